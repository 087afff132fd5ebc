"""Figures shared by the study notebooks (seaborn on matplotlib, labelled axes).

Kept here rather than in notebooks because several studies draw the same objects: belief
simplices (study 01 fractals, study 02 probe predictions) and block-structured transfer matrices;
study 01's factor mutual information by position too. Study 02's steering figures are in
:mod:`persona_wm.plots.steering`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from persona_wm.core.ghmm import GHMM
from persona_wm.core.sfp import sector_order

__all__ = ["simplex_xy", "plot_simplex", "plot_transfer_blocks", "plot_training_curves", "plot_mutual_information",
           "set_style"]

_TRIANGLE = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])


def set_style() -> None:
    """One consistent look for every report."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9)


def simplex_xy(beliefs: np.ndarray) -> np.ndarray:
    """Barycentric coordinates over 3 states -> 2-D points in an equilateral triangle."""
    beliefs = np.asarray(beliefs)
    if beliefs.shape[-1] != 3:
        raise ValueError(f"simplex plots need beliefs over 3 states, got {beliefs.shape[-1]}")
    return beliefs @ _TRIANGLE


def plot_simplex(
    beliefs: np.ndarray,
    ax: plt.Axes,
    hue: Sequence | None = None,
    hue_name: str = "",
    vertex_labels: Sequence[str] = ("s0", "s1", "s2"),
    title: str = "",
    size: float = 2.0,
    palette: str = "viridis",
) -> plt.Axes:
    """Scatter beliefs in the 2-simplex with its outline and labelled vertices."""
    xy = simplex_xy(beliefs)
    frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]})
    hue_column = (hue_name or "hue") if hue is not None else None
    if hue is not None:
        frame[hue_column] = np.asarray(hue)
    sns.scatterplot(data=frame, x="x", y="y", hue=hue_column, s=size, linewidth=0, ax=ax,
                    hue_order=sorted(set(frame[hue_column])) if hue is not None else None,
                    palette=palette if hue is not None else None, legend=hue is not None)
    outline = np.vstack([_TRIANGLE, _TRIANGLE[:1]])
    ax.plot(outline[:, 0], outline[:, 1], color="0.3", lw=0.8)
    for (vx, vy), label in zip(_TRIANGLE, vertex_labels):
        ax.annotate(label, (vx, vy), textcoords="offset points", xytext=(0, -10 if vy == 0 else 4),
                    ha="center", fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlabel("simplex coordinate x (probability, barycentric)")
    ax.set_ylabel("simplex coordinate y (probability, barycentric)")
    ax.set_title(title)
    return ax


def plot_transfer_blocks(process: GHMM, token_labels: Sequence[str] | None = None) -> plt.Figure:
    """Heatmaps of every T(x) with states listed sector by sector and sector boundaries drawn.

    Block diagonality (eq. 7) is then visible at a glance; off-block entries are what
    :func:`persona_wm.core.sfp.is_partition_preserving` reports as leaks.
    """
    order = sector_order(process)
    if process.factor_states:  # joint state s -> its factor states, e.g. "12" = (s_A=1, s_B=2)
        labels = ["".join(map(str, np.unravel_index(s, process.factor_states))) for s in order]
    else:
        labels = [str(s) for s in order]
    n = process.n_tokens
    fig, axes = plt.subplots(1, n + 1, figsize=(3.1 * n + 0.6, 3.4),
                             gridspec_kw={"width_ratios": [1] * n + [0.06]})
    edges = np.cumsum([len(s) for s in process.partition])[:-1] if process.partition else []
    for x, ax in enumerate(axes[:n]):
        block = process.transfer[x][np.ix_(order, order)]
        sns.heatmap(block, ax=ax, cmap="mako_r", vmin=0, vmax=1, square=True, cbar=x == n - 1, cbar_ax=axes[n],
                    cbar_kws={"label": "Pr(next state, token | state)"},
                    xticklabels=labels, yticklabels=labels, linewidths=0.2, linecolor="0.9")
        for e in edges:
            ax.axhline(e, color="crimson", lw=1.2)
            ax.axvline(e, color="crimson", lw=1.2)
        ax.set_title(f"T({token_labels[x] if token_labels else x})")
        ax.set_xlabel("next state (sector order)")
        ax.set_ylabel("current state (sector order)" if x == 0 else "")
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame, reference_excess: float = 0.005) -> plt.Figure:
    """Excess cross-entropy (model CE / Bayes-optimal CE - 1, log scale) against training step, one line per
    (process, seed), with a dotted reference line at ``reference_excess``.

    ``history`` is :func:`persona_wm.toy.train.history_frame`'s frame (``process``, ``seed``, ``step``,
    ``ce_ratio``); step 0 (the untrained network) is left out.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = history[history.step > 0].assign(excess=lambda d: d.ce_ratio - 1)
    sns.lineplot(data=curves, x="step", y="excess", hue="process", units="seed", estimator=None, ax=ax, lw=1)
    ax.set_yscale("log")
    ax.axhline(reference_excess, color="0.4", ls=":", lw=1)
    ax.text(curves.step.max(), reference_excess, f" {1 + reference_excess:g}× optimal", va="center", fontsize=7)
    ax.set_xlabel("training step (batches)")
    ax.set_ylabel("model CE / Bayes-optimal CE − 1 (log scale)")
    ax.set_title("Training curves against the exact Bayes-optimal cross-entropy (one line per seed)")
    fig.tight_layout()
    return fig


def plot_mutual_information(table: pd.DataFrame, reference: np.ndarray, reference_label: str) -> plt.Figure:
    """One panel per SFP family: mean factor mutual information against position, a line per correlation c,
    and a fully factored reference process's curve dashed.

    ``table`` has ``process`` (the family), ``correlation c``, ``position`` and ``MI (nats)`` (study 01's
    :class:`~persona_wm.studies.sfp_definition.MutualInformationSweep` ``.table``); ``reference`` is the
    reference's mean MI at positions 0..L.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    positions = np.arange(len(reference))
    for ax, (family, frame) in zip(axes, table.groupby("process", sort=False)):
        sns.lineplot(data=frame, x="position", y="MI (nats)", hue="correlation c", marker="o", palette="flare", ax=ax)
        ax.plot(positions, reference, "k--", lw=1, label=reference_label)
        ax.set_title(family)
        ax.set_xlabel("position (tokens seen)")
        ax.set_ylabel("mean mutual information I(A;B) (nats)")
        ax.legend(fontsize=7, title="correlation c", title_fontsize=7)
    fig.tight_layout()
    return fig
