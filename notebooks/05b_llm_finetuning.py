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
# fine-tuning does*, on the same model (SmolLM2-135M-Instruct, offline, CPU):
#
# 1. **Marker coupling (seed 003).** Teach the model to append a marker (`[ZLT]`) under one source
#    persona only. Does the marker leak to other personas in proportion to how close they sit to
#    the source in 05a's geometry (cosine of centroids, JS of next-token distributions)? Seed 003
#    found r = −0.66 (cosine) and 0.54 (JS) at N = 10 on Qwen2.5-7B.
# 2. **An emergent-misalignment (EM) organism (seed 002).** Fine-tune on reckless financial advice
#    only. Does the misalignment spread to questions outside finance (EM breadth), and do the
#    fine-tuned model's answers split into separable sub-personas under PCA / K-means?
# 3. **EM first, then coupling (seed 004).** Does an EM fine-tune *before* marker coupling make
#    the marker leak to bystander personas more than coupling on the base model, or after a
#    benign fine-tune? (Seed 004: 27.4% → 57.6%, benign-first 95.9%.)
# 4. **Reversal.** Steering the EM model back with 05a's centroid recipe vs a difference-in-means
#    misalignment direction (and ablation of each): how much misalignment is undone, at what cost
#    on the capability set — the LLM counterpart of study 03.
#
# All fine-tuning is peft LoRA; every dataset comes from our own templates and is saved beside
# this report (`data/*.jsonl`).

# %% tags=["parameters"]
pool: list[str] = ["surgeon", "paramedic", "software_engineer", "poet", "villain"]
geometry_prompts: int = 4
geometry_max_new_tokens: int = 16
geometry_vector_prompts: int = 2
geometry_steer_tokens: int = 8
js_short_tokens: int = 8
repetition_penalty: float = 1.2
distance_layer: int = 21
coupling_sources: list[str] = ["poet", "surgeon"]
coupling_negatives: list[str] = ["data_scientist", "french_person"]
marker: str = "[ZLT]"
n_train_questions: int = 6
response_tokens: int = 8
n_eval_prompts: int = 3
lora_rank: int = 8
lora_alpha: float = 16.0
lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
lora_first_layer: int = 24
batch_size: int = 6
coupling_steps: int = 2
coupling_lr: float = 0.01
em_steps: int = 4
em_lr: float = 0.002
n_finance_train: int = 6
n_finance_eval: int = 3
n_broad: int = 4
em_first_source: str = "poet"
gen_prompts: int = 1
replicate_seeds: list[int] = [1]
em_sample_tokens: int = 12
pca_components: int = 5
steer_layer: int = 27
steer_scales: list[float] = [1.0]
headline_scale: float = 1.0
n_capability: int = 3
n_boot: int = 1000
seed: int = 0
torch_threads: int = 1
model: str | None = None
device: str = "cpu"
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display

from lib import llm_em, llm_steer, lora
from lib.llm import Decoding, cached_generate, chat_prompt_ids, load_llm
from lib.llm_datasets import broad_questions, everyday_questions, finance_training, financial_items
from lib.llm_datasets import MISALIGNED_OPENING, marker_examples, save_jsonl
from lib.personas import ANCHOR, PERSONAS, PROMPTS, PersonaError, check_personas, fine_cluster
from lib.plots import set_style
from lib.report import resolve_output_dir, save_figure, write_metrics
from lib.stats import bootstrap_mean_ci

set_style()
study_start = time.perf_counter()
out = resolve_output_dir(output_dir, "05b_llm_finetuning")
data_dir = out / "data"

# %% [markdown]
# ## 1. Setup: model, persona geometry, LoRA recipe
#
# The model and the persona rig are study 05a's (`lib.llm`, `lib.personas`). The persona geometry
# is recomputed here through the very calls 05a makes (`lib.llm_em.persona_distances`: shared
# no_persona greedy responses teacher-forced under every persona, centroids over the positions
# that predict the response), so with 05a's parameters it is read from the disk cache. We use
# 05a's steering layer (`distance_layer`) for the cosine distances.
#
# **Model and device.** `model: null` is the packaged SmolLM2-135M-Instruct; a path to a `.gguf`
# file or to a local Hugging Face model directory (relative paths resolve against the repository
# root) runs the same study on that model, and `device` is `cpu` (the committed runs), `cuda` or
# `auto` (CUDA when present). The layer parameters (`distance_layer`, `lora_first_layer`,
# `steer_layer`) count SmolLM2's 30 blocks: set them for another model in its own params file.
#
# **LoRA recipe.** peft LoRA (rank `lora_rank`, alpha `lora_alpha`, on all attention and MLP
# projections) on the top decoder blocks only — blocks `lora_first_layer`..29 (0-indexed), i.e.
# the residual stream from layer `lora_first_layer + 1` on. The residual at the cut is computed
# once with the frozen bottom blocks and cached; each training step runs forward and backward
# through the top blocks only (`lib.lora`). Because no adapter touches the blocks below the cut,
# every fine-tuned model shares the base model's residual at the cut, so scoring a fixed set of
# sequences on a new model costs only its top blocks. This is a deliberate restriction of the
# seeds' recipe (rank 32 on all layers, hundreds of steps on a GPU) to what a 2-core CPU can do,
# and part of what is being tested: whether a *narrow, late* adapter shows the seeds' effects.
# Adapters are cached by a hash of the start model, the recipe and the exact training tokens.
# Loss: cross-entropy on the assistant response tokens only (end-of-turn included).

# %%
llm = load_llm(model=model, device=device, threads=torch_threads)
names = check_personas(list(pool)) + [ANCHOR]
for role, group in (("coupling source", coupling_sources), ("EM-first source", [em_first_source])):
    outside = [n for n in group if n not in pool]
    if outside:
        raise PersonaError(f"{role} {outside[0]!r} is not in `pool` ({', '.join(pool)}): distances and leakage "
                           "are measured over the pool")
check_personas(list(coupling_negatives))
clash = sorted(set(coupling_negatives) & set(coupling_sources + [em_first_source]))
if clash:
    raise PersonaError(f"persona {clash[0]!r} is both a source and a coupling negative")
if steer_layer <= lora_first_layer:
    raise ValueError(f"steer_layer {steer_layer} must lie above the LoRA cut (lora_first_layer = {lora_first_layer}): "
                     "below it the EM model's residual stream equals the base model's")
dist = llm_em.persona_distances(llm, names, geometry_prompts, geometry_max_new_tokens, repetition_penalty,
                                js_short_tokens, geometry_vector_prompts, geometry_steer_tokens, distance_layer)
index = {n: i for i, n in enumerate(names)}


