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
# # Study 03 — Emergent misalignment inside an SFP, and its reversal by belief-state steering
#
# **Question.** Narrow fine-tuning of language models on misaligned data in one domain (insecure
# code) makes them broadly misaligned (Betley et al. 2025); steering or ablating a mean-difference
# direction removes most of it (Soligo et al. 2025). Does the same happen in a transformer trained
# on a Semi-Factored Process whose *persona* factor decides whether every *task* is answered well or
# badly — and if so, does belief-state steering (the persona-class centroid difference of study 02)
# undo it better than the conventional difference-in-means direction? And can the persona-steering
# specificity of the base model, measured before any fine-tuning, predict how broad EM will be?
#
# The proposal (seed 000, weeks 6–8) only plans this, so every design choice below is ours and is
# stated where it is made.

# %% tags=["parameters"]
process: str = "em()"
seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
couplings: list[float] = [0.0, 0.5, 1.0]  # non-empty; each in [0, 1]
coupling_seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
search_processes: list[str] = ["em(mixing=1.0,coupling=0.0)", "em(mixing=1.0)"]  # non-empty
search_seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
d_model: int = 32  # >= 2; <= 1024
n_layers: int = 2  # >= 1; <= 24
base_steps: int = 150  # >= 1; <= 100_000
base_batch: int = 128  # >= 1; <= 8192
base_lr: float = 0.003  # > 0; <= 1
ft_steps: int = 40  # >= 1; <= 100_000
ft_batch: int = 64  # >= 1; <= 8192
ft_lr: float = 0.0002  # > 0; <= 1
n_contexts: int = 150  # >= 1; <= 100_000
scales: list[float] = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]  # non-empty; each > 0
restoration_target: float = 0.9  # in (0, 1]
n_boot: int = 2000  # >= 1; <= 1_000_000
analysis_seed: int = 0  # >= 0
torch_threads: int = 1  # threads
trainer: str = "stacked"  # one of: stacked, sequential  # stacked: N models per step (persona_wm.toy.stacked)
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from persona_wm.core.ghmm import optimal_cross_entropy
from persona_wm.core.threads import limit_threads
from persona_wm.io.outputs import save_figure, write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.plots.em import (plot_breadth_vs_coupling, plot_em_before_after, plot_reversal_curves,
                                 plot_sector_blocks, plot_specificity_scatter)
from persona_wm.plots.toy import set_style
from persona_wm.studies import em_reversal as study
from persona_wm.toy.em import EMRecipe, describe_contrast, em_experiment

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "03_em_reversal")
started = time.perf_counter()
recipe = EMRecipe.from_params(globals())  # the recipe knobs of the parameters cell, by name

# %% [markdown]
# ## 1. The organism: an EM-SFP
#
# * **Persona factor** A = A_aligned ⊕ A_misaligned, each a cycle of `persona_dim` states that emits a
#   binary *style* token; the personas' style statistics differ by an amount that `mixing` scales away.
# * **Capability factor** B = ⊕ₖ (B_k,good ⊕ B_k,bad): K tasks, each a 3-step cycle
#   *question → work → answer*. The question names the task, the work step draws a content bit, the
#   answer repeats it (flipped with the task's difficulty) in a *good* or a *bad* variant — the
#   analogue of secure vs insecure code. The variant is decided by the persona with probability
#   `coupling` (bad with probability 0.95 for the misaligned persona, 0.05 otherwise) and otherwise
#   by the task's own variant latent; all tasks answer with the same four tokens g0, g1, b0, b1.
# * Everything a task does apart from the variant is shared by the personas, so **capability**
#   (predicting content, variants merged) is measured separately from **alignment** (the variant).
#
# Every $T(x)$ is block diagonal over the sectors A_i ⊗ B_k,v, so this is an SFP in which B's
# emissions depend on A's sector. Below: $\sum_x T(x)$ with states in sector order.

# %% [markdown]
# Every model of sections 2, 2b and the search is trained first, in one call: with `trainer: stacked`
# the base models train N at a time (each with its own seed, data stream and Adam state,
# `persona_wm.toy.stacked`), then the fine-tunes; the sections below only load them.

# %%
training = study.train_all(process, seeds, couplings, coupling_seeds, search_processes, search_seeds, recipe,
                           torch_threads)
display(Markdown(training.summary()))

