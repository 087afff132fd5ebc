"""The logic of the LLM studies' section results (05a, 05b) on small hand-made inputs: no model files.

The section functions that run the model are exercised by the notebooks (nbval, smoke parameters) and by
the default reruns compared with the committed metrics; what is tested here is what the result
dataclasses derive from their tables (best layer, gates, verdicts, tables, paired tests, formatting).
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from persona_wm.llm.model import Decoding
from persona_wm.llm.personas import PersonaError
from persona_wm.plots import finetuning as ft_plots
from persona_wm.studies import llm_finetuning as ft
from persona_wm.studies import llm_persona_geometry as geo


def _stats(rho, gates, strat_p=None, n_perm=576) -> pd.DataFrame:
    layers = list(range(1, len(rho) + 1))
    frame = pd.DataFrame({"layer": layers, "rho": rho, "all_gates": gates,
                          "stratified_p": strat_p if strat_p is not None else [0.5] * len(rho),
                          "stratified_exact": [True] * len(rho), "stratified_n_permutations": [n_perm] * len(rho)})
    for column in ("mantel_p", "partial_rho", "radial_residual_rho", "per_prompt_median_rho", "short_ratio",
                   "centred_rho", "cos_distance_std", "jackknife_min", "jackknife_max", "radial_r2_cos"):
        frame[column] = 0.1
    for gate in ("cluster_partial", "radial_residual", "per_prompt_median", "short_ratio"):
        frame[f"gate_{gate}"] = True
    return frame


def _setup(n_personas: int = 4, n_layers: int = 30) -> geo.Setup:
    names = ["surgeon", "paramedic", "poet", "villain", "florist", "librarian"][:n_personas] + ["no_persona"]
    depth = pd.DataFrame({"seed_layer": list(geo.SEED_RHO), "seed_rho": list(geo.SEED_RHO.values())})
    depth["our_layer"] = [round(L * n_layers / geo.SEED_N_LAYERS) for L in depth["seed_layer"]]
    return geo.Setup(llm=None, names=names, prompts=["a", "b"], decoding=Decoding(4), depth=depth)


def test_setup_counts_and_maps_the_confirmatory_layer() -> None:
    setup = _setup(4)
    assert setup.anchor == 4 and setup.core == [0, 1, 2, 3] and setup.core_names[-1] == "villain"
    assert setup.n_pairs == 6
    assert setup.confirm_layer == 11  # round(10 * 30 / 28)
    assert setup.systems[-1] == ""  # the anchor's system turn is empty
    assert list(setup.persona_table().index) == setup.names


def test_layer_analysis_best_layer_gates_and_largest_step() -> None:
    analysis = geo.LayerAnalysis(_stats([0.1, 0.2, 0.8, 0.7], [False, False, True, True]), {}, 100)
    assert analysis.best_layer == 3 and analysis.first_pass == 3
    assert list(analysis.passing) == [3, 4]
    assert analysis.jump_layer == 3 and analysis.jump.max() == pytest.approx(0.6)
    assert analysis.at(2)["rho"] == pytest.approx(0.2) and analysis.at(9) is None
    none_pass = geo.LayerAnalysis(_stats([0.4], [False]), {}, 100)
    assert none_pass.first_pass is None and none_pass.jump_layer == 1  # one layer: no step, the best layer


def test_seed_comparison_marks_unmeasured_layers_with_a_dash() -> None:
    stats = _stats([0.3] * 30, [False] * 30)
    stats = stats[stats["layer"] != 16]  # seed L15 maps to our L16: not measured
    table = geo.seed_comparison(geo.LayerAnalysis(stats, {}, 10), _setup().depth)
    assert table.shape == (16, 4)
    column = next(c for c in table.columns if c.endswith("L16"))
    assert table.loc["ρ ours", column] == "—" and table.loc["ρ seed", column] == "0.921"
    first = table.columns[0]
    assert table.loc["ρ ours", first] == "0.300" and table.loc["jackknife seed", first] == "0.630–0.772"
    assert table.loc["Mantel p seed", table.columns[1]].startswith("<")  # seed's later layers report bounds


def _sweep(spill_centroid, spill_vector) -> pd.DataFrame:
    personas = [f"p{i}" for i in range(len(spill_centroid))]
    return pd.concat([pd.DataFrame({"method": m, "persona": personas, "spillover": s})
                      for m, s in (("centroid", spill_centroid), ("persona_vector", spill_vector))], ignore_index=True)


def test_matched_effect_wilcoxon_needs_five_personas() -> None:
    empty = pd.DataFrame()
    five = geo.SteeringControls(empty, empty, [], _sweep([1, 2, 3, 4, 5], [2, 3, 4, 5, 7]), empty, 2)
    assert 0 < five.matched_p < 0.1  # every centroid spillover below the persona vector's
    four = geo.SteeringControls(empty, empty, [], _sweep([1, 2, 3, 4], [2, 3, 4, 5]), empty, 2)
    assert four.matched_p is None


def test_headline_gap_closed_and_wins() -> None:
    head = pd.DataFrame({"intended_shift": [0.02, 0.01], "js_unsteered_target": [0.1, 0.1]},
                        index=["centroid", "persona_vector"])
    at_head = pd.DataFrame({"centroid": [3.0, 1.0, 5.0], "persona_vector": [2.0, 2.0, 4.0]})
    headline = geo.SteeringHeadline(1.0, head, at_head, None, 0.8)
    assert headline.gap_closed == pytest.approx({"centroid": 0.2, "persona_vector": 0.1})
    assert headline.wins == 2


def _result_for_conclusion(spill=(0.001, 0.002), shift=(0.01, 0.01), stats=None) -> geo.PersonaGeometryResult:
    stats = stats if stats is not None else _stats([0.2] * 11 + [0.9] * 19, [False] * 11 + [True] * 19,
                                                  strat_p=[1 / 576] * 5 + [0.3] * 25)
    summary = pd.DataFrame({"method": ["centroid", "persona_vector"] * 2, "scale": [0.5, 0.5, 1.0, 1.0],
                            "specificity": [10.0, 5.0, 6.0, 4.0]})
    head = pd.DataFrame({"specificity": [shift[0] / spill[0], shift[1] / spill[1]],
                         "specificity_ci_low": [9.0, 4.0], "specificity_ci_high": [11.0, 6.0],
                         "intended_shift": list(shift), "spillover": list(spill),
                         "js_unsteered_target": [0.05, 0.05]}, index=["centroid", "persona_vector"])
    heat = SimpleNamespace(decoupled=pd.DataFrame({"pair": ["(poet, villain)", "(surgeon, poet)"]}))
    return geo.PersonaGeometryResult(
        setup=_setup(), plan=SimpleNamespace(layers=list(stats["layer"])), responses=None, forced=None,
        analysis=geo.LayerAnalysis(stats, {}, 100), heat=heat, crossed=None, steer=SimpleNamespace(summary=summary),
        steer_controls=None, headline=geo.SteeringHeadline(1.0, head, pd.DataFrame(), None, 0.8), heldout=None,
        timing=None)


def test_conclusion_verdicts() -> None:
    verdict = geo.conclude(_result_for_conclusion())
    assert verdict.holds_confirm is False and verdict.confirm is not None  # L11 measured, gates fail there
    assert verdict.headline == "seed 001's six gates pass from layer 12, not at its confirmatory depth"
    assert verdict.every_layer_from_first and verdict.contiguous
    assert verdict.strat_floor_layers == 5 and verdict.stratified_floor == 576
    assert verdict.trio_pairs == 1  # (poet, villain); (surgeon, poet) has one trio member
    assert verdict.centroid_better and verdict.ci_separated and verdict.better_every_scale
    assert verdict.driver == "lower spillover"  # equal shifts, half the spillover
    assert verdict.partial_gap  # 20% of the gap closed
    assert "specificity falls with scale" in verdict.scale_text
    assert verdict.at_layers == [11, 12]  # the confirmatory depth, then the best layer


def test_conclusion_driver_follows_the_larger_log_ratio_and_the_sign() -> None:
    bigger_shift = geo.conclude(_result_for_conclusion(spill=(0.001, 0.0011), shift=(0.02, 0.01)))
    assert bigger_shift.driver == "a larger intended shift"
    negative = geo.conclude(_result_for_conclusion(shift=(0.01, -0.01)))
    assert negative.driver == "the sign of the intended shift"


# --------------------------------------------------------------------------------------------
# 05b


def test_check_design_names_what_does_not_fit() -> None:
    pool = ["surgeon", "poet", "villain", "helpful_assistant"]
    assert ft.check_design(pool, ["poet"], ["florist"], "villain", "whole_response", 27, 0)[-1] == "no_persona"
    with pytest.raises(PersonaError, match="seed003_anchor 'librarian' is not in `pool`"):
        ft.check_design(pool, ["poet"], ["florist"], "villain", "whole_response", 27, 0, "librarian")
    with pytest.raises(ValueError, match="adapter_seeds must be distinct"):
        ft.check_design(pool, ["poet"], ["florist"], "villain", "whole_response", 27, 0, adapter_seeds=[1, 1])
    with pytest.raises(PersonaError, match="coupling source 'librarian' is not in `pool`"):
        ft.check_design(pool, ["librarian"], ["florist"], "villain", "whole_response", 27, 0)
    with pytest.raises(PersonaError, match="EM-first source 'florist' is not in `pool`"):
        ft.check_design(pool, ["poet"], ["surgeon"], "florist", "whole_response", 27, 0)
    with pytest.raises(PersonaError, match="'poet' is both a source and a coupling negative"):
        ft.check_design(pool, ["poet"], ["poet"], "villain", "whole_response", 27, 0)
    with pytest.raises(ValueError, match="coupling_loss must be"):
        ft.check_design(pool, ["poet"], ["florist"], "villain", "all", 27, 0)
    with pytest.raises(ValueError, match="steer_layer 3 must lie above"):
        ft.check_design(pool, ["poet"], ["florist"], "villain", "marker_only", 3, 3)


def test_formatting_helpers_and_undefined_numbers() -> None:
    assert ft.ci_text(-0.1234, 0.5) == "[-0.12, 0.50]" and ft.ci_text(0.1, 0.25, ".0%") == "[10%, 25%]"
    assert ft.excludes_zero(0.1, 0.2) == "excludes 0" and ft.excludes_zero(-0.2, -0.1) == "excludes 0"
    assert ft.excludes_zero(-0.1, 0.1) == "includes 0"
    assert ft._num(np.float64(2)) == 2.0 and isinstance(ft._num(3), float)
    assert ft._num(float("nan")) is None and ft._num(np.inf) is None


def test_runs_merge_in_order_and_count_each_adapter_once() -> None:
    a, b = SimpleNamespace(key="k1", train_s=10.0), SimpleNamespace(key="k2", train_s=5.0)
    runs = ft.merge_runs({"couple:poet": a}, {"em": b}, {"C1:poet": a})
    assert list(runs) == ["couple:poet", "em", "C1:poet"]
    assert len(ft.unique_runs(runs)) == 2 and ft.recorded_train_s(runs) == 15.0


def test_recipe_chosen_row_and_reversal_tables() -> None:
    table = pd.DataFrame({"lr": [1e-4, 1e-3, 1e-3], "steps": [30, 30, 60], "val_loss": [2.0, 1.0, 1.5]})
    recipe = ft.Recipe(SimpleNamespace(lr=1e-3, steps=30), table, {}, 3)
    assert recipe.chosen["val_loss"] == 1.0
    sweep = pd.DataFrame({"method": ["none", "em_minus_base_centroid", "em_minus_base_centroid"],
                          "intervention": ["none", "steer", "ablate"], "scale": [0.0, 1.0, 1.0],
                          "items_in_domain": [[1]] * 3, "adapter": 0})
    est = ft.Estimate.across([0.1])
    rest = ft.Restoration("em_minus_base_centroid", "in_domain", (0.5,), (0.0, 0.1), est, est)
    rev = ft.Reversal(pd.DataFrame(), sweep, pd.DataFrame(), {("em_minus_base_centroid", "in_domain"): rest}, est, 1.0)
    assert "none" not in set(rev.shown["method"]) and "items_in_domain" not in rev.table.columns
    assert rev.restoration_table().loc["em_minus_base_centroid (in_domain)", "restoration"] == 0.5


def test_em_evaluation_tables_count_answered_samples_only() -> None:
    answers = pd.DataFrame({"set": ["broad"] * 4 + ["in_domain"] * 2, "model": ["EM", "EM", "base", "base", "EM", "EM"],
                            "answered": [1, 0, 1, 1, 1, 1], "template": [1, 1, 0, 1, 0, 0], "content": 0,
                            "content_general": 0, "tone": 0.0, "text": "x"})
    ev = ft.EMEvaluation(answers, {}, {})
    assert ev.template_rate.to_dict() == {"EM": 1.0, "base": 0.5}  # the unanswered EM sample is left out
    assert ev.answered_rate("EM") == pytest.approx(0.75)
    table = ev.table()
    assert table.loc[("broad", "EM"), "answered"] == 0.5 and table.loc[("broad", "EM"), "n"] == 2


def test_finetuning_figures_have_labelled_axes() -> None:
    rng = np.random.default_rng(0)
    bys = pd.DataFrame({"source": ["a", "a", "b", "b"], "cos_distance": rng.random(4), "js": rng.random(4),
                        "logprob": rng.random(4), "gen_rate": rng.random(4)})
    slopes = {(y, k): ft.Slope(1.0, 0.0, 2.0, 0.05, 4) for y, _ in ft.OUTCOMES for k, _, _ in ft.DISTANCES}
    distances = [(k, x, label.format(layer=21)) for k, x, label in ft.DISTANCES]
    _, axes = plt.subplots(2, 2)
    ft_plots.plot_leakage_vs_distance(bys, slopes, ft.OUTCOMES, distances, axes)
    assert axes[0, 0].get_xlabel() == "1 − cos of centroids, layer 21" and "log-prob" in axes[0, 0].get_ylabel()
    _, ax = plt.subplots()
    ft_plots.plot_losses(pd.DataFrame({"run": ["em"] * 3, "step": [1, 2, 3], "loss": [3.0, 2.0, 1.5]}), ax)
    assert ax.get_xlabel() == "training step" and "nats/token" in ax.get_ylabel()
    # 85 runs (gpu.yaml) of 8 kinds: one legend entry per kind, one line per run
    runs = [f"couple:p{i}:a{a}" for i in range(10) for a in range(5)] + [f"{k}:a{a}" for k in ("em", "control")
                                                                       for a in range(5)]
    runs += [f"{arm}:librarian:a{a}" for arm in ("C1", "C2", "C2prime", "C3", "C3prime") for a in range(5)]
    fig, ax = plt.subplots(figsize=(7.5, 4.0))  # the notebook's size
    ft_plots.plot_losses(pd.DataFrame([{"run": r, "step": s, "loss": 1.0 / s} for r in runs for s in (1, 2)]), ax)
    assert len(ax.get_legend().get_texts()) == 8 and len(ax.get_lines()) >= len(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gpu.yaml's run warned "Tight layout not applied" with an 85-entry legend
        fig.tight_layout()
    plt.close("all")
    assert math.isfinite(float(bys["js"].sum()))


def test_arm_effect_text_puts_welch_beside_the_mixed_model_and_flags_disagreement() -> None:
    """gpu.yaml's C2 - C1: the mixed model's interval excludes 0, Welch's over the adapters does not; the text says so."""
    welch = {"difference": -0.074, "ci_low": -0.168, "ci_high": 0.021, "p": 0.1, "n_a": 5.0, "n_b": 5.0, "a": 0.25,
             "b": 0.33}
    split = ft.ArmEffect("C2-C1", "all", -0.074, -0.121, -0.026, 0.002, 5, welch)
    assert split.excludes_zero and not split.welch_excludes_zero
    assert split.text() == ("C2-C1 -7.4% [-12.1%, -2.6%] (Welch over adapters [-16.8%, +2.1%]; the two intervals "
                            "disagree about 0)")
    both = ft.ArmEffect("C2-C2prime", "all", 0.246, 0.198, 0.293, 1e-9, 5, welch | {"ci_low": 0.158, "ci_high": 0.334})
    assert both.text() == "C2-C2prime +24.6% [+19.8%, +29.3%] (Welch over adapters [+15.8%, +33.4%])"
    missing = ft.ArmEffect("C3-C1", "all", 0.01, -0.1, 0.1, 0.5, 1, {})
    assert "Welch over adapters n/a" in missing.text() and not missing.welch_excludes_zero
