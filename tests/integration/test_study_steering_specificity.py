"""Study 02's section functions (persona_wm.studies.steering_specificity) on tiny trained models.

The sections run end to end on two processes x two seeds of tiny models (so that every over-seeds
summary has an sd); the result's ``metrics()`` must carry the keys of the committed
``outputs/02_steering_specificity/metrics.json`` and be writable. The accessors that carry logic
(stat lookups, per-seed averages, Table 6 differences, the targets' verdicts, the training plan) are
checked against hand computations on the same frames.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from persona_wm.core.files import REPO_ROOT
from persona_wm.io.outputs import write_metrics
from persona_wm.plots import steering as figures
from persona_wm.studies import steering_specificity as study
from persona_wm.toy.hooks import residual_hooks
from persona_wm.toy.steer import centroid_interaction, prepare_steering
from persona_wm.toy.train import TrainConfig, load_or_train

TINY = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, batch_size=32, eval_every=5, eval_sequences=64,
            warmup_steps=2, steps=10, snapshot_steps=(0, 5, 10))
PROCESSES = ("z1r_x_z1r", "semi_factored")
SEEDS = (0, 1)
SCALES = (0.0, 0.5, 1.0)
PARTITION_SCALES = (0.0, 1.0, 5.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("models")
    return {(p, s): load_or_train(TrainConfig(process=p, seed=s, **TINY), device="cpu", cache_dir=cache, progress=False)
            for p in PROCESSES for s in SEEDS}


@pytest.fixture(scope="module")
def result(models) -> study.SteeringSpecificityResult:
    training = study.training_summary(models)
    probes = study.probe_section(models, PROCESSES, 60, 0)
    steering = study.steering_section(models, PROCESSES, SCALES, 80, 0)
    partition = study.partition_section(models, PARTITION_SCALES, 80, 0)
    return study.SteeringSpecificityResult(
        SEEDS, PROCESSES, training, probes, study.probe_training(models, PROCESSES, SEEDS, 60, 0), steering,
        study.interaction_section(models, 80, 0), study.trend_section(models, 80, 0),
        study.layer_section(models, 1.0, 80, 0), partition,
        study.targets_table(PROCESSES, training, probes, steering, partition))


def _paths(value, prefix=()) -> set[tuple[str, ...]]:
    """Every key path of nested dicts, with scale keys generalised (``scale_*``); lists and leaves end a path."""
    if not isinstance(value, dict):
        return {prefix}
    out = set()
    for key, item in value.items():
        out |= _paths(item, prefix + ("scale_*" if key.startswith("scale_") else key,))
    return out


def test_metrics_have_the_committed_keys_and_write(result, tmp_path) -> None:
    committed = json.loads((REPO_ROOT / "outputs" / "02_steering_specificity" / "metrics.json").read_text())
    metrics = result.metrics()
    assert set(metrics) == set(committed)
    other = {"mess3_x_mess3"}  # the committed study's third process, not trained here
    theirs = {path for path in _paths(committed) if not other & set(path) and path[0] != "targets"}
    ours = {path for path in _paths(metrics) if path[0] != "targets"}
    assert ours == theirs, f"missing: {sorted(theirs - ours)[:5]}, extra: {sorted(ours - theirs)[:5]}"
    assert metrics["seeds"] == list(SEEDS)
    # scale 0 moves nothing: its ratio is undefined and written as null
    assert metrics["steering"]["z1r_x_z1r"]["factor0"]["scale_0.0"]["ratio"] is None
    assert set(metrics["steering"]["z1r_x_z1r"]["factor0"]) == {f"scale_{c}" for c in SCALES}
    assert set(metrics["partition"]) == {f"scale_{c}" for c in PARTITION_SCALES}
    write_metrics(metrics, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["targets"].keys() == set(result.targets.target)


def test_stat_headline_and_per_seed_match_the_frames(result) -> None:
    steering = result.steering
    s = steering.stats
    row = s[(s.process == "z1r_x_z1r") & (s.method == "conditional") & (s.factor == 1) & (s.scale == 0.5)]
    assert steering.stat("z1r_x_z1r", 1, 0.5, "kl_unsteered", "conditional") == row.kl_unsteered_mean.item()
    assert np.isnan(steering.stat("z1r_x_z1r", 1, 7.0, "ratio")), "a scale never swept has no value"
    assert steering.headline("semi_factored", "centroid") == pytest.approx(
        np.mean([steering.stat("semi_factored", f, 1.0, "ratio") for f in (0, 1)]))
    per_seed = steering.per_seed("semi_factored", "centroid", "tv_unsteered")
    f = steering.frame
    for seed in SEEDS:
        rows = f[(f.process == "semi_factored") & (f.method == "centroid") & (f.scale == 1.0) & (f.seed == seed)]
        assert len(rows) == 2 and per_seed[seed] == pytest.approx(rows.tv_unsteered.mean())
    assert set(steering.decode_accuracy.index) == set(PROCESSES)
    assert steering.at_scale(1.0).index.tolist() == [(p, f) for p in sorted(PROCESSES) for f in (0, 1)]


def test_seed_comparison_only_for_processes_the_seed_reports(result) -> None:
    steering = result.steering
    assert set(steering.closer_reading) == {"z1r_x_z1r"}  # the seed has no table for our semi-factored process
    folds = steering.fold_by_reading.loc["z1r_x_z1r"]
    assert steering.closer_reading["z1r_x_z1r"] == folds.idxmin()
    assert set(folds.index) == {"per-context", "context-averaged"}


def test_partition_added_is_the_difference_to_scale_zero(result) -> None:
    partition = result.partition
    by = partition.stats.set_index(["method", "block", "scale"])
    for method in study.METHODS:
        for block in study.SECTORS.values():
            assert partition.added(method, block) == pytest.approx(
                by.loc[(method, block, 1.0), "forbidden_mean"] - by.loc[(method, block, 0.0), "forbidden_mean"])
    table = partition.beside_seed()
    assert ("forbidden (seed)", "centroid") in table.columns
    assert table.loc[("P10", 5.0), ("forbidden (seed)", "centroid")] == 0.395  # the seed's Table 6


def test_targets_verdicts_follow_their_thresholds(result) -> None:
    targets = result.targets
    assert len(targets) and set(targets.columns) == {"target", "ours", "threshold", "met"}
    for row in targets.itertuples():
        assert row.met == (row.ours <= row.threshold if "≤" in row.target else row.ours >= row.threshold), row.target
    names = set(targets.target)
    assert "Z1R×Z1R CE ratio ≤ 1.005" in names and not any(n.startswith("Mess3") for n in names)
    assert "forbidden mass added by steering, P10 at scale 1 (conditional) ≤ 0.001" in names
    assert "forbidden mass P01 at scale 5 (centroid) ≥ 0.1" in names


def test_probe_and_trend_summaries(result) -> None:
    probes = result.probes
    assert probes.final_layer == "blocks.1.hook_resid_post"
    assert probes.table().index.tolist() == sorted(PROCESSES)
    assert (probes.sd("untrained") >= 0).all().all()
    assert len(probes.angles) == len(PROCESSES) * len(SEEDS)
    assert set(probes.angle_spread) == set(PROCESSES)
    long = result.probe_training.long
    assert set(long.steps) == {0, 5, 10} and set(long.factor) == {"factor0", "factor1"}
    points = result.trend.points
    assert set(result.trend.stats) == set(points.process)
    assert result.trend.late["z1r_x_z1r"]["n"] == int((points[points.process == "z1r_x_z1r"].ce_ratio < 1.05).sum())
    assert set(result.interaction.final.hook) == {"blocks.1.hook_resid_post"}


def test_training_plan() -> None:
    plan = study.TrainingPlan(("z1r_x_z1r",), (3,), {"z1r_x_z1r": 95}, {"z1r_x_z1r": 64}, {"z1r_x_z1r": 0.002},
                              (0.0, 0.5, 1.0), 256)
    config = plan.config("z1r_x_z1r", 3)
    assert (config.steps, config.batch_size, config.lr, config.seed) == (95, 64, 0.002, 3)
    assert config.eval_every == 9 and config.eval_sequences == 256
    assert config.snapshot_steps == (0, 48, 95)  # round(0.5 * 95) = 48
    with pytest.raises(ValueError, match=r"TrainingPlan.batch_size has no entry for process\(es\) \['mess3_x_mess3'\]"):
        study.TrainingPlan(("z1r_x_z1r", "mess3_x_mess3"), (0,), {"z1r_x_z1r": 1, "mess3_x_mess3": 1},
                           {"z1r_x_z1r": 1}, {"z1r_x_z1r": 0.1, "mess3_x_mess3": 0.1}, (1.0,), 8)


def test_figures_have_labelled_axes(result) -> None:
    import matplotlib.pyplot as plt

    from persona_wm.plots.toy import plot_training_curves

    stats = result.steering.stats
    for grid in (figures.plot_kl_vs_scale(stats), figures.plot_ratio_vs_scale(stats),
                 figures.plot_bounded_spillover(stats), figures.plot_additivity_vs_training(result.trend.points),
                 figures.plot_ratio_by_layer(result.layers.frame, result.layers.scale),
                 figures.plot_partition(result.partition.frame)):
        assert any(ax.get_ylabel() for ax in grid.axes.flat)  # facet grids label the outer axes
        assert any("scale" in ax.get_xlabel() or "CE" in ax.get_xlabel() or "hook" in ax.get_xlabel()
                   for ax in grid.axes.flat)
    fig = plot_training_curves(result.training.history)
    assert "step" in fig.axes[0].get_xlabel() and "optimal" in fig.axes[0].get_ylabel()
    assert fig.axes[0].get_yscale() == "log"
    plt.close("all")
    assert isinstance(result.training.ce, pd.DataFrame)


def test_interaction_uses_the_steering_contexts_at_every_hook(models, result) -> None:
    trained = models[("semi_factored", 1)]
    tokens = trained.process.sample(80, 10, np.random.default_rng([0, 1, 7]))  # steering_frame's contexts
    frame = result.interaction.frame.set_index(["process", "seed", "hook"])["non-additive fraction"]
    for hook in residual_hooks(trained.model):
        expected = centroid_interaction(prepare_steering(trained.model, trained.process, tokens, hook))
        assert frame.loc[("semi_factored", 1, hook)] == expected