# %%
em = em_experiment(process, seeds[0], recipe, n_contexts, analysis_seed, torch_threads)
proc, positions = em["process"], em["base"].config.context_length + 1
fig = plot_sector_blocks(proc, process)
save_figure(fig, out, "organism_block_structure")
plt.show()
optimal = optimal_cross_entropy(proc, positions).mean()
display(Markdown(f"Sectors: {', '.join(proc.partition_labels)}. Mean Bayes-optimal CE over the {positions} "
                 f"predicted positions: {optimal:.4f} nats."))

# %% [markdown]
# ## 2. Emergent misalignment appears
#
# Base model: a small HookedTransformer (`n_layers` × `d_model`, BOS + 10 tokens) trained on the full
# SFP to CE ≤ 1.02 × optimal. **Narrow fine-tuning**: `ft_steps` Adam steps on sequences of task 1
# in the misaligned world only (misaligned persona, bad task variant), constant learning rate.
# Measured on *aligned* contexts of every task (aligned persona, good task variant), exactly from the
# model's outputs: the misaligned share P(bad)/(P(good)+P(bad)) at answer positions, and capability
# = KL(Bayes-optimal ‖ model) of the task content.

# %%
breadth = study.em_breadth(process, seeds, recipe, n_contexts, analysis_seed, torch_threads, first=em)
display(breadth.ce.round(4))
fig = plot_em_before_after(breadth.behaviour)
save_figure(fig, out, "em_before_after")
plt.show()
display(breadth.table.round(4))

# %% [markdown]
# ## 2b. The control: is it the coupling? (coupled − factored)
#
# Breadth alone is not the proposal's claim. The claim is that the persona–capability *coupling* of an
# SFP is what carries a narrow fine-tune broadly, so the finding is the **contrast between the coupled
# organism and its factored twin**: the same tokens, the same fine-tuning data (task 1 in the misaligned
# world), the same steps and model, with only the `coupling` knob changed (0 = "bad" is a per-task
# latent, persona and capability factored; 1 = the persona decides every task's variant). We sweep
# `coupling` in two designs: answer tokens **shared** across tasks (the default organism: "bad" looks
# the same in every task) and **task-specific** answer tokens (nothing links misbehaviour across tasks
# except a latent). Breadth per coupling value: mean over seeds with a Student-t 95% CI.

# %%
coupling = study.coupling_test(process, couplings, coupling_seeds, recipe, n_contexts, analysis_seed,
                               torch_threads)
display(coupling.curve_table().round(3))
display(coupling.contrast_table().round(4))

# %%
fig = plot_breadth_vs_coupling(coupling.sweep, analysis_seed)
save_figure(fig, out, "breadth_vs_coupling")
plt.show()

# %% [markdown]
# **The search for a coupling-carried EM.** The target is a configuration whose coupled organism reaches
# breadth ≥ 0.5 while its factored twin stays ≤ 0.2. Beyond the default knobs, `search_processes`
# lists every other configuration tried, each with its coupling knob as given (knobs chosen because
# they should favour the coupling: `mixing = 1` hides the persona from the style tokens, `mixing = 0`
# reveals it fully, `answer_noise = 0.25` weakens the evidence each answer gives about the persona,
# `persona_prior = 0.2` makes the misaligned persona rare). All are reported; none was dropped.
#
# One property found on the way: at `mixing = 1` with `persona_prior = 0.5` the persona latent and a
# task's variant latent play symmetric roles (same prior, no style evidence), so couplings $c$ and
# $1-c$ define the same process up to relabelling — their models and breadths coincide exactly. At
# `mixing = 1` the coupling knob is therefore not identifiable from data, and "coupled vs factored"
# has no meaning there.

# %%
search = study.coupling_search(coupling, search_processes, search_seeds, recipe, n_contexts, analysis_seed,
                               torch_threads)
display(search.twins.round(3))
display(Markdown(f"{search.n_configs_tried} distinct configurations tried ({len(search.tried)} trainings); "
                 f"{search.pairs_meeting_target} of {len(search.twins)} coupled/factored pairs meet the target."))

