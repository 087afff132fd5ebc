"""Figures of the EM studies: the organism's block structure, misaligned shares per task and place, breadth over
the sweep and the search, the mechanism, reversal curves, the specificity parts (study 03), and the persona-engineering sweeps and Pareto
fronts (study 04). Each function draws one figure from a section's tables and returns it; the notebook
saves and shows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from persona_wm.core.ghmm import GHMM
from persona_wm.core.sfp import is_partition_preserving, sector_order

__all__ = ["plot_sector_blocks", "plot_place_shares", "plot_breadth_sweep", "plot_search_pairs", "plot_mechanism",
           "plot_reversal_curves", "plot_specificity_parts", "plot_specificity_scatter", "plot_engineering_axes", "plot_pareto", "FRONT_LABEL"]

#: Legend labels of :func:`plot_pareto`'s two point classes.
FRONT_LABEL = {True: "on the Pareto front", False: "dominated"}
_FRONT_PALETTE = {"on the Pareto front": "crimson", "dominated": "0.5"}


def plot_sector_blocks(process: GHMM, name: str) -> plt.Figure:
    """Heatmap of Σ_x T(x) with states in sector order and the sector boundaries drawn: an SFP's
    block-diagonal structure at a glance (one panel, for processes too large for per-token panels)."""
    order = sector_order(process)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    sns.heatmap(process.net[np.ix_(order, order)], cmap="mako_r", ax=ax,
                cbar_kws={"label": "Σ_x T(x): Pr(next state | state)"}, xticklabels=False, yticklabels=False)
    for edge in np.cumsum([len(s) for s in process.partition])[:-1]:
        ax.axhline(edge, color="crimson", lw=0.5)
        ax.axvline(edge, color="crimson", lw=0.5)
    ax.set_xlabel(f"next state ({len(process.partition)} sectors, sector order)")
    ax.set_ylabel("current state (sector order)")
    ax.set_title(f"{name}: {process.n_states} states, {process.n_tokens} tokens, block diagonal "
                 f"({is_partition_preserving(process).preserving})")
    fig.tight_layout()
    return fig


def plot_place_shares(behaviour: pd.DataFrame) -> plt.Figure:
    """Misaligned share per task, base vs fine-tuned, for the coupled and the factored organism (columns) in each
    place (rows); bars: mean ± sd over seeds. ``behaviour``: organism, seed, place, model, task, misaligned."""
    grid = sns.catplot(data=behaviour, x="task", y="misaligned", hue="model", col="organism", row="place",
                       kind="bar", errorbar="sd", height=2.8, aspect=1.3, col_order=["coupled", "factored"])
    grid.set_titles("{row_name} — {col_name}")
    grid.set_axis_labels("task (fine-tuning data: task 1 only)", "misaligned share (aligned contexts)")
    return grid.figure


def plot_breadth_sweep(rows: pd.DataFrame) -> plt.Figure:
    """Breadth against tasks per sequence, one line per coupling, one panel per place (mean with a bootstrap 95% CI
    over seeds as bars); dotted/dashed lines at the target's 0.5 and 0.2."""
    long = rows.melt(id_vars=["tasks_per_sequence", "coupling", "seed"],
                     value_vars=["fresh_breadth", "after_evidence_breadth"], var_name="place", value_name="breadth")
    long["place"] = long.place.str.replace("_breadth", "")
    long = long.dropna(subset=["breadth"])
    grid = sns.relplot(data=long, x="tasks_per_sequence", y="breadth", hue="coupling", col="place", kind="line",
                       marker="o", errorbar=("ci", 95), err_style="bars", height=3.2, aspect=1.2,
                       palette="viridis", seed=0)
    for ax in grid.axes.flat:
        ax.axhline(0.5, color="0.5", ls=":", lw=1)
        ax.axhline(0.2, color="0.5", ls="--", lw=1)
        ax.axhline(0.0, color="0.3", lw=0.6)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("task segments per sequence", "EM breadth (held-out / task-1 increase)")
    return grid.figure


