"""Study 05a's crossed design on hand-made inputs (no model files): the two-way RSA bootstrap, the BCa rule (an
interval never excludes its estimate, in tests and in the committed metrics of both models), the contrasts
(difference-in-differences, block mean, Holm), layers by relative depth, and the topic-matched control prompts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats as sps

from persona_wm.analysis import geometry, stats
from persona_wm.core.files import REPO_ROOT
from persona_wm.llm import controls
from persona_wm.llm.personas import ANCHOR, PERSONAS
from persona_wm.plots.persona import plot_crossed
from persona_wm.studies import llm_persona_geometry as geo

#: Every committed run of study 05a (default SmolLM2, Gemma-3-270M, and any other params' outputs).
METRICS = sorted(p for p in (REPO_ROOT / "outputs").glob("05a_llm_persona_geometry*/metrics.json")
                 if not p.parent.name.endswith("_smoke"))  # smoke outputs are git-ignored scratch


# --------------------------------------------------------------------------------------------
# Intervals contain their estimates


def _intervals(node, path=""):
    """Yield (path, estimate, low, high) for every interval in a metrics tree (elementwise for lists)."""
    if isinstance(node, dict):
        if {"estimate", "ci_low", "ci_high"} <= set(node):
            yield path, node["estimate"], node["ci_low"], node["ci_high"]
        if {"rho_by_layer", "ci_low", "ci_high"} <= set(node):
            yield path, node["rho_by_layer"], node["ci_low"], node["ci_high"]
        if {"difference", "ci"} <= set(node) and node["difference"] is not None:
            yield path, node["difference"], node["ci"][0], node["ci"][1]
        for key, value in node.items():
            yield from _intervals(value, f"{path}.{key}" if path else key)


def _excluded(estimate, low, high) -> list[int]:
    est, lo, hi = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (estimate, low, high))
    finite = np.isfinite(est) & np.isfinite(lo) & np.isfinite(hi)
    return [int(i) for i in np.flatnonzero(finite & ((est < lo - 1e-12) | (est > hi + 1e-12)))]


@pytest.mark.parametrize("path", METRICS, ids=[p.parent.name for p in METRICS])
def test_committed_05a_intervals_contain_their_estimates(path: Path) -> None:
    """Fails when any interval of a committed 05a run excludes its own point estimate."""
    metrics = json.loads(path.read_text())
    found = list(_intervals(metrics))
    assert any(p.startswith("crossed.did_block") for p, *_ in found), "no crossed.did_block interval in the metrics"
    bad = {p: _excluded(e, lo, hi) for p, e, lo, hi in found if _excluded(e, lo, hi)}
    assert not bad, f"{path.parent.name}: intervals exclude their estimate at {bad}"


def test_the_interval_check_itself_catches_an_excluded_estimate() -> None:
    tree = {"crossed": {"did_block": {"estimate": 0.27, "ci_low": 0.239, "ci_high": 0.259}}}
    (path, e, lo, hi), = _intervals(tree)
    assert path == "crossed.did_block" and _excluded(e, lo, hi) == [0]


def test_checked_bootstrap_falls_back_to_percentile_where_bca_excludes_the_estimate(monkeypatch) -> None:
    real = sps.bootstrap

    def shifted(*args, **kwargs):  # BCa as the issue saw it: a finite interval beside its estimate
        res = real(*args, **kwargs)
        low, high = np.array(res.confidence_interval.low), np.array(res.confidence_interval.high)
        low[0], high[0] = low[0] + 10, high[0] + 10
        return SimpleNamespace(confidence_interval=SimpleNamespace(low=low, high=high),
                               bootstrap_distribution=res.bootstrap_distribution)

    monkeypatch.setattr(stats.sps, "bootstrap", shifted)
    x = np.random.default_rng(0).normal(size=30)
    out = stats.checked_bootstrap((x,), lambda v: np.array([np.mean(v), np.median(v)]), 500, seed=0)
    assert out.method.tolist() == [1, 0]  # percentile for the shifted element, BCa kept for the other
    assert out.low[0] <= out.estimate[0] <= out.high[0] and out.high[0] < 5
    assert out.counts() == {"BCa": 1, "percentile": 1, "percentile, widened to the estimate": 0}


def test_checked_bootstrap_widens_when_percentile_misses_too() -> None:
    # the number of distinct values: every resample has fewer, so BCa is undefined and the percentile misses
    x = np.arange(12.0)
    out = stats.checked_bootstrap((x,), lambda v: float(len(np.unique(v))), 300, seed=0)
    assert out.method.tolist() == [2] and out.high[0] == out.estimate[0] == 12


@pytest.mark.parametrize("seed", range(5))
def test_checked_bootstrap_intervals_always_contain_the_estimate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=8), rng.exponential(size=6)
    out = stats.checked_bootstrap((a, b), lambda u, v: np.array([np.mean(u) - np.mean(v), np.max(u), np.std(v)]),
                                  300, seed=seed)
    assert np.all(out.low <= out.estimate) and np.all(out.estimate <= out.high)


def test_centred_bootstrap_p_and_holm() -> None:
    rng = np.random.default_rng(0)
    dist = np.stack([rng.normal(1.0, 0.1, 999), rng.normal(0.0, 0.1, 999)])
    p = stats.centred_bootstrap_p(dist, np.array([1.0, 0.0]))
    assert p[0] == pytest.approx(1 / 1000) and p[1] > 0.9
    adjusted, reject = stats.holm([0.01, 0.02, 0.5])
    assert adjusted.tolist() == pytest.approx([0.03, 0.04, 0.5]) and reject.tolist() == [True, True, False]


# --------------------------------------------------------------------------------------------
# The two-way RSA bootstrap


def _cell(rng, n_u=5, n_p=6, n_l=3, d=8, signal=1.0):
    base = rng.normal(size=(n_p, n_l, d))
    means = base[None] * signal + rng.normal(size=(n_u, n_p, n_l, d))
    js = np.abs(rng.normal(size=(n_u, n_p, n_p)))
    js = (js + js.transpose(0, 2, 1)) / 2
    return means, js


def test_crossed_rsa_of_the_full_draw_is_the_plain_rsa() -> None:
    means, js = _cell(np.random.default_rng(0))
    gram = geometry.PromptGram.of(means, js)
    rho = geometry.crossed_rsa([gram], np.arange(5), np.arange(6))[0]
    plain = [geometry.rsa(geometry.cosine_distance_matrix(means.mean(0)[:, k]), js.mean(0)) for k in range(3)]
    assert rho == pytest.approx(plain, abs=1e-12)


def test_crossed_rsa_weights_users_and_drops_self_pairs() -> None:
    means, js = _cell(np.random.default_rng(1))
    gram = geometry.PromptGram.of(means, js)
    users, systems = np.array([0, 0, 3, 4, 4]), np.array([1, 1, 2, 5, 0, 2])
    rho = geometry.crossed_rsa([gram], users, systems)[0]
    cent, jsm = means[users].mean(0), js[users].mean(0)
    a, b = np.triu_indices(6, k=1)
    keep = systems[a] != systems[b]
    i, j = systems[a[keep]], systems[b[keep]]
    for k in range(3):
        cos = geometry.cosine_distance_matrix(cent[:, k])
        assert rho[k] == pytest.approx(sps.spearmanr(cos[i, j], jsm[i, j]).statistic, abs=1e-12)


def test_contrasts_build_the_difference_in_differences_and_its_block_mean() -> None:
    layers, block = [5, 10, 15], [10, 15]
    matrix, series = geo._contrasts(["trained", "reinit"], layers, block)
    cells = {f"cell:{w}/{ps}": np.array(v) for (w, ps), v in {
        ("trained", "persona"): [0.9, 0.8, 0.7], ("trained", "formatting"): [0.5, 0.5, 0.5],
        ("trained", "topic"): [0.6, 0.6, 0.6], ("reinit", "persona"): [0.4, 0.4, 0.4],
        ("reinit", "formatting"): [0.3, 0.3, 0.3], ("reinit", "topic"): [0.2, 0.2, 0.2]}.items()}
    order = [f"cell:{w}/{ps}" for w in ("trained", "reinit") for ps in geo.PROMPT_SETS] + ["system_tokens"]
    out = matrix @ np.concatenate([cells.get(k, np.zeros(3)) for k in order])
    trained_gap = cells["cell:trained/persona"] - (cells["cell:trained/formatting"] + cells["cell:trained/topic"]) / 2
    random_gap = cells["cell:reinit/persona"] - (cells["cell:reinit/formatting"] + cells["cell:reinit/topic"]) / 2
    assert out[series["did"]] == pytest.approx(trained_gap - random_gap)
    assert out[series["persona_minus_control"]] == pytest.approx(trained_gap)
    assert out[series["did_block"]] == pytest.approx([np.mean((trained_gap - random_gap)[1:])])
    assert out[series["did:reinit/topic"]] == pytest.approx(
        cells["cell:trained/persona"] - cells["cell:reinit/persona"] - cells["cell:trained/topic"] + cells["cell:reinit/topic"])


def _crossed(did=(0.3, 0.2, 0.01), low=(0.2, 0.1, -0.05), high=(0.4, 0.3, 0.06)) -> geo.Crossed:
    layers, block = [5, 10, 15], [10, 15]
    matrix, series = geo._contrasts(["trained", "reinit"], layers, block)
    n = matrix.shape[0]
    est, lo, hi = np.zeros(n), -np.ones(n), np.ones(n)
    est[series["did"]], lo[series["did"]], hi[series["did"]] = did, low, high
    est[series["did_block"]], lo[series["did_block"]], hi[series["did_block"]] = 0.1, 0.02, 0.2
    rng = np.random.default_rng(0)
    dist = est[:, None] + rng.normal(0, 0.05, size=(n, 999))
    intervals = stats.CheckedIntervals(est, lo, hi, np.zeros(n, dtype=int), dist)
    return geo.Crossed([0, 1], {}, ["reinit"], layers, block, 999, series, intervals)


def test_crossed_result_reports_block_holm_and_verdict() -> None:
    crossed = _crossed()
    assert crossed.block() == {"estimate": 0.1, "ci_low": 0.02, "ci_high": 0.2, "ci_method": "BCa", "block": [10, 15]}
    assert crossed.block_excludes_zero and crossed.verdict.startswith("a persona-specific residue")
    assert crossed.holm_layers == [5, 10]  # 0.3 and 0.2 are 6 and 4 bootstrap s.d. from 0; 0.01 is not
    frame = crossed.did_frame()
    assert frame["in_block"].tolist() == [False, True, True] and (frame["holm_p"] >= frame["p"]).all()
    fig, axes = plt.subplots(1, 2)
    plot_crossed(crossed.cells_frame(), frame, crossed.block_layers, "tiny model", 15, axes)
    assert all(ax.get_xlabel() == "tiny model layer (of 15)" and ax.get_ylabel() for ax in axes)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Layers by relative depth


def test_relative_layers_resolve_against_each_models_depth() -> None:
    assert geometry.relative_layers([0.2, 0.37, 0.53, 0.7, 0.9], 30) == [6, 11, 16, 21, 27]
    assert geometry.relative_layers([0.2, 0.37, 0.53, 0.7, 0.9], 18) == [4, 7, 10, 13, 16]
    assert geometry.relative_layers(None, 4) == [1, 2, 3, 4]
    assert geometry.relative_layers([0.01], 18) == [1]


def test_layer_plan_resolves_the_block_and_names_the_bad_field() -> None:
    plan = geo.layer_plan(18, None, 0.7, 0.7, 1.0)
    assert plan.steer_layer == 13 and plan.block_layers == [13, 14, 15, 16, 17, 18]
    assert plan.as_dict()["block"] == {"relative": [0.7, 1.0], "layers": [13, 14, 15, 16, 17, 18]}
    with pytest.raises(ValueError, match="^layers: relative depth 1.5"):
        geo.layer_plan(30, [0.5, 1.5], 0.7, 0.7, 1.0)
    with pytest.raises(ValueError, match="^steer_layer:"):
        geo.layer_plan(30, None, 0.0, 0.7, 1.0)
    with pytest.raises(ValueError, match="^block_start, block_end: no measured layer"):
        geo.layer_plan(30, [0.2, 0.5], 0.7, 0.7, 1.0)


# --------------------------------------------------------------------------------------------
# Control prompts


def test_topic_controls_cover_every_persona_without_naming_it() -> None:
    names = [n for n in PERSONAS if n != ANCHOR]
    assert set(controls.TOPIC_POOLS) == set(names)
    for name, pool in controls.TOPIC_POOLS.items():
        text = " ".join(pool).lower()
        assert "you are" not in text and "you " not in text, name
        occupation = name.replace("_", " ")
        assert occupation not in text, f"{name}: its topic control names the occupation"
    words = lambda text: [len(w) for w in text.split()]  # noqa: E731  a whitespace "tokenizer" for the test
    out = controls.topic_matched_controls(words, ["poet", "surgeon"], ["one two three four five", "a b c d"])
    assert [len(o.split()) for o in out] == [5, 4]
    with pytest.raises(controls.LLMError, match="no topic-matched control prompt for persona"):
        controls.topic_matched_controls(words, ["astronaut"], ["x"])


def test_an_optional_model_alias_without_its_package_names_the_install_step(monkeypatch) -> None:
    from persona_wm.llm import loading

    monkeypatch.setitem(loading.OPTIONAL_GGUF, "no-such-model", "persona_wm_no_such_package")
    with pytest.raises(loading.LLMError, match="requirements-acceptance.txt"):
        loading.load_llm(model="no-such-model", device="cpu")


#: The committed runs the README's 05a table shows, by column title.
README_RUNS = {"SmolLM2-135M-Instruct": "05a_llm_persona_geometry", "Gemma-3-270M (base)": "05a_llm_persona_geometry_gemma3_270m"}


def test_readme_05a_table_is_built_from_both_committed_metrics() -> None:
    """The README's side-by-side table is ``models_table`` of the committed metrics.json files, character for
    character (regenerate it with the command in the README's 05a section after a rerun)."""
    paths = {title: REPO_ROOT / "outputs" / folder / "metrics.json" for title, folder in README_RUNS.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    assert not missing, f"committed 05a metrics missing: {missing}"
    table = geo.models_table({title: json.loads(p.read_text()) for title, p in paths.items()})
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### 05a"):readme.index("### 05b")]
    assert table in section, "README's 05a table differs from models_table(committed metrics):\n" + table