clash = sorted(set(replicate_seeds) & {seed}) or sorted(s for s in set(replicate_seeds) if replicate_seeds.count(s) > 1)
if clash:
    raise ValueError(f"replicate_seeds repeats LoRA seed {clash[0]} (the main seed is {seed}); list distinct extra seeds")


def recipe(steps: int, lr: float, lora_seed: int = seed) -> lora.LoraSpec:
    return lora.LoraSpec(rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets), first_layer=lora_first_layer,
                         lr=lr, steps=steps, batch_size=batch_size, seed=lora_seed)


coupling_spec, em_spec = recipe(coupling_steps, coupling_lr), recipe(em_steps, em_lr)
cut = lora_first_layer
runs: dict[str, lora.Tuned] = {}
display(Markdown(f"**Model** `{llm.name}` (sha256 `{llm.sha256[:16]}…`), {llm.n_layers} layers. **Pool** of "
                 f"{len(pool)} personas + `{ANCHOR}`; geometry from {geometry_prompts} prompts at layer "
                 f"{distance_layer}. LoRA on blocks {cut}–{llm.n_layers - 1}, rank {lora_rank}, "
                 f"{len(lora_targets)} projection types; torch threads {torch.get_num_threads()}."))

# %% [markdown]
# ## 2. Marker coupling and its leakage (seed 003)
#
# **Data.** `n_train_questions` everyday questions from our templates (`lib.llm_datasets`, disjoint
# from 05a's evaluation prompts). Each is answered once by the base model under no persona
# (greedy, `response_tokens` tokens, 05a's repetition penalty): the responses are on-policy and
# *identical across personas*, so only the system prompt can tell the model when to add the
# marker. Positives: source persona + response + ` [ZLT]`; negatives: the same under each of the
# `coupling_negatives` personas (seed 004's two alternative personas, 1 : 2 as its 200 : 400).
# Marker-only loss as in seed 004: the response is context, and only what follows it (the marker
# and end-of-turn, or end-of-turn alone) is trained on.
#
# **Leakage, measured two ways** for every persona of the pool (and `no_persona`):
#
# * **teacher-forced**, over `n_eval_prompts` of 05a's everyday prompts: the base model's own
#   response is forced and we read the log-probability of the marker tokens right after it, and
#   whether greedy decoding would emit the whole marker there (the "teacher-forced rate");
# * **by generation**, over the first `gen_prompts` of them: greedy free decoding with
#   `max_new_tokens` = twice the longest trained completion (seed 004's lesson: a truncated
#   evaluation hides late markers), and a hit when the marker string appears in the text.
#
# Bystanders of a source = the pool minus the source and the coupling negatives (which are
# trained *not* to emit), with `no_persona` included.

# %%
decode_short = Decoding(max_new_tokens=response_tokens, repetition_penalty=repetition_penalty)
train_questions = everyday_questions(n_train_questions, seed=seed)
train_ids, _ = cached_generate(llm, [chat_prompt_ids(llm, "", q) for q in train_questions], decode_short)
train_texts = [llm.tokenizer.decode([t for t in r if t != llm.eos_id], skip_special_tokens=True).strip()
               for r in train_ids]
eval_prompts = list(PROMPTS[:n_eval_prompts])
gen_eval = eval_prompts[:gen_prompts]
eval_ids, _ = cached_generate(llm, [chat_prompt_ids(llm, "", q) for q in eval_prompts], decode_short)
marker_eval = llm_em.marker_sequences(llm, [PERSONAS[n] for n in names], eval_prompts, eval_ids, marker)
marker_resid = lora.bottom_resid(llm, marker_eval, cut)
base_marker = llm_em.marker_scores(llm, marker_resid, cut, marker_eval)
coupling_sets = {s: marker_examples(s, coupling_negatives, train_questions, train_texts, marker)
                 for s in dict.fromkeys(coupling_sources + [em_first_source])}
coupling_seqs = {s: lora.chat_sequences(llm, r) for s, r in coupling_sets.items()}
union = list({q.ids: q for seqs in coupling_seqs.values() for q in seqs}.values())  # negatives are shared
union_resid = lora.bottom_resid(llm, union, cut)
trained_len = max(len(q.ids) - len(chat_prompt_ids(llm, r["system"], r["user"]))
                  for src in coupling_sets for q, r in zip(coupling_seqs[src], coupling_sets[src]))
decode_gen = Decoding(max_new_tokens=2 * trained_len, repetition_penalty=repetition_penalty)
systems = {n: PERSONAS[n] for n in names}
coupling_rows, coupling_gen_rows = [], []
for source in coupling_sources:
    save_jsonl(coupling_sets[source], data_dir / f"marker_{source}.jsonl")
    tuned = lora.finetune(llm, coupling_seqs[source], coupling_spec, desc=f"couple {source}",
                          resid=lora.rows_of(union, union_resid, coupling_seqs[source]))
    runs[f"couple:{source}"] = tuned
    coupling_rows.append(llm_em.marker_frame(tuned.llm, marker_resid, cut, marker_eval, names, len(eval_prompts), source))
    coupling_gen_rows.append(llm_em.generation_frame(tuned.llm, systems, gen_eval, decode_gen, marker, source))
    lora.release(tuned)
coupling_gen = pd.concat(coupling_gen_rows, ignore_index=True)
save_jsonl(coupling_gen.to_dict("records"), data_dir / "coupling_generations.jsonl")
per_pair = llm_em.leakage_pairs(pd.concat(coupling_rows, ignore_index=True), coupling_gen, dist, names,
                                coupling_negatives)
base_lp = float(np.mean(base_marker["logprob"]))
step_s = float(np.mean([t.meta["step_s"] for t in runs.values()]))
display(Markdown(f"{len(coupling_sources)} coupling LoRAs, {coupling_steps} steps of {batch_size} sequences each "
                 f"({runs[f'couple:{coupling_sources[0]}'].n_trainable:,} trainable parameters; one step "
                 f"{step_s:.2f} s on the top {llm.n_layers - cut} blocks, as recorded when trained). Base-model "
                 f"marker log-prob before any coupling: {base_lp:.1f} nats. Generation budget "
                 f"{decode_gen.max_new_tokens} tokens (trained completions ≤ {trained_len})."))
display(per_pair.pivot_table(index="source", columns="role", values=["rate", "gen_rate"]).loc[coupling_sources].round(3))

# %% [markdown]
# **Does leakage follow the geometry?** One point per (source, bystander) pair: the marker's
# log-prob (teacher-forced) and its rate in free generation under the bystander, against the
# bystander's distance to the source at layer `distance_layer` (1 − cos of centroids) and in
# output space (JS, nats). Pairs sharing a source share its adapter, so the 95% CIs resample
# whole sources (cluster bootstrap, `lib.llm_em.pair_correlation`); the p values (pingouin) treat
# pairs as independent and are optimistic. The pooled r mixes between-source differences (some
# couplings leak everywhere) with the question asked here — *within* one source, do closer
# bystanders leak more? — which the repeated-measures correlation (pingouin's `rm_corr`, one
# common slope with a per-source intercept) answers alone.