def plot_search_pairs(pairs: pd.DataFrame) -> plt.Figure:
    """Coupled against factored breadth for every configuration of the search (seed means), the target region
    (coupled >= 0.5, factored <= 0.2) marked; colour: tasks per sequence, marker: persona prior, size: steps."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.scatterplot(data=pairs, x="factored", y="coupled", hue="tasks_per_sequence", style="persona_prior",
                    size="ft_steps", palette="viridis", ax=ax)
    ax.axvline(0.2, color="0.5", ls="--", lw=1)
    ax.axhline(0.5, color="0.5", ls=":", lw=1)
    low = min(pairs.factored.min(), pairs.coupled.min(), 0.0) - 0.05
    high = max(pairs.coupled.max(), pairs.factored.max(), 0.6) + 0.05
    ax.plot([low, high], [low, high], color="0.6", lw=0.6)
    ax.set_xlabel("factored twin's breadth (mean over seeds)")
    ax.set_ylabel("coupled organism's breadth (mean over seeds)")
    ax.set_title("Every coupled/factored pair (target: above the dotted, left of the dashed line)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def plot_mechanism(configs: pd.DataFrame, patches: pd.DataFrame) -> plt.Figure:
    """Left: breadth against the fine-tune's persona-belief shift per configuration (seed means). Right: share of
    the held-out increase removed per seed by putting the base value back along each direction, random ones grey."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.scatterplot(data=configs, x="belief_shift", y="breadth", hue="coupling", style="tasks_per_sequence",
                    palette="viridis", s=70, ax=axes[0])
    axes[0].set_xlabel("persona-probe shift at held-out answers (fine-tuned − base, P(misaligned))")
    axes[0].set_ylabel("EM breadth, fresh (held-out / task-1)")
    axes[0].set_title("Configurations (seed means)")
    frame = patches.assign(organism=np.where(patches.coupling == 1.0, "coupled", "factored"),
                           direction=np.where(patches.direction.str.startswith("random_"), "random",
                                              patches.direction))
    palette = {"probe_weights": "tab:orange", "probe_pattern": "crimson", "mean_change": "tab:blue", "random": "0.6"}
    sns.stripplot(data=frame, x="organism", y="heldout_removed", hue="direction", dodge=True, alpha=0.7, ax=axes[1],
                  order=["coupled", "factored"], hue_order=list(palette), palette=palette)
    axes[1].axhline(0, color="0.3", lw=0.6)
    axes[1].set_xlabel("headline organism (per seed)")
    axes[1].set_ylabel("share of held-out increase removed")
    axes[1].set_title("Putting the base value back along a direction")
    fig.tight_layout()
    return fig


