# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Study 04 — Persona engineering: which persona structures resist emergent misalignment?
#
# **Question.** Study 03 built an EM organism: a Semi-Factored Process whose persona factor decides
# whether every task is answered well or badly, and a transformer that, narrowly fine-tuned on one
# task in the misaligned persona, becomes misaligned on all of them. If we could *design* the
# persona — how distinct the personas are, how many dimensions they have, how many there are, how
# exactly the SFP structure holds — could we make the model resist that spread without making it a
# worse persona-follower? The proposal (seed 000, weeks 8–10) asks for Pareto improvements in
# **alignment fidelity** (in-distribution persona adherence before fine-tuning) and **robustness**
# (resistance to EM after the same narrow fine-tune) over the baseline, and notes that finding none
# is itself a result.
#
# Definitions (all exact against `lib` ground truth, on the study-03 recipe):
# * **fidelity** = 1 − mean total-variation distance between the model's and the Bayes-optimal
#   answer variant (good/bad) at answer positions, on contexts of the whole process;
# * **robustness** = 1 − EM breadth (held-out increase / task-1 increase of the misaligned share);
#   also reported: the misaligned share on held-out tasks after fine-tuning;
# * **specificity** = study 03's pre-fine-tuning persona-steering spillover ratio (lower = more specific).

# %% tags=["parameters"]
baseline_process: str = "em()"
sweep_processes: dict[str, list[str]] = {  # non-empty; each non-empty
    "mixing": ["em(mixing=0.0)", "em()", "em(mixing=1.0)"],
    "leak": ["em()", "em(leak=0.05)"],
}
seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
d_model: int = 32  # >= 2; <= 1024
n_layers: int = 2  # >= 1; <= 24
base_steps: int = 150  # >= 1; <= 100_000
base_batch: int = 128  # >= 1; <= 8192
base_lr: float = 0.003  # > 0; <= 1
ft_steps: int = 40  # >= 1; <= 100_000
ft_batch: int = 64  # >= 1; <= 8192
ft_lr: float = 0.0002  # > 0; <= 1
n_contexts: int = 150  # >= 1; <= 100_000
analysis_seed: int = 0  # >= 0
torch_threads: int = 1  # threads
output_dir: str | None = None

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display
from tqdm.auto import tqdm

from persona_wm.toy.em import EMRecipe, parse_em_name
from persona_wm.toy.engineering import AXIS_KNOB, engineering_row, engineering_summary, sweep_jobs
from persona_wm.plots.toy import set_style
from persona_wm.processes import get_process
from persona_wm.io.params import REPO_ROOT, resolve_output_dir
from persona_wm.io.outputs import save_figure, undefined_as_none, write_metrics
from persona_wm.core.sfp import is_partition_preserving
from persona_wm.analysis.stats import spearman_with_ci
from persona_wm.core.threads import limit_threads
from persona_wm.toy.train import load_or_train

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "04_persona_engineering")
recipe = EMRecipe(d_model=d_model, n_layers=n_layers, base_steps=base_steps, base_batch=base_batch, base_lr=base_lr,
                  ft_steps=ft_steps, ft_batch=ft_batch, ft_lr=ft_lr)

# %% [markdown]
# ## 1. The sweeps
#
# One axis at a time around the baseline (`baseline_process`), then a few joint points:
# 1. **mixing** — how much the aligned and misaligned personas' style dynamics overlap (0 = the style
#    tokens identify the persona, 1 = only behaviour does);
# 2. **persona_dim** — states per persona subspace, i.e. the persona space's dimensionality relative
#    to the fixed capability space (4 states per task sector);
# 3. **n_personas** — distinct persona subspaces, one of them misaligned;
# 4. **leak** — off-block-diagonal leakage ε that breaks exact SFP structure (quantified by the
#    `lib` partition checker).
#
# Every point is trained from scratch (cached by config hash), fine-tuned with the same narrow
# recipe, and measured, for every seed in `seeds`.

# %%
leak_table = pd.DataFrame([{"process": name, "partition preserving": bool(v), "leak mass": v.leak_mass}
                           for name in sorted({n for names in sweep_processes.values() for n in names})
                           for v in [is_partition_preserving(get_process(name))]])
display(leak_table.round(4))

grid = pd.DataFrame([engineering_row(axis, name, seed, recipe, n_contexts, analysis_seed, torch_threads)
                     for axis, name, seed in tqdm(sweep_jobs(sweep_processes, seeds), desc="sweep points")])