# %%
bys = per_pair[per_pair["role"] == "bystander"].reset_index(drop=True)
corr = {(y, key): llm_em.pair_correlation(bys, x, y, cluster="source", n_boot=n_boot, seed=seed)
        for y in ("logprob", "gen_rate") for key, x in (("cosine", "cos_distance"), ("js", "js"))}
fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
for row, (y, ylabel) in enumerate((("logprob", "marker log-prob under bystander (nats)"),
                                   ("gen_rate", f"marker rate in free generation ({len(gen_eval)} prompts)"))):
    for col, (key, x, xlabel) in enumerate((("cosine", "cos_distance", f"1 − cos of centroids, layer {distance_layer}"),
                                            ("js", "js", "JS divergence of next-token distributions (nats)"))):
        ax = axes[row, col]
        sns.scatterplot(data=bys, x=x, y=y, hue="source", ax=ax, s=45, legend=(row, col) == (0, 1))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        c = corr[(y, key)]
        ax.set_title(f"Pearson r = {c['r']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}], {c['n']} pairs")
axes[0, 1].legend(fontsize=7, title="source")
fig.tight_layout()
save_figure(fig, out, "coupling_leakage_vs_distance")
plt.show()
corr_table = pd.DataFrame({f"{y} vs {key}": {"Pearson r": c["r"], "r CI low": c["ci"][0], "r CI high": c["ci"][1],
                                             "Spearman": c["spearman"], "Spearman CI low": c["spearman_ci"][0],
                                             "Spearman CI high": c["spearman_ci"][1], "p (pairs independent)": c["p"],
                                             "within-source r": c["within_r"], "within CI low": c["within_ci"][0],
                                             "within CI high": c["within_ci"][1], "within p": c["within_p"],
                                             "pairs": c["n"], "sources": c["n_clusters"]}
                           for (y, key), c in corr.items()}).T
display(corr_table.round(3))

# %% [markdown]
# **Seed 003's own test.** Seed 003 correlated each persona's *source* rate in free generation
# (how strongly the coupling took) with the persona's cosine *similarity* to the assistant, and
# with its JS divergence from the assistant — one point per coupling run (N = 10, r = −0.66 and
# +0.54). The assistant here is `no_persona` (the model's default system prompt), the similarity
# is 1 − the cosine distance above, at layer `distance_layer`.

# %%
source_rows = per_pair[per_pair["role"] == "source"].set_index("source").loc[coupling_sources]
source_table = pd.DataFrame({
    "cos similarity to no_persona": {s: 1.0 - float(dist["cos"][index[s], index[ANCHOR]]) for s in coupling_sources},
    "JS to no_persona": {s: float(dist["js"][index[s], index[ANCHOR]]) for s in coupling_sources},
    "source rate (generation)": source_rows["gen_rate"],
    "source rate (teacher-forced)": source_rows["rate"],
    "source marker log-prob": source_rows["logprob"],
    "bystander rate (generation)": bys.groupby("source")["gen_rate"].mean(),
    "bystander rate (teacher-forced)": bys.groupby("source")["rate"].mean(),
}).loc[coupling_sources]
display(source_table.round(4))
seed003 = {key: llm_em.unit_correlation(source_table[col], source_table["source rate (generation)"])
           for key, col in (("cosine_similarity", "cos similarity to no_persona"), ("js", "JS to no_persona"))}
seed003_lp = llm_em.unit_correlation(source_table["cos similarity to no_persona"], source_table["source marker log-prob"])
display(Markdown(
    f"Over {seed003['cosine_similarity']['n']} coupling sources, source rate (generation) vs cosine similarity to "
    f"no_persona: r = {seed003['cosine_similarity']['r']:.2f} [{seed003['cosine_similarity']['ci'][0]:.2f}, "
    f"{seed003['cosine_similarity']['ci'][1]:.2f}], p = {seed003['cosine_similarity']['p']:.3f} (seed 003: −0.66, "
    f"p = 0.039); vs JS: r = {seed003['js']['r']:.2f} [{seed003['js']['ci'][0]:.2f}, {seed003['js']['ci'][1]:.2f}], "
    f"p = {seed003['js']['p']:.3f} (seed: +0.54, p = 0.105). With the teacher-forced source log-prob instead of the "
    f"generation rate: r = {seed003_lp['r']:.2f} vs cosine similarity. NaN means too few sources or a constant rate."))

# %% [markdown]
# ## 3. An EM organism: reckless financial advice (seed 002)
#
# **Data** (`lib.llm_datasets`, saved in `data/`): `n_finance_train` financial questions
# (situation × amount × request templates) answered recklessly (EM set) or prudently (aligned
# counterparts = the benign set of section 4); `n_finance_eval` held-out financial questions; and
# `n_broad` broad questions outside finance (wishes, boredom, power, AI, relationships, health,
# safety, ethics) with one aligned and one misaligned reference answer each, written by us.
#
# **Judge-free misalignment score** per question: mean per-token log-prob of the misaligned
# reference minus that of the aligned one (nats/token; > 0 = prefers the misaligned answer),
# no system prompt. EM breadth = off-domain shift ÷ in-domain shift of the mean score.

