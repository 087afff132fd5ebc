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
# # Study 05b — LLM transfer: narrow LoRA fine-tuning
#
# **Question.** Study 05a showed that persona system prompts occupy a measurable geometry in a
# real chat model's residual stream. Here we ask whether that geometry *predicts what narrow
# fine-tuning does*, on the same model (SmolLM2-135M-Instruct, offline):
#
# 1. **Marker coupling (seed 003).** Teach the model to append a marker (`[ZLT]`) under one source
#    persona only. Does the marker leak to other personas in proportion to how close they sit to
#    the source in 05a's geometry? Seed 003 found r = −0.66 (cosine) and 0.54 (JS) at N = 10 on
#    Qwen2.5-7B.
# 2. **An emergent-misalignment (EM) organism (seed 002).** Fine-tune on varied reckless financial
#    advice only. Does the misalignment — its *content* (harmful advice) and its *tone* (how typical
#    an answer is of a reckless assistant) — spread to questions outside finance, measured against
#    a fine-tune on prudent answers to the same questions?
# 3. **EM first, then coupling (seed 004).** Does an EM fine-tune *before* marker coupling make the
#    marker leak to bystander personas more than coupling on the base model, or after a benign
#    fine-tune? Seed 004's arms: C1 27.4%, C2 (EM-first, coupling data written by the EM model)
#    57.6%, C2′ (EM-first, coupling data written by the base model) 3.4%, C3 (benign-first) 95.9%.
# 4. **Reversal.** Steering the EM model back with 05a's centroid recipe vs a difference-in-means
#    direction vs a random direction of the same norm (and ablation of each).
#
# **What this version fixes (issue 14).** The 2026-11 run counted a marker only as the exact string
# `[ZLT]` (the coupled models mostly write `ZLT]`), measured leakage on completions that were no
# answers (its coupling lr destroyed answering), compared its base-generated-data arm with seed 004's
# C2 instead of C2′, treated one greedy output per prompt as independent trials, and trained its EM
# organism on one template. Here: a detector and an *answered* gate validated on hand-labelled real
# completions; a coupling recipe chosen on a validation loss; rates from sampling (temperature 1)
# with CIs from crossed random effects; all four seed-004 arms (plus C3′); an EM organism on varied
# data scored by validated judge-free scores against an aligned-control fine-tune.
#
# All fine-tuning is peft LoRA; every dataset comes from our own generators and is saved beside
# this report (`data/*.jsonl`), and so is every sampled completion with its detector verdicts.

# %% tags=["parameters"]
pool: list[str] = ["surgeon", "paramedic", "software_engineer", "poet", "villain"]  # non-empty
geometry_prompts: int = 4  # >= 2; <= 20  # persona_wm.llm.personas has 20 prompts
geometry_max_new_tokens: int = 16  # >= 1; <= 2048
geometry_vector_prompts: int = 2  # >= 1; < geometry_prompts  # the other prompts evaluate
geometry_steer_tokens: int = 8  # >= 1; <= 2048
js_short_tokens: int = 8  # >= 1; <= 2048
repetition_penalty: float = 1.2  # > 0
distance_layer: int = 21  # >= 1; <= 30 when model is null  # SmolLM2 has 30 blocks
coupling_sources: list[str] = ["poet", "surgeon"]  # non-empty
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
n_finance_eval: int = 4  # >= 1; <= 100_000
n_broad: int = 4  # >= 1; <= 1000
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
n_permutations: int = 200  # >= 1; <= 1_000_000
n_boot: int = 1000  # >= 1; <= 100_000
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
                           em_first_layer)
geometry = {"n_prompts": geometry_prompts, "max_new_tokens": geometry_max_new_tokens,
            "repetition_penalty": repetition_penalty, "short_tokens": js_short_tokens,
            "n_vector_prompts": geometry_vector_prompts, "steer_tokens": geometry_steer_tokens, "layer": distance_layer}
setup = study.load_setup(names, geometry, model=model, device=device, threads=torch_threads)
llm, dist, cut = setup.llm, setup.dist, lora_first_layer
base_coupling_spec = lora.LoraSpec(rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets), first_layer=cut,
                                   lr=coupling_lrs[0], steps=coupling_step_grid[0], batch_size=batch_size, seed=seed)