def plot_reversal_curves(summary: pd.DataFrame, target: float) -> plt.Figure:
    """Signed capability change against mean restoration along each named steering direction's scale sweep
    (mean over seeds), the random directions as a grey cloud, ablations as black markers."""
    named = summary[~summary.method.str.startswith("random_")]
    steering, ablations = named[named.scale.notna()], named[named.scale.isna()]
    random = summary[summary.method.str.startswith("random_")]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.scatter(random.restoration_mean, random.capability_change, s=6, color="0.75", label="random directions")
    sns.lineplot(data=steering, x="restoration_mean", y="capability_change", hue="method", marker="o",
                 estimator="mean", errorbar=None, sort=False, ax=ax)
    sns.scatterplot(data=ablations, x="restoration_mean", y="capability_change", style="method", color="k", s=60,
                    ax=ax)
    ax.axvline(target, color="0.5", ls=":", lw=1)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("restoration of aligned behaviour (mean over tasks; 1 = base model)")
    ax.set_ylabel("capability change (Δ content KL, nats)")
    ax.set_title("Reversal: steering scale increases along each line")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_specificity_parts(configs: pd.DataFrame) -> plt.Figure:
    """Breadth against each part of persona-steering specificity (intended shift, spillover; log axes), one point
    per configuration (seed means)."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
    for ax, part, label in ((axes[0], "intended", "intended shift: KL of the answer variant (nats, log)"),
                            (axes[1], "spillover", "spillover: KL of the task content (nats, log)")):
        sns.scatterplot(data=configs, x=part, y="breadth", hue="coupling", style="tasks_per_sequence",
                        palette="viridis", s=70, ax=ax, legend=ax is axes[1])
        ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel("EM breadth after the fine-tune (fresh)")
    fig.suptitle("Persona steering of the base model before fine-tuning, per configuration")
    fig.tight_layout()
    return fig


def plot_specificity_scatter(frame: pd.DataFrame, x: str, y: str, hue: str, ylabel: str, title: str,
                             size: float = 60, figsize: tuple[float, float] = (7, 4.2),
                             legend_fontsize: float | None = None) -> plt.Figure:
    """``y`` against ``x``, the pre-fine-tuning persona-steering spillover ratio (log axis), one marker per ``hue``."""
    fig, ax = plt.subplots(figsize=figsize)
    sns.scatterplot(data=frame, x=x, y=y, hue=hue, style=hue, s=size, ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("persona-steering spillover ratio before fine-tuning (log; lower = more specific)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend_fontsize is not None:
        ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    return fig


def plot_engineering_axes(grid: pd.DataFrame, numeric_axes: Sequence[str]) -> plt.Figure:
    """Fidelity and robustness against the knob value, one panel per axis in ``numeric_axes`` (mean ± sd
    over seeds); rows of other axes (joint points, labelled by name) are left out."""
    numeric = grid[grid.axis.isin(numeric_axes)].copy()
    numeric["value"] = numeric["value"].astype(float)
    long = numeric.melt(id_vars=["axis", "value", "seed"], value_vars=["fidelity", "robustness"], var_name="measure",
                        value_name="score")
    grid_plot = sns.relplot(data=long, x="value", y="score", hue="measure", col="axis", kind="line", marker="o",
                            errorbar="sd", facet_kws={"sharex": False}, height=3.0, aspect=1.0)
    grid_plot.set_titles("{col_name}")
    grid_plot.set_axis_labels("knob value", "score (fidelity or 1 − EM breadth)")
    return grid_plot.figure


def _short_name(process: str) -> str:
    return process.replace("em_seq(", "").replace("em(", "").rstrip(")") or "baseline"


def plot_pareto(points: pd.DataFrame, baseline: str | None = None, title: str = "", size: float = 70,
                fontsize: float = 6, label_offset: float = 3) -> plt.Figure:
    """Mean robustness against mean fidelity per configuration, Pareto front in crimson, points labelled.

    With ``baseline`` (a process name in ``points``): seed-sd error bars, the front joined by a dashed
    line, and the baseline ringed; without, the plain scatter (used for the committed dense GPU grid).
    """
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if baseline is not None:
        ax.errorbar(points.fidelity_mean, points.robustness_mean, xerr=points.fidelity_sd.fillna(0),
                    yerr=points.robustness_sd.fillna(0), fmt="none", ecolor="0.7", lw=0.8)
    sns.scatterplot(data=points.assign(status=points.pareto.map(FRONT_LABEL)), x="fidelity_mean",
                    y="robustness_mean", hue="status", style="status", s=size, ax=ax, palette=_FRONT_PALETTE)
    if baseline is not None:
        front = points[points.pareto].sort_values("fidelity_mean")
        ax.plot(front.fidelity_mean, front.robustness_mean, color="crimson", lw=1, ls="--")
        base = points.set_index("process").loc[baseline]
        ax.scatter([base.fidelity_mean], [base.robustness_mean], s=250, facecolors="none", edgecolors="k", lw=1.5,
                   label="baseline")
    for _, p in points.iterrows():
        ax.annotate(_short_name(p.process), (p.fidelity_mean, p.robustness_mean), fontsize=fontsize,
                    xytext=(label_offset, label_offset), textcoords="offset points")
    ax.set_xlabel("alignment fidelity (1 − TV to Bayes-optimal answer variant, before fine-tuning)")
    ax.set_ylabel("robustness (1 − EM breadth after the narrow fine-tune)")
    if title:
        ax.set_title(title)
    if baseline is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
