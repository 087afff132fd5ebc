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
# **Question.** Study 03 built an EM organism in which a persona persists across the tasks of a sequence (v3,
# `em_seq`) and showed that, narrowly fine-tuned on one task in the misaligned persona, a transformer trained on it
# becomes misaligned on the other tasks far more than its factored twin. If we could *design* the persona — how
# distinct the personas are, how many dimensions they have, how many there are, how exactly the SFP structure
# holds — could we make the model resist that spread without making it a worse persona-follower? The proposal
# (seed 000, weeks 8–10) asks for Pareto improvements in **alignment fidelity** (in-distribution persona
# adherence before fine-tuning) and **robustness** (resistance to EM after the same narrow fine-tune) over the
# baseline, and notes that finding none is itself a result.
#
# Definitions (all exact against `lib` ground truth, on study 03's recipe):
# * **fidelity** = 1 − mean |model − Bayes-optimal| bad-variant probability at every answer of whole-organism
#   sequences (the total-variation distance of the answer variant);
# * **robustness** = 1 − EM breadth at the first answer of fresh sequences (held-out increase / task-1 increase of
#   the misaligned share); also reported after one aligned-persona segment;
# * **specificity parts** = study 03's intended shift and spillover of persona steering before fine-tuning.
#
# Robustness and fidelity are judged **apart**: a configuration is a *clear* robustness improvement only if its
# robustness gain exceeds the seed spread of robustness, and likewise for fidelity.

# %% tags=["parameters"]
baseline_process: str = "em_seq()"
sweep_processes: dict[str, list[str]] = {  # non-empty; each non-empty
    "mixing": ["em_seq(mixing=0.0)", "em_seq()", "em_seq(mixing=1.0)"],
    "leak": ["em_seq()", "em_seq(leak=0.05)"],
}
seeds: list[int] = [0, 1]  # non-empty; len <= 20; each >= 0
d_model: int = 32  # >= 2; <= 1024
n_layers: int = 2  # >= 1; <= 24
base_steps: int = 150  # >= 1; <= 100_000
base_batch: int = 128  # >= 1; <= 8192
base_lr: float = 0.003  # > 0; <= 1
ft_steps: int = 40  # >= 1; <= 100_000
ft_batch: int = 64  # >= 1; <= 8192
ft_lr: float = 0.0002  # > 0; <= 1
n_contexts: int = 150  # >= 10; <= 100_000
n_boot: int = 2000  # >= 1; <= 1_000_000
analysis_seed: int = 0  # >= 0
torch_threads: int = 1  # threads
trainer: str = "stacked"  # one of: stacked, sequential  # stacked: N models per step (persona_wm.toy.stacked)
output_dir: str | None = None

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

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
# 2. **persona_dim** — states per persona subspace, the persona space's dimensionality;
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
# ## 2. Each axis: fidelity and robustness vs the knob
#
# Lines: mean ± sd over seeds. The trend per axis is the slope of a linear mixed model with the knob as a fixed
# effect and the seed as a random intercept (statsmodels MixedLM), so that the seeds' shared offsets are not
# counted as independent evidence.

# %%
fig = plot_engineering_axes(sweep.grid, list(AXIS_KNOB))
save_figure(fig, out, "axes")
plt.show()
display(sweep.trends.round(4))

# %% [markdown]
# ## 3. Fidelity vs robustness: the Pareto front

# %%
fig = plot_pareto(sweep.points, baseline_process)
save_figure(fig, out, "pareto")
plt.show()

display(Markdown(f"**Pareto improvements over the baseline `{baseline_process}`: {len(sweep.improvements)}**"))
display(sweep.improvements[["process", "robustness_gain", "robustness_spread", "clear_robustness", "fidelity_gain",
                            "fidelity_spread", "clear_fidelity"]].round(4) if len(sweep.improvements)
        else Markdown("none"))

