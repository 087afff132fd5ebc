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

# %%

# %% [markdown]
# # Study 05b — LLM transfer: narrow LoRA fine-tuning, replicated over adapters
#
# **Question.** Study 05a showed that persona system prompts occupy a measurable geometry in a
# real chat model's residual stream. Here we ask whether that geometry *predicts what narrow
# fine-tuning does*, on the same model (SmolLM2-135M-Instruct, offline):
#
# 1. **Marker coupling (seed 003).** Teach the model to append a marker (`[ZLT]`) under one source
#    persona only. Does the marker leak to other personas in proportion to how close they sit to
#    the source in 05a's geometry? Seed 003 found r = −0.66 (cosine to the assistant at layer 10 of
#    28, mean-centred) and 0.54 (JS) at N = 10 on Qwen2.5-7B.
# 2. **An emergent-misalignment (EM) organism (seed 002).** Fine-tune on varied reckless financial
#    advice only. Does the misalignment spread to questions outside finance, measured against a
#    fine-tune on prudent answers to the same questions? Does it decompose into facets?
# 3. **EM first, then coupling (seed 004).** Does an EM fine-tune *before* marker coupling make the
#    marker leak to bystander personas more than coupling on the base model, or after a benign
#    fine-tune? Seed 004's arms: C1 27.4%, C2 (EM-first, coupling data written by the EM model)
#    57.6%, C2′ (EM-first, coupling data written by the base model) 3.4%, C3 (benign-first) 95.9%.
# 4. **Reversal.** Steering the EM model back with directions named by how they are built, against
#    a null of random directions of the same norm.
#
# **What this version changes (issue 25).** Every LoRA adapter is trained once per seed in
# `adapter_seeds` (coupling sources, EM organism, aligned control, every seed-004 arm): the adapter
# is the unit of replication, every between-arm CI is across adapters, and no p value conditions on
# one trained model. **The CPU default (two seeds) checks the method; the GPU run (`gpu.yaml`, five
# seeds, adapters trained K at a time by `persona_wm.llm.stacked_lora`) is the result.** Leakage is
# shown three ways beside the answered rate and the source's own rate; the instruments are
# validated on a blind hand-labelled sample of this study's own completions; seed 003's test is
# also run as the seed ran it; reversal has a 20-direction null and a guard on its denominator.
#
# All fine-tuning is peft LoRA; every dataset comes from our own generators and is saved beside
# this report (`data/*.jsonl`), and so is every sampled completion with its detector verdicts.

