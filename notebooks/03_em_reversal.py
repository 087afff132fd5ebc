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
# # Study 03 — Emergent misalignment carried by a persona, and its reversal
#
# **Question.** Narrow fine-tuning of language models on misaligned data in one domain makes them broadly
# misaligned (Betley et al. 2025). The proposal (seed 000) explains this with a Semi-Factored Process: a *persona*
# factor shared by every task, coupled to the *capability* factor by a correlated prior over sectors, so that a
# fine-tune that moves the persona belief moves every task. Does a transformer trained on such a process show
# emergent misalignment **because of the coupling** — more than its factored twin, trained and fine-tuned the same
# way — and does it do so **through its persona belief**? Then: does belief-state steering undo it better than
# the conventional difference-in-means direction and than random directions, and does pre-fine-tuning steering
# specificity predict breadth?
#
# The previous organism (`em()`, one task per sequence) answered the first question with a null: its coupled −
# factored breadth was −0.004 [−0.138, 0.130] with shared and +0.036 [−0.121, 0.194] with task-specific answer
# tokens (README, "one task per sequence"). With one task per sequence a network has no reason to carry a persona
# belief from one task to another. This study's organism (`em_seq`, v3) shows several tasks per sequence under one
# persona, with no answer token shared between tasks.

# %% tags=["parameters"]
process: str = "em_seq()"  # the pre-registered headline organism (coupled); its factored twin has coupling=0.0
tasks_per_sequence: list[int] = [1, 3]  # non-empty; each >= 1; each <= 12
couplings: list[float] = [0.0, 1.0]  # non-empty; each in [0, 1]
persona_priors: list[float] = [0.5]  # non-empty; each in (0, 1)
seeds: list[int] = [0, 1]  # non-empty; len <= 20; each >= 0
d_model: int = 32  # >= 2; <= 1024
n_layers: int = 2  # >= 1; <= 24
base_steps: int = 150  # >= 1; <= 100_000
base_batch: int = 128  # >= 1; <= 8192
base_lr: float = 0.003  # > 0; <= 1
ft_steps: int = 40  # in ft_step_grid  # the headline's fine-tuning steps
ft_step_grid: list[int] = [40]  # non-empty; each >= 1; each <= 100_000
ft_batch: int = 64  # >= 1; <= 8192
ft_lr: float = 0.0002  # in ft_lr_grid  # the headline's fine-tuning learning rate
ft_lr_grid: list[float] = [0.0002]  # non-empty; each > 0; each <= 1
n_contexts: int = 150  # >= 10; <= 100_000
scales: list[float] = [0.5, 1.0, 2.0]  # non-empty; contains 1.0; each > 0
restoration_target: float = 0.9  # in (0, 1]
n_random: int = 4  # >= 1; <= 1000  # random directions in each null
n_boot: int = 2000  # >= 1; <= 1_000_000
analysis_seed: int = 0  # >= 0
torch_threads: int = 1  # threads
trainer: str = "stacked"  # one of: stacked, sequential  # stacked: N models per step (persona_wm.toy.stacked)
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from persona_wm.core.threads import limit_threads
from persona_wm.io.outputs import save_figure, write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.plots import em as figures
from persona_wm.plots.toy import set_style
from persona_wm.processes import get_process
from persona_wm.studies import em_reversal as study

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "03_em_reversal")
started = time.perf_counter()
design = study.Design.from_params(globals())  # the parameters cell's design and recipe knobs, by name

# %% [markdown]
# ## 1. The organism: a persona that persists across tasks
#
# * **Persona factor** A = A_aligned ⊕ A_misaligned, drawn once per sequence: each persona is a cycle of
#   `persona_dim` states emitting a binary *style* token whose statistics differ between personas by an amount
#   that `mixing` scales away (as in `em()`).
# * **Capability factor**: a sequence is `tasks_per_sequence` *segments*, each *question → work → answer*. The
#   question names a task drawn afresh for the segment, the work step emits a content bit, the answer repeats it
#   (flipped with the task's difficulty) with one of **that task's own** answer tokens, good or bad — no answer
#   token is shared between tasks. Every task k has a *variant latent* v_k (good/bad) drawn once per sequence.
# * **Coupling**: at an answer the variant follows the persona with probability `coupling` (bad with probability
#   0.95 for the misaligned persona, 0.05 otherwise) and the task's own latent otherwise. The prior puts the same
#   probability on the misaligned persona as on each v_k = bad, so **each task's marginal bad-answer rate is the
#   same at every coupling**: only the dependence between tasks changes (checked below, exactly).
#
# Every $T(x)$ is block diagonal over the sectors (persona) ⊗ (v_1, …, v_K). Below: $\sum_x T(x)$ in sector order.