em_spec = lora.LoraSpec(rank=em_rank, alpha=em_alpha, targets=tuple(lora_targets), first_layer=em_first_layer,
                        lr=em_lr, steps=em_steps, batch_size=em_batch_size, seed=seed)
display(Markdown(f"**Model** `{llm.name}` (sha256 `{llm.sha256[:16]}…`) on `{llm.device}`, {llm.n_layers} layers. "
                 f"**Pool** of {len(pool)} personas + `{names[-1]}`; geometry from {geometry_prompts} prompts at layer "
                 f"{distance_layer}. Coupling LoRA on blocks {cut}–{llm.n_layers - 1} (rank {lora_rank}); EM LoRA on "
                 f"blocks {em_first_layer}–{llm.n_layers - 1} (rank {em_rank}); torch threads {torch.get_num_threads()}."))

# %% [markdown]
# ## 2. The instrument: a marker detector and an answered gate, validated first
#
# `persona_wm.llm.em.detect_marker` counts the marker in every form the tokenizer produces (`[ZLT]`,
# `ZLT]`, `[ZLT`, bare `ZLT`; case-sensitive). `persona_wm.llm.em.answered` passes a completion only if,
# with the marker removed, it has at least 4 ordinary words and 20 characters in them, ordinary
# words make up at least half of its tokens, and at most half of its words are repeats. Both were
# checked against 56 real completions from the 2026-11 run, labelled by hand
# (`tests/data/05b_marker_labels.jsonl`), before any rate below was computed. **Leakage is the
# marker rate among answered completions**, always shown beside the answered rate.

# %%
detector = llm_em.detector_agreement(marker=marker)
display(Markdown(
    f"On {detector['n_labelled']} hand-labelled completions ({detector['n_marker']} with the marker, "
    f"{detector['n_answered']} answers): detector agreement {detector['agreement']:.0%} (the old exact-string "
    f"test: {detector['exact_string_agreement']:.0%}); answered-gate agreement {detector['answered_agreement']:.0%}."))

# %% [markdown]
# ## 3. The coupling recipe, chosen on a validation loss
#
# **Data.** `n_train_questions` everyday questions (`persona_wm.llm.datasets`, disjoint from 05a's
# evaluation prompts) and `n_val_questions` more for validation. Each is answered once by the start
# model under no persona (greedy, `response_tokens` tokens, 05a's repetition penalty): the answers
# are *identical across personas*, so only the system prompt tells the model when to add the
# marker. Positives: source persona + answer + ` [ZLT]`; negatives: the same answer under each of
# the `coupling_negatives` personas (seed 004's 1 : 2). With `coupling_loss: whole_response` the
# loss covers the whole answer and the marker (so a recipe that wrecks the answer pays for it in
# the loss); `marker_only` is seed 004's loss on the marker and end-of-turn alone.
#
# **Choice.** Every learning rate in `coupling_lrs` × step count in `coupling_step_grid` is trained
# on the EM-first source's data; the one with the lowest loss on the held-out questions' coupling
# examples is used for every coupling run below. Beside each candidate: its teacher-forced marker
# rate under the source and under the bystanders, and the share of sampled completions under the
# source that are answers — what the validation loss trades.

# %%
data = study.coupling_data(setup, coupling_sources + [em_first_source], coupling_negatives, n_train_questions,
                           n_val_questions, n_eval_prompts, gen_prompts, response_tokens, repetition_penalty, marker,
                           coupling_loss, cut, temperature, n_samples, sample_batch, seed)
recipe = study.choose_recipe(setup, data, base_coupling_spec, coupling_lrs, coupling_step_grid, em_first_source,
                             coupling_negatives)
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
# One coupling LoRA per source with the chosen recipe. **Leakage, measured two ways** for every
# persona of the pool (and `no_persona`):
#
# * **teacher-forced**, over `n_eval_prompts` of 05a's everyday prompts: the base model's own
#   answer is forced and we read the log-probability of the marker tokens right after it (an
#   instrument that does not depend on what the model writes);
# * **by sampling**, over the first `gen_prompts` of them: `n_samples` completions per (persona,
#   prompt) at temperature `temperature`, `max_new_tokens` = twice the longest trained completion
#   (seed 004's lesson: a truncated evaluation hides late markers); the rate is the marker among
#   *answered* completions.
#
# Bystanders of a source = the pool minus the source and the coupling negatives (trained *not* to
# emit), with `no_persona` included.