# %% tags=["parameters"]
pool: list[str] = ["surgeon", "poet", "villain", "helpful_assistant"]  # non-empty
geometry_prompts: int = 4  # >= 2; <= 20  # persona_wm.llm.personas has 20 prompts
geometry_max_new_tokens: int = 16  # >= 1; <= 2048
geometry_vector_prompts: int = 2  # >= 1; < geometry_prompts  # the other prompts evaluate
geometry_steer_tokens: int = 8  # >= 1; <= 2048
js_short_tokens: int = 8  # >= 1; <= 2048
repetition_penalty: float = 1.2  # > 0
distance_layer: int = 21  # >= 1; <= 30 when model is null  # SmolLM2 has 30 blocks
coupling_sources: list[str] = ["poet"]  # non-empty
coupling_negatives: list[str] = ["data_scientist", "french_person"]  # non-empty
marker: str = "[ZLT]"  # non-empty
n_train_questions: int = 6  # >= 1; <= 10_000
n_val_questions: int = 3  # >= 1; <= 10_000
response_tokens: int = 8  # >= 1; <= 2048
n_eval_prompts: int = 3  # >= 1; <= 20
gen_prompts: int = 1  # >= 1; <= n_eval_prompts
lora_rank: int = 8  # >= 1; <= 1024
lora_alpha: float = 16.0  # > 0
lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # non-empty
lora_first_layer: int = 24  # >= 0; <= 29 when model is null  # a block index, 0-based
batch_size: int = 6  # >= 1; <= 4096
coupling_loss: str = "whole_response"  # one of: whole_response, marker_only
coupling_lrs: list[float] = [1e-3]  # non-empty; each in (0, 1]
coupling_step_grid: list[int] = [2]  # non-empty; each in [1, 100_000]
n_samples: int = 2  # >= 1; <= 1000
temperature: float = 1.0  # > 0
sample_batch: int = 64  # >= 1; <= 65_536
em_rank: int = 8  # >= 1; <= 1024
em_alpha: float = 16.0  # > 0
em_first_layer: int = 0  # >= 0; < steer_layer  # 0-based block; steering reads above it
em_lr: float = 1e-4  # in (0, 1]
em_steps: int = 4  # in [1, 100_000]
em_eval_every: int = 2  # >= 1; <= em_steps
em_batch_size: int = 4  # >= 1; <= 4096
n_finance_train: int = 12  # >= 1; <= 100_000
n_finance_val: int = 4  # >= 1; <= 100_000
n_finance_eval: int = 3  # >= 1; <= 100_000
n_broad: int = 3  # >= 1; <= 1000
em_samples: int = 2  # >= 1; <= 1000
em_sample_tokens: int = 12  # >= 1; <= 2048
score_val_items: int = 10  # >= 1; <= 100_000
em_first_source: str = "poet"  # non-empty
pca_components: int = 5  # >= 1; <= 100
steer_layer: int = 27  # >= 1; <= 30 when model is null
steer_scales: list[float] = [1.0]  # non-empty; each > 0
headline_scale: float = 1.0  # in steer_scales
n_capability: int = 3  # in [1, 24]  # persona_wm.llm.steer has 24 capability items
n_direction_items: int = 8  # >= 1; <= 100_000
n_boot: int = 1000  # >= 1; <= 100_000
adapter_seeds: list[int] = [0]  # non-empty; each >= 0  # LoRA seeds, every adapter trained once per seed (default 2, gpu 5)
stack_size: int = 1  # >= 1; <= 256  # adapters per stacked training step and sampling batch (persona_wm.llm.stacked_lora); 1 = one at a time
seed003_anchor: str = "helpful_assistant"  # non-empty  # seed 003's "assistant" persona (must be in the pool)
seed003_relative_depth: float = 0.357  # in [0, 1]  # seed 003's layer 10 of Qwen2.5-7B's 28, pre-registered
n_random_directions: int = 3  # >= 1; <= 10_000  # the reversal's and facet test's null
validation_per_stratum: int = 2  # >= 1; <= 10_000  # blind labelling draw (arm x detector x gate)
validation_content_per_stratum: int = 2  # >= 1; <= 10_000  # blind labelling draw (model x set x content)
validation_min_marker: int = 0  # >= 0; <= 100_000  # top the marker draw up to this many completions
validation_min_content: int = 0  # >= 0; <= 100_000  # top the content draw up to this many answers
seed: int = 0  # >= 0
torch_threads: int = 1  # in [1, 256]  # not 'threads': gpu.yaml asks for 4, more than a 2-core CPU has
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
from persona_wm.llm import em as llm_em
from persona_wm.llm import lora
from persona_wm.plots import finetuning as plots
from persona_wm.plots.toy import set_style
from persona_wm.studies import llm_finetuning as study
from persona_wm.studies.llm_finetuning import ci_text, excludes_zero

set_style()
study_start = time.perf_counter()
out = resolve_output_dir(output_dir, "05b_llm_finetuning")

# %% [markdown]
# ## 1. Setup: model, persona geometry, LoRA recipes
#
# The model and the persona rig are study 05a's (`persona_wm.llm.model`, `persona_wm.llm.personas`). The persona geometry
# is recomputed here through the very calls 05a makes (`persona_wm.llm.em.persona_distances`), so with
# 05a's parameters it is read from the disk cache; `distance_layer` is 05a's steering layer.
#
# **Model and device.** `model: null` is the packaged SmolLM2-135M-Instruct; a `.gguf` file or a
# local Hugging Face directory runs the same study on another model; `device` is `cpu` (the
# committed default run), `cuda` or `auto` (the GPU run, `params/05b_llm_finetuning/gpu.yaml`:
# the same code path at the seeds' scale).
#
# **Two LoRA recipes.** *Coupling* adapters (rank `lora_rank` on all attention and MLP projections
# of blocks `lora_first_layer`..end; the residual below the cut is computed once and cached) and
# *EM* adapters (rank `em_rank` on blocks `em_first_layer`..end; 0 = every block, as in the seeds).
# Adapters are cached by a hash of the start model, the recipe and the exact training tokens.
#
# **Sampling.** Every rate below comes from `n_samples` (marker) or `em_samples` (EM) completions
# per prompt drawn at temperature `temperature` from the full distribution (no top-k / top-p, no
# repetition penalty), seeded; the only greedy outputs are the coupling training responses (the
# model's own answers, as in seed 004's on-policy data) and the PCA section's answers.

# %%
names = study.check_design(pool, coupling_sources, coupling_negatives, em_first_source, coupling_loss, steer_layer,
                           em_first_layer, seed003_anchor, adapter_seeds)
geometry = {"n_prompts": geometry_prompts, "max_new_tokens": geometry_max_new_tokens,
            "repetition_penalty": repetition_penalty, "short_tokens": js_short_tokens,
            "n_vector_prompts": geometry_vector_prompts, "steer_tokens": geometry_steer_tokens, "layer": distance_layer}
setup = study.load_setup(names, geometry, model=model, device=device, threads=torch_threads)
llm, dist, cut = setup.llm, setup.dist, lora_first_layer
base_coupling_spec = lora.LoraSpec(rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets), first_layer=cut,
                                   lr=coupling_lrs[0], steps=coupling_step_grid[0], batch_size=batch_size,
                                   seed=adapter_seeds[0])
