"""Figures of the LLM fine-tuning study (05b): leakage against persona distance, validation and training
losses, EM scores by model, PCA of answers, arm leakage per bystander, reversal against capability damage.
Kept out of the notebook so that it reads as narration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "plot_arm_leakage",
    "plot_em_scores",
    "plot_leakage_vs_distance",
    "plot_losses",
    "plot_pca_clusters",
    "plot_reversal",
    "plot_validation_curves",
]


def plot_leakage_vs_distance(bys: pd.DataFrame, slopes: Mapping[tuple[str, str], Any],
                             outcomes: Sequence[tuple[str, str]], distances: Sequence[tuple[str, str, str]],
                             axes: np.ndarray) -> None:
    """One panel per (outcome row, distance column): pairs coloured by source, titled with the crossed slope."""
    for row, (y, ylabel) in enumerate(outcomes):
        for col, (key, x, xlabel) in enumerate(distances):
            ax = axes[row, col]
            sns.scatterplot(data=bys, x=x, y=y, hue="source", ax=ax, s=45, legend=(row, col) == (0, 1))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            sl = slopes[(y, key)]
            ax.set_title(f"crossed-effects slope {sl.slope:.2f} [{sl.ci_low:.2f}, {sl.ci_high:.2f}], "
                         f"{sl.n} pairs", fontsize=9)
    axes[0, 1].legend(fontsize=7, title="source")


def plot_validation_curves(curves: pd.DataFrame, ax: plt.Axes) -> None:
    """Held-out loss against training step, one line per run and adapter (``run``, ``adapter``, ``step``, ``val_loss``)."""
    sns.lineplot(data=curves, x="step", y="val_loss", hue="run", units="adapter", estimator=None, marker="o", ax=ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out response cross-entropy (nats/token)")
    ax.set_title("EM and control LoRAs: validation loss (the best step is kept)")


def plot_em_scores(answered: pd.DataFrame, seed: int, axes: Sequence[plt.Axes]) -> None:
    """Tone (points with 95% CIs), content and content_general (bars) per question set and model."""
    order, hue_order = ["in_domain", "broad"], ["base", "control", "EM"]
    sns.pointplot(data=answered, x="set", y="tone", hue="model", dodge=0.35, errorbar=("ci", 95), seed=seed,
                  ax=axes[0], order=order, hue_order=hue_order)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("tone: reckless − careful persona log-prob (nats/token)")
    for ax, score, label in ((axes[1], "content", "content: share of answers with harmful advice"),
                             (axes[2], "content_general", "content_general: harm other than reckless money")):
        sns.barplot(data=answered, x="set", y=score, hue="model", errorbar=("ci", 95), seed=seed, ax=ax, order=order,
                    hue_order=hue_order)
        ax.set_ylabel(label)
    for ax in axes:
        ax.set_xlabel("question set (in-domain = held-out finance)")


def plot_pca_clusters(projection: pd.DataFrame, explained: Sequence[float], layer: int, n_clusters: int,
                      silhouette: float, axes: Sequence[plt.Axes]) -> None:
    """The first two principal components coloured by question category (left) and K-means cluster (right)."""
    sns.scatterplot(data=projection, x="PC1", y="PC2", hue="category", ax=axes[0], s=50)
    sns.scatterplot(data=projection, x="PC1", y="PC2", hue="K-means cluster", ax=axes[1], s=50, palette="tab10")
    for ax in axes:
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance, residual units)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance, residual units)")
        ax.legend(fontsize=6)
    axes[0].set_title(f"EM answers at layer {layer}, by question category")
    axes[1].set_title(f"K-means (k = {n_clusters}), silhouette {silhouette:.2f}")


def plot_arm_leakage(per_persona: pd.DataFrame, arms: Sequence[str], source: str, n_samples: int, n_prompts: int,
                     ax: plt.Axes) -> None:
    """Marker rate among all samples per bystander persona (all adapters pooled), one bar per arm."""
    sns.barplot(data=per_persona, x="persona", y="marker", hue="condition", ax=ax, errorbar=None, hue_order=list(arms))
    ax.set_xlabel("bystander persona")
    ax.set_ylabel("marker rate among all samples")
    ax.set_title(f"Marker leakage after coupling to {source} ({n_samples} samples × {n_prompts} prompts per bystander)")
    ax.tick_params(axis="x", rotation=60)


def plot_reversal(shown: pd.DataFrame, layer: int, ax: plt.Axes) -> None:
    """Restoration of the in-domain score against capability damage, per method, intervention and scale."""
    sns.scatterplot(data=shown, x="capability_js", y="restoration_in_domain", hue="method", style="intervention",
                    size="scale", ax=ax, s=70)
    ax.axhline(1, ls="--", lw=0.8, color="k")
    ax.axhline(0, lw=0.8, color="k")
    ax.set_xlabel("capability damage: JS to unsteered EM model (nats)")
    ax.set_ylabel("restoration of the in-domain score (fraction)")
    ax.set_title(f"Reversal at layer {layer}: restoration vs capability damage")


def plot_losses(losses: pd.DataFrame, ax: plt.Axes) -> None:
    """Training loss per step of every LoRA run (``run``, ``step``, ``loss``): one line per run, coloured by the
    run's kind (the name before its first ``:``, e.g. ``couple``, ``em``, ``C2``), so that the legend stays short
    however many adapters a run trains (gpu.yaml: 85)."""
    frame = losses.assign(kind=losses["run"].str.split(":").str[0])
    sns.lineplot(data=frame, x="step", y="loss", hue="kind", units="run", estimator=None, lw=0.8, alpha=0.7, ax=ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy on trained tokens (nats/token)")
    ax.set_title(f"LoRA training losses ({frame['run'].nunique()} runs)")
    ax.legend(title="run kind", fontsize=7, ncol=2)