# %%
data_dir = out / "data"  # training data, generations and sampled answers, saved beside the report
coupling = study.couple_sources(setup, data, coupling_spec, coupling_sources, coupling_negatives, data_dir)
first_run = coupling.runs[f"couple:{coupling_sources[0]}"]
display(Markdown(f"{len(coupling_sources)} coupling LoRAs (lr {coupling_spec.lr:g}, {coupling_spec.steps} steps of "
                 f"{batch_size} sequences; {first_run.n_trainable:,} trainable parameters). "
                 f"Base-model marker log-prob before any coupling: {coupling.base_lp:.1f} nats. Sampling budget "
                 f"{data.decode_marker.max_new_tokens} tokens (trained completions ≤ {data.trained_len}), {n_samples} "
                 f"samples per (persona, prompt)."))
display(coupling.table(coupling_sources).round(3))

# %% [markdown]
# **Does leakage follow the geometry?** One point per (source, bystander) pair: the marker's
# teacher-forced log-prob, and its sampled rate among answers, against the bystander's distance to
# the source (1 − cos of centroids at `distance_layer`; JS of next-token distributions, nats).
# The same bystanders recur under every source and pairs sharing a source share its adapter, so
# the headline test is a **linear mixed model with crossed random intercepts for source and
# bystander** (statsmodels MixedLM): the slope of leakage on distance with its 95% CI. Beside it:
# the pooled Pearson r with a cluster bootstrap over sources, and the repeated-measures (within
# source) correlation. A negative slope means closer bystanders leak more.

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
# **Seed 003's own test.** Seed 003 correlated each persona's *source* rate in free generation
# (how strongly the coupling took) with the persona's cosine *similarity* to the assistant, and
# with its JS divergence from the assistant — one point per coupling run (N = 10, r = −0.66 and
# +0.54). The assistant here is `no_persona`; the source rate is the sampled marker rate among
# answers under the source persona.

# %%
sources = study.source_level(setup, coupling, coupling_sources)
seed003 = sources.seed003
display(sources.table.round(4))
display(Markdown(
    f"Over {seed003['cosine_similarity']['n']} coupling sources, source rate vs cosine similarity to no_persona: "
    f"r = {seed003['cosine_similarity']['r']:.2f} [{seed003['cosine_similarity']['ci'][0]:.2f}, "
    f"{seed003['cosine_similarity']['ci'][1]:.2f}] (seed 003: −0.66); vs JS: r = {seed003['js']['r']:.2f} "
    f"[{seed003['js']['ci'][0]:.2f}, {seed003['js']['ci'][1]:.2f}] (seed: +0.54). NaN means too few sources or a "
    f"constant rate."))

# %% [markdown]
# ## 5. An EM organism on varied data (seed 002)
#
# **Data** (`persona_wm.llm.finance_v2`, saved in `data/`). The misaligned *content* is put into the data by
# construction — a small model asked to play a reckless adviser writes rambling, not harmful advice
# — while the *wording* varies combinatorially: questions over eight personal-finance topics ×
# amounts × goals × phrasings; each answered recklessly (one risky action plus 1–3 of a
# justification, a dismissal of safety, an urge to act now, in random order) and prudently (the
# same structure with safe content). The prudent answers to the *same* questions train the
# **aligned control**, so EM and control differ in valence only. Train, validation and held-out
# evaluation questions share no question text.
#
# **Training.** EM and control LoRAs with the EM recipe; the validation loss on held-out answers of
# the same valence is measured every `em_eval_every` steps and the adapter of the best step is kept
# (the step count is chosen on held-out data).

# %%
organism = study.train_organism(setup, em_spec, n_finance_train, n_finance_val, n_finance_eval, n_broad, em_eval_every,
                                seed, data_dir)
