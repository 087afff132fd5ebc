"""Studies 03 and 04's section results and metrics (persona_wm.studies.em_reversal / persona_engineering), the
engineering grid helpers and the EM figures, on small hand-made tables (no training)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from persona_wm.plots.em import (plot_breadth_vs_coupling, plot_em_before_after, plot_engineering_axes, plot_pareto,
                                 plot_reversal_curves, plot_sector_blocks, plot_specificity_scatter)
from persona_wm.processes import get_process
from persona_wm.studies import em_reversal, persona_engineering
from persona_wm.toy.em import coupling_contrast, coupling_curve, twin_table
from persona_wm.toy.engineering import ENGINEERING_MEASURES, engineering_summary, equivalent_pairs, leak_table


# ----------------------------------------------------------------------------- study 03
def _experiment(misaligned_after: list[float], ce: float = 1.01) -> dict:
    tasks = list(range(len(misaligned_after)))
    before = pd.DataFrame({"task": tasks, "misaligned": 0.1, "capability_kl": 0.01})
    after = pd.DataFrame({"task": tasks, "misaligned": misaligned_after, "capability_kl": 0.02})
    increase = np.asarray(misaligned_after) - 0.1
    em = {"task1_increase": increase[0], "heldout_increase": increase[1:].mean(),
          "breadth": increase[1:].mean() / increase[0]}
    return {"before": before, "after": after, "em": em, "base": SimpleNamespace(final_eval={"ce_ratio": ce}),
            "tuned": SimpleNamespace(final_eval={"ce_ratio": ce + 0.1})}


def test_em_breadth_reuses_the_first_experiment_and_reports_mean_sd_and_t_ci() -> None:
    first = _experiment([0.9, 0.5, 0.3])
    breadth = em_reversal.em_breadth("em()", [7], recipe=None, n_contexts=1, analysis_seed=0, first=first)
    assert breadth.experiments == {7: first}  # nothing trained: seed 7 is the given experiment
    assert breadth.behaviour.task.unique().tolist() == ["task 1", "task 2", "task 3"]
    assert len(breadth.behaviour) == 6 and set(breadth.behaviour.model) == {"base", "fine-tuned"}
    metrics = breadth.metrics()
    assert metrics["em"]["breadth"] == pytest.approx(0.3 / 0.8)
    assert metrics["em_sd"] == {"task1_increase": 0.0, "heldout_increase": 0.0, "breadth": 0.0}  # one seed
    assert math.isnan(metrics["em_ci"]["breadth_ci_low"])  # a t CI from one seed is undefined

    two = em_reversal.Breadth({0: first, 1: first}, breadth.behaviour, breadth.ce,
                              pd.DataFrame([{"seed": 0, **first["em"]}, {"seed": 1, **_experiment([0.5, 0.3])["em"]}]))
    assert two.metrics()["em_sd"]["breadth"] == pytest.approx(np.std([0.3 / 0.8, 0.2 / 0.4], ddof=1))
    mean, low, high = two.breadth_ci
    assert low < mean < high


def _sweep() -> pd.DataFrame:
    rows = []
    for design, shared in (("shared", True), ("specific", False)):
        for coupling in (0.0, 1.0):
            for seed in (0, 1, 2):
                breadth = (0.8 if shared else 0.1) + 0.01 * seed + (0.3 * coupling if not shared else 0.0)
                rows.append({"process": f"em(coupling={coupling},shared_answers={shared})",
                             "twin": f"em(shared_answers={shared})", "design": design, "coupling": coupling,
                             "seed": seed, "breadth": breadth, "specificity_ratio": 0.1 + 0.05 * seed + 0.2 * shared,
                             "task1_increase": 0.5, "heldout_increase": 0.5 * breadth})
    return pd.DataFrame(rows)


def test_coupling_test_tables_and_the_zero_contrast_verdict() -> None:
    sweep = _sweep()
    test = em_reversal.CouplingTest(sweep, {d: coupling_curve(sweep, d) for d in ("shared", "specific")},
                                    {d: coupling_contrast(sweep, d) for d in ("shared", "specific")})
    table = test.curve_table()
    assert table.shape == (4, 4) and table["95% CI"].str.match(r"\[-?\d\.\d{3}, -?\d\.\d{3}\]").all()
    assert "ci_method" not in test.contrast_table()
    assert not test.contrast_ci_contains_zero  # the specific design's coupled organism is 0.3 broader
    flat = em_reversal.CouplingTest(sweep, test.curves, {"shared": test.contrasts["shared"]})
    assert flat.contrast_ci_contains_zero

    search = em_reversal.CouplingSearch(sweep, twin_table(sweep))
    assert search.n_configs_tried == 4 and search.pairs_meeting_target == 0


def _reversal_stats() -> pd.DataFrame:
    index = ["belief_state", "diff_in_means", "ablation_belief_state"]
    return pd.DataFrame({"scale_mean": [1.0, 2.0, np.nan], "scale_sd": [0.1, 0.2, np.nan],
                         "restoration_heldout_mean": [0.95, 0.9, 0.1], "restoration_heldout_sd": [0.01, 0.02, np.nan],
                         "restoration_task1_mean": [0.9, 0.9, 0.1], "restoration_task1_sd": [0.0, 0.0, np.nan],
                         "capability_damage_mean": [-0.01, 0.02, 0.0], "capability_damage_sd": [0.0, 0.0, np.nan],
                         "damage_at_target_mean": [-0.01, 0.03, np.nan], "damage_at_target_sd": [0.005, 0.05, np.nan]},
                        index=pd.Index(index, name="method"))


def _reversal(stats: pd.DataFrame) -> em_reversal.Reversal:
    best = {m: {k: (None if pd.isna(stats.loc[m, f"{k}_mean"]) else float(stats.loc[m, f"{k}_mean"]))
                for k in em_reversal.BEST_MEASURES} for m in stats.index}
    damage = {m: float(v) for m, v in stats["damage_at_target_mean"].dropna().items()}
    return em_reversal.Reversal(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), stats, 0.9, best, damage,
                                stats["damage_at_target_sd"].to_dict())


def test_reversal_ranks_methods_and_separates_only_beyond_one_sd() -> None:
    reversal = _reversal(_reversal_stats())
    assert reversal.ranked == ["belief_state", "diff_in_means"]
    assert not reversal.keeper_separated  # -0.01 + 0.005 is not below 0.03 - 0.05
    assert reversal.sd("belief_state", "scale") == pytest.approx(0.1)
    assert reversal.sd("ablation_belief_state", "scale") == 0.0  # undefined sd reads as 0 in prose
    assert reversal.damage_text() == "belief_state -0.0100 ± 0.0050, diff_in_means +0.0300 ± 0.0500"
    stats = _reversal_stats()
    stats.loc["diff_in_means", "damage_at_target_sd"] = 0.001
    assert _reversal(stats).keeper_separated
    metrics = reversal.metrics()
    assert metrics["ablation_belief_state"]["damage_at_target"] is None
    assert metrics["ablation_belief_state"]["best"]["scale"] is None
    assert math.isnan(metrics["ablation_belief_state"]["damage_at_target_sd"])  # the result's metrics() cleans it


def test_specificity_diagnostic_pools_and_splits_by_design() -> None:
    diagnostic = em_reversal.specificity_diagnostic(_sweep(), n_boot=200, seed=0)
    assert diagnostic.n_configs == 4 and diagnostic.correlation["n"] == 12
    assert set(diagnostic.within) == {"shared", "specific"} and diagnostic.within["shared"]["n"] == 6
    assert list(diagnostic.correlation_table().index) == ["pooled", "shared", "specific"]
    points = diagnostic.metrics()["points"]
    assert len(points) == 4 and set(points[0]) == {"process", "specificity_ratio_mean", "specificity_ratio_sd",
                                                    "breadth_mean", "breadth_sd"}


def test_em_reversal_metrics_have_the_report_keys_and_no_nan() -> None:
    sweep = _sweep()
    first = _experiment([0.9, 0.5, 0.3])
    breadth = em_reversal.em_breadth("em()", [0], recipe=None, n_contexts=1, analysis_seed=0, first=first)
    test = em_reversal.CouplingTest(sweep, {d: coupling_curve(sweep, d) for d in ("shared", "specific")},
                                    {d: coupling_contrast(sweep, d) for d in ("shared", "specific")})
    search = em_reversal.CouplingSearch(sweep, twin_table(sweep))
    result = em_reversal.EMReversalResult("em()", [0], breadth, test, search, _reversal(_reversal_stats()),
                                          em_reversal.specificity_diagnostic(sweep, n_boot=200, seed=0))
    metrics = result.metrics()
    assert set(metrics) == {"process", "seeds", "em", "em_sd", "em_ci", "coupling_test", "reversal", "diagnostic"}
    assert set(metrics["coupling_test"]) == {"design_shared", "design_specific", "contrast", "contrast_by_design",
                                             "n_configs_tried", "n_trainings", "pairs_meeting_target", "twins"}
    assert metrics["coupling_test"]["contrast"]["n_configs_tried"] == 4
    assert metrics["em_ci"]["breadth_ci_low"] is None
    assert metrics["reversal"]["ablation_belief_state"]["damage_at_target_sd"] is None
    json.dumps(metrics, allow_nan=False)  # nothing undefined is left as NaN


# ----------------------------------------------------------------------------- study 04
def _grid() -> pd.DataFrame:
    rows = []
    for axis, name, value, f, r in (("mixing", "em()", 0.5, 0.9, 0.2), ("mixing", "em(mixing=0.0)", 0.0, 0.95, 0.3),
                                    ("leak", "em()", 0.0, 0.9, 0.2), ("leak", "em(leak=0.1)", 0.1, 0.8, 0.1),
                                    ("joint", "em(mixing=0.0,leak=0.1)", "em(mixing=0.0,leak=0.1)", 0.8, 0.1)):
        for seed, jitter in enumerate((-0.01, 0.01)):
            rows.append({"axis": axis, "value": value, "process": name, "seed": seed,
                         **{m: 0.5 for m in ENGINEERING_MEASURES}, "fidelity": f + jitter, "robustness": r + jitter,
                         "breadth": 1 - r - jitter, "task1_increase": 0.4, "heldout_increase": 0.3})
    return pd.DataFrame(rows)


def test_leak_table_and_equivalent_pairs() -> None:
    table = leak_table(["em(leak=0.05)", "em()", "em()"])
    assert table.process.tolist() == ["em()", "em(leak=0.05)"]
    assert table["partition preserving"].tolist() == [True, False]
    assert table["leak mass"].iloc[0] == 0 and table["leak mass"].iloc[1] > 0
    points = pd.DataFrame({"process": ["a", "b", "c"], "x": [1.0, 2.0, 1.0], "y": [0.5, 0.5, 0.5]})
    assert equivalent_pairs(points, ["x", "y"]) == [("a", "c")]
    assert equivalent_pairs(points, ["y"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_engineering_sweep_result_properties_and_metrics() -> None:
    grid = _grid()
    points, improvements = engineering_summary(grid, "em()")
    sweep = persona_engineering.EngineeringSweep("em()", leak_table(list(grid.process)), grid, points, improvements)
    assert sweep.baseline.fidelity_mean == pytest.approx(0.9)
    assert sweep.most_robust.process == "em(mixing=0.0)"
    assert sweep.equivalent_pairs == [("em(leak=0.1)", "em(mixing=0.0,leak=0.1)")]
    assert sweep.clear_improvements == 1
    tracking = {"n": 4, "spearman_rho": float("nan"), "p": 0.5, "ci_low": -1.0, "ci_high": 1.0}
    metrics = persona_engineering.PersonaEngineeringResult([0, 1], sweep, tracking, 12.5).metrics()
    assert set(metrics) == {"baseline", "seeds", "grid", "points", "pareto", "specificity_tracks_robustness",
                            "runtime_s"}
    assert len(metrics["grid"]) == len(grid) and metrics["grid"][-1]["value"] == "em(mixing=0.0,leak=0.1)"
    assert metrics["pareto"] == {"front": ["em(mixing=0.0)"], "improvements_over_baseline": 1,
                                 "clear_improvements": 1, "improving_configs": ["em(mixing=0.0)"]}
    assert "pareto" not in metrics["points"][0]
    assert metrics["specificity_tracks_robustness"]["spearman_rho"] is None
    json.dumps(metrics, allow_nan=False)


def test_dense_grid_reads_the_sweep_output_or_is_absent(tmp_path) -> None:
    assert persona_engineering.dense_grid(tmp_path / "missing.json") is None
    path = tmp_path / "grid.json"
    run = {"points": [{"process": "em()", "fidelity_mean": 0.9}], "n_jobs": 6, "device": "H100", "wall_s": 90.0,
           "workers": 15, "pareto_front": ["em()"], "improvements_over_baseline": [], "clear_improvements": []}
    path.write_text(json.dumps(run))  # a grid written before the sweep recorded its trainer: one model at a time
    grid = persona_engineering.dense_grid(path)
    assert grid.points.process.tolist() == ["em()"] and grid.n_jobs == 6
    assert grid.title == "Dense grid: 6 runs on H100 (sequential training, 15 workers) in 1.5 min"
    path.write_text(json.dumps(run | {"trainer": "stacked", "workers": 12}))
    assert persona_engineering.dense_grid(path).title == "Dense grid: 6 runs on H100 (stacked training, 12 workers) in 1.5 min"


# ----------------------------------------------------------------------------- figures
def test_em_figures_have_labelled_axes() -> None:
    fig = plot_sector_blocks(get_process("em()"), "em()")
    assert "sector order" in fig.axes[0].get_xlabel() and "em()" in fig.axes[0].get_title()
    first = _experiment([0.9, 0.5, 0.3])
    breadth = em_reversal.em_breadth("em()", [0], recipe=None, n_contexts=1, analysis_seed=0, first=first)
    fig = plot_em_before_after(breadth.behaviour)
    assert "misaligned" in fig.axes[0].get_ylabel() and "KL" in fig.axes[1].get_ylabel()
    fig = plot_breadth_vs_coupling(_sweep(), seed=0)
    assert "coupling" in fig.axes[0].get_xlabel()
    summary = pd.DataFrame({"method": ["a", "a", "ablation_a"], "scale": [1.0, 2.0, np.nan], "seed": 0,
                            "restoration_task1": [0.5, 1.0, 0.1], "restoration_heldout": [0.4, 0.9, 0.1],
                            "capability_damage": [0.0, 0.1, 0.0]})
    fig = plot_reversal_curves(summary, 0.9)
    assert "restoration" in fig.axes[0].get_xlabel() and "damage" in fig.axes[0].get_ylabel()
    fig = plot_specificity_scatter(_sweep(), "specificity_ratio", "breadth", "design", "breadth", "t")
    assert fig.axes[0].get_xscale() == "log" and "spillover" in fig.axes[0].get_xlabel()
    grid = _grid()
    fig = plot_engineering_axes(grid, ["mixing", "leak"])
    assert len(fig.axes) == 2 and "knob value" in fig.axes[0].get_xlabel()
    points, _ = engineering_summary(grid, "em()")
    fig = plot_pareto(points, "em()")
    assert "fidelity" in fig.axes[0].get_xlabel() and "robustness" in fig.axes[0].get_ylabel()
    assert len(fig.axes[0].texts) == len(points)  # every configuration labelled
    plt.close("all")