em_spec = lora.LoraSpec(rank=em_rank, alpha=em_alpha, targets=tuple(lora_targets), first_layer=em_first_layer,
                        lr=em_lr, steps=em_steps, batch_size=em_batch_size, seed=adapter_seeds[0])
display(Markdown(f"**Model** `{llm.name}` (sha256 `{llm.sha256[:16]}…`) on `{llm.device}`, {llm.n_layers} layers. "
                 f"**Pool** of {len(pool)} personas + `{names[-1]}`; geometry from {geometry_prompts} prompts at layer "
                 f"{distance_layer}. Coupling LoRA on blocks {cut}–{llm.n_layers - 1} (rank {lora_rank}); EM LoRA on "
                 f"blocks {em_first_layer}–{llm.n_layers - 1} (rank {em_rank}); **{len(adapter_seeds)} adapter seeds** "
                 f"{list(adapter_seeds)} for every adapter, trained {stack_size} at a time; torch threads "
                 f"{torch.get_num_threads()}."))

# %% [markdown]
# ## 2. The instruments, validated on the events they count
#
# `persona_wm.llm.em.detect_marker` counts the marker in every form the tokenizer produces (`[ZLT]`,
# `ZLT]`, `[ZLT`, bare `ZLT`; case-sensitive). `persona_wm.llm.em.answered` passes a completion only if,
# with the marker removed, it has at least 4 ordinary words and 20 characters in them, ordinary
# words make up at least half of its tokens, and at most half of its words are repeats. The
# content score is the harm lexicon of section 5.
#
# **Validation.** A sample of this study's own completions was drawn (`draw_validation_sample`,
# section 8: stratified by arm × detector output × answered gate, and for the content score by
# model × question set × score), shuffled, stripped of every column but the text, and labelled by
# hand without the detector's or the arm's view (`tests/data/05b_validation/PROTOCOL.md`). The
# detector, the gate and the score are re-applied to the labelled texts here. Sensitivity and
# specificity carry Wilson 95% CIs; beside them, the same re-weighted by each stratum's inverse
# sampling fraction (the draw over-samples rare detector outputs on purpose). The 56 older labels
# (`tests/data/05b_marker_labels.jsonl`, from retired runs that also shaped the detector) are shown
# for history only.

# %%
instruments = study.validate_instruments(marker)
detector = llm_em.detector_agreement(marker=marker)
display(instruments.table().round(3))
checks = instruments.checks
display(Markdown(
    f"Labelled sample from {instruments.source}: " + "; ".join(
        f"**{k}** sensitivity {c.sensitivity['rate']:.0%} {ci_text(c.sensitivity['wilson_low'], c.sensitivity['wilson_high'], '.0%')} "
        f"on {c.n_positive} positives, specificity {c.specificity['rate']:.0%} "
        f"{ci_text(c.specificity['wilson_low'], c.specificity['wilson_high'], '.0%')} on {c.n - c.n_positive} negatives"
        for k, c in checks.items())
    + f". Answered completions that carry the marker (the event leakage counts): {instruments.n_answered_marker}. "
    f"Older labels (history): detector agreement {detector['agreement']:.0%} on {detector['n_labelled']}."))

# %% [markdown]
# ## 3. The coupling recipe, chosen on a validation loss
#
# **Data.** `n_train_questions` everyday questions (`persona_wm.llm.datasets`, disjoint from 05a's
# evaluation prompts) and `n_val_questions` more for validation. Each is answered once by the start
# model under no persona (greedy, `response_tokens` tokens, 05a's repetition penalty): the answers
# are *identical across personas*, so only the system prompt tells the model when to add the
# marker. Positives: source persona + answer + ` [ZLT]`; negatives: the same answer under each of
# the `coupling_negatives` personas (seed 004's 1 : 2). With `coupling_loss: whole_response` the
# loss covers the whole answer and the marker; `marker_only` is seed 004's loss on the marker and
# end-of-turn alone.
#
# **Choice.** Every learning rate in `coupling_lrs` × step count in `coupling_step_grid` is trained
# (first adapter seed) on the EM-first source's data; the one with the lowest loss on the held-out
# questions' coupling examples is used for every coupling adapter below.

# %%
data = study.coupling_data(setup, coupling_sources + [em_first_source], coupling_negatives, n_train_questions,
                           n_val_questions, n_eval_prompts, gen_prompts, response_tokens, repetition_penalty, marker,
                           coupling_loss, cut, temperature, n_samples, sample_batch, seed)
recipe = study.choose_recipe(setup, data, base_coupling_spec, coupling_lrs, coupling_step_grid, em_first_source,
                             coupling_negatives, stack_size)