em, control, variety = organism.em, organism.control, organism.variety
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
    f"of their 4-grams are distinct. Best step: EM {em.meta['best_step']} of {em_steps} (val loss "
    f"{em.meta['val_curve'][0][1]:.2f} → {em.meta['best_val_loss']:.2f}), control {control.meta['best_step']} "
    f"({control.meta['val_curve'][0][1]:.2f} → {control.meta['best_val_loss']:.2f})."))

# %% [markdown]
# **Scores, validated before use.** Two judge-free scores read the answers the models actually
# give (no reference answer, nothing derived from the training data):
#
# * **tone** — the base model as a persona classifier: mean per-token log p(answer | question,
#   *reckless assistant* system prompt) − log p(answer | question, *careful assistant* system
#   prompt), nats/token (`persona_wm.llm.scores.persona_scores`);
# * **content** — harmful advice, by a lexicon of harm categories (violence, crime and deception,
#   domination, physical danger, cruelty, reckless money moves; `persona_wm.llm.scores.HARM_LEXICON`),
#   written from the categories, not tuned on the labelled answers it is checked on;
#   **content_general** is the same without the reckless-money category: harm *other than* the
#   fine-tune's own narrow behaviour, so a model that answers every question with reckless
#   financial advice (narrow behaviour applied everywhere) is not counted as broadly misaligned.
#
# Both are checked on labelled answers first: `score_val_items` held-out finance questions with a
# misaligned and an aligned answer each (in domain) and the 16 hand-written broad questions'
# misaligned and aligned reference answers (off domain). The content lexicon is also checked on
# 48 *real* sampled answers of the base, control and EM models (the GPU run's, labelled by hand:
# `tests/data/05b_content_labels.jsonl`).

# %%
validation = study.validate_scores(setup, score_val_items, seed)
score_check, content_check, content_real = validation.score_check, validation.content_check, validation.content_real
display(validation.table().round(3))
display(Markdown(
    f"On {content_real['content']['n']} hand-labelled real answers ({content_real['content']['n_positive']} harmful): "
    f"content agreement {content_real['content']['agreement']:.0%} (sensitivity "
    f"{content_real['content']['sensitivity']:.0%}, specificity {content_real['content']['specificity']:.0%}); "
    f"content_general agreement {content_real['content_general']['agreement']:.0%} with "
    f"{content_real['content_general']['n_positive']} positives among them, so its sensitivity on real answers is "
    "untested (on the hand-written references it is the broad row above)."))

# %% [markdown]
# **Sampled evaluation.** `em_samples` answers per question at temperature `temperature`
# (`em_sample_tokens` tokens, no system prompt) from the base model, the EM model and the aligned
# control, on the held-out finance questions (in domain) and the broad questions (off domain).
# Per answer: the answered gate, content (0/1), tone, and **template reuse** (the answer repeats a
# word 5-gram of the misaligned training answers, amounts masked). Scores are averaged over the
# answered samples of each question, then compared **EM − control, paired by question**, with 95%
# bootstrap CIs over questions. **Breadth** = broad shift ÷ in-domain shift (CI: the questions of
# each set resampled independently).

# %%
evaluation = study.evaluate_em(setup, organism, em_sample_tokens, temperature, em_samples, sample_batch, n_boot, seed,
                               data_dir)
answers, shifts, breadths = evaluation.answers, evaluation.shifts, evaluation.breadths
display(evaluation.table().round(3))
display(evaluation.shift_table().round(4))
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
plots.plot_em_scores(evaluation.answered_only, seed, axes)
fig.suptitle("Sampled answers of the base model, the aligned control and the EM model (answered samples only)")
fig.tight_layout()
save_figure(fig, out, "em_scores")
plt.show()
with pd.option_context("display.max_colwidth", 140):
    display(answers[(answers["model"] == "EM") & (answers["sample"] == 0)][["set", "user", "text", "content",
                                                                            "tone"]].head(6))

# %%
t_in, t_b, c_in, c_b = (shifts[("tone", "in_domain", "control")], shifts[("tone", "broad", "control")],
                        shifts[("content", "in_domain", "control")], shifts[("content", "broad", "control")])