# %%
organism = study.organism(design)
fig = figures.plot_sector_blocks(get_process(process), process)
save_figure(fig, out, "organism_block_structure")
plt.show()
display(organism.marginals.pivot(index="coupling", columns="task", values="bad_rate").round(6))
display(Markdown(f"{organism.n_states} states, {organism.n_tokens} tokens, {len(organism.sectors)} sectors; mean "
                 f"Bayes-optimal CE over one sequence {organism.optimal_ce:.4f} nats. Exact P(first answer bad) per "
                 f"task differs between couplings by at most {organism.marginal_spread:.1e}."))

# %% [markdown]
# ## 2. Training
#
# Base models: a small HookedTransformer (`n_layers` × `d_model`) trained on the whole organism, one sequence per
# context. **Narrow fine-tune**: Adam at a constant rate on sequences made only of task-1 segments, from the
# misaligned persona with task 1's variant bad. One fine-tuning run per learning rate keeps snapshots at every
# step count of the search, so "40 steps" is the 40-step snapshot of the run. Every model of every section is
# trained first, in one call (stacked: N models per step).

# %%
training = study.train_all(design, torch_threads)
display(Markdown(training.summary()))
display(training.base_ce.round(4))
experiments = study.Experiments(design, n_contexts, analysis_seed, torch_threads, training)

# %% [markdown]
# ## 3. The pre-registered headline: coupled − factored breadth
#
# Measured on sequences of the *aligned* world (aligned persona, every variant good), exactly from the models'
# outputs: the misaligned share P(bad)/(P(good)+P(bad)) of the segment's own task at each answer. **Breadth** =
# (mean increase on the held-out tasks 2…K) / (increase on task 1), in two places: **fresh** — the first answer of
# a sequence, with no in-context evidence about the persona; **after evidence** — the second answer, after one
# segment of another task answered by the aligned persona. The headline (fixed in the params before the run:
# organism, place = fresh, fine-tune, seeds) is the coupled organism minus its factored twin with a Welch 95% CI
# over seeds; the target is coupled ≥ 0.5, factored ≤ 0.2 and the CI of the difference above 0.2.

# %%
headline = study.contrast(experiments)
fig = figures.plot_place_shares(headline.behaviour)
save_figure(fig, out, "shares_by_task")
plt.show()
display(headline.rows.round(4))

# %% [markdown]
# ## 4. Where breadth comes from: tasks per sequence × coupling
#
# The same measure for every (tasks_per_sequence, coupling) at the headline's prior and fine-tune (mean, Student-t
# 95% CI over seeds). With one task per sequence there is no second answer, so no "after evidence" value.

# %%
sweep = study.coupling_sweep(experiments)
display(sweep.display_table())
fig = figures.plot_breadth_sweep(sweep.rows)
save_figure(fig, out, "breadth_sweep")
plt.show()

# %% [markdown]
# ## 5. The search space, stated before tuning
#
# Every coupled/factored pair over tasks_per_sequence × persona prior × fine-tuning steps × learning rate (the
# params' grids), each over all seeds, fresh place. All pairs are reported; none was dropped.

# %%
found = study.search(experiments)
display(found.pairs.round(3))
fig = figures.plot_search_pairs(found.pairs)
save_figure(fig, out, "search_pairs")
plt.show()
display(Markdown(f"{found.n_configs_tried} coupled/factored configurations tried ({found.n_trainings} trainings); "
                 f"{len(found.meeting_target)} meet the target."))

# %% [markdown]
# ## 6. Mechanism: does the fine-tune move the persona belief, and does that carry the breadth?
#
# * A linear **probe** of the exact P(misaligned persona | context) on the *base* model's final-layer residual
#   (every position of whole-organism sequences; R² on held-out sequences).
# * **Belief shift**: the probe's reading of the fine-tuned minus the base model at the held-out tasks' fresh
#   answers. Across the configurations of the sweep and the search (seed means, configurations as units): does
#   the shift predict breadth?
# * **Causal test**: in the fine-tuned model, put the base model's value back along the probe direction (final
#   layer, every position) and measure how much of the held-out increase goes — in the coupled and the factored
#   headline organism, against the same patch along random directions. "The persona-belief direction" has two
#   readings, both computed: the probe's weights (decoding) and its pattern, the covariance of the activations
#   with the posterior (encoding); the mean change itself is shown as the ceiling for any one direction.

