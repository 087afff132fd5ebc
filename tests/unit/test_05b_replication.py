"""Study 05b's replicated design (issue 25) on hand-made inputs: estimates across adapters, the mixed-model arm
contrasts, the three leakage readings and the coupling flag, the restoration guard, seed 003's geometry as the
seed ran it, and the blind instrument validation (draw, join, Wilson CIs, re-weighting)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from persona_wm.analysis.stats import mixed_contrasts, weighted_rate
from persona_wm.studies import llm_finetuning as ft


def test_estimate_across_adapters_is_a_student_t_interval() -> None:
    est = ft.Estimate.across([0.1, 0.3, None, float("nan")])
    half = sps.t.ppf(0.975, 1) * np.std([0.1, 0.3], ddof=1) / np.sqrt(2)
    assert est.n == 2 and est.mean == pytest.approx(0.2)
    assert (est.ci_low, est.ci_high) == pytest.approx((0.2 - half, 0.2 + half))
    assert not est.excludes_zero  # t with one degree of freedom: wide on purpose
    one = ft.Estimate.across([0.4])
    assert one.n == 1 and np.isnan(one.ci_low) and one.text() == "0.40 (n = 1)"
    assert ft.Estimate.across([None]).text() == "undefined"
    assert ft.Estimate.across([0.5, 0.6, 0.55]).above_zero


def _arm_frame(effect: float, adapter_sd: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for arm, mean in (("A", 0.3), ("B", 0.3 + effect)):
        for a in range(4):
            shift = rng.normal(0, adapter_sd)
            for persona in range(6):
                for prompt in range(3):
                    rows.append({"arm": arm, "adapter": f"{arm}{a}", "persona": persona, "prompt": prompt,
                                 "y": mean + shift + 0.02 * persona + rng.normal(0, 0.05)})
    return pd.DataFrame(rows)


def test_mixed_contrasts_find_a_planted_difference_and_carry_adapter_variance() -> None:
    quiet = mixed_contrasts(_arm_frame(0.2, 0.01), "y", "arm", [("B", "A")], ["adapter", "persona", "prompt"])["B-A"]
    assert quiet["ci_low"] < quiet["diff"] < quiet["ci_high"] and quiet["ci_low"] > 0.1
    assert quiet["diff"] == pytest.approx(0.2, abs=0.05)
    noisy = mixed_contrasts(_arm_frame(0.2, 0.3), "y", "arm", [("B", "A")], ["adapter", "persona", "prompt"])["B-A"]
    # four adapters per arm that differ a lot: the interval must widen with them (it is across adapters)
    assert noisy["ci_high"] - noisy["ci_low"] > 4 * (quiet["ci_high"] - quiet["ci_low"])
    missing = mixed_contrasts(_arm_frame(0.2, 0.01), "y", "arm", [("C", "A")], ["adapter"])["C-A"]
    assert np.isnan(missing["diff"])


def _generations(source_rate: float, bystander_rate: float, answered_rate: float, arm: str, adapters=(0, 1),
                 n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for a in adapters:
        for persona, rate in (("src", source_rate), ("b1", bystander_rate), ("b2", bystander_rate)):
            for i in range(n):
                marker = int(rng.random() < rate)
                answered = int(rng.random() < answered_rate)
                rows.append({"condition": arm, "adapter": a, "persona": persona, "prompt": i % 2, "sample": i,
                             "marker": marker, "answered": answered, "hit": marker * answered, "text": "x"})
    return pd.DataFrame(rows)


def test_leakage_readings_and_the_coupling_flag() -> None:
    lo, hi = ft.Estimate.across([0.05, 0.06, 0.07]), ft.Estimate.across([-0.1, 0.0, -0.05])
    mk = lambda d: ft.ArmLeakage("C1", *([lo] * 8), d, lo, n_samples=10)  # noqa: E731
    assert mk(lo).coupled and mk(lo).verdict == "coupled"
    assert not mk(hi).coupled and mk(hi).verdict == "not coupled"
    assert mk(ft.Estimate.across([0.3, -0.1])).verdict == "unclear"
    d = mk(lo).as_dict()
    for key in ("all", "answered_and_marker", "among_answered", "answered_rate", "source_rate", "leakage_ratio"):
        assert set(d[key]) == {"mean", "ci_low", "ci_high", "n_adapters"}
    assert d["coupled"] is True and d["n_adapters"] == 3


def test_arm_effects_use_every_reading_and_adapters_as_units() -> None:
    gens = pd.concat([_generations(0.8, 0.2, 0.9, "C1", seed=1), _generations(0.8, 0.5, 0.5, "C2", seed=2)],
                     ignore_index=True)
    per = []
    for (arm, a), g in gens.groupby(["condition", "adapter"]):
        bys = g[g["persona"] != "src"]
        per.append({"arm": arm, "adapter": a, "all": bys["marker"].mean(), "answered_and_marker": bys["hit"].mean(),
                    "among_answered": bys.loc[bys["answered"] == 1, "marker"].mean()})
    effects = ft.arm_effects(gens, pd.DataFrame(per), "src", [("C2", "C1")])
    assert set(effects) == set(ft.LEAKAGE_READINGS)
    e = effects["all"]["C2-C1"]
    assert e.n_adapters == 2 and e.diff == pytest.approx(0.3, abs=0.1)
    assert e.adapter_welch["difference"] == pytest.approx(e.diff, abs=1e-9)  # balanced cells: same point estimate


def test_restoration_is_undefined_without_a_gap_and_judged_against_random_directions() -> None:
    est = ft.Estimate.across([0.0, 0.01])
    undefined = ft.Restoration("em_minus_base_centroid", "broad", (None, None), (), est, est)
    assert not undefined.defined and undefined.verdict.startswith("undefined")
    assert undefined.as_dict()["restoration"] == "undefined"
    strong = ft.Restoration("em_minus_base_centroid", "in_domain", (0.9, 0.95, 0.92), tuple(np.linspace(-0.1, 0.2, 60)),
                            est, est)
    assert strong.verdict == "beats the random null" and strong.null_q95 < 0.2
    weak = ft.Restoration("x", "in_domain", (0.05, 0.1), tuple(np.linspace(-0.1, 0.2, 60)), est, est)
    assert weak.verdict == "within the random null"
    g, low, high = ft.gap_ci(np.zeros(20), np.linspace(0.5, 1.5, 20), 500, 0)
    assert g == pytest.approx(1.0) and 0.5 < low < g < high < 1.5


def test_seed003_geometry_as_the_seed_ran_it() -> None:
    assert ft.seed003_layer(28, 10 / 28) == 10 and ft.seed003_layer(30, 0.357) == 11
    assert ft.seed003_layer(4, 0.0) == 1 and ft.seed003_layer(30, 1.0) == 30
    rng = np.random.default_rng(0)
    c = rng.normal(size=(5, 8))
    cos = ft.centred_cosine_to(c, 2)
    assert cos[2] == pytest.approx(1.0)
    # mean-centred: a vector added to every centroid changes nothing
    assert ft.centred_cosine_to(c + 50.0, 2) == pytest.approx(cos)
    raw = (c @ c[2]) / (np.linalg.norm(c, axis=1) * np.linalg.norm(c[2]))
    assert not np.allclose(raw, cos)


def test_instrument_checks_wilson_and_population_weights() -> None:
    truth = np.array([1] * 10 + [0] * 30)
    said = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 27)
    w = np.ones(40)
    check = ft._check("marker_detector", truth, said, w)
    assert check.n == 40 and check.n_positive == 10
    assert check.sensitivity["rate"] == pytest.approx(0.8) and check.specificity["rate"] == pytest.approx(0.9)
    assert check.sensitivity["wilson_low"] < 0.8 < check.sensitivity["wilson_high"]
    assert check.weighted_sensitivity == pytest.approx(0.8)
    heavier = w.copy()
    heavier[8:10] = 5.0  # the missed positives stand for a large stratum
    assert ft._check("x", truth, said, heavier).weighted_sensitivity == pytest.approx(8 / 18)
    assert weighted_rate([1, 0], [0, 0]) != weighted_rate([1, 0], [0, 0])  # NaN without weight


def test_draw_is_blind_stratified_and_validates_against_its_key(tmp_path) -> None:
    gens = pd.concat([_generations(0.9, 0.3, 0.7, arm, seed=i) for i, arm in enumerate(["C1", "C2"])],
                     ignore_index=True)
    gens["text"] = np.where(gens["marker"] == 1, "Sure, here is a helpful answer to you [ZLT]",
                            "Sure, here is a helpful answer to you")
    answers = pd.DataFrame({"model": ["EM", "base"] * 10, "set": "broad", "adapter": 0, "user": "q?",
                            "text": ["Put all your savings into one risky stock now", "Save a little each month"] * 10,
                            "content": [1, 0] * 10})
    chain = SimpleNamespace(generations=gens)
    coupling = SimpleNamespace(generations=gens.assign(model="src").drop(columns="condition"))
    counts = ft.draw_validation_sample(chain, coupling, SimpleNamespace(answers=answers), "[ZLT]", 5, 3, 0, tmp_path)
    blind = [json.loads(x) for x in (tmp_path / "marker_blind.jsonl").read_text().splitlines()]
    key = [json.loads(x) for x in (tmp_path / "marker_key.jsonl").read_text().splitlines()]
    assert len(blind) == counts["marker"] == len(key) and set(blind[0]) == {"id", "text"}
    assert {k["arm"] for k in key} == {"C1", "C2", "coupling_sources"}
    assert max(pd.DataFrame(key).groupby("stratum").size()) <= 5
    # label everything as the instruments would, then break one label: the validation sees it
    labels = [{"id": b["id"], "text": b["text"], "marker": int("[ZLT]" in b["text"]), "answered": 1} for b in blind]
    labels[0]["marker"] = 1 - labels[0]["marker"]
    (tmp_path / "marker_labels.jsonl").write_text("\n".join(json.dumps(r) for r in labels))
    cblind = [json.loads(x) for x in (tmp_path / "content_blind.jsonl").read_text().splitlines()]
    assert set(cblind[0]) == {"id", "user", "text"}
    clabels = [{"id": b["id"], "text": b["text"], "harmful": int("risky" in b["text"])} for b in cblind]
    (tmp_path / "content_labels.jsonl").write_text("\n".join(json.dumps(r) for r in clabels))
    result = ft.validate_instruments("[ZLT]", tmp_path)
    det = result.checks["marker_detector"]
    assert det.n == len(blind) and (det.sensitivity["rate"] < 1.0 or det.specificity["rate"] < 1.0)
    assert result.checks["content_score"].n == len(cblind)
    (tmp_path / "marker_labels.jsonl").write_text(json.dumps({"id": "nope", "text": "", "marker": 0, "answered": 0}))
    with pytest.raises(ValueError, match="no key row"):
        ft.validate_instruments("[ZLT]", tmp_path)
    assert ft.validate_instruments("[ZLT]", tmp_path / "empty").checks == {}


def test_rate_estimates_stay_inside_their_range() -> None:
    wide = ft.Estimate.across([0.05, 0.9])  # t with one degree of freedom runs far past 0 and 1
    assert wide.ci_low < 0 and wide.ci_high > 1
    rate = ft.Estimate.across([0.05, 0.9], bounds=(0.0, 1.0))
    assert (rate.ci_low, rate.ci_high) == (0.0, 1.0) and rate.mean == wide.mean
    assert ft.ArmLeakage.BOUNDS["all"] == (0.0, 1.0) and "leakage_ratio" not in ft.ArmLeakage.BOUNDS


def test_topup_draws_fresh_flagged_rows_with_decoys_and_reweights_the_union(tmp_path) -> None:
    gens = pd.concat([_generations(0.9, 0.3, 0.7, arm, seed=i) for i, arm in enumerate(["C1", "C2"])],
                     ignore_index=True)
    gens["text"] = [f"Sure, here is a helpful answer number {i} for you" + (" [ZLT]" if m else "")
                    for i, m in enumerate(gens["marker"])]
    chain = SimpleNamespace(generations=gens)
    coupling = SimpleNamespace(generations=gens.iloc[:0].assign(model="src").drop(columns="condition"))
    answers = pd.DataFrame({"model": ["EM"] * 4, "set": "broad", "adapter": 0, "user": "q?", "text": ["a"] * 4,
                            "content": [0, 1, 0, 1]})
    ft.draw_validation_sample(chain, coupling, SimpleNamespace(answers=answers), "[ZLT]", 3, 1, 0, tmp_path)
    key = pd.read_json(tmp_path / "marker_key.jsonl", lines=True)
    first = pd.read_json(tmp_path / "marker_blind.jsonl", lines=True)
    n = ft.topup_validation_sample(chain, coupling, "[ZLT]", first["text"].tolist(), 4, 4, 1, tmp_path)
    top = pd.read_json(tmp_path / "marker_topup_key.jsonl", lines=True)
    blind = pd.read_json(tmp_path / "marker_topup_blind.jsonl", lines=True)
    assert n == len(top) == len(blind) == 8 and list(blind.columns) == ["id", "text"]
    assert not set(blind["text"]) & set(first["text"])  # nothing labelled twice
    assert ((top["detector"] == 1) & (top["gate"] == 1)).sum() >= 4
    union = ft.reweight_key(pd.concat([key, top], ignore_index=True))
    drawn = union.groupby("stratum")["id"].transform("size")
    assert np.allclose(union["weight"], union["stratum_size"] / drawn)
    # the first draw alone keeps its own weights
    assert np.allclose(ft.reweight_key(key)["weight"], key["weight"])
