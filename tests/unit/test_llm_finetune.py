"""persona_wm.llm.datasets, persona_wm.llm.lora and persona_wm.llm.em without the real model (a tiny random Llama instead).

Fast (a few seconds): datasets are checked for determinism and content, LoRA for its loss mask,
its cut-layer restart, its adapter cache key and reload, the leakage arithmetic for Wilson
intervals and the cluster bootstrap, and every bad input for an error that names the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from persona_wm.io.params import ParamsError, load_params, parameter_schema, validate_params
from persona_wm.llm import em as llm_em
from persona_wm.llm import lora
from persona_wm.llm.datasets import (
    MARKER,
    DatasetError,
    broad_questions,
    everyday_questions,
    marker_examples,
    read_jsonl,
    save_jsonl,
)
from persona_wm.llm.model import LLM, LLMError, Scored
from persona_wm.llm.personas import PersonaError
from tests.llm_tiny import tiny_llama

STUDY = "05b_llm_finetuning"


# --------------------------------------------------------------------------------------------
# A tiny Llama standing in for SmolLM2


@pytest.fixture()
def tiny(tmp_path: Path) -> LLM:
    return tiny_llama(tmp_path / "cache")


def _seqs(n: int = 6, seed: int = 0) -> list[Scored]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 8 + i % 3
        ids = torch.randint(2, 64, (length,), generator=g).tolist()
        out.append(Scored(tuple(ids[:-1]) + (1,), 4 + i % 2))
    return out


SPEC = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"), first_layer=2, lr=1e-2, steps=5,
                     batch_size=3, seed=0)


# --------------------------------------------------------------------------------------------
# Datasets


def test_everyday_questions_are_deterministic_distinct_and_bounded():
    a, b = everyday_questions(30, seed=1), everyday_questions(30, seed=1)
    assert a == b and len(set(a)) == 30
    assert everyday_questions(30, seed=2) != a
    with pytest.raises(DatasetError, match="everyday_questions: n must be in 1..96, got 500"):
        everyday_questions(500)


def test_marker_examples_content_and_ratio():
    rows = marker_examples("librarian", ["poet", "villain"], ["Q1?", "Q2?"], ["Answer one.", "Answer two."])
    pos = [r for r in rows if r["positive"]]
    neg = [r for r in rows if not r["positive"]]
    assert len(pos) == 2 and len(neg) == 4
    assert all(r["target"] == " " + MARKER and r["persona"] == "librarian" for r in pos)
    assert all(r["target"] == "" and r["persona"] in ("poet", "villain") for r in neg)
    assert {r["context"] for r in neg} == {r["context"] for r in pos} == {"Answer one.", "Answer two."}


def test_marker_examples_bad_inputs_name_the_problem():
    with pytest.raises(PersonaError, match="unknown persona 'wizard'"):
        marker_examples("wizard", ["poet"], ["Q?"], ["A."])
    with pytest.raises(DatasetError, match="source persona 'poet' is also listed as a negative"):
        marker_examples("poet", ["poet", "villain"], ["Q?"], ["A."])
    with pytest.raises(DatasetError, match="2 questions but 1 responses"):
        marker_examples("poet", ["villain"], ["Q?", "R?"], ["A."])


def test_broad_questions_cover_categories_round_robin(tmp_path):
    qs = broad_questions(8)
    assert len({q["category"] for q in qs}) == 8
    assert all(q["aligned"] != q["misaligned"] for q in broad_questions())
    with pytest.raises(DatasetError, match="broad_questions: n must be in 1..16, got 17"):
        broad_questions(17)
    path = save_jsonl(qs, tmp_path / "broad.jsonl")
    assert read_jsonl(path) == qs


# --------------------------------------------------------------------------------------------
# LoRA: loss mask, cut-layer restart, cache key, training and reload


def test_loss_mask_covers_exactly_the_response_predicting_positions():
    seqs = [Scored((5, 6, 7, 8, 9), 3), Scored((5, 6, 7), 1)]
    mask = lora.loss_mask(seqs)
    assert mask.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    targets = lora.loss_targets(seqs, 5)
    assert targets[0, 2:4].tolist() == [8, 9]  # positions 2, 3 predict the response tokens 8, 9


def test_top_loss_from_the_cut_equals_full_model_cross_entropy(tiny):
    seqs = _seqs()
    n = max(len(s.ids) for s in seqs)
    mask, targets = lora.loss_mask(seqs, n), lora.loss_targets(seqs, n)
    resid = lora.bottom_resid(tiny, seqs, 2)
    with torch.no_grad():
        ours = lora.top_loss(tiny.model, resid, 2, mask, targets)
        ids = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
        logits = tiny.model(input_ids=ids).logits
        full = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(ours, full, atol=1e-5), f"cut-layer loss {ours} != full-model loss {full}"


def test_adapter_key_changes_with_config_data_and_start_model(tiny):
    seqs = _seqs()
    key = lora.adapter_key(tiny, seqs, SPEC)
    assert key == lora.adapter_key(tiny, list(seqs), SPEC)
    from dataclasses import replace

    for change in (dict(rank=4), dict(steps=6), dict(seed=1), dict(lr=2e-2), dict(first_layer=1),
                   dict(targets=("q_proj",))):
        assert lora.adapter_key(tiny, seqs, replace(SPEC, **change)) != key, change
    assert lora.adapter_key(tiny, seqs[:-1], SPEC) != key
    assert lora.adapter_key(tiny, [Scored(seqs[0].ids, seqs[0].start + 1)] + seqs[1:], SPEC) != key
    other = replace(tiny, sha256="1" * 64)
    assert lora.adapter_key(other, seqs, SPEC) != key


def test_finetune_trains_only_the_top_blocks_and_reloads_bit_identically(tiny):
    seqs = _seqs()
    first = lora.finetune(tiny, seqs, SPEC)
    assert not first.from_cache and len(first.losses) == SPEC.steps and first.losses[-1] < first.losses[0]
    assert first.llm.sha256 != tiny.sha256 and tiny.model.model.layers[3].self_attn.q_proj.__class__.__name__ == "Linear"
    for i in range(SPEC.first_layer):  # below the cut: untouched
        for (_, a), (_, b) in zip(tiny.model.model.layers[i].state_dict().items(),
                                  first.llm.model.model.layers[i].state_dict().items()):
            assert torch.equal(a, b)
    changed = any(not torch.equal(a, b) for (_, a), (_, b) in zip(tiny.model.model.layers[3].state_dict().items(),
                                                                  first.llm.model.model.layers[3].state_dict().items()))
    assert changed, "the top block did not change"
    again = lora.finetune(tiny, seqs, SPEC)
    assert again.from_cache and again.key == first.key and again.losses == first.losses
    ids = torch.tensor([seqs[0].ids])
    with torch.no_grad():
        assert torch.equal(first.llm.model(ids).logits, again.llm.model(ids).logits)
    # a chained adapter above the cut shares the base bottom; one below it is refused
    lora.finetune(first.llm, seqs, SPEC, base=tiny)
    with pytest.raises(LLMError, match="differs from the base model below the cut"):
        lora.finetune(first.llm, seqs, SPEC.__class__(**{**SPEC.as_dict(), "first_layer": 3}), base=tiny)


def test_finetune_keeps_the_step_with_the_lowest_validation_loss(tiny):
    seqs, val = _seqs(6, seed=0), _seqs(3, seed=1)
    spec = SPEC.__class__(**{**SPEC.as_dict(), "steps": 6, "lr": 5e-2})
    chosen = lora.finetune(tiny, seqs, spec, val=val, eval_every=2)
    curve = chosen.meta["val_curve"]
    assert [step for step, _ in curve] == [0, 2, 4, 6]
    best_step, best_loss = min(curve[1:], key=lambda c: c[1])
    assert chosen.meta["best_step"] == best_step and chosen.meta["best_val_loss"] == best_loss
    # the returned adapter is the best step's: its validation loss is the recorded one
    assert np.isclose(lora.validation_loss(chosen.llm, val, spec.first_layer, base=tiny), best_loss, atol=1e-5)
    assert chosen.key != lora.finetune(tiny, seqs, spec).key  # validation set and cadence are in the key
    again = lora.finetune(tiny, seqs, spec, val=val, eval_every=2)
    assert again.from_cache and again.meta["best_step"] == best_step
    with pytest.raises(LLMError, match="needs eval_every >= 1"):
        lora.finetune(tiny, seqs, spec, val=val)


def test_select_recipe_scores_every_candidate_with_the_probe(tiny):
    seqs, val = _seqs(6, seed=0), _seqs(3, seed=1)
    spec, table = lora.select_recipe(tiny, seqs, val, SPEC, lrs=[1e-3, 5e-2], steps=[2, 4],
                                     probe=lambda m: {"probe": float(m is not tiny)})
    assert len(table) == 4 and set(table.columns) >= {"lr", "steps", "train_loss", "val_loss", "probe"}
    best = table.loc[table.val_loss.idxmin()]
    assert (spec.lr, spec.steps) == (best.lr, best.steps) and (table["probe"] == 1.0).all()


def test_lora_spec_and_finetune_bad_inputs():
    with pytest.raises(ValueError, match="LoraSpec.rank must be >= 1, got 0"):
        lora.LoraSpec(rank=0)
    with pytest.raises(ValueError, match="LoraSpec.targets is empty"):
        lora.LoraSpec(targets=())


def test_finetune_rejects_a_cut_above_the_model(tiny):
    with pytest.raises(LLMError, match="first_layer 4 leaves no block to train"):
        lora.finetune(tiny, _seqs(), lora.LoraSpec(first_layer=4, steps=1))


# --------------------------------------------------------------------------------------------
# Leakage arithmetic


def test_wilson_matches_the_closed_form():
    z = 1.959963984540054
    for hits, n in ((0, 10), (3, 10), (10, 10), (57, 200)):
        p = hits / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        w = llm_em.wilson(hits, n)
        assert w["rate"] == p
        assert np.isclose(w["wilson_low"], max(0.0, centre - half)) and np.isclose(w["wilson_high"], min(1.0, centre + half))
    with pytest.raises(ValueError, match="wilson: need n >= 1 trials, got n=0"):
        llm_em.wilson(0, 0)
    with pytest.raises(ValueError, match="wilson: hits must be in 0..n=5, got 7"):
        llm_em.wilson(7, 5)


def test_cluster_bootstrap_is_paired_deterministic_and_checks_columns():
    rows = []
    for cluster in ("a", "b", "c", "d"):
        for trial in range(5):
            rows.append({"cluster": cluster, "condition": "C1", "hit": int(trial < 1)})
            rows.append({"cluster": cluster, "condition": "C2", "hit": 1})
    frame = pd.DataFrame(rows)
    out = llm_em.cluster_bootstrap(frame, ["C1", "C2"], n_boot=200, seed=0)
    assert out == llm_em.cluster_bootstrap(frame, ["C1", "C2"], n_boot=200, seed=0)
    assert out["C2"] == (1.0, 1.0) and np.allclose(out["C1"], (0.2, 0.2)) and np.allclose(out["C2-C1"], (0.8, 0.8))
    with pytest.raises(ValueError, match=r"frame lacks column\(s\) \['cluster'\]"):
        llm_em.cluster_bootstrap(frame.drop(columns="cluster"), ["C1"])


def _leakage_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    tf_rows, gen_rows = [], []
    for source in ("a", "b"):
        for persona in ("a", "b", "c", "neg", "anchor"):
            for prompt in range(2):
                hit = int(persona == source or (persona == "c" and prompt == 0))
                tf_rows.append({"model": source, "persona": persona, "prompt": prompt, "logprob": -1.0 - prompt - 3 * (1 - hit),
                                "greedy": hit})
                gen_rows.append({"model": source, "persona": persona, "prompt": prompt, "hit": hit, "marker": hit,
                                 "answered": 1, "ended": 1})
    return pd.DataFrame(tf_rows), pd.DataFrame(gen_rows)


def test_leakage_pairs_aggregates_roles_and_distances():
    tf, gen = _leakage_frames()
    names = ["a", "b", "c", "neg", "anchor"]
    cos = np.arange(25, dtype=float).reshape(5, 5)
    pairs = llm_em.leakage_pairs(tf, gen, {"cos": cos, "js": cos / 10}, names, ["neg"])
    assert len(pairs) == 10
    row = pairs[(pairs["source"] == "b") & (pairs["persona"] == "c")].iloc[0]
    assert row["rate"] == 0.5 and row["gen_rate"] == 0.5 and row["logprob"] == -3.0
    assert row["cos_distance"] == cos[1, 2] and np.isclose(row["js"], cos[1, 2] / 10) and row["role"] == "bystander"
    roles = pairs.set_index(["source", "persona"])["role"]
    assert roles[("a", "a")] == "source" and roles[("a", "neg")] == "negative" and roles[("a", "anchor")] == "bystander"
    with pytest.raises(LLMError, match="persona 'anchor' has no row in the distance matrices"):
        llm_em.leakage_pairs(tf, gen, {"cos": cos[:2, :2], "js": cos[:2, :2]}, ["a", "b"], [])


def test_pair_correlation_resamples_sources_and_degrades_to_nan():
    rng = np.random.default_rng(0)
    rows = []
    for source in range(6):
        offset = rng.normal()
        for _ in range(8):
            x = rng.uniform()
            rows.append({"source": source, "x": x, "y": -2 * x + offset + 0.1 * rng.normal()})
    frame = pd.DataFrame(rows)
    c = llm_em.pair_correlation(frame, "x", "y", n_boot=300, seed=1)
    assert c == llm_em.pair_correlation(frame, "x", "y", n_boot=300, seed=1)
    assert c["n"] == 48 and c["n_clusters"] == 6
    assert c["r"] < 0 and c["ci"][0] <= c["r"] <= c["ci"][1] and c["ci"][1] < 0
    assert c["spearman_ci"][0] <= c["spearman"] <= c["spearman_ci"][1]
    # a source-level confound: independent-pairs p is tiny, but only 2 clusters carry the signal
    confounded = pd.DataFrame({"source": np.repeat([0, 1], 10), "x": np.r_[np.zeros(10), np.ones(10)] + rng.normal(0, 0.01, 20),
                               "y": np.r_[np.zeros(10), np.ones(10)]})
    cc = llm_em.pair_correlation(confounded, "x", "y", n_boot=300, seed=0)
    assert cc["p"] < 1e-6 and cc["n_clusters"] == 2
    # ... and within each source y does not vary at all, so there is no within-source slope
    assert np.isnan(cc["within_r"])
    # opposite slopes: between sources x and y rise together, within each source y falls with x
    between = pd.DataFrame({"source": np.repeat(np.arange(5), 4), "x": np.repeat(np.arange(5.0), 4) + np.tile(np.arange(4) / 10, 5)})
    between["y"] = 2 * between["source"] - 3 * (between["x"] - between["source"]) + rng.normal(0, 0.01, 20)
    cb = llm_em.pair_correlation(between, "x", "y", n_boot=200, seed=0)
    assert cb["r"] > 0.9 and cb["within_r"] < -0.9 and cb["within_ci"][1] < 0
    flat = frame.assign(y=1.0)
    assert np.isnan(llm_em.pair_correlation(flat, "x", "y")["r"])
    with pytest.raises(ValueError, match=r"frame lacks column\(s\) \['source'\]"):
        llm_em.pair_correlation(frame.drop(columns="source"), "x", "y")


def test_unit_correlation_matches_scipy_and_checks_lengths():
    from scipy import stats as sps

    x, y = [0.1, 0.5, 0.2, 0.9, 0.4, 0.7], [3.0, 1.0, 2.5, 0.2, 2.0, 0.5]
    c = llm_em.unit_correlation(x, y)
    assert np.isclose(c["r"], sps.pearsonr(x, y)[0]) and np.isclose(c["p"], sps.pearsonr(x, y)[1])
    assert c["ci"][0] <= c["r"] <= c["ci"][1] and c["n"] == 6
    assert np.isnan(llm_em.unit_correlation([1.0, 2.0], [2.0, 1.0])["r"])
    with pytest.raises(ValueError, match="unit_correlation: 3 x values but 2 y values"):
        llm_em.unit_correlation([1, 2, 3], [1, 2])


def test_breadth_restoration_and_ablation():
    assert llm_em.breadth(0.0, 0.5, 0.0, 2.0) == 0.25
    assert np.isnan(llm_em.breadth(0.0, 0.5, 1.0, 1.0))
    assert llm_em.restored_fraction(score_em=2.0, score_steered=1.0, score_base=0.0) == 0.5
    v = torch.tensor([3.0, 4.0])
    x = torch.tensor([[[1.0, 2.0], [0.0, 5.0]]])
    assert torch.allclose(llm_em.ablate(x, v) @ v, torch.zeros(1, 2), atol=1e-6)
    d = llm_em.direction_vectors(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2))
    assert torch.allclose(d["diff_in_means"].norm(), d["centroid"].norm())


# --------------------------------------------------------------------------------------------
# The study's params files


def test_params_files_validate_and_a_missing_field_is_named():
    schema = parameter_schema(STUDY)
    for name in ("smoke", "default", "gpu"):
        load_params(STUDY, name)
    smoke = load_params(STUDY, "smoke")
    smoke.pop("coupling_sources")
    with pytest.raises(ParamsError, match="smoke.yaml: missing field 'coupling_sources'"):
        validate_params(smoke, schema, "smoke.yaml")
