"""Figures of study 02 (belief-state steering in toy transformers): spillover against scale, the reading-free
spillover measures, additivity over training, layer dependence and Table 6's partition masses.

Each function draws one figure from a section's frame (the tables of :mod:`persona_wm.studies.steering_specificity`'s
result dataclasses, passed as frames: this layer knows nothing of the studies) and returns the seaborn grid; the
notebook saves and shows it.
"""

from __future__ import annotations

import pandas as pd
import seaborn as sns

__all__ = ["plot_kl_vs_scale", "plot_ratio_vs_scale", "plot_bounded_spillover", "plot_additivity_vs_training",
           "plot_ratio_by_layer", "plot_partition"]


def _steer_label(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(factor=lambda d: "steer factor " + d.factor.astype(str))


def plot_kl_vs_scale(stats: pd.DataFrame) -> sns.FacetGrid:
    """Intended and spillover KL against scale, per process (columns) and steered factor (rows).

    ``stats`` is the steering sweep summarised over seeds (``process``, ``method``, ``factor``, ``scale``,
    ``kl_steered_mean``, ``kl_unsteered_mean``); scale 0 is left out.
    """
    curves = stats[stats.scale > 0].melt(id_vars=["process", "method", "factor", "scale"],
                                         value_vars=["kl_steered_mean", "kl_unsteered_mean"], var_name="quantity",
                                         value_name="KL (nats)")
    curves["quantity"] = curves["quantity"].map({"kl_steered_mean": "intended (steered factor)",
                                                 "kl_unsteered_mean": "spillover (other factor)"})
    grid = sns.relplot(data=_steer_label(curves), x="scale", y="KL (nats)", hue="quantity", style="method",
                       col="process", row="factor", kind="line", marker="o", height=2.8, aspect=1.2)
    grid.set(yscale="log")
    grid.set_titles("{row_name} · {col_name}")
    grid.set_axis_labels("steering scale c (× centroid difference)", "D_KL vs unsteered output (nats, log)")
    return grid


def plot_ratio_vs_scale(stats: pd.DataFrame) -> sns.FacetGrid:
    """Spillover ratio against scale, per steered factor (``stats`` as for :func:`plot_kl_vs_scale`, with
    ``ratio_mean``)."""
    grid = sns.relplot(data=_steer_label(stats[stats.scale > 0]), x="scale", y="ratio_mean", hue="process",
                       style="method", col="factor", kind="line", marker="o", height=3.2, aspect=1.3)
    grid.set(yscale="log")
    grid.set_titles("{col_name}")
    grid.set_axis_labels("steering scale c (× centroid difference)", "spillover ratio = spillover / intended (log)")
    return grid


def plot_bounded_spillover(stats: pd.DataFrame) -> sns.FacetGrid:
    """The two reading-free spillover measures against scale (``stats`` as for :func:`plot_kl_vs_scale`, with
    ``tv_unsteered_mean`` and ``argmax_flip_mean``)."""
    bounded = stats[stats.scale > 0].melt(id_vars=["process", "method", "factor", "scale"],
                                          value_vars=["tv_unsteered_mean", "argmax_flip_mean"], var_name="measure",
                                          value_name="value")
    bounded["measure"] = bounded.measure.map({"tv_unsteered_mean": "mean TV of the other factor",
                                              "argmax_flip_mean": "fraction of other-factor argmax flips"})
    grid = sns.relplot(data=bounded, x="scale", y="value", hue="process", style="method", col="measure", kind="line",
                       marker="o", height=3.2, aspect=1.3, facet_kws={"sharey": False})
    grid.set_titles("{col_name}")
    grid.set_axis_labels("steering scale c (× centroid difference)", "spillover (probability / fraction of contexts)")
    return grid


def plot_additivity_vs_training(points: pd.DataFrame) -> sns.FacetGrid:
    """Non-additive fraction and seed-method ratio against excess CE at each snapshot (log-log).

    ``points``: one row per training snapshot (``process``, ``seed``, ``steps``, ``ce_ratio``, ``interaction``,
    ``ratio``).
    """
    long = points.assign(excess=points.ce_ratio - 1).melt(
        id_vars=["process", "seed", "steps", "excess"], value_vars=["interaction", "ratio"], var_name="quantity",
        value_name="value")
    long["quantity"] = long.quantity.map({"interaction": "non-additive fraction of the centroids",
                                          "ratio": "seed-method spillover ratio, scale 1 (per-context)"})
    grid = sns.relplot(data=long, x="excess", y="value", hue="process", style="seed", row="quantity",
                       kind="line", marker="o", sort=False, height=2.8, aspect=2.2, facet_kws={"sharey": False})
    grid.set(xscale="log", yscale="log")
    grid.set_titles("{row_name}")
    grid.set_axis_labels("CE / Bayes-optimal CE − 1 at the snapshot (log; training runs right to left)",
                         "value (log; fraction or ratio)")
    return grid


def plot_ratio_by_layer(frame: pd.DataFrame, scale: float) -> sns.FacetGrid:
    """Spillover ratio at every residual hook (bars: mean over seeds, error bars: their sd).

    ``frame``: the per-seed steering rows at one ``scale`` (``process``, ``method``, ``factor``, ``hook``, ``ratio``).
    """
    grid = sns.catplot(data=_steer_label(frame), x="hook", y="ratio", hue="method", col="process", row="factor",
                       kind="bar", errorbar="sd", height=3.0, aspect=1.1)
    grid.set(yscale="log")
    grid.set_titles("{row_name} · {col_name}")
    grid.set_axis_labels("residual hook (steering site)", f"spillover ratio at scale {scale:g} (log)")
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", rotation=30)
    return grid


def plot_partition(frame: pd.DataFrame) -> sns.FacetGrid:
    """Forbidden and target-class mass against scale, per partition block and method (Table 6).

    ``frame``: per seed (``block``, ``scale``, ``method``, ``seed``, ``forbidden``, ``target``).
    """
    long = frame.melt(id_vars=["block", "scale", "method", "seed"], value_vars=["forbidden", "target"],
                      var_name="mass", value_name="probability")
    grid = sns.relplot(data=long, x="scale", y="probability", hue="block", style="method", col="mass", kind="line",
                       markers=True, errorbar="sd", height=3.2, aspect=1.2)
    grid.set_titles("{col_name} mass")
    grid.set_axis_labels("steering scale c", "probability mass (mean over contexts; sd over seeds)")
    return grid