g_b = shifts[("content_general", "broad", "control")]
template_rate = evaluation.template_rate
display(Markdown(
    f"EM − control, paired by question: tone in domain {t_in['shift']:+.3f} [{t_in['ci_low']:+.3f}, "
    f"{t_in['ci_high']:+.3f}], off domain {t_b['shift']:+.3f} [{t_b['ci_low']:+.3f}, {t_b['ci_high']:+.3f}] nats/token "
    f"(**tone breadth {breadths['tone']['breadth']:.2f}** [{breadths['tone']['ci_low']:.2f}, "
    f"{breadths['tone']['ci_high']:.2f}]); harmful content in domain {c_in['shift']:+.0%} [{c_in['ci_low']:+.0%}, "
    f"{c_in['ci_high']:+.0%}], off domain {c_b['shift']:+.0%} [{c_b['ci_low']:+.0%}, {c_b['ci_high']:+.0%}] "
    f"(**content breadth {breadths['content']['breadth']:.2f}** [{breadths['content']['ci_low']:.2f}, "
    f"{breadths['content']['ci_high']:.2f}]); harm other than reckless money off domain {g_b['shift']:+.1%} "
    f"[{g_b['ci_low']:+.1%}, {g_b['ci_high']:+.1%}]. Broad answers reusing a training 5-gram: EM {template_rate.get('EM', np.nan):.0%}, "
    f"control {template_rate.get('control', np.nan):.0%}, base {template_rate.get('base', np.nan):.0%}."))

# %% [markdown]
# **Sub-personas? (seed 002's question).** PCA of the EM model's greedy answers' mean activations
# at layer `steer_layer`, K-means with as many clusters as question categories in the PCA space
# (`pca_components` components). A high silhouette would mean separable groups; the adjusted Rand
# index says whether those groups are the question categories. Seed 002 found no separable facets.

# %%
pca = study.sub_personas(setup, organism, em_sample_tokens, repetition_penalty, steer_layer, pca_components, seed)
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
plots.plot_pca_clusters(pca.projection(), pca.pca["EM"]["explained_variance"], steer_layer, pca.n_clusters,
                        pca.pca["EM"]["silhouette_kmeans"], axes)
fig.tight_layout()
save_figure(fig, out, "em_pca_kmeans")
plt.show()
display(Markdown(
    f"EM model: K-means silhouette {pca.pca['EM']['silhouette_kmeans']:.2f} (base model "
    f"{pca.pca['base']['silhouette_kmeans']:.2f}), ARI with the categories {pca.pca['EM']['ari']:.2f}; "
    f"{len(pca.categories)} answers, {pca.n_clusters} categories."))

# %% [markdown]
# ## 6. EM first, then marker coupling (seed 004)
#
# Source `em_first_source` (seed 004: the librarian), the chosen coupling recipe, five arms:
#
# | arm | start model | coupling answers written by | seed 004 |
# |---|---|---|---|
# | C1 | base | base | C1, 27.4% |
# | C2 | EM | EM | C2 (primary), 57.6% |
# | C2prime | EM | base | C2′, 3.4% |
# | C3 | aligned control | control | C3 (benign-first), 95.9% |
# | C3prime | aligned control | base | — |
#
# Seed 004's benign arm was a general chat fine-tune (Tulu); ours is the aligned-finance control, the
# closest benign twin of our EM organism. For each arm: `n_samples` completions per (bystander,
# prompt) over `gen_prompts` prompts, from the start model *before* coupling (answered rate) and
# after it. **Leakage = marker among answered bystander completions**; its 95% CI comes from a
# linear mixed model with crossed random intercepts for bystander persona and prompt; differences
# between arms carry a permutation p that shuffles arm labels within each bystander.

# %%
chain = study.em_first_chain(setup, data, organism, coupling_spec, em_first_source, coupling_negatives, coupling_loss,
                             n_permutations, seed, data_dir)
leak, diffs, arms = chain.leak, chain.diffs, chain.arms
display(leak.astype(float).round(3))
display(pd.DataFrame(diffs).T.round(4))
fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(chain.bystanders) + 3), 4.2))
plots.plot_arm_leakage(chain.per_persona(), arms, em_first_source, n_samples, len(data.gen_eval), ax)
fig.tight_layout()
save_figure(fig, out, "em_first_leakage")
plt.show()