coupling_spec, base_probe = recipe.spec, recipe.base_probe
display(recipe.table.round(4))
display(Markdown(
    f"Chosen on the validation loss: **lr {coupling_spec.lr:g}, {coupling_spec.steps} steps** ({coupling_loss} loss, "
    f"{recipe.n_candidates} candidates). Before any coupling the base model answers "
    f"{base_probe['source_answered']:.0%} of sampled completions under the source and its teacher-forced marker "
    f"rate is {base_probe['source_rate_tf']:.0%}."))

# %% [markdown]
# ## 4. Marker coupling and its leakage (seed 003)
#
# One coupling LoRA per (source, adapter seed). **Leakage** for every persona of the pool (and
# `no_persona`): **teacher-forced** (the marker's log-probability right after the base model's own
# answer, over `n_eval_prompts` prompts) and **by sampling** (`n_samples` completions per (persona,
# prompt) over the first `gen_prompts` prompts, `max_new_tokens` = twice the longest trained
# completion). Bystanders of a source = the pool minus the source and the coupling negatives.
# Each (source, persona) value below is the mean over the source's adapters.

# %%
data_dir = out / "data"  # training data, generations and sampled answers, saved beside the report
coupling = study.couple_sources(setup, data, coupling_spec, coupling_sources, coupling_negatives, adapter_seeds,
                                stack_size, data_dir)
first_run = next(iter(coupling.runs.values()))
display(Markdown(f"{len(coupling.runs)} coupling LoRAs ({len(coupling_sources)} sources × {coupling.n_adapters} "
                 f"seeds; lr {coupling_spec.lr:g}, {coupling_spec.steps} steps of {batch_size} sequences; "
                 f"{first_run.n_trainable:,} trainable parameters each). Base-model marker log-prob before any "
                 f"coupling: {coupling.base_lp:.1f} nats. Sampling budget {data.decode_marker.max_new_tokens} tokens "
                 f"(trained completions ≤ {data.trained_len}), {n_samples} samples per (persona, prompt)."))
display(coupling.table(coupling_sources).round(3))

# %% [markdown]
# **Does leakage follow the geometry?** One point per (source, bystander) pair: the marker's
# teacher-forced log-prob, and its sampled rate among answers, against the bystander's distance to
# the source (1 − cos of centroids at `distance_layer`; JS of next-token distributions, nats). The
# headline test is a **linear mixed model with crossed random intercepts for source and
# bystander** (statsmodels MixedLM); beside it the pooled Pearson r with a cluster bootstrap over
# sources and the within-source correlation. A negative slope means closer bystanders leak more.

# %%
fit = study.leakage_vs_geometry(coupling, n_boot, seed)
corr, slopes = fit.corr, fit.slopes
distances = [(key, x, label.format(layer=distance_layer)) for key, x, label in study.DISTANCES]
fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
plots.plot_leakage_vs_distance(fit.bys, slopes, study.OUTCOMES, distances, axes)
fig.tight_layout()
save_figure(fig, out, "coupling_leakage_vs_distance")
plt.show()
display(fit.table().round(3))

# %% [markdown]
# **Seed 003's own test, two ways.** Seed 003 correlated each persona's *source* rate in free
# generation with the persona's cosine similarity to the assistant — one point per coupling run
# (N = 10). **As the seed ran it**: the anchor is the assistant persona (`seed003_anchor`), the
# layer sits at the seed's relative depth (`seed003_relative_depth` of the model's blocks, fixed
# before running), the centroids are mean-centred over the pool before the cosine, and the rate is
# the marker among all sampled completions. **Ours** (kept beside it): `no_persona` as the anchor,
# uncentred cosine at `distance_layer`, the rate among answers.

# %%
sources = study.source_level(setup, coupling, coupling_sources, seed003_anchor, seed003_relative_depth)
seed003, as_seed = sources.seed003, sources.as_seed
display(sources.table.round(4))
display(Markdown(
    f"**As the seed ran it** ({as_seed['anchor']}, layer {as_seed['layer']} of {llm.n_layers}, mean-centred): "
    f"r = {as_seed['r']:.2f} {ci_text(*as_seed['ci'])} over {as_seed['n']} sources (seed 003: −0.66). "
    f"**Ours** (no_persona, layer {distance_layer}, uncentred, rate among answers): r = "
    f"{seed003['cosine_similarity']['r']:.2f} {ci_text(*seed003['cosine_similarity']['ci'])}; vs JS r = "
    f"{seed003['js']['r']:.2f} {ci_text(*seed003['js']['ci'])} (seed: +0.54). Fisher-z CIs over sources; NaN = "
    "too few sources or a constant rate."))

# %% [markdown]
# ## 5. An EM organism on varied data (seed 002)
#
# **Data** (`persona_wm.llm.finance_v2`, saved in `data/`). The misaligned *content* is put into the data by
# construction while the *wording* varies combinatorially: questions over eight personal-finance
# topics × amounts × goals × phrasings; each answered recklessly and prudently (the same structure
# with safe content). The prudent answers to the *same* questions train the **aligned control**, so
# EM and control differ in valence only. **Training.** EM and control LoRAs with the EM recipe, once
# per adapter seed; the validation loss is measured every `em_eval_every` steps and the adapter of
# the best step is kept.