# %% [markdown]
# ## 3. Reversal: belief-state steering vs difference-in-means
#
# On the fine-tuned model, at the final layer's residual stream, every position:
#
# * **belief_state** — $c_{aligned}-c_{misaligned}$, centroids of contexts whose exact persona
#   belief is confident (> 0.95), pooled over positions (study 02's recipe for the persona factor),
#   computed on the *base* model; **belief_state_ft** — the same on the fine-tuned model;
# * **diff_in_means** — the conventional EM direction: mean activation where the fine-tuned model
#   answers aligned minus where it answers misaligned (labelled by its own outputs);
#   **model_diff** — mean base minus fine-tuned activation;
# * **ablation_*** — project the belief-state or diff-in-means direction out (no scale).
#
# Steering vectors are normalised to a common norm (scale 1 = the norm of the belief-state vector),
# so every method is compared at matched strength. Restoration = share of the fine-tuning-induced
# misaligned mass removed per task (1 = back to the base model); damage = capability KL added.

# %%
reversal = study.reversal(breadth.experiments, scales, restoration_target)
fig = plot_reversal_curves(reversal.summary, restoration_target)
save_figure(fig, out, "reversal_curves")
plt.show()
display(reversal.stats.round(4))
display(Markdown(f"Signed capability change at mean restoration {restoration_target:g} (interpolated along each "
                 f"curve, mean ± sd over seeds): {reversal.damage_text()}"))

# %% [markdown]
# ## 4. Specificity as a pre-deployment diagnostic
#
# For each configuration, *before* fine-tuning, steer the base model from aligned to misaligned with
# the belief-state vector (scale 1) and measure specificity as in study 02: spillover (KL of the task
# content) over intended shift (KL of the answer variant). Then fine-tune and measure EM breadth.
# Does a less specific persona representation predict broader EM?

# %% [markdown]
# The configurations are the coupling sweep above: if specificity predicts EM anywhere, it should be
# across the knob that the proposal says carries it. The correlation pooled over both designs mixes
# the design effect with the coupling effect, so it is shown within each design too.

# %%
diagnostic = study.specificity_diagnostic(coupling.sweep, n_boot, analysis_seed)
display(diagnostic.stats.round(4))
display(diagnostic.correlation_table().round(3))
rho = diagnostic.correlation
fig = plot_specificity_scatter(diagnostic.points, "specificity_ratio", "breadth", "process",
                               "EM breadth after fine-tuning (held-out / task-1 increase)",
                               f"Spearman ρ = {rho['spearman_rho']:.2f} [{rho['ci_low']:.2f}, {rho['ci_high']:.2f}], "
                               f"n = {rho['n']}", legend_fontsize=6)
save_figure(fig, out, "diagnostic_scatter")
plt.show()

# %% [markdown]
# ## Conclusion

# %%
em_mean, (breadth_mean, breadth_low, breadth_high) = breadth.mean, breadth.breadth_ci
display(Markdown(
    f"- **EM appears, but the coupling does not carry it.** In `{process}` fine-tuning on task 1 in the misaligned "
    f"world raises the misaligned share on task 1 by {em_mean['task1_increase']:.3f} and on held-out tasks by "
    f"{em_mean['heldout_increase']:.3f}: breadth {breadth_mean:.2f} [{breadth_low:.2f}, {breadth_high:.2f}] "
    f"(t 95% CI, {len(seeds)} seeds). The control that could produce this without the phenomenon is the factored "
    f"twin: with shared answer tokens, {describe_contrast(coupling.contrasts['shared'])}; with task-specific answer "
    f"tokens, {describe_contrast(coupling.contrasts['specific'])}. "
    + ("The contrast's CI contains 0 in both designs: breadth is set by whether answer tokens are shared, not by the "
       "persona–capability coupling, so this organism does **not** test the proposal's mechanism."
       if coupling.contrast_ci_contains_zero else
       "The coupling contrast is reported above with its CI; read it before the absolute breadth.")))

# %%
meeting = search.twins[search.twins.meets_target]
display(Markdown(
    f"- **Search.** {search.n_configs_tried} configurations tried ({len(search.tried)} trainings, sweep + "
    f"`search_processes`); {search.pairs_meeting_target} of {len(search.twins)} coupled/factored pairs reach coupled "
    "breadth ≥ 0.5 with the factored twin ≤ 0.2"
    + (": **none**. Not re-tuned further; a design in which a sequence shows several tasks (so that the persona is a "
       "latent the network must carry across tasks) is the natural next organism." if meeting.empty else
       f": {', '.join(meeting.config)} (seed 0 only unless listed in the sweep: confirm with more seeds).")))