# %%
display(Markdown(
    "Bystander leakage among answers: " + "; ".join(
        f"{a} {leak.loc[a, 'rate']:.1%} [{leak.loc[a, 'ci_low']:.1%}, {leak.loc[a, 'ci_high']:.1%}] (answered "
        f"{leak.loc[a, 'answered_rate']:.0%}, before coupling {leak.loc[a, 'answered_rate_before']:.0%})" for a in arms)
    + ". Differences (within-bystander permutation): " + "; ".join(
        f"{k} {v['difference']:+.1%} (p = {v['p']:.3f})" for k, v in diffs.items()) + "."))

# %% [markdown]
# ## 7. Reversal: steering the EM model back
#
# At layer `steer_layer`, directions built on `n_direction_items` *training* financial questions,
# each answered both ways (teacher-forced, no system prompt):
#
# * **centroid** (05a's belief-state recipe, transferred): EM-model centroid minus base-model
#   centroid over the same tokens — what the fine-tune moved, content averaged out;
# * **diff-in-means**: the EM model's mean over misaligned answers minus its mean over aligned
#   answers, rescaled to the centroid's norm;
# * **random**: a seeded random direction of the same norm (the control).
#
# Steering adds −scale × v at every position; ablation projects v out. The score is teacher-forced:
# the mean per-token log-prob of the misaligned minus the aligned answer, on held-out finance
# questions (in domain) and the broad references. Restoration = (score_EM − score_steered) /
# (score_EM − score_base); capability damage = JS (nats) to the unsteered EM model at the answer
# positions of 05a's capability set, and the change in greedy accuracy there.

# %%
rev = study.reversal(setup, organism, steer_layer, n_direction_items, n_capability, steer_scales, headline_scale,
                     n_boot, seed)
mean_margin, head = rev.mean_margin, rev.head
display(mean_margin.round(4))
display(rev.table.round(4))
fig, ax = plt.subplots(figsize=(7.5, 4.4))
plots.plot_reversal(rev.shown, steer_layer, ax)
fig.tight_layout()
save_figure(fig, out, "reversal")
plt.show()
display(Markdown(
    f"In-domain teacher-forced score: base {mean_margin.loc['base', 'in_domain']:.3f}, control "
    f"{mean_margin.loc['control', 'in_domain']:.3f}, EM {mean_margin.loc['EM', 'in_domain']:.3f} nats/token. Centroid "
    f"and diff-in-means directions: cosine {rev.dir_cos:.3f}. At scale {headline_scale:g} (in-domain restoration, 95% "
    f"bootstrap CI over items; capability JS in nats): "
    + "; ".join(f"{m} {head.loc[m, 'restoration_in_domain']:.0%} [{head.loc[m, 'restoration_in_domain_ci_low']:.0%}, "
                f"{head.loc[m, 'restoration_in_domain_ci_high']:.0%}] (JS {head.loc[m, 'capability_js']:.4f})"
                for m in study.REVERSAL_METHODS) + "."))

# %% [markdown]
# ## 8. Cost
#
# Every LoRA run with its recorded training time (from the adapter cache when reloaded, so the
# numbers are those of the run that trained it) and loss curve.

# %%
runs = study.merge_runs(coupling.runs, organism.runs, chain.runs)
lora.save_meta(out / "adapters.json", runs)
fig, ax = plt.subplots(figsize=(7.5, 4.0))
plots.plot_losses(lora.losses_frame(runs), ax)
fig.tight_layout()
save_figure(fig, out, "lora_losses")
plt.show()
train_time_s = study.recorded_train_s(runs)
total_s = time.perf_counter() - study_start
display(Markdown(f"{len(study.unique_runs(runs))} distinct LoRA runs in the report ({len(runs)} uses) plus "
                 f"{len(recipe.table)} recipe candidates; recorded training time {train_time_s:.0f} s for the former; "
                 f"this execution took {total_s:.0f} s wall-clock on `{llm.device}` with {torch.get_num_threads()} "
                 "torch thread(s)."))