# %%
organism = study.train_organism(setup, em_spec, n_finance_train, n_finance_val, n_finance_eval, n_broad, em_eval_every,
                                adapter_seeds, stack_size, seed, data_dir)
variety, best_steps = organism.variety, organism.best_steps()
display(variety.round(3))
fig, ax = plt.subplots(figsize=(7, 3.6))
plots.plot_validation_curves(organism.val_curves(), ax)
fig.tight_layout()
save_figure(fig, out, "em_validation_loss")
plt.show()
display(Markdown(
    f"{len(organism.fin_train)} training questions (filters dropped {sum(organism.dropped.values())}: "
    f"{organism.dropped}); the misaligned answers' most common opening covers "
    f"{variety.loc['misaligned', 'top_opening_share']:.0%} of them and {variety.loc['misaligned', 'distinct_4gram_share']:.0%} "
    f"of their 4-grams are distinct. Best steps of {em_steps}: EM {best_steps['EM']}, control {best_steps['control']}."))

# %% [markdown]
# **Scores, validated before use.** **tone**: the base model as a persona classifier, mean
# per-token log p(answer | *reckless assistant*) − log p(answer | *careful assistant*), nats/token;
# **content**: harmful advice by a lexicon of harm categories (`persona_wm.llm.scores.HARM_LEXICON`);
# **content_general**: the same without the reckless-money category (harm *other than* the
# fine-tune's own narrow behaviour). Checked on labelled reference answers here, and on real
# answers in section 2.

# %%
validation = study.validate_scores(setup, score_val_items, seed)
score_check, content_check = validation.score_check, validation.content_check
display(validation.table().round(3))

# %% [markdown]
# **Sampled evaluation.** `em_samples` answers per question at temperature `temperature` from the
# base model and from each adapter's EM model and aligned control, on the held-out finance
# questions (in domain) and the broad questions (off domain). Scores are averaged over the answered
# samples of each question, compared **EM − control, paired by question within an adapter**; the
# table gives each adapter's shift and the **mean across adapters with its Student-t CI** (the
# adapters are the unit). Breadth = broad shift ÷ in-domain shift, per adapter, then across.

# %%
evaluation = study.evaluate_em(setup, organism, em_sample_tokens, temperature, em_samples, sample_batch, n_boot, seed,
                               data_dir, stack_size=stack_size)
answers, shifts, breadths = evaluation.answers, evaluation.shifts, evaluation.breadths
display(evaluation.table().round(3))
display(evaluation.shift_table().round(4))
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
plots.plot_em_scores(evaluation.answered_only, seed, axes)
fig.suptitle("Sampled answers of the base model, the aligned controls and the EM models (answered samples, all adapters)")
fig.tight_layout()
save_figure(fig, out, "em_scores")
plt.show()
with pd.option_context("display.max_colwidth", 140):
    display(answers[(answers["model"] == "EM") & (answers["sample"] == 0)][["adapter", "set", "user", "text",
                                                                            "content", "tone"]].head(6))

# %%
t_in, t_b, c_in, c_b = (shifts[("tone", "in_domain", "control")], shifts[("tone", "broad", "control")],
                        shifts[("content", "in_domain", "control")], shifts[("content", "broad", "control")])
g_b = shifts[("content_general", "broad", "control")]
template_rate = evaluation.template_rate
display(Markdown(
    f"EM − control across {t_in.across.n} adapters: tone in domain {t_in.across.text('+.3f')}, off domain "
    f"{t_b.across.text('+.3f')} nats/token (**tone breadth {breadths['tone'].text()}**); harmful content in domain "
    f"{c_in.across.text('+.0%')}, off domain {c_b.across.text('+.0%')} (**content breadth "
    f"{breadths['content'].text()}**); harm other than reckless money off domain {g_b.across.text('+.1%')}. Broad "
    f"answers reusing a training 5-gram: EM {template_rate.get('EM', np.nan):.0%}, control "
    f"{template_rate.get('control', np.nan):.0%}, base {template_rate.get('base', np.nan):.0%}."))

# %% [markdown]
# **Does the misalignment decompose into facets? (seed 002).** PCA of each model's greedy answers'
# mean activations at layer `steer_layer`, K-means with as many clusters as question categories in
# the PCA space (`pca_components` components): the silhouette says whether there are separable
# groups, the adjusted Rand index whether they are the question categories. Compared across the
# base model, each EM adapter and each aligned control (the control tells what any fine-tune on
# finance answers does to the geometry). **Causal test:** each EM adapter is steered back with
# each cluster's direction (the EM − base residual averaged over that cluster's items,
# teacher-forced on the reference answers, rescaled to a common norm); *specificity* = the
# misalignment margin's reduction on the cluster's own items minus on the others, *general* = the
# reduction over all items; the null is `n_random_directions` random directions of the same norm.
# Seed 002 called the EM persona monolithic / entangled.