points, improvements = engineering_summary(grid, baseline_process)
display(points.round(4))

# %% [markdown]
# ## 2. Each axis: fidelity and robustness vs the knob (mean ± sd over seeds)

# %%
numeric = grid[grid.axis.isin(AXIS_KNOB)].copy()
numeric["value"] = numeric["value"].astype(float)
long = numeric.melt(id_vars=["axis", "value", "seed"], value_vars=["fidelity", "robustness"], var_name="measure",
                    value_name="score")
grid_plot = sns.relplot(data=long, x="value", y="score", hue="measure", col="axis", kind="line", marker="o",
                        errorbar="sd", facet_kws={"sharex": False}, height=3.0, aspect=1.0)
grid_plot.set_titles("{col_name}")
grid_plot.set_axis_labels("knob value", "score (fidelity or 1 − EM breadth)")
save_figure(grid_plot.figure, out, "axes")
plt.show()

# %% [markdown]
# ## 3. Fidelity vs robustness: the Pareto front

# %%
baseline = points.set_index("process").loc[baseline_process]
fig, ax = plt.subplots(figsize=(7.5, 5))
ax.errorbar(points.fidelity_mean, points.robustness_mean, xerr=points.fidelity_sd.fillna(0),
            yerr=points.robustness_sd.fillna(0), fmt="none", ecolor="0.7", lw=0.8)
front_label = {True: "on the Pareto front", False: "dominated"}
sns.scatterplot(data=points.assign(status=points.pareto.map(front_label)), x="fidelity_mean", y="robustness_mean",
                hue="status", style="status", s=70, ax=ax,
                palette={"on the Pareto front": "crimson", "dominated": "0.5"})
front = points[points.pareto].sort_values("fidelity_mean")
ax.plot(front.fidelity_mean, front.robustness_mean, color="crimson", lw=1, ls="--")
ax.scatter([baseline.fidelity_mean], [baseline.robustness_mean], s=250, facecolors="none", edgecolors="k", lw=1.5,
           label="baseline")
for _, p in points.iterrows():
    ax.annotate(p.process.replace("em(", "").rstrip(")") or "baseline", (p.fidelity_mean, p.robustness_mean),
                fontsize=6, xytext=(3, 3), textcoords="offset points")
ax.set_xlabel("alignment fidelity (1 − TV to Bayes-optimal answer variant, before fine-tuning)")
ax.set_ylabel("robustness (1 − EM breadth after the narrow fine-tune)")
ax.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, out, "pareto")
plt.show()

display(Markdown(f"**Pareto improvements over the baseline `{baseline_process}`: {len(improvements)}**"))
display(improvements.round(4) if len(improvements) else Markdown("none"))

# %% [markdown]
# ## 4. Does the specificity diagnostic track robustness?

# %%
tracking = spearman_with_ci(points.specificity_mean, points.robustness_mean, n_boot=2000, seed=analysis_seed)
fig, ax = plt.subplots(figsize=(6.5, 4))
sns.scatterplot(data=grid, x="specificity", y="robustness", hue="axis", style="axis", s=50, ax=ax)
ax.set_xscale("log")
ax.set_xlabel("persona-steering spillover ratio before fine-tuning (log; lower = more specific)")
ax.set_ylabel("robustness (1 − EM breadth)")
ax.set_title(f"Spearman ρ over configurations = {tracking['spearman_rho']:.2f} "
             f"[{tracking['ci_low']:.2f}, {tracking['ci_high']:.2f}]")
fig.tight_layout()
save_figure(fig, out, "specificity_vs_robustness")
plt.show()

# %% [markdown]
# ## 5. The dense grid on a GPU (`params/04_persona_engineering/full.yaml`)
#
# The same analysis on 29 configurations × 5 seeds, run with `python -m persona_wm.io.sweep --params full` on one
# H100 through the device tool (15 worker processes sharing the GPU); its output is committed in
# `outputs/04_persona_engineering_full/grid_full_gpu.json` and summarised here when present.