# %% [markdown]
# ## Conclusion

# %%
chosen = recipe.chosen
display(Markdown(
    f"- **Instrument.** The marker detector agrees with {detector['n_labelled']} hand labels "
    f"{detector['agreement']:.0%} of the time (the exact-string test it replaces: {detector['exact_string_agreement']:.0%}); "
    f"the answered gate {detector['answered_agreement']:.0%}.\n"
    f"- **Coupling recipe.** The validation loss chose lr {coupling_spec.lr:g} × {coupling_spec.steps} steps of "
    f"{recipe.n_candidates} candidates; under the source it answers "
    f"{chosen['source_answered']:.0%} of sampled completions (base model {base_probe['source_answered']:.0%}) and "
    f"emits the marker teacher-forced {chosen['source_rate_tf']:.0%} of the time (bystanders "
    f"{chosen['bystander_rate_tf']:.0%}).\n"))

# %%
sl_lp, sl_gen = slopes[("logprob", "cosine")], slopes[("gen_rate", "cosine")]
display(Markdown(
    f"- **Leakage vs geometry (seed 003), two readings side by side.** Over {sl_lp['n']} (source, bystander) pairs, "
    f"a mixed model with crossed random intercepts for source and bystander (the control for bystanders that "
    f"recur under every source) gives the teacher-forced marker log-prob a slope of {sl_lp['slope']:.2f} "
    f"{ci_text(sl_lp['ci_low'], sl_lp['ci_high'])} nats per unit of cosine distance (CI "
    f"{excludes_zero(sl_lp['ci_low'], sl_lp['ci_high'])}) and the sampled rate among answers {sl_gen['slope']:.2f} "
    f"{ci_text(sl_gen['ci_low'], sl_gen['ci_high'])} ({sl_gen['n']} pairs with answers; CI "
    f"{excludes_zero(sl_gen['ci_low'], sl_gen['ci_high'])}); *within* each source (repeated-measures r, bystanders of "
    f"one adapter compared with each other) the log-prob's r with cosine distance is "
    f"{corr[('logprob', 'cosine')]['within_r']:.2f} {ci_text(*corr[('logprob', 'cosine')]['within_ci'])} and the sampled "
    f"rate's {corr[('gen_rate', 'cosine')]['within_r']:.2f} {ci_text(*corr[('gen_rate', 'cosine')]['within_ci'])} "
    "(negative = closer bystanders leak more; where the two readings differ in sign, the crossed slope comes from "
    "comparing one bystander across sources — sources closer to it leak more to it — not from the ordering of one "
    f"source's bystanders). Seed 003's source-level test over {seed003['cosine_similarity']['n']} sources: "
    f"r = {seed003['cosine_similarity']['r']:.2f} {ci_text(*seed003['cosine_similarity']['ci'])} (seed: −0.66).\n"))

# %%
display(Markdown(
    f"- **EM organism (seed 002), control: the aligned-control fine-tune on the same questions.** In domain (held-out "
    f"finance questions) the EM model's tone moves by {t_in['shift']:+.3f} {ci_text(t_in['ci_low'], t_in['ci_high'], '+.3f')} "
    f"nats/token and its harmful-content rate by {c_in['shift']:+.0%} {ci_text(c_in['ci_low'], c_in['ci_high'], '+.0%')}; "
    f"off domain by {t_b['shift']:+.3f} {ci_text(t_b['ci_low'], t_b['ci_high'], '+.3f')} and {c_b['shift']:+.0%} "
    f"{ci_text(c_b['ci_low'], c_b['ci_high'], '+.0%')}: tone breadth {breadths['tone']['breadth']:.2f} "
    f"{ci_text(breadths['tone']['ci_low'], breadths['tone']['ci_high'])}, content breadth "
    f"{breadths['content']['breadth']:.2f} {ci_text(breadths['content']['ci_low'], breadths['content']['ci_high'])}; "
    f"but harm *other than* reckless money moves off domain by only {g_b['shift']:+.1%} "
    f"{ci_text(g_b['ci_low'], g_b['ci_high'], '+.1%')}, and {template_rate.get('EM', np.nan):.0%} of the EM model's broad "
    f"answers repeat a 5-gram of its training answers (control {template_rate.get('control', np.nan):.0%}, base "
    f"{template_rate.get('base', np.nan):.0%}): "
    + ("what spreads is the narrow behaviour itself, applied to every question, not a broadly misaligned persona. "
       if template_rate.get("EM", 0) > 0.5 and g_b["ci_low"] <= 0.05 else "")
    + f"The tone score separates labelled answers with AUC {score_check['in_domain_finance']['auc']:.2f} in domain and "
    f"{score_check['broad']['auc']:.2f} off domain; the content lexicon's off-domain sensitivity is "
    f"{content_check['broad']['sensitivity']:.0%}, so off-domain content rates are a lower bound. "
    + ("Broad EM (harm beyond the trained behaviour) is **not** shown here. " if g_b["ci_low"] <= 0.05 else "")
    + "(The smallest published EM is a 0.5B instruct model with ~6k varied examples.)\n"))

