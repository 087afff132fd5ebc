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
trainer: str = "stacked"  # one of: stacked, sequential  # stacked: N models per step (persona_wm.toy.stacked)
output_dir: str | None = None

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from persona_wm.analysis.stats import spearman_with_ci
from persona_wm.core.threads import limit_threads
from persona_wm.io.outputs import save_figure, write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.plots.em import plot_engineering_axes, plot_pareto, plot_specificity_scatter
from persona_wm.plots.toy import set_style
from persona_wm.studies import persona_engineering as study
from persona_wm.toy.em import EMRecipe
from persona_wm.toy.engineering import AXIS_KNOB, recorded_train_seconds

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "04_persona_engineering")
recipe = EMRecipe.from_params(globals())  # the recipe knobs of the parameters cell, by name

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
sweep = study.engineering_sweep(baseline_process, sweep_processes, seeds, recipe, n_contexts, analysis_seed,
                               torch_threads)
display(sweep.leak_table.round(4))
display(sweep.points.round(4))

# %% [markdown]
# ## 2. Each axis: fidelity and robustness vs the knob (mean ± sd over seeds)

# %%
fig = plot_engineering_axes(sweep.grid, list(AXIS_KNOB))
save_figure(fig, out, "axes")
plt.show()

# %% [markdown]
# ## 3. Fidelity vs robustness: the Pareto front

# %%
fig = plot_pareto(sweep.points, baseline_process)
save_figure(fig, out, "pareto")
plt.show()

display(Markdown(f"**Pareto improvements over the baseline `{baseline_process}`: {len(sweep.improvements)}**"))
display(sweep.improvements.round(4) if len(sweep.improvements) else Markdown("none"))

# %% [markdown]
# ## 4. Does the specificity diagnostic track robustness?

# %%
tracking = spearman_with_ci(sweep.points.specificity_mean, sweep.points.robustness_mean, n_boot=2000,
                            seed=analysis_seed)
fig = plot_specificity_scatter(sweep.grid, "specificity", "robustness", "axis", "robustness (1 − EM breadth)",
                               f"Spearman ρ over configurations = {tracking['spearman_rho']:.2f} "
                               f"[{tracking['ci_low']:.2f}, {tracking['ci_high']:.2f}]", size=50, figsize=(6.5, 4))
save_figure(fig, out, "specificity_vs_robustness")
plt.show()

# %% [markdown]
# ## 5. The dense grid on a GPU (`params/04_persona_engineering/full.yaml`)
#
# The same analysis on 29 configurations × 5 seeds, run with `python -m persona_wm.io.sweep --params full` on one
# GPU through the device tool: the 145 base models and their 145 fine-tunes are trained first, stacked, on the GPU;
# then Dask worker processes measure the 170 grid points. Its output (device, trainer, workers and wall time are in
# the figure's title) is committed in `outputs/04_persona_engineering_full/grid_full_gpu.json` and summarised here
# when present.

# %%
full = study.dense_grid()
if full is not None:
    fig = plot_pareto(full.points, title=full.title, size=60, fontsize=5, label_offset=2)
    save_figure(fig, out, "pareto_full_gpu")
    plt.show()
    display(Markdown(f"Dense-grid Pareto front: {', '.join(f'`{p}`' for p in full.pareto_front)}; improvements "
                     f"over the baseline: {len(full.improvements)} ({len(full.clear_improvements)} beyond the seed "
                     f"spread: {', '.join(f'`{p}`' for p in full.clear_improvements)})."))

# %% [markdown]
# ## Conclusion

# %%
baseline, best_robust, improvements = sweep.baseline, sweep.most_robust, sweep.improvements
runtime_s = recorded_train_seconds(recipe, sweep.grid)
display(Markdown(
    f"- {sweep.points.shape[0]} configurations × {len(seeds)} seed(s). Baseline `{baseline_process}`: fidelity "
    f"{baseline.fidelity_mean:.3f}, robustness {baseline.robustness_mean:.3f} (EM breadth "
    f"{baseline.breadth_mean:.3f}).\n"
    f"- Most robust configuration: `{best_robust.process}` (robustness {best_robust.robustness_mean:.3f}, fidelity "
    f"{best_robust.fidelity_mean:.3f}).\n"
    f"- Pareto improvements over the baseline: **{len(improvements)}**"
    + (f" ({sweep.clear_improvements} beyond the seed spread): " + ", ".join(f"`{p}`" for p in improvements.process)
       if len(improvements) else " — no persona structure in this sweep beats the baseline on both measures, a "
       "negative result in the sense the proposal anticipates.") + "\n"
    f"- Specificity vs robustness across configurations: Spearman ρ = {tracking['spearman_rho']:.2f} "
    f"[{tracking['ci_low']:.2f}, {tracking['ci_high']:.2f}].\n"
    + "".join(f"- `{b}` behaves exactly like `{a}` (same fidelity, robustness and base CE to every digit): the two "
              "processes are observationally equivalent (identical token distributions, hence identical samples "
              "from the same seed and identical trained models); only the persona centroids used for specificity "
              "differ.\n" for a, b in sweep.equivalent_pairs)
    + f"- Training time of the sweep's models (as recorded when they were trained): {runtime_s:.0f} s."))

# %% [markdown]
# ## Metrics

# %% [markdown]
# The sections' results assemble into one frozen dataclass; `metrics.json` is written from its `metrics()`
# (the training time is read from the model cache, so reruns give the same file).

# %%
result = study.PersonaEngineeringResult(seeds, sweep, tracking, runtime_s)
write_metrics(result.metrics(), out)

# %%
# NBVAL_CHECK_OUTPUT
print("configurations:", sweep.points.shape[0], "grid rows:", len(sweep.grid))
print("fidelity in [0, 1]:", bool(((sweep.grid.fidelity >= 0) & (sweep.grid.fidelity <= 1)).all()))
print("leaky points detected:", int((~sweep.leak_table["partition preserving"]).sum()))