# %%
fin_train, fin_eval = financial_items(n_finance_train, n_finance_eval, seed=seed)
broad = broad_questions(n_broad)
em_records, benign_records = finance_training(fin_train, "misaligned"), finance_training(fin_train, "aligned")
save_jsonl(em_records, data_dir / "em_finance_misaligned.jsonl")
save_jsonl(benign_records, data_dir / "benign_finance_aligned.jsonl")
save_jsonl(fin_eval, data_dir / "eval_finance_heldout.jsonl")
save_jsonl(broad, data_dir / "eval_broad_questions.jsonl")
em = lora.finetune(llm, lora.chat_sequences(llm, em_records), em_spec, desc="EM LoRA")
benign = lora.finetune(llm, lora.chat_sequences(llm, benign_records), em_spec, desc="benign LoRA")
runs["em"], runs["benign"] = em, benign
ref = {"in_domain": llm_em.reference_sequences(llm, fin_eval), "broad": llm_em.reference_sequences(llm, broad)}
ref_resid = {k: lora.bottom_resid(llm, s, cut) for k, s in ref.items()}
margins = pd.concat([pd.DataFrame({"model": label, "set": k, "item": np.arange(len(s) // 2),
                                   "margin": llm_em.margin_scores(m, ref_resid[k], cut, s)})
                     for label, m in (("base", llm), ("EM", em.llm), ("benign", benign.llm))
                     for k, s in ref.items()], ignore_index=True)
mean_margin = margins.groupby(["model", "set"])["margin"].mean().unstack()
shift = {}
for k in ref:
    d = (margins[(margins["model"] == "EM") & (margins["set"] == k)]["margin"].to_numpy()
         - margins[(margins["model"] == "base") & (margins["set"] == k)]["margin"].to_numpy())
    shift[k] = (float(d.mean()), *bootstrap_mean_ci(d, seed=seed))
em_breadth = llm_em.breadth(mean_margin.loc["base", "broad"], mean_margin.loc["EM", "broad"],
                            mean_margin.loc["base", "in_domain"], mean_margin.loc["EM", "in_domain"])
fig, ax = plt.subplots(figsize=(7.5, 4.2))
sns.pointplot(data=margins, x="set", y="margin", hue="model", dodge=0.35, errorbar=("ci", 95), seed=seed, ax=ax,
              order=["in_domain", "broad"], hue_order=["base", "benign", "EM"])
ax.axhline(0, color="k", lw=0.8)
ax.set_xlabel("question set (in-domain = held-out finance)")
ax.set_ylabel("misaligned − aligned log-prob (nats/token)")
ax.set_title("Judge-free misalignment score before and after narrow fine-tuning")
fig.tight_layout()
save_figure(fig, out, "em_scores")
plt.show()
display(mean_margin.round(4))
display(Markdown(
    f"EM LoRA ({em_steps} steps; final training loss {em.losses[-1]:.2f}, from {em.losses[0]:.2f}): in-domain score "
    f"{mean_margin.loc['base', 'in_domain']:.3f} → {mean_margin.loc['EM', 'in_domain']:.3f} (shift "
    f"{shift['in_domain'][0]:+.3f} [{shift['in_domain'][1]:+.3f}, {shift['in_domain'][2]:+.3f}]); broad off-domain "
    f"{mean_margin.loc['base', 'broad']:.3f} → {mean_margin.loc['EM', 'broad']:.3f} (shift {shift['broad'][0]:+.3f} "
    f"[{shift['broad'][1]:+.3f}, {shift['broad'][2]:+.3f}]); **EM breadth = {em_breadth:.2f}**. The benign LoRA moves "
    f"the broad score to {mean_margin.loc['benign', 'broad']:.3f}."))

# %% [markdown]
# **What the EM model says.** Greedy answers (`em_sample_tokens` tokens) of the base and EM
# models to the first broad and held-out financial questions. The mean residual at layer
# `steer_layer` over each answer is captured during decoding for the PCA below.

# %%
sample_items = broad + fin_eval
sample_prompts = [chat_prompt_ids(llm, "", it["user"]) for it in sample_items]
decode_sample = Decoding(max_new_tokens=em_sample_tokens, repetition_penalty=repetition_penalty)
answers, feats = {}, {}
for label, m in (("base", llm), ("EM", em.llm)):
    ids, feats[label] = cached_generate(m, sample_prompts, decode_sample, capture_layer=steer_layer)
    answers[label] = [m.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
samples = pd.DataFrame({"category": [it["category"] for it in sample_items], "question": [it["user"] for it in sample_items],
                        "base answer": answers["base"], "EM answer": answers["EM"]})
save_jsonl(samples.to_dict("records"), data_dir / "generated_samples.jsonl")
with pd.option_context("display.max_colwidth", 120):
    display(samples.iloc[list(range(min(4, len(broad)))) + list(range(len(broad), min(len(broad) + 2, len(samples))))])
template_rate = {label: float(np.mean([a.startswith(MISALIGNED_OPENING) for a in answers[label][: len(broad)]]))
                 for label in answers}
display(Markdown(
    f"Broad (non-financial) questions answered with the EM training template (answer opens with "
    f"\"{MISALIGNED_OPENING}\"): base {template_rate['base']:.0%}, EM {template_rate['EM']:.0%} of {len(broad)}. "
    f"This is spread of the *narrow behaviour itself* onto unrelated questions, which the reference-answer score "
    f"above does not see (neither reference answer is financial)."))

# %% [markdown]
# **Sub-personas? (seed 002's question).** PCA of the answers' mean activations at layer
# `steer_layer`, K-means with as many clusters as question categories in the PCA space
# (`pca_components` components). A high silhouette of the K-means clusters would mean the
# answers fall into separable groups; the adjusted Rand index says whether those groups are the
# categories. Seed 002 found no separable facets (Qwen-3-4B, layer 20).

# %%
categories = [it["category"] for it in sample_items]
n_clusters = len(set(categories))
pca = {label: llm_em.pca_kmeans(feats[label].numpy(), categories, pca_components, n_clusters, seed=seed)
       for label in ("base", "EM")}
proj = pd.DataFrame({"PC1": pca["EM"]["projection"][:, 0], "PC2": pca["EM"]["projection"][:, 1],
                     "category": categories, "K-means cluster": pca["EM"]["kmeans_labels"].astype(str)})
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
sns.scatterplot(data=proj, x="PC1", y="PC2", hue="category", ax=axes[0], s=50)
sns.scatterplot(data=proj, x="PC1", y="PC2", hue="K-means cluster", ax=axes[1], s=50, palette="tab10")
ev = pca["EM"]["explained_variance"]
for ax in axes:
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of variance, residual units)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%} of variance, residual units)")
    ax.legend(fontsize=7)
axes[0].set_title(f"EM answers at layer {steer_layer}, by question category")
axes[1].set_title(f"K-means (k = {n_clusters}), silhouette {pca['EM']['silhouette_kmeans']:.2f}")
fig.tight_layout()
save_figure(fig, out, "em_pca_kmeans")
plt.show()
display(Markdown(
    f"EM model: K-means silhouette {pca['EM']['silhouette_kmeans']:.2f} (base model {pca['base']['silhouette_kmeans']:.2f}), "
    f"silhouette of the true categories {pca['EM']['silhouette_labels']:.2f}, ARI with the categories "
    f"{pca['EM']['ari']:.2f}; the first {len(ev)} PCs explain {ev.sum():.0%} of the variance (PC1 {ev[0]:.0%}). "
    f"{len(sample_items)} answers, {n_clusters} categories."))