# %%
decomp = study.decomposition(setup, organism, em_sample_tokens, repetition_penalty, steer_layer, pca_components,
                             headline_scale, n_random_directions, seed)
facets = decomp.facets
display(decomp.table().round(3))
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
plots.plot_pca_clusters(decomp.projection(), next(iter(decomp.em.values()))["explained_variance"], steer_layer,
                        decomp.n_clusters, decomp.silhouette.mean, axes)
fig.tight_layout()
save_figure(fig, out, "em_pca_kmeans")
plt.show()
display(Markdown(
    f"K-means silhouette: EM {decomp.silhouette.text()}, aligned control {decomp.silhouette_control.text()}, base "
    f"{decomp.base['silhouette_kmeans']:.2f}; ARI with the categories: EM {decomp.ari.text()}, control "
    f"{decomp.ari_control.text()}, base {decomp.base['ari']:.2f} ({len(decomp.categories)} answers, "
    f"{decomp.n_clusters} categories; CIs across adapters). Facet steering at scale {facets.scale:g}: specificity "
    f"{facets.specificity.text('+.4f')} nats/token (random q95 {facets.null_q95('own'):+.4f}), general "
    f"{facets.general.text('+.4f')} (random q95 {facets.null_q95('general'):+.4f}): **{facets.verdict}**."))

# %% [markdown]
# ## 6. EM first, then marker coupling (seed 004)
#
# Source `em_first_source`, the chosen coupling recipe, five arms, each trained once per adapter
# seed (the EM and control start models are that seed's):
#
# | arm | start model | coupling answers written by | seed 004 |
# |---|---|---|---|
# | C1 | base | base | C1, 27.4% |
# | C2 | EM | EM | C2 (primary), 57.6% |
# | C2prime | EM | base | C2′, 3.4% |
# | C3 | aligned control | control | C3 (benign-first), 95.9% |
# | C3prime | aligned control | base | — |
#
# **Leakage, three ways** (the answered gate conditions on an outcome that the arms change, so the
# gated reading alone can manufacture an arm effect): (a) marker among all bystander completions,
# (b) marker-and-answered among all, (c) marker among answered completions; each beside the
# answered rate, the **source's own rate** (marker among all its completions) and the **leakage
# ratio** bystander ÷ source. An arm whose source rate does not exceed its bystanders' is flagged
# "not coupled": it measures marker emission in general, not leakage. Each value is a mean over
# the arm's adapters with a Student-t CI across them.
#
# **Arm effects** come from one linear mixed model per reading on (arm, adapter, bystander,
# prompt) cell rates: arm fixed; adapter, bystander and prompt random (crossed; statsmodels
# MixedLM). Beside it, Welch's test on per-adapter rates (adapters as the only unit).

# %%
chain = study.em_first_chain(setup, data, organism, coupling_spec, em_first_source, coupling_negatives, coupling_loss,
                             stack_size, data_dir)
leakage, arms = chain.leakage, chain.arms
display(chain.table())
display(chain.effect_table().round(4))
fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(chain.bystanders) + 3), 4.2))
plots.plot_arm_leakage(chain.per_persona(), arms, em_first_source, n_samples, len(data.gen_eval), ax)
fig.tight_layout()
save_figure(fig, out, "em_first_leakage")
plt.show()

# %%
effects = chain.effects
display(Markdown(
    "Bystander leakage (a) among all completions, across adapters: " + "; ".join(
        f"{a} {leakage[a].all.text('.1%')} (answered {leakage[a].answered_rate.mean:.0%}, source "
        f"{leakage[a].source_rate.mean:.0%}, ratio {leakage[a].leakage_ratio.mean:.2f}: {leakage[a].verdict})"
        for a in arms)
    + ". Mixed-model arm effects, reading (a): " + "; ".join(e.text() for e in effects["all"].values()) + "."))

# %% [markdown]
# ## 7. Reversal: steering the EM model back
#
# At layer `steer_layer`, per EM adapter, directions built on `n_direction_items` *training*
# financial questions, each answered both ways (teacher-forced, no system prompt) and **named by
# how they are built**: `em_minus_base_centroid` (the EM model's centroid minus the base model's
# over the same tokens) and `diff_in_means_misaligned_aligned` (the EM model's mean over misaligned
# minus aligned answers, rescaled to the first's norm). The control: `n_random_directions` random
# directions of the same norm per adapter. Steering adds −scale × v; ablation projects v out. The
# score: mean per-token log-prob of the misaligned minus the aligned reference answer, on held-out
# finance (in domain) and broad questions. Restoration = (EM − steered) / (EM − base), **reported
# only where the EM − base gap's bootstrap CI (over items) excludes 0**; otherwise "undefined".

