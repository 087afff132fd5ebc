"""Figures of the LLM persona-geometry study (05a): rho by layer with gates, paired heatmaps,
jackknife ranges, steering specificity. Kept out of the notebook so that it reads as narration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["plot_crossed", "plot_controls", "plot_jackknife", "plot_paired_heatmaps", "plot_rho_by_layer", "plot_steering"]


def plot_rho_by_layer(stats: pd.DataFrame, seed: pd.DataFrame, axes: Sequence[plt.Axes]) -> None:
    """Left: rho and its controls vs layer, gates dashed, seed 001 at matched depth.
    Right: Mantel p (free and within-cluster) vs layer, log scale, gate at 0.001."""
    long = stats.melt(id_vars="layer", value_vars=["rho", "partial_rho", "radial_residual_rho", "per_prompt_median_rho"],
                      var_name="statistic", value_name="Spearman rho")
    names = {"rho": "raw rho (gate > 0.5)", "partial_rho": "cluster-partial rho (gate > 0.4)",
             "radial_residual_rho": "radial-residual rho (gate > 0.2)",
             "per_prompt_median_rho": "per-prompt median rho (gate >= 0.2)"}
    long["statistic"] = long["statistic"].map(names)
    ax = axes[0]
    sns.lineplot(data=long, x="layer", y="Spearman rho", hue="statistic", marker="o", markersize=4, ax=ax)
    for value, color in ((0.5, "C0"), (0.4, "C1"), (0.2, "C2")):
        ax.axhline(value, ls="--", lw=0.8, color=color)
    ax.scatter(seed["our_layer"], seed["seed_rho"], marker="*", s=140, color="k", zorder=5,
               label="seed 001 raw rho (Qwen2.5-7B, matched depth)")
    ax.set_xlabel("layer (residual stream after l blocks)")
    ax.set_ylabel("Spearman rho, 1 - cos vs JS over persona pairs")
    ax.set_ylim(min(-0.2, float(long["Spearman rho"].min()) - 0.05), 1.0)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    pl = stats.melt(id_vars="layer", value_vars=["mantel_p", "stratified_p"], var_name="null", value_name="p")
    pl["null"] = pl["null"].map({"mantel_p": "free permutations", "stratified_p": "within-cluster permutations"})
    sns.lineplot(data=pl, x="layer", y="p", hue="null", marker="o", markersize=4, ax=ax)
    ax.axhline(0.001, ls="--", lw=0.8, color="C0", label="gate p < 0.001")
    ax.axhline(0.05, ls=":", lw=0.8, color="C1", label="p = 0.05")
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual stream after l blocks)")
    ax.set_ylabel("one-sided Mantel p")
    ax.legend(fontsize=7)


def plot_paired_heatmaps(matrices: Mapping[str, np.ndarray], names: Sequence[str], order: np.ndarray,
                         axes: Sequence[plt.Axes]) -> None:
    """One heatmap per matrix, all in the same (clustered) persona order, own colour scale each."""
    labels = [names[i] for i in order]
    for ax, (title, matrix) in zip(axes, matrices.items()):
        m = np.asarray(matrix)[np.ix_(order, order)].astype(float)
        np.fill_diagonal(m, np.nan)
        sns.heatmap(pd.DataFrame(m, index=labels, columns=labels), cmap="viridis", square=True, ax=ax,
                    cbar_kws={"shrink": 0.7}, xticklabels=True, yticklabels=True)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=6)


def plot_jackknife(stats: pd.DataFrame, ax: plt.Axes) -> None:
    """Raw rho by layer with the leave-one-persona-out range (band) and median."""
    ax.fill_between(stats["layer"], stats["jackknife_min"], stats["jackknife_max"], alpha=0.3,
                    label="leave-one-persona-out range")
    ax.plot(stats["layer"], stats["jackknife_median"], ls="--", label="jackknife median")
    ax.plot(stats["layer"], stats["rho"], marker="o", markersize=4, label="all personas")
    ax.axhline(0.5, ls=":", lw=0.8, color="k")
    ax.set_xlabel("layer (residual stream after l blocks)")
    ax.set_ylabel("Spearman rho (cosine distance vs JS)")
    ax.legend(fontsize=7)


def plot_controls(frame: pd.DataFrame, n_prompts: int, ax: plt.Axes) -> None:
    """Rho by layer of the persona condition and each control (``condition`` column), with 95% bootstrap
    bands where a condition has them (``ci_low``/``ci_high``)."""
    palette = dict(zip(frame.condition.unique(), sns.color_palette(n_colors=frame.condition.nunique())))
    sns.lineplot(data=frame, x="layer", y="rho", hue="condition", palette=palette, marker="o", ax=ax)
    for name, group in frame.dropna(subset=["ci_low"]).groupby("condition"):
        ax.fill_between(group["layer"], group["ci_low"], group["ci_high"], color=palette[name], alpha=0.12)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("layer (residual stream after l blocks)")
    ax.set_ylabel("Spearman ρ(1 − cos of centroids, JS)")
    ax.set_title(f"Representation–behaviour ρ and its controls ({n_prompts} prompts; bands: 95% bootstrap over prompts)")
    ax.legend(fontsize=7)


def plot_crossed(cells: pd.DataFrame, did: pd.DataFrame, block_layers: Sequence[int], model: str, n_layers: int,
                 axes: Sequence[plt.Axes]) -> None:
    """Left: rho by layer in every cell of weights x prompt set (colour = prompt set, dashes = weights), with 95%
    two-way bootstrap bands. Right: the difference-in-differences by layer with its band, the pre-registered
    block shaded, layers surviving Holm's correction starred."""
    ax = axes[0]
    sns.lineplot(data=cells, x="layer", y="rho", hue="prompts", style="weights", marker="o", markersize=3, ax=ax)
    colours = dict(zip(cells["prompts"].unique(), sns.color_palette(n_colors=cells["prompts"].nunique())))
    for (prompts, _), group in cells.groupby(["prompts", "weights"]):
        ax.fill_between(group["layer"], group["ci_low"], group["ci_high"], color=colours[prompts], alpha=0.08)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel(f"{model} layer (of {n_layers})")
    ax.set_ylabel("Spearman ρ(1 − cos of centroids, JS)")
    ax.set_title("every cell of weights × prompt set", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[1]
    ax.axvspan(min(block_layers) - 0.5, max(block_layers) + 0.5, color="0.9", label="pre-registered block")
    ax.plot(did["layer"], did["did"], marker="o", color="C3", label="(trained − random) × (persona − control)")
    ax.fill_between(did["layer"], did["ci_low"], did["ci_high"], color="C3", alpha=0.2)
    hits = did[did["holm_reject"]]
    ax.scatter(hits["layer"], hits["did"], marker="*", s=90, color="k", zorder=5, label="Holm p < 0.05")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel(f"{model} layer (of {n_layers})")
    ax.set_ylabel("difference-in-differences of ρ")
    ax.set_title("persona-specific residue (band: 95% bootstrap over user × system prompts)", fontsize=9)
    ax.legend(fontsize=7)


def plot_steering(frame: pd.DataFrame, summary: pd.DataFrame, headline_scale: float,
                  axes: Sequence[plt.Axes]) -> None:
    """Left: intended shift vs spillover per target persona at the headline scale (log axes).
    Right: specificity (mean over personas, 95% bootstrap CI) by method and scale."""
    ax = axes[0]
    at = frame[frame["scale"] == headline_scale]
    sns.scatterplot(data=at, x="spillover", y="intended_shift", hue="method", style="method", ax=ax, s=40)
    ax.set_xscale("log")
    ax.axhline(0, lw=0.8, color="k")
    ax.set_xlabel("spillover: JS(steered, unsteered) on capability answers (nats)")
    ax.set_ylabel("intended shift: JS reduction to target persona (nats)")
    ax.set_title(f"one point per target persona, scale {headline_scale:g}", fontsize=9)
    ax = axes[1]
    methods = list(dict.fromkeys(summary["method"]))
    scales = sorted(summary["scale"].unique())
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rows = summary[summary["method"] == method].set_index("scale").loc[scales]
        x = np.arange(len(scales)) + (k - (len(methods) - 1) / 2) * width
        err = np.vstack([rows["specificity"] - rows["specificity_ci_low"], rows["specificity_ci_high"] - rows["specificity"]])
        ax.bar(x, rows["specificity"], width=width, label=method, color=f"C{k}")
        ax.errorbar(x, rows["specificity"], yerr=np.clip(err, 0, None), fmt="none", color="k", capsize=3)
    ax.set_xticks(np.arange(len(scales)), [f"{s:g}" for s in scales])
    ax.axhline(0, lw=0.8, color="k")
    ax.set_xlabel("steering scale (x centroid-vector norm)")
    ax.set_ylabel("specificity = intended shift / spillover (mean over personas)")
    ax.legend(fontsize=8)