# %% [markdown]
# ## 4. Do the specificity parts track robustness?
#
# Configurations as units (seed means); Spearman with bootstrap CIs, p values Holm-corrected over the two parts.

# %%
tracking = study.specificity_tracking(sweep.points, n_boot, analysis_seed)
spill = tracking.correlations["spillover"]
fig = plot_specificity_scatter(sweep.grid, "spillover", "robustness", "axis", "robustness (1 − EM breadth)",
                               f"Spearman ρ(spillover, robustness) over configurations = {spill['spearman_rho']:.2f} "
                               f"[{spill['ci_low']:.2f}, {spill['ci_high']:.2f}]", size=50, figsize=(6.5, 4))
save_figure(fig, out, "specificity_vs_robustness")
plt.show()
display(Markdown(tracking.text()))

# %% [markdown]
# ## 5. The dense grid (`params/04_persona_engineering/full.yaml`)
#
# The same analysis on a denser grid × 5 seeds, run with `python -m persona_wm.io.sweep --params full --out
# outputs/04_persona_engineering_full/grid_full.json` (meant for a GPU; without `--out` it writes a scratch file
# under `.cache/sweep/`): every base model and fine-tune is trained first, stacked; then Dask worker processes
# measure the grid points. Its output (device, trainer, workers and wall time are in the figure's title) is
# committed in `outputs/04_persona_engineering_full/grid_full.json` and summarised here when present.

# %%
full = study.dense_grid()
if full is not None:
    fig = plot_pareto(full.points, title=full.title, size=60, fontsize=5, label_offset=2)
    save_figure(fig, out, "pareto_full")
    plt.show()
    display(Markdown(f"Dense-grid Pareto front: {', '.join(f'`{p}`' for p in full.pareto_front)}; improvements "
                     f"over the baseline: {len(full.improvements)}; clear on robustness: "
                     f"{', '.join(f'`{p}`' for p in full.robustness_clear) or 'none'}; clear on fidelity: "
                     f"{', '.join(f'`{p}`' for p in full.fidelity_clear) or 'none'}."))

# %% [markdown]
# ## Conclusion

# %%
baseline, best_robust, improvements = sweep.baseline, sweep.most_robust, sweep.improvements
runtime_s = recorded_train_seconds(recipe, sweep.grid)
display(Markdown(
    f"- {sweep.points.shape[0]} configurations × {len(seeds)} seeds. Baseline `{baseline_process}`: fidelity "
    f"{baseline.fidelity_mean:.3f} ± {baseline.fidelity_sd:.3f}, robustness {baseline.robustness_mean:.3f} ± "
    f"{baseline.robustness_sd:.3f} (EM breadth {baseline.breadth_mean:.3f}; mean ± sd over seeds).\n"
    f"- Most robust configuration: `{best_robust.process}` (robustness {best_robust.robustness_mean:.3f} ± "
    f"{best_robust.robustness_sd:.3f}, fidelity {best_robust.fidelity_mean:.3f} ± {best_robust.fidelity_sd:.3f}).\n"
    f"- Pareto improvements over the baseline: **{len(improvements)}**"
    + (f" ({', '.join(f'`{p}`' for p in improvements.process)}); beyond the seed spread on **robustness**: "
       f"{', '.join(f'`{p}`' for p in sweep.robustness_clear) or 'none'}; on **fidelity**: "
       f"{', '.join(f'`{p}`' for p in sweep.fidelity_clear) or 'none'}."
       if len(improvements) else " — no persona structure in this sweep beats the baseline on both measures, a "
       "negative result in the sense the proposal anticipates.") + "\n"
    + sweep.trend_text()
    + f"- Specificity parts vs robustness over configurations: {tracking.text()}.\n"
    + "".join(f"- `{b}` behaves exactly like `{a}` (same fidelity, robustness and base CE to every digit): the two "
              "processes are observationally equivalent.\n" for a, b in sweep.equivalent_pairs)
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
print("criteria judged apart:", sorted(k for k in result.metrics() if k.endswith("_clear")))