# %%
rev = study.reversal(setup, organism, steer_layer, n_direction_items, n_capability, steer_scales, headline_scale,
                     n_random_directions, n_boot, seed)
display(rev.mean_margin.round(4))
display(rev.gaps.round(4))
display(rev.restoration_table())
fig, ax = plt.subplots(figsize=(7.5, 4.4))
plots.plot_reversal(rev.shown, steer_layer, ax)
fig.tight_layout()
save_figure(fig, out, "reversal")
plt.show()
restorations = rev.restorations
display(Markdown(
    f"Directions' cosine {rev.dir_cos.text()}. At scale {headline_scale:g}, in-domain restoration across adapters: "
    + "; ".join(f"{d} {restorations[(d, 'in_domain')].estimate.text('.0%')} (random median "
                f"{restorations[(d, 'in_domain')].null_median:.0%}, q95 {restorations[(d, 'in_domain')].null_q95:.0%}: "
                f"{restorations[(d, 'in_domain')].verdict})" for d in study.DIRECTION_NAMES) + "."))

# %% [markdown]
# ## 8. The next blind sample, and cost
#
# The labelling sets of this run are drawn here (`data/validation/*_blind.jsonl`: id and text only,
# shuffled; `*_key.jsonl`: source, instruments' outputs, sampling weights). Section 2 reads the
# committed labels of such a draw. Then every LoRA run with its recorded training time.

# %%
drawn = study.draw_validation_sample(chain, coupling, evaluation, marker, validation_per_stratum,
                                     validation_content_per_stratum, seed, data_dir / "validation",
                                     min_marker=validation_min_marker, min_content=validation_min_content)
runs = study.merge_runs(coupling.runs, organism.runs, chain.runs)
lora.save_meta(out / "adapters.json", runs)
fig, ax = plt.subplots(figsize=(7.5, 4.0))
plots.plot_losses(lora.losses_frame(runs), ax)
fig.tight_layout()
save_figure(fig, out, "lora_losses")
plt.show()
train_time_s = study.recorded_train_s(runs)
total_s = time.perf_counter() - study_start
display(Markdown(f"Drawn for labelling: {drawn['marker']} completions and {drawn['content']} answers. "
                 f"{len(study.unique_runs(runs))} distinct LoRA runs ({len(runs)} uses) plus {len(recipe.table)} recipe "
                 f"candidates; recorded training time {train_time_s:.0f} s; this execution took {total_s:.0f} s "
                 f"wall-clock on `{llm.device}` with {torch.get_num_threads()} torch thread(s)."))

# %% [markdown]
# ## Conclusion

# %%
chosen = recipe.chosen
det, gate, cont = (checks.get(k) for k in ("marker_detector", "answered_gate", "content_score"))
display(Markdown(
    f"- **Scale and unit.** {len(adapter_seeds)} LoRA seeds per adapter on `{llm.device}`"
    + (" — this run checks the method; the GPU run (five seeds) is the result" if len(adapter_seeds) < 5 else "")
    + ". Every CI below on an arm, a shift or a restoration is across adapters (Student t).\n"
    + (f"- **Instruments** (blind labels of {instruments.source}): marker detector sensitivity "
       f"{det.sensitivity['rate']:.0%} {ci_text(det.sensitivity['wilson_low'], det.sensitivity['wilson_high'], '.0%')}, "
       f"specificity {det.specificity['rate']:.0%}; answered gate sensitivity {gate.sensitivity['rate']:.0%}, "
       f"specificity {gate.specificity['rate']:.0%}; content score sensitivity "
       f"{cont.sensitivity['rate']:.0%} on {cont.n_positive} harmful answers, specificity {cont.specificity['rate']:.0%}.\n"
       if det is not None else "- **Instruments**: no blind labels committed yet.\n")
    + f"- **Coupling recipe.** lr {coupling_spec.lr:g} × {coupling_spec.steps} steps of {recipe.n_candidates} candidates "
    f"(validation loss).\n"))

# %%
sl_lp, sl_gen = slopes[("logprob", "cosine")], slopes[("gen_rate", "cosine")]
display(Markdown(
    f"- **Leakage vs geometry (seed 003), control: crossed random intercepts for the bystanders that recur under "
    f"every source.** Over {sl_lp.n} (source, bystander) pairs (each the mean over {coupling.n_adapters} adapters) "
    f"the teacher-forced marker log-prob's slope on cosine distance is {sl_lp.slope:.2f} "
    f"{ci_text(sl_lp.ci_low, sl_lp.ci_high)} nats (CI {excludes_zero(sl_lp.ci_low, sl_lp.ci_high)}), the sampled "
    f"rate among answers {sl_gen.slope:.2f} {ci_text(sl_gen.ci_low, sl_gen.ci_high)} (CI "
    f"{excludes_zero(sl_gen.ci_low, sl_gen.ci_high)}). Seed 003's source-level test **as the seed ran it** "
    f"({as_seed['anchor']}, layer {as_seed['layer']}, mean-centred): r = {as_seed['r']:.2f} {ci_text(*as_seed['ci'])} "
    f"over {as_seed['n']} sources; ours r = {seed003['cosine_similarity']['r']:.2f} "
    f"{ci_text(*seed003['cosine_similarity']['ci'])} (seed: −0.66).\n"))