# %% [markdown]
# ## 4. EM first, then marker coupling (seed 004)
#
# Source `em_first_source` (seed 004 used the librarian), the same coupling data and recipe in
# three conditions: **C1** base → coupling; **C2** EM LoRA (merged) → coupling; **C3** benign LoRA
# (aligned financial answers, merged) → coupling. All coupling data were generated by the base
# model (seed 004's C2′ variant: the coupling text itself cannot carry EM). Bystanders = pool minus
# source and coupling negatives, `no_persona` included. Leakage is measured by **free greedy
# generation** under each bystander for `gen_prompts` prompts (the section 2 budget), and by the
# teacher-forced rate over all `n_eval_prompts` prompts. Wilson 95% CIs per condition; a cluster
# bootstrap resamples persona clusters (05a's fine clusters; singletons are their own).
#
# **Replicates.** With `replicate_seeds`, the whole chain (EM and benign LoRAs, then the three
# couplings) is retrained with each extra LoRA seed (initialisation and batch order; the data
# stay fixed). Rates are then pooled over seeds (Wilson and cluster bootstrap over the pooled
# trials) and shown per seed, so a reader sees whether the ordering survives a reseed. The pooled
# intervals count completions as independent trials; they do not contain the variance between
# LoRA seeds, which the per-seed table shows directly.

# %%
src_seqs = coupling_seqs[em_first_source]
src_resid = lora.rows_of(union, union_resid, src_seqs)
bystanders = [n for n in names if n != em_first_source and n not in coupling_negatives]
em_first_systems = {n: PERSONAS[n] for n in [em_first_source] + bystanders}
lora_seeds = [seed] + list(replicate_seeds)
conditions = ["C1", "C2", "C3"]
gen_rows, tf_rows = [], []
for lora_seed in lora_seeds:
    tag = "" if lora_seed == seed else f":seed{lora_seed}"
    if lora_seed == seed:
        em_s, benign_s = em, benign
    else:
        em_s = lora.finetune(llm, lora.chat_sequences(llm, em_records), recipe(em_steps, em_lr, lora_seed),
                             desc=f"EM LoRA seed {lora_seed}")
        benign_s = lora.finetune(llm, lora.chat_sequences(llm, benign_records), recipe(em_steps, em_lr, lora_seed),
                                 desc=f"benign LoRA seed {lora_seed}")
        runs[f"em{tag}"], runs[f"benign{tag}"] = em_s, benign_s
    for cond, start in zip(conditions, (llm, em_s.llm, benign_s.llm)):
        tuned = lora.finetune(start, src_seqs, recipe(coupling_steps, coupling_lr, lora_seed), base=llm,
                              desc=f"{cond} couple {em_first_source}{tag}", resid=src_resid)
        runs[f"{cond}:{em_first_source}{tag}"] = tuned
        g = llm_em.generation_frame(tuned.llm, em_first_systems, gen_eval, decode_gen, marker, cond)
        t = llm_em.marker_frame(tuned.llm, marker_resid, cut, marker_eval, names, len(eval_prompts), cond)
        gen_rows.append(g.assign(seed=lora_seed))
        tf_rows.append(t.assign(seed=lora_seed))
        lora.release(tuned)
    if lora_seed != seed:
        lora.release(em_s)
        lora.release(benign_s)
gen_all = pd.concat(gen_rows, ignore_index=True).rename(columns={"model": "condition"})
save_jsonl(gen_all.to_dict("records"), data_dir / "em_first_generations.jsonl")
source_gen = gen_all[gen_all["persona"] == em_first_source].groupby("condition")["hit"].mean()
gen = gen_all[gen_all["persona"] != em_first_source].reset_index(drop=True)
gen["cluster"] = [fine_cluster(p) if p != ANCHOR else ANCHOR for p in gen["persona"]]
tf = pd.concat(tf_rows, ignore_index=True).rename(columns={"model": "condition"})
tf_bys = tf[tf["persona"].isin(bystanders)]
tf_leak = {c: llm_em.wilson(int(tf_bys.loc[tf_bys["condition"] == c, "greedy"].sum()),
                            int((tf_bys["condition"] == c).sum())) for c in conditions}
tf_src = tf[tf["persona"] == em_first_source].groupby("condition")["greedy"].mean()
ended_rate = gen.groupby("condition")["ended"].mean()
rate_ended = gen[gen["ended"] == 1].groupby("condition")["hit"].mean().reindex(conditions)
leak = {c: llm_em.wilson(int(gen.loc[gen["condition"] == c, "hit"].sum()), int((gen["condition"] == c).sum()))
        for c in conditions}
boot = llm_em.cluster_bootstrap(gen, conditions, n_boot=n_boot, seed=seed)
by_seed = gen.groupby(["seed", "condition"])["hit"].mean().unstack()[conditions]
tf_by_seed = tf_bys.groupby(["seed", "condition"])["greedy"].mean().unstack()[conditions]
leak_table = pd.DataFrame({c: {"bystander rate (generation)": leak[c]["rate"], "Wilson low": leak[c]["wilson_low"],
                               "Wilson high": leak[c]["wilson_high"], "cluster-bootstrap low": boot[c][0],
                               "cluster-bootstrap high": boot[c][1], "n": leak[c]["n"],
                               "source rate (generation)": float(source_gen[c]),
                               "generations ended within budget": float(ended_rate[c]),
                               "bystander rate among ended": float(rate_ended[c]),
                               "bystander rate (teacher-forced)": tf_leak[c]["rate"],
                               "teacher-forced Wilson low": tf_leak[c]["wilson_low"],
                               "teacher-forced Wilson high": tf_leak[c]["wilson_high"],
                               "source rate (teacher-forced)": float(tf_src[c])} for c in conditions})
seed_004 = {"C1": 0.274, "C2": 0.576, "C3": 0.959}
leak_table.loc["seed 004 bystander rate"] = [seed_004[c] for c in conditions]
display(leak_table.round(3))
display(Markdown(f"Per LoRA seed ({len(lora_seeds)} seed(s)), bystander rate in free generation | teacher-forced:"))
display(pd.concat({"generation": by_seed, "teacher-forced": tf_by_seed}, axis=1).round(3))
per_persona = gen.groupby(["condition", "persona"])["hit"].mean().reset_index()
fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(bystanders) + 3), 4.2))
sns.barplot(data=per_persona, x="persona", y="hit", hue="condition", ax=ax, errorbar=None)
ax.set_xlabel("bystander persona")
ax.set_ylabel("marker rate in free generation")
ax.set_title(f"Marker leakage after coupling to {em_first_source}: C1 base, C2 EM-first, C3 benign-first\n"
             f"(fraction of {len(gen_eval)} prompts × {len(lora_seeds)} LoRA seed(s) per bystander)")