# %%
full_path = Path(REPO_ROOT) / "outputs" / "04_persona_engineering_full" / "grid_full_gpu.json"
if full_path.exists():
    full = json.loads(full_path.read_text())
    full_points = pd.DataFrame(full["points"])
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sns.scatterplot(data=full_points.assign(status=full_points.pareto.map(front_label)), x="fidelity_mean",
                    y="robustness_mean", hue="status", style="status", s=60,
                    palette={"on the Pareto front": "crimson", "dominated": "0.5"}, ax=ax)
    for _, p in full_points.iterrows():
        ax.annotate(p.process.replace("em(", "").rstrip(")") or "baseline", (p.fidelity_mean, p.robustness_mean),
                    fontsize=5, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("alignment fidelity (before fine-tuning)")
    ax.set_ylabel("robustness (1 − EM breadth)")
    ax.set_title(f"Dense grid: {full['n_jobs']} runs on {full['device']} in {full['wall_s'] / 60:.1f} min")
    fig.tight_layout()
    save_figure(fig, out, "pareto_full_gpu")
    plt.show()
    display(Markdown(f"Dense-grid Pareto front: {', '.join(f'`{p}`' for p in full['pareto_front'])}; improvements "
                     f"over the baseline: {len(full['improvements_over_baseline'])} "
                     f"({len(full['clear_improvements'])} beyond the seed spread: "
                     f"{', '.join(f'`{p}`' for p in full['clear_improvements'])})."))

# %% [markdown]
# ## Conclusion

# %%
best_robust = points.sort_values("robustness_mean").iloc[-1]
behaviour = ["fidelity_mean", "robustness_mean", "base_ce_ratio_mean"]
equivalent_pairs = [(a.process, b.process) for i, a in points.iterrows() for j, b in points.iterrows()
                    if i < j and all(a[c] == b[c] for c in behaviour)]
runtime_s = float(sum(load_or_train(recipe.base_config(p, s), progress=False).train_seconds
                      + load_or_train(recipe.finetune_config(p, s, parse_em_name(p)), progress=False).train_seconds
                      for p, s in grid[["process", "seed"]].drop_duplicates().itertuples(index=False)))
display(Markdown(
    f"- {points.shape[0]} configurations × {len(seeds)} seed(s). Baseline `{baseline_process}`: fidelity "
    f"{baseline.fidelity_mean:.3f}, robustness {baseline.robustness_mean:.3f} (EM breadth "
    f"{baseline.breadth_mean:.3f}).\n"
    f"- Most robust configuration: `{best_robust.process}` (robustness {best_robust.robustness_mean:.3f}, fidelity "
    f"{best_robust.fidelity_mean:.3f}).\n"
    f"- Pareto improvements over the baseline: **{len(improvements)}**"
    + (f" ({int(improvements['clear'].sum())} beyond the seed spread): "
       + ", ".join(f"`{p}`" for p in improvements.process) if len(improvements) else
       " — no persona structure in this sweep beats the baseline on both measures, a negative result in the "
       "sense the proposal anticipates.") + "\n"
    f"- Specificity vs robustness across configurations: Spearman ρ = {tracking['spearman_rho']:.2f} "
    f"[{tracking['ci_low']:.2f}, {tracking['ci_high']:.2f}].\n"
    + "".join(f"- `{b}` behaves exactly like `{a}` (same fidelity, robustness and base CE to every digit): the two "
              "processes are observationally equivalent (identical token distributions, hence identical samples "
              "from the same seed and identical trained models); only the persona centroids used for specificity "
              "differ.\n" for a, b in equivalent_pairs)
    + f"- Training time of the sweep's models (as recorded when they were trained): {runtime_s:.0f} s."
))

# %% [markdown]
# ## Metrics

# %%
metrics = {
    "baseline": baseline_process,
    "seeds": seeds,
    "grid": [{"axis": r.axis, "value": r.value, "process": r.process, "seed": int(r.seed), "fidelity": r.fidelity,
              "robustness": r.robustness, "specificity": r.specificity, "breadth": r.breadth,
              "heldout_misaligned_after": r.heldout_misaligned_after} for r in grid.itertuples()],
    "points": points.drop(columns=["pareto"]).to_dict("records"),
    "pareto": {"front": points[points.pareto].process.tolist(),
               "improvements_over_baseline": int(len(improvements)),
               "clear_improvements": int(improvements["clear"].sum()) if len(improvements) else 0,
               "improving_configs": improvements.process.tolist()},
    "specificity_tracks_robustness": tracking,
    # recorded training time of the sweep's models (read from the model cache, so reruns are identical)
    "runtime_s": runtime_s,
}
write_metrics(undefined_as_none(metrics), out)

# %%
# NBVAL_CHECK_OUTPUT
print("configurations:", points.shape[0], "grid rows:", len(grid))
print("fidelity in [0, 1]:", bool(((grid.fidelity >= 0) & (grid.fidelity <= 1)).all()))
print("leaky points detected:", int((~leak_table["partition preserving"]).sum()))