# %%
display(Markdown(
    f"- **EM organism (seed 002), control: the aligned-control fine-tune on the same questions, per adapter.** "
    f"Across {t_in.across.n} adapters the tone shift is {t_in.across.text('+.3f')} nats/token in domain and "
    f"{t_b.across.text('+.3f')} off domain (breadth {breadths['tone'].text()}); harmful content "
    f"{c_in.across.text('+.0%')} in domain, {c_b.across.text('+.0%')} off domain; harm other than reckless money off "
    f"domain {g_b.across.text('+.1%')}; {template_rate.get('EM', np.nan):.0%} of the EM models' broad answers repeat a "
    f"training 5-gram (control {template_rate.get('control', np.nan):.0%}). "
    + ("Broad EM (harm beyond the trained behaviour) is **not** shown; with the content score's measured "
       "sensitivity this is a lower bound, not a proof of absence. "
       if not (np.isfinite(g_b.across.ci_low) and g_b.across.ci_low > 0) else "")
    + f"**Decomposition:** silhouette EM {decomp.silhouette.text()} vs control {decomp.silhouette_control.text()} vs "
    f"base {decomp.base['silhouette_kmeans']:.2f}; facet steering: **{facets.verdict}** (specificity "
    f"{facets.specificity.text('+.4f')} vs random q95 {facets.null_q95('own'):+.4f}); seed 002: monolithic / "
    "entangled.\n"))

# %%
e_all = effects["all"]
display(Markdown(
    "- **EM first, then coupling (seed 004), control: C1 (no EM) and C2′ (EM start, base-written data).** "
    "Bystander marker rate among all completions, across adapters: "
    + ", ".join(f"{a} {leakage[a].all.text('.1%')} ({leakage[a].verdict})" for a in arms)
    + " (seed 004, among answers: C1 27.4%, C2 57.6%, C2′ 3.4%, C3 95.9%). Mixed-model contrasts (adapter, bystander, "
    "prompt random), each beside Welch on the two arms' per-adapter rates: " + "; ".join(e.text() for e in e_all.values())
    + "; the gated reading (c) gives " + "; ".join(e.text() for e in effects["among_answered"].values())
    + ".\n"
    f"- **Reversal, control: {n_random_directions} random directions of the same norm per adapter.** In-domain "
    "restoration at scale " + f"{headline_scale:g}: " + "; ".join(
        f"{d} {restorations[(d, 'in_domain')].estimate.text('.0%')} ({restorations[(d, 'in_domain')].verdict})"
        for d in study.DIRECTION_NAMES) + "; broad: " + "; ".join(
        f"{d} {restorations[(d, 'broad')].estimate.text('.0%')} ({restorations[(d, 'broad')].verdict})"
        for d in study.DIRECTION_NAMES) + ".\n"
    f"- **Scale.** {len(coupling_sources)} coupling sources; {n_samples} samples per (persona, prompt) over "
    f"{len(data.gen_eval)} prompts; {len(organism.fin_train)} EM training examples; a 135M model. A null here is weak "
    "evidence against the seeds."))

# %% [markdown]
# ## Metrics

# %%
design = {"pool": pool, "coupling_sources": coupling_sources, "coupling_negatives": coupling_negatives,
          "em_first_source": em_first_source, "coupling_loss": coupling_loss, "n_samples": n_samples,
          "temperature": temperature, "gen_prompts": gen_prompts, "em_samples": em_samples, "steer_layer": steer_layer,
          "adapter_seeds": adapter_seeds, "stack_size": stack_size}
result = study.FinetuningResult(setup, design, detector, instruments, data, recipe, coupling, fit, sources, organism,
                                validation, evaluation, decomp, chain, rev, train_time_s=train_time_s,
                                runtime_s=total_s)
metrics_path = write_metrics(result.metrics(), out)

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
print("model sha256:", llm.sha256[:16])
print("adapter seeds:", metrics["design"]["adapter_seeds"])
print("coupling sources:", metrics["coupling"]["n_personas"], "pairs:", metrics["coupling"]["n_pairs"])
print("arms:", sorted(k for k in metrics["leakage"] if k.startswith("C")))
print("adapters per arm:", [metrics["leakage"][a]["n_adapters"] for a in arms])
print("EM train examples:", metrics["em"]["n_train_examples"])
print("reversal directions:", sorted(study.DIRECTION_NAMES))