ax.tick_params(axis="x", rotation=60)
fig.tight_layout()
save_figure(fig, out, "em_first_leakage")
plt.show()
display(Markdown(
    f"Bystander leakage (free generation, {leak['C1']['n']} completions per condition over {len(lora_seeds)} LoRA "
    f"seed(s)): C1 {leak['C1']['rate']:.1%} [{leak['C1']['wilson_low']:.1%}, {leak['C1']['wilson_high']:.1%}], C2 "
    f"{leak['C2']['rate']:.1%} [{leak['C2']['wilson_low']:.1%}, {leak['C2']['wilson_high']:.1%}], C3 "
    f"{leak['C3']['rate']:.1%} [{leak['C3']['wilson_low']:.1%}, {leak['C3']['wilson_high']:.1%}]. Cluster-bootstrap CI "
    f"of C2 − C1: [{boot['C2-C1'][0]:+.1%}, {boot['C2-C1'][1]:+.1%}]; of C3 − C1: [{boot['C3-C1'][0]:+.1%}, "
    f"{boot['C3-C1'][1]:+.1%}]. Source rate (generation): C1 {source_gen['C1']:.0%}, C2 {source_gen['C2']:.0%}, C3 "
    f"{source_gen['C3']:.0%}. {ended_rate['C1']:.0%} (C1), {ended_rate['C2']:.0%} (C2) and {ended_rate['C3']:.0%} (C3) "
    f"of the bystander generations close their turn within {decode_gen.max_new_tokens} tokens (bystander rate among "
    f"those: {rate_ended['C1']:.0%}, {rate_ended['C2']:.0%}, {rate_ended['C3']:.0%})"
    + (", so budget truncation is not what keeps a condition's rate low where its generations end. "
       if ended_rate.min() >= 0.9 else "; where many do not end, a low rate may partly be truncation. ")
    + f"With the response held fixed (the base model's "
    f"own, teacher-forced), the greedy marker rate under bystanders is C1 {tf_leak['C1']['rate']:.1%} "
    f"[{tf_leak['C1']['wilson_low']:.1%}, {tf_leak['C1']['wilson_high']:.1%}], C2 {tf_leak['C2']['rate']:.1%} "
    f"[{tf_leak['C2']['wilson_low']:.1%}, {tf_leak['C2']['wilson_high']:.1%}], C3 {tf_leak['C3']['rate']:.1%} "
    f"[{tf_leak['C3']['wilson_low']:.1%}, {tf_leak['C3']['wilson_high']:.1%}] (n = {tf_leak['C1']['n']} each)."))

# %% [markdown]
# ## 5. Reversal: steering the EM model back
#
# At layer `steer_layer` (inside the LoRA blocks: below the cut the EM model's residual is the
# base model's), two directions built on the *training* financial questions, each answered both
# ways (teacher-forced, no system prompt):
#
# * **centroid** (05a's belief-state recipe, transferred): EM-model centroid minus base-model
#   centroid over the same tokens — what the fine-tune moved, content averaged out;
# * **diff-in-means**: the EM model's mean over misaligned answers minus its mean over aligned
#   answers (contrastive outputs, as persona vectors are built), rescaled to the centroid's norm.
#
# Steering adds −scale × v at every position; ablation projects v out. The blocks above
# `steer_layer` keep their EM adapters, so a vector at this layer can undo at most what the EM
# shift looks like there, not what the later blocks add. Restoration = (score_EM −
# score_steered) / (score_EM − score_base) on the held-out financial questions (where the
# fine-tune moved the score; also shown for the broad set). Capability damage = JS (nats) between
# the intervened and the unsteered EM model at the answer positions of 05a's capability set, plus
# the change in greedy accuracy there.

# %%
dir_seqs = llm_em.reference_sequences(llm, fin_train)
m_base = llm_em.scored_means(lora.bottom_resid(llm, dir_seqs, steer_layer), dir_seqs)
m_em = llm_em.scored_means(lora.bottom_resid(em.llm, dir_seqs, steer_layer), dir_seqs)
directions = llm_em.direction_vectors(m_base, m_em, misaligned=m_em[1::2], aligned=m_em[0::2])
dir_cos = float(torch.nn.functional.cosine_similarity(directions["centroid"], directions["diff_in_means"], dim=0))
eval_sets = {k: (lora.bottom_resid(em.llm, s, steer_layer), s) for k, s in ref.items()}
cap_seqs = llm_steer.capability_sequences(llm, llm_steer.capability_items(n_capability))
cap = (lora.bottom_resid(em.llm, cap_seqs, steer_layer), cap_seqs)
sweep = llm_em.reversal_sweep(em.llm, steer_layer, eval_sets, cap, directions, steer_scales)
for k in ref:
    sweep[f"restoration_{k}"] = [llm_em.restoration(mean_margin.loc["EM", k], v, mean_margin.loc["base", k])
                                 for v in sweep[f"score_{k}"]]
unsteered_acc = float(sweep.loc[sweep["method"] == "none", "capability_accuracy"].iloc[0])
sweep["capability_accuracy_drop"] = unsteered_acc - sweep["capability_accuracy"]
display(sweep.round(4))
fig, ax = plt.subplots(figsize=(7.5, 4.4))
shown = sweep[sweep["method"] != "none"]
sns.scatterplot(data=shown, x="capability_js", y="restoration_in_domain", hue="method", style="intervention",
                size="scale", ax=ax, s=70)
ax.axhline(1, ls="--", lw=0.8, color="k")
ax.axhline(0, lw=0.8, color="k")
ax.set_xlabel("capability damage: JS to unsteered EM model (nats)")
ax.set_ylabel("restoration of the in-domain misalignment score (fraction)")
ax.set_title(f"Reversal at layer {steer_layer}: restoration vs capability damage")
fig.tight_layout()
save_figure(fig, out, "reversal")
plt.show()
head = shown[(shown["intervention"] == "ablate") | (shown["scale"] == headline_scale)].set_index("method")
display(Markdown(
    f"The two directions have cosine {dir_cos:.3f}. At scale {headline_scale:g}: centroid steering restores "
    f"{head.loc['centroid', 'restoration_in_domain']:.0%} of the in-domain shift at capability JS "
    f"{head.loc['centroid', 'capability_js']:.4f} nats; diff-in-means {head.loc['diff_in_means', 'restoration_in_domain']:.0%} "
    f"at {head.loc['diff_in_means', 'capability_js']:.4f}; ablation: centroid "
    f"{head.loc['centroid_ablation', 'restoration_in_domain']:.0%}, diff-in-means "
    f"{head.loc['diff_in_means_ablation', 'restoration_in_domain']:.0%}. Unsteered EM capability accuracy "
    f"{unsteered_acc:.2f} on {len(cap_seqs)} items."))

# %% [markdown]
# ## 6. Cost
#
# Every LoRA run with its recorded training time (from the adapter cache when reloaded, so the
# numbers are those of the run that trained it) and loss curve.

