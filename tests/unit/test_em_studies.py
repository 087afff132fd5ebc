"""Studies 03 and 04's section records and metrics (persona_wm.studies.em_reversal / persona_engineering) on
hand-made frames: verdict properties, undefined values, the random nulls, the mixed-model trend, and the figures."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from persona_wm.plots.em import (  # noqa: E402
    plot_breadth_sweep,
    plot_engineering_axes,
    plot_mechanism,
    plot_pareto,
    plot_reversal_curves,
    plot_search_pairs,
    plot_sector_blocks,
    plot_specificity_parts,
)
from persona_wm.processes import get_process  # noqa: E402
from persona_wm.studies import em_reversal, persona_engineering  # noqa: E402
from persona_wm.toy.em import EMRecipe  # noqa: E402
from persona_wm.toy.engineering import (  # noqa: E402
    ENGINEERING_MEASURES,
    axis_trends,
    engineering_summary,
    equivalent_pairs,
    leak_table,
)

RECIPE = EMRecipe(d_model=8, n_layers=1, base_steps=5, base_batch=4, base_lr=0.01, ft_steps=2, ft_batch=4,
                  ft_lr=0.001, ft_step_grid=(1, 2), ft_lr_grid=(0.001, 0.01))


# ----------------------------------------------------------------------------- study 03
def test_design_names_its_organisms_and_rejects_an_inconsistent_headline() -> None:
    design = em_reversal.Design("em_seq()", (1, 3), (0.0, 1.0), (0.5, 0.2), (0, 1), RECIPE)
    assert design.factored == "em_seq(coupling=0.0)"
    assert design.sweep_names == ["em_seq(tasks_per_sequence=1,coupling=0.0)", "em_seq(tasks_per_sequence=1)",
                                  "em_seq(coupling=0.0)", "em_seq()"]
    assert len(design.search_names) == 2 * 2 * 2 and len(design.unit_names) == 8
    # 8 organisms x 2 seeds: a base each and one fine-tuning run per learning rate
    assert len(design.configs()) == 16 + 16 * 2
    assert design.search_axes["ft_lr"] == [0.001, 0.01]
    with pytest.raises(ValueError, match="must be fully coupled"):
        em_reversal.Design("em_seq(coupling=0.5)", (3,), (0.0, 1.0), (0.5,), (0,), RECIPE)
    with pytest.raises(ValueError, match="must contain the headline's 3"):
        em_reversal.Design("em_seq()", (1, 6), (0.0, 1.0), (0.5,), (0,), RECIPE)
    with pytest.raises(ValueError, match="must contain 0.0 and 1.0"):
        em_reversal.Design("em_seq()", (3,), (0.5, 1.0), (0.5,), (0,), RECIPE)


def _rows(coupled: list[float], factored: list[float], tps: int = 3) -> pd.DataFrame:
    rows = []
    for coupling, values in ((1.0, coupled), (0.0, factored)):
        for seed, b in enumerate(values):
            rows.append({"process": f"c{coupling}", "tasks_per_sequence": tps, "coupling": coupling,
                         "persona_prior": 0.5, "ft_steps": 40, "ft_lr": 2e-4, "seed": seed,
                         "fresh_task1_increase": 0.5, "fresh_heldout_increase": 0.5 * b, "fresh_breadth": b,
                         "after_evidence_task1_increase": np.nan, "after_evidence_heldout_increase": np.nan,
                         "after_evidence_breadth": np.nan})
    return pd.DataFrame(rows)


def test_contrast_verdict_needs_both_levels_and_a_ci_above_the_margin() -> None:
    met = em_reversal._contrast(_rows([0.6, 0.62, 0.58, 0.61], [0.0, 0.02, -0.01, 0.01]), "fresh")
    assert met.difference == pytest.approx(0.5975) and met.meets_target and met.excludes_zero
    assert met.ci_low <= met.difference <= met.ci_high
    weak = em_reversal._contrast(_rows([0.45, 0.47, 0.46], [0.0, 0.01, 0.0]), "fresh")
    assert not weak.meets_target  # coupled below 0.5
    noisy = em_reversal._contrast(_rows([0.9, 0.2, 0.9], [0.1, 0.0, 0.1]), "fresh")
    assert not noisy.meets_target and noisy.ci_low < 0.2  # the CI of the difference reaches below 0.2
    assert "Welch 95% CI" in met.text()


def test_sweep_table_has_a_t_interval_per_cell_and_marks_missing_places() -> None:
    sweep = em_reversal.CouplingSweep(pd.concat([_rows([0.6, 0.7], [0.0, 0.1]), _rows([0.1, 0.2], [0.0, 0.0], 1)]))
    table = sweep.table.set_index(["tasks_per_sequence", "coupling"])
    cell = table.loc[(3, 1.0), "fresh"]
    assert cell["mean"] == pytest.approx(0.65) and cell["ci_low"] < 0.65 < cell["ci_high"] and cell["n_seeds"] == 2
    assert table.loc[(3, 1.0), "after_evidence"]["n_seeds"] == 0
    assert sweep.display_table().after_evidence.eq("—").all()
    assert sweep.contrast(1).coupled == pytest.approx(0.15)


def test_search_counts_pairs_and_trainings() -> None:
    rows = pd.concat([_rows([0.6, 0.6], [0.0, 0.0]).assign(ft_steps=s, ft_lr=lr) for s in (20, 40)
                      for lr in (1e-3, 1e-2)], ignore_index=True)
    pairs = [{"tasks_per_sequence": 3, "persona_prior": 0.5, "ft_steps": s, "ft_lr": lr,
              **em_reversal._contrast(g, "fresh").metrics()} for (s, lr), g in rows.groupby(["ft_steps", "ft_lr"])]
    found = em_reversal.Search({"ft_steps": [20, 40]}, rows, pd.DataFrame(pairs))
    assert found.n_configs_tried == 4
    assert found.n_trainings == 4 + 4 * 2  # 2 organisms x 2 seeds bases, one run per lr each
    assert found.metrics()["pairs_meeting_target"] == 0  # no spread: the CI is undefined, so not met


def _mechanism(coupled_increase: list[float], factored_increase: list[float]) -> em_reversal.Mechanism:
    patches = []
    for coupling, increases in ((1.0, coupled_increase), (0.0, factored_increase)):
        for seed, inc in enumerate(increases):
            for direction, removed in (("probe_weights", 0.1), ("probe_pattern", 0.6 + 0.01 * seed),
                                       ("mean_change", 0.8), *((f"random_{i:02d}", 0.01 * i) for i in range(10))):
                patches.append({"process": "x", "seed": seed, "coupling": coupling, "direction": direction,
                                "unpatched_heldout_increase": inc, "patched_heldout_increase": inc * (1 - removed),
                                "heldout_removed": removed})
    units = pd.DataFrame([{"process": "x", "seed": s, "coupling": c, "headline": True, "probe_r2": 0.9,
                           "belief_shift": 0.3 + 0.01 * s, "breadth": 0.5, "tasks_per_sequence": 3}
                          for c in (0.0, 1.0) for s in range(3)])
    return em_reversal.Mechanism(units, units, {"n": 3, "spearman_rho": 1.0}, pd.DataFrame(patches), 10)


def test_mechanism_shares_are_defined_only_where_there_is_an_increase_to_remove() -> None:
    mech = _mechanism([0.3, 0.25, 0.35], [0.01, -0.02, 0.0])
    coupled = mech.removed(True, "probe_pattern")
    assert coupled["defined"] and coupled["removed"] == pytest.approx(0.61)
    assert coupled["ci_low"] <= coupled["removed"] <= coupled["ci_high"]
    assert coupled["random_null"]["q50"] == pytest.approx(0.045)
    assert mech.meets_expectation("probe_pattern") and not mech.meets_expectation("probe_weights")
    factored = mech.removed(False, "probe_pattern")
    assert not factored["defined"] and np.isnan(factored["removed"])
    metrics = mech.metrics()
    assert set(metrics["ablation_breadth_removed_coupled"]) == {"probe_weights", "probe_pattern", "mean_change"}
    assert np.isnan(metrics["ablation_breadth_removed_factored"]["probe_pattern"])  # None once the result cleans it


def _summary() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for scale in (0.5, 1.0, 2.0):
            rows.append({"method": "belief_state", "scale": scale, "seed": seed, "restoration_mean": 0.5 * scale,
                         "restoration_min": 0.45 * scale, "restoration_task1": 0.4 * scale,
                         "restoration_heldout": 0.55 * scale, "capability_change": 0.01 * scale,
                         "reaches_target": 0.45 * scale >= 0.9})
            for i in range(10):
                rows.append({"method": f"random_{i:02d}", "scale": scale, "seed": seed, "restoration_mean": 0.01 * i,
                             "restoration_min": 0.0, "restoration_task1": 0.0, "restoration_heldout": 0.0,
                             "capability_change": 0.0, "reaches_target": False})
        rows.append({"method": "ablation_belief_state", "scale": np.nan, "seed": seed, "restoration_mean": 0.2,
                     "restoration_min": 0.1, "restoration_task1": 0.1, "restoration_heldout": 0.25,
                     "capability_change": 0.0, "reaches_target": False})
    return pd.DataFrame(rows)


def test_reversal_compares_every_method_with_its_random_null() -> None:
    rev = em_reversal.Reversal(pd.DataFrame(), _summary(), 0.9, 10)
    assert set(rev.stats.index) == {"belief_state", "ablation_belief_state"}  # random directions only in the null
    assert rev.stats.loc["belief_state", "scale_mean"] == 2.0
    assert rev.stats.loc["belief_state", "change_at_target_mean"] == pytest.approx(0.018)
    null = rev.random_null.set_index("scale")
    assert null.loc[1.0, "restoration_mean_q50"] == pytest.approx(0.045)
    assert rev.beyond_null("belief_state", 1.0)
    metrics = rev.metrics()
    assert metrics["random_null"]["n_directions"] == 10 and len(metrics["random_null"]["per_scale"]) == 3
    assert metrics["belief_state"]["built_as"].startswith("persona-class centroid")
    assert metrics["ablation_belief_state"]["at_scale_1"] is None


def test_em_figures_have_labelled_axes() -> None:
    fig = plot_sector_blocks(get_process("em_seq(n_tasks=2)"), "em_seq(n_tasks=2)")
    assert "sector order" in fig.axes[0].get_xlabel()
    rows = pd.concat([_rows([0.6, 0.7], [0.0, 0.1]), _rows([0.1, 0.2], [0.0, 0.0], 1)])
    assert "breadth" in plot_breadth_sweep(rows).axes[0].get_ylabel()
    pairs = pd.DataFrame({"coupled": [0.6, 0.1], "factored": [0.0, 0.1], "tasks_per_sequence": [3, 1],
                          "persona_prior": [0.5, 0.5], "ft_steps": [40, 40]})
    assert "factored" in plot_search_pairs(pairs).axes[0].get_xlabel()
    mech = _mechanism([0.3, 0.25, 0.35], [0.01, -0.02, 0.0])
    fig = plot_mechanism(mech.configs.assign(belief_shift=[0.1, 0.2, 0.3, 0.1, 0.2, 0.3]), mech.patches)
    assert "shift" in fig.axes[0].get_xlabel() and "removed" in fig.axes[1].get_ylabel()
    fig = plot_reversal_curves(_summary(), 0.9)
    assert "restoration" in fig.axes[0].get_xlabel() and "capability" in fig.axes[0].get_ylabel()
    configs = pd.DataFrame({"intended": [0.1, 0.5], "spillover": [0.01, 0.02], "breadth": [0.1, 0.6],
                            "coupling": [0.0, 1.0], "tasks_per_sequence": [3, 3]})
    fig = plot_specificity_parts(configs)
    assert fig.axes[0].get_xscale() == "log" and "intended" in fig.axes[0].get_xlabel()
    plt.close("all")


# ----------------------------------------------------------------------------- study 04
def _grid(slope: float = 0.0) -> pd.DataFrame:
    rows = []
    for axis, name, value, f, r in (("mixing", "em_seq()", 0.5, 0.9, 0.2),
                                    ("mixing", "em_seq(mixing=0.0)", 0.0, 0.95, 0.3),
                                    ("leak", "em_seq()", 0.0, 0.9, 0.2), ("leak", "em_seq(leak=0.1)", 0.1, 0.8, 0.1),
                                    ("joint", "em_seq(mixing=0.0,leak=0.1)", "em_seq(mixing=0.0,leak=0.1)", 0.8, 0.1)):
        for seed, jitter in enumerate((-0.01, 0.01, 0.0)):
            rows.append({"axis": axis, "value": value, "process": name, "seed": seed,
                         **{m: 0.5 for m in ENGINEERING_MEASURES}, "fidelity": f + jitter, "robustness": r + jitter,
                         "breadth": 1 - r - jitter, "robustness_after_evidence": r})
    return pd.DataFrame(rows)


def test_leak_table_and_equivalent_pairs() -> None:
    table = leak_table(["em_seq(n_tasks=2,leak=0.05)", "em_seq(n_tasks=2)", "em_seq(n_tasks=2)"])
    assert table["partition preserving"].tolist() == [True, False]
    points = pd.DataFrame({"process": ["a", "b", "c"], "x": [1.0, 2.0, 1.0], "y": [0.5, 0.5, 0.5]})
    assert equivalent_pairs(points, ["x", "y"]) == [("a", "c")]


def test_mixed_model_trend_recovers_a_planted_slope_with_seed_offsets() -> None:
    rng = np.random.default_rng(0)
    rows = [{"axis": "leak", "value": v, "seed": s, "robustness": 0.5 - 2.0 * v + 0.05 * s + rng.normal(0, 0.01),
             "fidelity": 0.9 + rng.normal(0, 0.01)} for s in range(5) for v in (0.0, 0.05, 0.1, 0.2)]
    trends = axis_trends(pd.DataFrame(rows)).set_index("measure")
    assert trends.loc["robustness", "ci_low"] < -2.0 < trends.loc["robustness", "ci_high"]
    assert trends.loc["robustness", "p"] < 1e-6
    assert trends.loc["fidelity", "ci_low"] < 0 < trends.loc["fidelity", "ci_high"]  # no planted trend, none found
    # seed offsets of sd 0.08 against noise of 0.01 carry most of the variance
    assert trends.loc["robustness", "seed_share"] > 0.9 and not trends.loc["robustness", "boundary"]
    # seeds with equal means (each one's residuals a rotation of the same four) carry none: on the boundary
    noise = np.array([0.01, -0.01, 0.005, -0.005])
    equal = pd.DataFrame([{"axis": "leak", "value": v, "seed": s, "robustness": 0.5 - v + np.roll(noise, s)[i],
                           "fidelity": 0.9} for s in range(5) for i, v in enumerate((0.0, 0.05, 0.1, 0.2))])
    flat = axis_trends(equal, measures=("robustness",)).iloc[0]
    assert flat.seed_share < 0.01 and flat.boundary


def test_engineering_sweep_judges_robustness_and_fidelity_apart() -> None:
    grid = _grid()
    points, improvements = engineering_summary(grid, "em_seq()")
    sweep = persona_engineering.EngineeringSweep("em_seq()", leak_table(list(grid.process)), grid, points,
                                                 improvements)
    assert sweep.robustness_clear == ["em_seq(mixing=0.0)"] and sweep.fidelity_clear == ["em_seq(mixing=0.0)"]
    tracking = persona_engineering.specificity_tracking(points, n_boot=50, seed=0)
    assert set(tracking.correlations) == {"intended", "spillover"}
    metrics = persona_engineering.PersonaEngineeringResult([0, 1, 2], sweep, tracking, 12.5).metrics()
    assert {"robustness_clear", "fidelity_clear", "trends", "specificity_tracks_robustness"} <= set(metrics)
    assert metrics["pareto"]["improvements"][0]["robustness_gain"] == pytest.approx(0.1)
    json.dumps(metrics, allow_nan=False)


def test_dense_grid_reads_the_v3_sweep_output_and_skips_the_former_organisms(tmp_path) -> None:
    assert persona_engineering.dense_grid(tmp_path / "missing.json") is None
    path = tmp_path / "grid.json"
    run = {"points": [{"process": "em_seq()", "fidelity_mean": 0.9}], "n_jobs": 6, "device": "H200", "wall_s": 90.0,
           "workers": 12, "trainer": "stacked", "pareto_front": ["em_seq()"], "improvements_over_baseline": []}
    path.write_text(json.dumps(run | {"clear_improvements": []}))  # the former OR rule's file
    assert persona_engineering.dense_grid(path) is None
    path.write_text(json.dumps(run | {"robustness_clear": [], "fidelity_clear": ["x"]}))
    grid = persona_engineering.dense_grid(path)
    assert grid.fidelity_clear == ["x"]
    assert grid.title == "Dense grid: 6 runs on H200 (stacked training, 12 workers) in 1.5 min"


def test_engineering_figures_have_labelled_axes() -> None:
    grid = _grid()
    fig = plot_engineering_axes(grid, ["mixing", "leak"])
    assert len(fig.axes) == 2 and "knob value" in fig.axes[0].get_xlabel()
    points, _ = engineering_summary(grid, "em_seq()")
    fig = plot_pareto(points, "em_seq()")
    assert "fidelity" in fig.axes[0].get_xlabel() and len(fig.axes[0].texts) == len(points)
    plt.close("all")
