"""Tests of the toy-transformer trainer, belief probes and belief-state steering.

Models here are tiny (d_model 16, a few steps) so the whole file runs in seconds on a CPU; the
properties checked do not depend on the model being good.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from persona_wm.core.ghmm import ProcessError
from persona_wm.toy.probe import fit_probe, principal_angles, probe_table, r2_score, residual_hooks
from persona_wm.toy.steer import (
    belief_classes,
    kl_divergence,
    partition_violation,
    prepare_steering,
    steered_logits,
    steering_sweep,
    summarise_sweep,
)
from persona_wm.toy.train import TrainConfig, cache_path, evaluate, load_or_train, model_inputs, train

TINY = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, batch_size=32, eval_every=5,
            eval_sequences=64, warmup_steps=2)


@pytest.fixture(scope="module")
def tiny_semi(tmp_path_factory):
    config = TrainConfig(process="semi_factored", steps=10, seed=0, **TINY)
    return load_or_train(config, device="cpu", threads=1, cache_dir=tmp_path_factory.mktemp("models"),
                         progress=False)


def test_config_validation_and_key() -> None:
    with pytest.raises(ProcessError, match="unknown process 'nope'"):
        TrainConfig(process="nope")
    with pytest.raises(ValueError, match="d_model must be positive"):
        TrainConfig(process="z1r", d_model=0)
    with pytest.raises(ValueError, match="snapshot_steps"):
        TrainConfig(process="z1r", steps=10, snapshot_steps=(20,))
    a, b = TrainConfig(process="z1r"), TrainConfig(process="z1r")
    assert a.key() == b.key()
    assert a.key() != TrainConfig(process="z1r", seed=1).key()
    assert a.key() != TrainConfig(process="z1r_x_z1r").key()


def test_training_is_seeded_and_cached(tmp_path) -> None:
    config = TrainConfig(process="z1r", steps=6, seed=3, snapshot_steps=(0, 6), **TINY)
    first = train(config, device="cpu", progress=False)
    second = train(config, device="cpu", progress=False)
    for (name, p), q in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=f"parameter {name} differs between identical seeded runs")
    cached = load_or_train(config, device="cpu", cache_dir=tmp_path, progress=False)
    assert not cached.from_cache and cache_path(config, tmp_path).exists()
    again = load_or_train(config, device="cpu", cache_dir=tmp_path, progress=False)
    assert again.from_cache and again.history == cached.history
    assert set(again.snapshots) == {0, 6}
    assert [h["step"] for h in again.history] == [0, 5, 6]
    torch.testing.assert_close(again.snapshot_model(6).state_dict()["embed.W_E"], again.model.state_dict()["embed.W_E"])


def test_model_inputs_prepend_bos() -> None:
    inputs = model_inputs(np.array([[0, 1, 1]]), n_tokens=2)
    assert inputs.tolist() == [[2, 0, 1, 1]]


def test_model_cross_entropy_is_never_below_the_bayes_optimum(tiny_semi) -> None:
    process = tiny_semi.process
    tokens = process.sample(128, tiny_semi.config.context_length, np.random.default_rng(0))
    result = evaluate(tiny_semi.model, process, tokens)
    assert result["model_ce"] >= result["optimal_ce"]  # Gibbs' inequality, prefix by prefix
    assert result["ce_ratio"] == pytest.approx(result["model_ce"] / result["optimal_ce"])


# ---------------------------------------------------------------------------- probes
def test_probe_recovers_planted_linear_map_on_held_out_groups() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    y = x @ rng.normal(size=(8, 3)) + 0.5
    probe = fit_probe(x, y, groups=np.repeat(np.arange(100), 6))
    assert probe.r2 == pytest.approx(1.0, abs=1e-10)
    noise = fit_probe(x, rng.normal(size=(600, 3)), groups=np.repeat(np.arange(100), 6))
    assert noise.r2 < 0.1


def test_r2_is_variance_weighted() -> None:
    y = np.column_stack([np.linspace(0, 1, 10), np.full(10, 0.3)])  # second column never varies
    pred = y.copy()
    pred[:, 1] += 0.01
    assert r2_score(y, pred) == pytest.approx(1 - 10 * 0.01**2 / ((y[:, 0] - y[:, 0].mean()) ** 2).sum())


def test_principal_angles() -> None:
    e = np.eye(6)
    np.testing.assert_allclose(principal_angles(e[:, :2], e[:, 2:4]), [90, 90])
    np.testing.assert_allclose(principal_angles(e[:, :2], e[:, :2] @ np.array([[1, 1], [1, -1]])), [0, 0], atol=1e-6)


def test_probe_table_covers_every_layer_and_factor(tiny_semi) -> None:
    process = tiny_semi.process
    rows, probes = probe_table(tiny_semi.model, process, process.sample(60, 10, np.random.default_rng(1)))
    layers = residual_hooks(tiny_semi.model) + ["concat"]
    assert {(r["layer"], r["target"]) for r in rows} == {(layer, t) for layer in layers for t in ("joint", "factor0", "factor1")}
    assert probes[("concat", "joint")].weights.shape == (16 * len(residual_hooks(tiny_semi.model)), 9)


# ---------------------------------------------------------------------------- steering
def test_kl_divergence_matches_scipy() -> None:
    p, q = np.array([0.2, 0.5, 0.3]), np.array([0.1, 0.6, 0.3])
    assert kl_divergence(p, q) == pytest.approx(scipy_entropy(p, q))
    assert kl_divergence(p, p) == pytest.approx(0.0)


def test_belief_classes_rules() -> None:
    synced = np.repeat(np.eye(3), [10, 7, 5], axis=0)
    exact = belief_classes(synced)
    assert exact.rule == "exact" and exact.counts.tolist() == [10, 7, 5]
    fractal = np.random.default_rng(0).dirichlet(np.ones(3), 90)
    lobes = belief_classes(fractal)
    assert lobes.rule == "argmax"
    np.testing.assert_array_equal(lobes.labels, fractal.argmax(-1))
    with pytest.raises(ProcessError, match="exact belief classes"):
        belief_classes(fractal, rule="exact")
    with pytest.raises(ProcessError, match="fewer than two"):
        belief_classes(np.tile([1.0, 0, 0], (20, 1)))


def test_zero_steering_leaves_outputs_unchanged(tiny_semi) -> None:
    process = tiny_semi.process
    setup = prepare_steering(tiny_semi.model, process, process.sample(200, 10, np.random.default_rng(2)))
    zero = steered_logits(tiny_semi.model, setup.tokens, process.n_tokens, setup.hook,
                          np.zeros_like(setup.activations))
    np.testing.assert_allclose(zero, setup.probs, atol=1e-6)
    per_pair = steering_sweep(tiny_semi.model, setup, 0, [0.0, 1.0])
    n_classes = len(setup.classes[0].counts)
    assert len(per_pair) == n_classes * (n_classes - 1) * 2
    table = summarise_sweep(per_pair)
    assert table.loc[table.scale == 0, "kl_steered"].item() == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(table.loc[table.scale == 0, "ratio"].item())
    assert table.loc[table.scale == 1, "kl_steered"].item() > 0


def test_partition_violation_reports_forbidden_mass(tiny_semi) -> None:
    process = tiny_semi.process
    setup = prepare_steering(tiny_semi.model, process, process.sample(400, 10, np.random.default_rng(3)))
    frame = partition_violation(tiny_semi.model, setup, "(1,0)", [0.0, 2.0])
    assert frame.steered_factor.unique().tolist() == [0]  # factor A varies inside P10; factor B sits in S0
    inside = setup.beliefs[:, list(process.partition[2])].sum(-1) > 1 - 1e-9
    # in P10 factor B is in S0 with flipped tokens: it can only emit 1, so tokens with b = 0 are forbidden
    forbidden = setup.probs[:, [0, 2]].sum(-1)
    pairs_weighted = frame.loc[frame.scale == 0, "forbidden"].item()
    assert pairs_weighted == pytest.approx(forbidden[inside & (setup.classes[0].labels >= 0)].mean(), rel=0.3)
    assert ((frame[["forbidden", "target"]] >= 0) & (frame[["forbidden", "target"]] <= 1 + 1e-9)).all().all()
    with pytest.raises(ProcessError, match="unknown sector"):
        partition_violation(tiny_semi.model, setup, "(7,7)", [1.0])


def test_steering_needs_a_factored_process(tiny_semi) -> None:
    from persona_wm.processes import z1r

    with pytest.raises(ProcessError, match="factored process"):
        prepare_steering(tiny_semi.model, z1r(), np.zeros((4, 10), dtype=int))


def _synthetic_setup(interaction: float):
    """Two 3-class factors with activations u_a + v_b (+ interaction * w_ab) and no model behind them."""
    from persona_wm.toy.steer import BeliefClasses, SteeringSetup

    rng = np.random.default_rng(0)
    a, b = np.repeat(np.arange(3), 30), np.tile(np.arange(3), 30)
    u, v, w = rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), rng.normal(size=(3, 3, 8))
    acts = u[a] + v[b] + interaction * w[a, b]
    classes = [BeliefClasses(lab, np.eye(3), np.bincount(lab), "exact") for lab in (a, b)]
    centroids = [np.stack([acts[lab == k].mean(0) for k in range(3)]) for lab in (a, b)]
    joint = {(f, i, j): acts[(lab_f == i) & (lab_g == j)].mean(0)
             for f, (lab_f, lab_g) in enumerate([(a, b), (b, a)]) for i in range(3) for j in range(3)}
    return SteeringSetup(None, np.zeros((90, 1), int), "hook", acts, None, None, None, classes, centroids,
                         [a, b], joint), acts, a, b


def test_centroid_interaction_is_zero_for_additive_representations() -> None:
    from persona_wm.toy.steer import centroid_interaction

    additive, *_ = _synthetic_setup(0.0)
    assert centroid_interaction(additive) == pytest.approx(0.0, abs=1e-12)
    assert centroid_interaction(_synthetic_setup(1.0)[0]) > 0.1


def test_conditional_vectors_move_to_the_joint_centroid() -> None:
    from persona_wm.toy.steer import steering_vectors

    setup, acts, a, b = _synthetic_setup(1.0)
    idx, pairs = np.array([0, 1, 2]), np.array([[0, 2], [0, 1], [0, 2]])
    vectors = steering_vectors(setup, 0, idx, pairs, "conditional")
    for r, i in enumerate(idx):
        target = acts[(a == pairs[r, 1]) & (b == b[i])].mean(0)
        np.testing.assert_allclose(acts[i] + vectors[r], target + (acts[i] - acts[(a == a[i]) & (b == b[i])].mean(0)))
    marginal = steering_vectors(setup, 0, idx, pairs, "centroid")
    np.testing.assert_allclose(marginal[0], setup.centroids[0][2] - setup.centroids[0][0])
    with pytest.raises(ValueError, match="unknown steering method"):
        steering_vectors(setup, 0, idx, pairs, "magic")


def test_across_seeds_and_bootstrap() -> None:
    import pandas as pd

    from persona_wm.analysis.stats import across_seeds, bootstrap_mean_ci

    frame = pd.DataFrame({"g": ["x"] * 3 + ["y"] * 3, "seed": [0, 1, 2] * 2, "v": [1.0, 2.0, 3.0, 5.0, 5.0, 5.0]})
    out = across_seeds(frame, ["g"], ["v"]).set_index("g")
    assert out.loc["x", "v_mean"] == 2.0 and out.loc["x", "v_sd"] == pytest.approx(1.0)
    assert out.loc["y", "v_sd"] == 0.0 and out.loc["x", "n_seeds"] == 3
    low, high = bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0])
    assert low <= 2.5 <= high
    assert np.isnan(bootstrap_mean_ci([1.0])[0])


def test_cache_key_tracks_the_process_definition(monkeypatch) -> None:
    import persona_wm.processes as processes

    config = TrainConfig(process="z1r")
    before = config.key()
    original = processes.REGISTRY["z1r"]

    def changed():
        process = original()
        return process.with_initial(np.array([1.0, 0.0, 0.0]))

    monkeypatch.setitem(processes.REGISTRY, "z1r", changed)
    assert TrainConfig(process="z1r").key() != before, "same name, new definition must not hit the old cache"


def test_fine_tune_starts_from_its_base_and_is_cached_separately(tmp_path) -> None:
    base = TrainConfig(process="semi_factored", steps=4, seed=1, **TINY)
    zero = TrainConfig(process="semi_factored", steps=0, seed=1, init_from=base, data_sector="(0,0)", **TINY)
    assert zero.key() != base.key()
    base_model = load_or_train(base, device="cpu", cache_dir=tmp_path, progress=False)
    tuned = load_or_train(zero, device="cpu", cache_dir=tmp_path, progress=False)
    for name, weight in base_model.model.state_dict().items():
        torch.testing.assert_close(tuned.model.state_dict()[name], weight)
    with pytest.raises(ValueError, match="not a sector"):
        TrainConfig(process="semi_factored", init_from=base, data_sector="(9,9)", **TINY)
    with pytest.raises(ValueError, match="share the process and architecture"):
        TrainConfig(process="semi_factored", init_from=base, d_model=32)
    with pytest.raises(ValueError, match="tokens"):
        TrainConfig(process="semi_factored", data_process="mess3")


def test_restricted_sector_samples_stay_in_the_sector() -> None:
    from persona_wm.core.sfp import restrict_to_sector
    from persona_wm.processes import get_process

    process = get_process("semi_factored")
    inside = restrict_to_sector(process, "(0,0)")  # both factors in S0: both emit 0 forever
    assert not inside.sample(50, 10, np.random.default_rng(0)).any()
    both = restrict_to_sector(process, ["(0,0)", "(1,1)"])
    assert both.initial[list(process.partition[1])].sum() == 0
    with pytest.raises(ProcessError, match="unknown sector"):
        restrict_to_sector(process, "(5,5)")


def test_spearman_with_ci() -> None:
    from persona_wm.analysis.stats import spearman_with_ci

    x = np.arange(12.0)
    result = spearman_with_ci(x, x ** 3, n_boot=500)
    assert result["spearman_rho"] == pytest.approx(1.0) and result["p"] < 1e-6
    assert result["ci_low"] <= result["spearman_rho"] <= result["ci_high"]
    noisy = spearman_with_ci(x, np.random.default_rng(0).normal(size=12), n_boot=500)
    assert noisy["ci_low"] < 0 < noisy["ci_high"]


def test_both_readings_and_bounded_spillover(tiny_semi) -> None:
    """Context-averaged KL <= per-context KL (joint convexity); TV and flips are bounded and vanish at scale 0."""
    process = tiny_semi.process
    setup = prepare_steering(tiny_semi.model, process, process.sample(300, 10, np.random.default_rng(4)))
    per_pair = steering_sweep(tiny_semi.model, setup, 0, [0.0, 1.0, 3.0])
    for col in ("kl_target", "kl_steered", "kl_unsteered"):
        assert (per_pair[f"{col}_avg"] <= per_pair[col] + 1e-9).all(), col
    assert ((per_pair[["tv_steered", "tv_unsteered", "argmax_flip"]] >= 0)
            & (per_pair[["tv_steered", "tv_unsteered", "argmax_flip"]] <= 1 + 1e-12)).all().all()
    at0 = per_pair[per_pair.scale == 0]
    assert at0[["tv_steered", "tv_unsteered", "argmax_flip", "kl_steered_avg"]].abs().max().max() < 1e-6
    table = summarise_sweep(per_pair)
    assert {"ratio", "ratio_avg", "ratio_pairs"} <= set(table.columns)
    assert np.isnan(table.loc[table.scale == 0, "ratio_avg"].item())
    moved = table[table.scale == 3.0].iloc[0]
    assert moved.tv_steered > 0 and moved.kl_steered_avg > 0


def test_context_averaged_reading_cancels_opposite_shifts() -> None:
    """Two contexts whose other factor moves in opposite directions: per-context KL > 0, averaged KL = 0."""
    from persona_wm.toy.steer import kl_divergence, total_variation

    orig = np.array([[0.5, 0.5], [0.5, 0.5]])
    steered = np.array([[0.7, 0.3], [0.3, 0.7]])
    per_context = kl_divergence(steered, orig).mean()
    averaged = kl_divergence(steered.mean(0), orig.mean(0))
    assert per_context > 0.05 and averaged == pytest.approx(0.0, abs=1e-12)
    assert total_variation(steered, orig).tolist() == pytest.approx([0.2, 0.2])


def test_training_trend_has_a_point_per_snapshot(tmp_path) -> None:
    from persona_wm.toy.steer import training_trend

    config = TrainConfig(process="z1r_x_z1r", steps=10, seed=0, snapshot_steps=(0, 5, 10), **TINY)
    trained = load_or_train(config, device="cpu", threads=1, cache_dir=tmp_path, progress=False)
    rows = training_trend(trained, 200, 0)
    assert [r["steps"] for r in rows] == [0, 5, 10]
    assert all(r["ce_ratio"] >= 1 - 1e-6 and 0 <= r["interaction"] <= 1 and r["ratio_avg"] >= 0
               for r in rows)