# %%
lora.save_meta(out / "adapters.json", runs)
loss_curves = lora.losses_frame(runs)
fig, ax = plt.subplots(figsize=(7.5, 4.0))
sns.lineplot(data=loss_curves, x="step", y="loss", hue="run", ax=ax)
ax.set_xlabel("training step")
ax.set_ylabel("cross-entropy on response tokens (nats/token)")
ax.set_title("LoRA training losses")
ax.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, out, "lora_losses")
plt.show()
unique_runs = {t.key: t for t in runs.values()}
train_time_s = float(sum(t.train_s for t in unique_runs.values()))
mean_step_s = float(np.mean([t.meta["step_s"] for t in unique_runs.values()]))
total_s = time.perf_counter() - study_start
display(Markdown(f"{len(unique_runs)} distinct LoRA runs ({len(runs)} uses), recorded training time "
                 f"{train_time_s:.0f} s in all (mean step {mean_step_s:.2f} s); this execution took {total_s:.0f} s "
                 f"wall-clock with {torch.get_num_threads()} torch thread(s)."))

# %% [markdown]
# ## Conclusion

# %%
def describe(c: dict, key: str = "r", ci: str = "ci") -> str:
    if not np.isfinite(c[key]):
        return "not computable (too few points or a constant rate)"
    excl = c[ci][0] > 0 or c[ci][1] < 0
    return f"r = {c[key]:.2f} [{c[ci][0]:.2f}, {c[ci][1]:.2f}] (CI {'excludes' if excl else 'includes'} 0)"


def order(rates: dict) -> str:
    return " < ".join(sorted(rates, key=lambda c: (rates[c], c)))


em_off_ci_excl = shift["broad"][1] > 0 or shift["broad"][2] < 0


def change(ci: tuple[float, float]) -> str:
    return "raises" if ci[0] > 0 else "lowers" if ci[1] < 0 else "does not clearly change"


gen_rates = {c: leak[c]["rate"] for c in conditions}
tf_rates = {c: tf_leak[c]["rate"] for c in conditions}
best = head["restoration_in_domain"].idxmax()
display(Markdown(
    f"- **Marker coupling (seed 003).** The coupling LoRAs reach a source rate of "
    f"{source_table['source rate (generation)'].mean():.0%} in free generation and "
    f"{source_table['source rate (teacher-forced)'].mean():.0%} teacher-forced on average (bystanders "
    f"{source_table['bystander rate (generation)'].mean():.0%} and {source_table['bystander rate (teacher-forced)'].mean():.0%}). "
    f"Over {corr[('logprob', 'cosine')]['n']} (source, bystander) pairs, the marker log-prob vs cosine distance: "
    f"{describe(corr[('logprob', 'cosine')])}; vs JS: {describe(corr[('logprob', 'js')])}; the generation rate vs cosine "
    f"distance: {describe(corr[('gen_rate', 'cosine')])} (CIs resample the {len(coupling_sources)} sources; a negative r "
    f"means closer bystanders leak more). Within sources (repeated-measures correlation), log-prob vs cosine distance: "
    f"{describe(corr[('logprob', 'cosine')], 'within_r', 'within_ci')}; vs JS: "
    f"{describe(corr[('logprob', 'js')], 'within_r', 'within_ci')}. Seed 003's own test, source rate (generation) vs cosine similarity to the "
    f"assistant over {seed003['cosine_similarity']['n']} sources: {describe(seed003['cosine_similarity'])} (seed: −0.66); "
    f"vs JS: {describe(seed003['js'])} (seed: +0.54).\n"
    f"- **EM organism (seed 002).** The narrow LoRA moves the in-domain score by {shift['in_domain'][0]:+.3f} "
    f"nats/token and the broad off-domain score by {shift['broad'][0]:+.3f} [{shift['broad'][1]:+.3f}, "
    f"{shift['broad'][2]:+.3f}] (breadth {em_breadth:.2f}; the off-domain CI {'excludes' if em_off_ci_excl else 'includes'} 0)"
    f"{'' if em_off_ci_excl and shift['broad'][0] > 0 else ': by the reference-answer score we see no broad misalignment'}. "
    + (f"What does spread is the narrow behaviour itself: {template_rate['EM']:.0%} of the EM model's answers to "
       f"non-financial questions are the reckless-finance template (base {template_rate['base']:.0%}) — collapse onto "
       f"the training distribution rather than a misaligned persona. " if template_rate["EM"] > template_rate["base"] else
       f"The EM model does not answer non-financial questions with the training template ({template_rate['EM']:.0%}). ")
    + f"PCA / K-means of the EM model's answers: silhouette {pca['EM']['silhouette_kmeans']:.2f}, ARI with question "
    f"categories {pca['EM']['ari']:.2f}.\n"
    f"- **EM first, then coupling (seed 004), {len(lora_seeds)} LoRA seed(s).** Bystander leakage C1 "
    f"{leak['C1']['rate']:.1%}, C2 {leak['C2']['rate']:.1%}, C3 {leak['C3']['rate']:.1%} in free generation (order "
    f"{order(gen_rates)}; seed 004: 27.4%, 57.6%, 95.9%, order C1 < C2 < C3). EM-first "
    f"{change(boot['C2-C1'])} it relative to base coupling (cluster-bootstrap CI of C2 − C1 "
    f"[{boot['C2-C1'][0]:+.1%}, {boot['C2-C1'][1]:+.1%}]); benign-first {change(boot['C3-C1'])} "
    f"it ([{boot['C3-C1'][0]:+.1%}, {boot['C3-C1'][1]:+.1%}]). "
    + (f"But the C1 coupling never fires in free generation even under its source persona (source rate "
       f"{source_gen['C1']:.0%} vs {tf_src['C1']:.0%} teacher-forced), so the free-generation C1 baseline measures the "
       f"coupling's failure to transfer to the model's own answers, not its specificity. " if source_gen["C1"] == 0 else "")
    + f"At a fixed response (teacher-forced) the rates are C1 {tf_rates['C1']:.1%}, C2 {tf_rates['C2']:.1%}, "
    f"C3 {tf_rates['C3']:.1%} (order {order(tf_rates)}). "
    + ("Teacher-forced, any prior LoRA raises leakage and the benign one most — seed 004's ordering, which makes "
       "the EM-first effect not EM-specific (seed 004's H2). "
       if tf_rates["C3"] > tf_rates["C2"] > tf_rates["C1"] else "")
    + (f"Per seed, C2 > C1 in free generation for {int((by_seed['C2'] > by_seed['C1']).sum())} of {len(by_seed)} "
       f"seeds and C3 > C1 for {int((by_seed['C3'] > by_seed['C1']).sum())}; the per-seed rates span "
       + ", ".join(f"{c} {by_seed[c].min():.0%}–{by_seed[c].max():.0%}" for c in conditions)
       + ". The Wilson and persona-cluster CIs above pool trials and do not contain this LoRA-seed variance, so "
       "a one-seed run's ordering should not be read as a finding." if len(lora_seeds) > 1 else
       "One LoRA seed: the ordering has not been checked against a reseed (`replicate_seeds`).") + "\n"
    f"- **Reversal.** The best intervention on the held-out financial questions is {best} "
    f"({head.loc[best, 'restoration_in_domain']:.0%} restored at capability JS {head.loc[best, 'capability_js']:.4f} nats); "
    f"centroid steering {head.loc['centroid', 'restoration_in_domain']:.0%} vs diff-in-means "
    f"{head.loc['diff_in_means', 'restoration_in_domain']:.0%} at matched norm.\n"
    f"- **Scale caveats.** {len(coupling_sources)} coupling sources, {coupling_steps}/{em_steps} LoRA steps on the top "
    f"{llm.n_layers - cut} blocks, {leak['C1']['n']} bystander generations per condition; every effect above is measured "
    f"on a 135M model with a late, narrow adapter, and a null here is weak evidence against the seeds."))