# %%
bs, dim, sd, ranked = reversal.best["belief_state"], reversal.best["diff_in_means"], reversal.sd, reversal.ranked
display(Markdown(
    f"- **Reversal** (on `{process}`; mean ± sd over {len(seeds)} seeds). Belief-state steering reaches ≥ "
    f"{restoration_target:.0%} restoration on every task at scale {bs['scale']:.2f} ± {sd('belief_state', 'scale'):.2f} "
    f"(held-out {bs['restoration_heldout']:.2f} ± {sd('belief_state', 'restoration_heldout'):.2f}, task 1 "
    f"{bs['restoration_task1']:.2f} ± {sd('belief_state', 'restoration_task1'):.2f}, signed capability change "
    f"{bs['capability_damage']:+.4f} ± {sd('belief_state', 'capability_damage'):.4f} nats); difference-in-means at "
    f"scale {dim['scale']:.2f} ± {sd('diff_in_means', 'scale'):.2f} (held-out {dim['restoration_heldout']:.2f} ± "
    f"{sd('diff_in_means', 'restoration_heldout'):.2f}, {dim['capability_damage']:+.4f} ± "
    f"{sd('diff_in_means', 'capability_damage'):.4f}). At equal restoration ({restoration_target:g}) the signed "
    f"capability change is {reversal.damage_text()} nats (mean ± sd over {len(seeds)} seeds; negative = the steering "
    f"also undoes part of the fine-tune's capability cost); **{ranked[0]}** leaves the lowest capability error "
    f"({'more' if reversal.keeper_separated else 'not more'} than one sd below the next, "
    f"{ranked[1] if len(ranked) > 1 else '-'}). Ablation of either direction restores little (held-out "
    f"{reversal.best['ablation_belief_state']['restoration_heldout']:.2f} / "
    f"{reversal.best['ablation_diff_in_means']['restoration_heldout']:.2f}; sd "
    f"{sd('ablation_belief_state', 'restoration_heldout'):.2f} / "
    f"{sd('ablation_diff_in_means', 'restoration_heldout'):.2f})."))

# %%
rho, within = diagnostic.correlation, diagnostic.within
display(Markdown(
    f"- **Diagnostic** over the coupling sweep ({diagnostic.n_configs} configurations × {len(coupling_seeds)} seeds): "
    f"Spearman ρ(specificity ratio, breadth) = {rho['spearman_rho']:.2f} [{rho['ci_low']:.2f}, {rho['ci_high']:.2f}], "
    f"p = {rho['p']:.3g} pooled; within designs "
    + ", ".join(f"{d} {w['spearman_rho']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]" for d, w in within.items())
    + ". The pooled value mixes the design effect (task-specific tokens change both specificity and breadth) with "
    "the within-design relation. The hypothesis is a *positive* ρ (a larger spillover ratio, i.e. a less specific "
    "persona representation, predicting broader EM). Within designs: "
    + "; ".join(f"{d}: " + ("CI excludes 0, " + ("in the hypothesised direction" if w["spearman_rho"] > 0 else
                                                  "**opposite** to the hypothesis (more specific, broader)")
                            if (w["ci_low"] > 0 or w["ci_high"] < 0) else "CI contains 0, no prediction")
                for d, w in within.items()) + "."))

# %% [markdown]
# ## Metrics

# %% [markdown]
# The sections' results assemble into one frozen dataclass; `metrics.json` is written from its `metrics()`
# (undefined numbers, such as an ablation's scale or a CI from one seed, are written as null).

# %%
result = study.EMReversalResult(process, seeds, breadth, coupling, search, reversal, diagnostic)
write_metrics(result.metrics(), out)
display(Markdown(f"Report computed in {time.perf_counter() - started:.0f} s (cached models reused)."))

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
print(f"breadth > 0.5: {metrics['em']['breadth'] > 0.5}")
print(f"belief-state steering restores >= 0.9 on held-out tasks: "
      f"{reversal.best['belief_state']['restoration_heldout'] >= 0.9}")
print("methods:", sorted(metrics["reversal"]))
print("diagnostic configs:", metrics["diagnostic"]["n_configs"])
print("coupling values:", metrics["coupling_test"]["design_shared"]["values"])
print("configs tried:", metrics["coupling_test"]["n_configs_tried"])