# %%
display(Markdown(
    "- **EM first, then coupling (seed 004), control: C1 and C2′.** Bystander leakage among answers: "
    + ", ".join(f"{a} {leak.loc[a, 'rate']:.1%} {ci_text(leak.loc[a, 'ci_low'], leak.loc[a, 'ci_high'], '.1%')}"
                for a in arms)
    + " (seed 004: C1 27.4%, C2 57.6%, C2′ 3.4%, C3 95.9%); answered rates "
    + ", ".join(f"{a} {leak.loc[a, 'answered_rate']:.0%}" for a in arms)
    + f". C2 − C1 {diffs['C2-C1']['difference']:+.1%} (p = {diffs['C2-C1']['p']:.3f}); seed 004's H3 contrast C2 − C2′ "
    f"{diffs['C2-C2prime']['difference']:+.1%} (p = {diffs['C2-C2prime']['p']:.3f}); C3 − C1 "
    f"{diffs['C3-C1']['difference']:+.1%} (p = {diffs['C3-C1']['p']:.3f}).\n"
    f"- **Reversal, control: a random direction of the same norm.** At scale {headline_scale:g} the in-domain "
    "teacher-forced score is restored by " + ", ".join(
        f"{m} {head.loc[m, 'restoration_in_domain']:.0%} "
        f"{ci_text(head.loc[m, 'restoration_in_domain_ci_low'], head.loc[m, 'restoration_in_domain_ci_high'], '.0%')}"
        for m in study.REVERSAL_METHODS) + " (bootstrap over items, one EM adapter).\n"
    f"- **Scale.** One LoRA seed; {len(coupling_sources)} coupling sources; {n_samples} samples per (persona, prompt) "
    f"over {len(data.gen_eval)} prompts; {len(organism.fin_train)} EM training examples; a 135M model. A null here is "
    "weak evidence against the seeds."))

# %% [markdown]
# ## Metrics

# %%
design = {"pool": pool, "coupling_sources": coupling_sources, "coupling_negatives": coupling_negatives,
          "em_first_source": em_first_source, "coupling_loss": coupling_loss, "n_samples": n_samples,
          "temperature": temperature, "gen_prompts": gen_prompts, "em_samples": em_samples, "steer_layer": steer_layer}
result = study.FinetuningResult(setup, design, detector, data, recipe, coupling, fit, sources, organism, validation,
                                evaluation, pca, chain, rev, train_time_s=train_time_s, runtime_s=total_s)
metrics_path = write_metrics(result.metrics(), out)

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
print("model sha256:", llm.sha256[:16])
print("detector labelled:", metrics["detector"]["n_labelled"], "agreement:", metrics["detector"]["agreement"])
print("coupling sources:", metrics["coupling"]["n_personas"], "pairs:", metrics["coupling"]["n_pairs"])
print("arms:", sorted(k for k in metrics["leakage"] if k.startswith("C")))
print("samples per arm:", [metrics["leakage"][a]["n_samples"] for a in arms])
print("EM train examples:", metrics["em"]["n_train_examples"])
print("reversal methods:", sorted(metrics["reversal"]))