# %%
mech = study.mechanism(experiments, n_random, n_boot)
display(mech.configs.round(3))
fig = figures.plot_mechanism(mech.configs, mech.patches)
save_figure(fig, out, "mechanism")
plt.show()

# %% [markdown]
# ## 7. Reversal on the coupled organism
#
# On each seed's fine-tuned coupled headline model, at the final layer, every position, each direction named by
# how it is built (`study.DIRECTION_BUILDS`). Steering vectors are normalised to a common norm (scale 1 = the
# norm of the base belief-state vector); the null is `n_random` random directions at the same norms. Restoration
# = share of the fine-tune's increase removed per task (fresh place; undefined where the increase is below
# 0.02); capability change = signed change of the content KL against the fine-tuned model.

# %%
rev = study.reversal(experiments, scales, restoration_target, n_random)
fig = figures.plot_reversal_curves(rev.summary, restoration_target)
save_figure(fig, out, "reversal_curves")
plt.show()
display(rev.stats.round(4))
display(rev.random_null.round(4))

# %% [markdown]
# ## 8. The specificity diagnostic, well posed
#
# Study 02's specificity is a ratio spillover / intended shift of persona steering on the base model; its
# denominator vanishes wherever the persona does not drive the answers (coupling 0), which made the old ratio
# explode there. Its two parts are kept apart: **intended** = KL of the answer variant, **spillover** = KL of the
# task content, steering the base model by −(belief-state vector). Each is correlated with breadth across
# configurations (seed means), Spearman with bootstrap CIs, p values Holm-corrected over the two.

# %%
diag = study.diagnostic(experiments, n_boot)
display(diag.configs.round(4))
fig = figures.plot_specificity_parts(diag.configs)
save_figure(fig, out, "diagnostic_parts")
plt.show()

# %% [markdown]
# ## Conclusion

# %%
c, after = headline.fresh, headline.contrasts.get("after_evidence")
one_task = sweep.contrast(min(tasks_per_sequence)) if min(tasks_per_sequence) == 1 else None
display(Markdown(
    f"- **Headline (pre-registered, fresh sequences).** `{design.process}` against its factored twin "
    f"`{design.factored}`: {c.text()}. Target (coupled ≥ {study.TARGET_COUPLED}, factored ≤ {study.TARGET_FACTORED}, "
    f"CI above {study.TARGET_DIFFERENCE}): **{'met' if c.meets_target else 'not met'}**. The control is the "
    "factored twin: same tokens, data, fine-tune and model, only the coupling knob at 0."
    + (f" After one aligned-persona segment: {after.text()}." if after is not None else "")
    + (f"\n- **One task per sequence** (tasks_per_sequence = 1, the old organism's situation): {one_task.text()}."
       if one_task is not None else "")))

# %%
display(Markdown(
    f"- **Search.** {found.n_configs_tried} coupled/factored configurations over {found.axes} "
    f"({found.n_trainings} trainings, {len(seeds)} seeds each); {len(found.meeting_target)} meet the target."))

# %%
display(Markdown(f"- **Mechanism.** {mech.text(len(seeds))}"))

# %%
display(Markdown(f"- **Reversal** (coupled headline, {len(seeds)} seeds). {rev.text(len(seeds))}"))

# %%
corr = diag.correlations
display(Markdown(
    f"- **Diagnostic** ({len(diag.configs)} configurations as units, seed means; Holm over the two correlations): "
    + "; ".join(f"{part} shift vs breadth ρ = {v['spearman_rho']:.2f} [{v['ci_low']:.2f}, {v['ci_high']:.2f}], "
                f"Holm p = {v['p_holm']:.3g}" for part, v in corr.items()) + "."))

# %% [markdown]
# ## Metrics

# %%
result = study.EMReversalResult(design, organism, headline, sweep, found, mech, rev, diag)
write_metrics(result.metrics(), out)
display(Markdown(f"Report computed in {time.perf_counter() - started:.0f} s (cached models reused)."))

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()["organism_v3"]
print("marginals held equal:", organism.marginal_spread < 1e-12)
print("places:", sorted(metrics["contrast_by_place"]))
print("sweep cells:", len(metrics["sweep"]))
print("configs tried:", metrics["search"]["n_configs_tried"])
print("reversal methods:", sorted(k for k in metrics["reversal"] if k != "random_null"))
print("random null directions:", metrics["reversal"]["random_null"]["n_directions"])