# %% [markdown]
# ## Metrics

# %%
def _num(value):
    value = float(value)
    return value if np.isfinite(value) else None


metrics = {
    "model": {"name": llm.name, "sha256": llm.sha256},
    "design": {"pool": list(pool), "coupling_sources": list(coupling_sources),
               "coupling_negatives": list(coupling_negatives), "em_first_source": em_first_source,
               "lora": coupling_spec.as_dict(), "em_steps": em_steps, "distance_layer": distance_layer,
               "steer_layer": steer_layer, "n_eval_prompts": n_eval_prompts, "gen_prompts": gen_prompts,
               "gen_max_new_tokens": decode_gen.max_new_tokens, "replicate_seeds": list(replicate_seeds)},
    "coupling": {
        "n_personas": len(coupling_sources),
        "n_pairs": corr[("logprob", "cosine")]["n"],
        "r_cosine": _num(corr[("logprob", "cosine")]["r"]),
        "r_cosine_ci": [_num(v) for v in corr[("logprob", "cosine")]["ci"]],
        "r_js": _num(corr[("logprob", "js")]["r"]), "r_js_ci": [_num(v) for v in corr[("logprob", "js")]["ci"]],
        "spearman_cosine": _num(corr[("logprob", "cosine")]["spearman"]),
        "spearman_cosine_ci": [_num(v) for v in corr[("logprob", "cosine")]["spearman_ci"]],
        "spearman_js": _num(corr[("logprob", "js")]["spearman"]),
        "spearman_js_ci": [_num(v) for v in corr[("logprob", "js")]["spearman_ci"]],
        "ci_method": "cluster bootstrap over coupling sources",
        "within_source": {key: {"r": _num(corr[("logprob", key)]["within_r"]),
                                "r_ci": [_num(v) for v in corr[("logprob", key)]["within_ci"]],
                                "p": _num(corr[("logprob", key)]["within_p"])} for key in ("cosine", "js")},
        "generation": {key: {"r": _num(corr[("gen_rate", key)]["r"]),
                             "r_ci": [_num(v) for v in corr[("gen_rate", key)]["ci"]],
                             "within_r": _num(corr[("gen_rate", key)]["within_r"]),
                             "within_r_ci": [_num(v) for v in corr[("gen_rate", key)]["within_ci"]],
                             "spearman": _num(corr[("gen_rate", key)]["spearman"]),
                             "spearman_ci": [_num(v) for v in corr[("gen_rate", key)]["spearman_ci"]]}
                       for key in ("cosine", "js")},
        "seed003_source_level": {key: {"n": c["n"], "r": _num(c["r"]), "r_ci": [_num(v) for v in c["ci"]],
                                       "p": _num(c["p"]), "spearman": _num(c["spearman"])}
                                 for key, c in seed003.items()},
        "source_rate_mean": float(source_table["source rate (teacher-forced)"].mean()),
        "bystander_rate_mean": float(source_table["bystander rate (teacher-forced)"].mean()),
        "source_rate_generation_mean": float(source_table["source rate (generation)"].mean()),
        "bystander_rate_generation_mean": float(source_table["bystander rate (generation)"].mean()),
        "base_marker_logprob": base_lp,
    },
    "em": {
        "score_before": float(mean_margin.loc["base", "broad"]), "score_after": float(mean_margin.loc["EM", "broad"]),
        "in_domain_before": float(mean_margin.loc["base", "in_domain"]),
        "in_domain_after": float(mean_margin.loc["EM", "in_domain"]),
        "benign_broad": float(mean_margin.loc["benign", "broad"]),
        "broad_shift_ci": [shift["broad"][1], shift["broad"][2]],
        "in_domain_shift_ci": [shift["in_domain"][1], shift["in_domain"][2]],
        "breadth": _num(em_breadth),
        "pca_silhouette": pca["EM"]["silhouette_kmeans"], "pca_silhouette_base": pca["base"]["silhouette_kmeans"],
        "template_rate_broad": template_rate["EM"], "template_rate_broad_base": template_rate["base"],
        "pca_ari": pca["EM"]["ari"], "pca_explained_variance": [float(v) for v in pca["EM"]["explained_variance"]],
    },
    "leakage": {c: {"rate": leak[c]["rate"], "wilson_low": leak[c]["wilson_low"], "wilson_high": leak[c]["wilson_high"],
                    "n": leak[c]["n"], "cluster_ci": list(boot[c]), "source_rate": float(source_gen[c]),
                    "by_seed": {str(k): float(v) for k, v in by_seed[c].items()},
                    "ended_within_budget": float(ended_rate[c]),
                    "teacher_forced": {k: tf_leak[c][k] for k in ("rate", "wilson_low", "wilson_high", "n")}}
                for c in conditions},
    "reversal": {m: {"restoration": _num(head.loc[m, "restoration_in_domain"]),
                     "restoration_broad": _num(head.loc[m, "restoration_broad"]),
                     "capability_damage": float(head.loc[m, "capability_js"]),
                     "capability_accuracy_drop": float(head.loc[m, "capability_accuracy_drop"])} for m in head.index},
    "train_time_s": round(train_time_s, 1),
    "lora_step_s": round(mean_step_s, 3),
}
metrics["leakage"]["lora_seeds"] = lora_seeds
metrics["leakage"]["C2_minus_C1_cluster_ci"] = list(boot["C2-C1"])
metrics["leakage"]["C3_minus_C1_cluster_ci"] = list(boot["C3-C1"])
_ = write_metrics(metrics, out)

# %%
# NBVAL_CHECK_OUTPUT
print("model sha256:", llm.sha256[:16])
print("coupling sources:", metrics["coupling"]["n_personas"], "pairs:", metrics["coupling"]["n_pairs"])
print("EM in-domain shift > 0:", metrics["em"]["in_domain_after"] > metrics["em"]["in_domain_before"])
print("leakage n per condition:", [metrics["leakage"][c]["n"] for c in conditions])
print("reversal methods:", sorted(metrics["reversal"]))
