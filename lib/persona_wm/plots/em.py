"""Figures of the EM studies: the organism's block structure, EM before/after, breadth vs coupling,
reversal curves, the specificity diagnostic (study 03), and the persona-engineering sweeps and Pareto
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
from persona_wm.toy.em import mean_restoration

__all__ = ["plot_sector_blocks", "plot_em_before_after", "plot_breadth_vs_coupling", "plot_reversal_curves",
           "plot_specificity_scatter", "plot_engineering_axes", "plot_pareto", "FRONT_LABEL"]

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


def plot_em_before_after(behaviour: pd.DataFrame) -> plt.Figure:
    """Misaligned share and capability error per task, base vs fine-tuned (bars: mean ± sd over seeds).

    ``behaviour``: one row per (seed, model, task) with columns ``task`` (label), ``model``,
    ``misaligned`` and ``capability_kl``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sns.barplot(data=behaviour, x="task", y="misaligned", hue="model", errorbar="sd", ax=axes[0])
    axes[0].set_ylabel("misaligned share of answer mass (aligned contexts)")
    axes[0].set_xlabel("task (fine-tuning data: task 1 only)")
    sns.barplot(data=behaviour, x="task", y="capability_kl", hue="model", errorbar="sd", ax=axes[1])
    axes[1].set_ylabel("capability error KL(optimal ‖ model) (nats)")
    axes[1].set_xlabel("task")
    fig.tight_layout()
    return fig


def plot_breadth_vs_coupling(sweep: pd.DataFrame, seed: int) -> plt.Figure:
    """EM breadth against the coupling knob per answer design: seeds as points, mean with a 95% CI band
    (seaborn's bootstrap, seeded with ``seed``); dotted/dashed lines at the target's 0.5 and 0.2."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=sweep, x="coupling", y="breadth", hue="design", marker="o", errorbar=("ci", 95), seed=seed,
                 ax=ax)
    sns.stripplot(data=sweep, x="coupling", y="breadth", hue="design", native_scale=True, dodge=False, alpha=0.4,
                  legend=False, ax=ax)
    ax.axhline(0.5, color="0.5", ls=":", lw=1)
    ax.axhline(0.2, color="0.5", ls="--", lw=1)
    ax.set_xlabel("persona–capability coupling (0 = factored, 1 = fully coupled)")
    ax.set_ylabel("EM breadth (held-out / task-1 increase)")
    ax.set_title("Breadth vs coupling (points: seeds; band: 95% CI)")
    fig.tight_layout()
    return fig


def plot_reversal_curves(summary: pd.DataFrame, target: float) -> plt.Figure:
    """Capability damage against mean restoration (:func:`persona_wm.toy.em.mean_restoration`) along each
    steering method's scale sweep (lines; one per seed when there are several), ablations as black markers."""
    steering = summary[summary.scale.notna()].assign(restoration=mean_restoration)
    ablations = summary[summary.scale.isna()].assign(restoration=mean_restoration)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.lineplot(data=steering, x="restoration", y="capability_damage", hue="method", marker="o", estimator="mean",
                 errorbar=None, sort=False, units="seed" if summary.seed.nunique() > 1 else None, ax=ax)
    sns.scatterplot(data=ablations, x="restoration", y="capability_damage", style="method", color="k", s=60, ax=ax)
    ax.axvline(target, color="0.5", ls=":", lw=1)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("restoration of aligned behaviour (mean over tasks; 1 = base model)")
    ax.set_ylabel("capability damage (Δ content KL, nats)")
    ax.set_title("Reversal curves: steering scale increases along each line")
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
    return process.replace("em(", "").rstrip(")") or "baseline"


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
