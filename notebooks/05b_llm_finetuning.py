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
response_tokens: int = 12
n_eval_prompts: int = 3
lora_rank: int = 8
lora_alpha: float = 16.0
lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
lora_first_layer: int = 24
batch_size: int = 6
coupling_steps: int = 4
coupling_lr: float = 0.01
em_steps: int = 4
em_lr: float = 0.002
n_finance_train: int = 6
n_finance_eval: int = 3
n_broad: int = 4
em_first_source: str = "poet"
gen_prompts: int = 1
em_sample_tokens: int = 12
pca_components: int = 5
steer_layer: int = 27
steer_scales: list[float] = [1.0]
headline_scale: float = 1.0
n_capability: int = 3
n_boot: int = 1000
seed: int = 0
torch_threads: int = 1
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pingouin as pg
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
from lib.stats import bootstrap_mean_ci, spearman_with_ci

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
llm = load_llm(threads=torch_threads)
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


def recipe(steps: int, lr: float) -> lora.LoraSpec:
    return lora.LoraSpec(rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets), first_layer=lora_first_layer,
                         lr=lr, steps=steps, batch_size=batch_size, seed=seed)


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
# **Leakage measure.** For every persona of the pool and `n_eval_prompts` of 05a's everyday
# prompts, the base model's own response is teacher-forced and we read the log-probability of the
# marker tokens right after it, and whether greedy decoding would emit the whole marker there
# (the "teacher-forced rate"). Bystanders of a source = the pool minus the source and the coupling
# negatives (which are trained *not* to emit), with `no_persona` included.

# %%
decode_short = Decoding(max_new_tokens=response_tokens, repetition_penalty=repetition_penalty)
train_questions = everyday_questions(n_train_questions, seed=seed)
train_ids, _ = cached_generate(llm, [chat_prompt_ids(llm, "", q) for q in train_questions], decode_short)
train_texts = [llm.tokenizer.decode([t for t in r if t != llm.eos_id], skip_special_tokens=True).strip()
               for r in train_ids]
eval_prompts = list(PROMPTS[:n_eval_prompts])
eval_ids, _ = cached_generate(llm, [chat_prompt_ids(llm, "", q) for q in eval_prompts], decode_short)
marker_eval = llm_em.marker_sequences(llm, [PERSONAS[n] for n in names], eval_prompts, eval_ids, marker)
marker_resid = lora.bottom_resid(llm, marker_eval, cut)
base_marker = llm_em.marker_scores(llm, marker_resid, cut, marker_eval)


def coupling_data(source: str) -> list[dict]:
    return marker_examples(source, coupling_negatives, train_questions, train_texts, marker)


def score_frame(tuned_llm, label: str) -> pd.DataFrame:
    s = llm_em.marker_scores(tuned_llm, marker_resid, cut, marker_eval)
    return pd.DataFrame({"model": label, "persona": np.repeat(names, len(eval_prompts)),
                         "prompt": np.tile(np.arange(len(eval_prompts)), len(names)),
                         "logprob": s["logprob"], "greedy": s["greedy"].astype(int)})


coupling_sets = {s: coupling_data(s) for s in dict.fromkeys(coupling_sources + [em_first_source])}
coupling_seqs = {s: lora.chat_sequences(llm, r) for s, r in coupling_sets.items()}
union = list({q.ids: q for seqs in coupling_seqs.values() for q in seqs}.values())  # negatives are shared
union_resid = lora.bottom_resid(llm, union, cut)
coupling_rows = []
for source in coupling_sources:
    save_jsonl(coupling_sets[source], data_dir / f"marker_{source}.jsonl")
    tuned = lora.finetune(llm, coupling_seqs[source], coupling_spec, desc=f"couple {source}",
                          resid=lora.rows_of(union, union_resid, coupling_seqs[source]))
    runs[f"couple:{source}"] = tuned
    coupling_rows.append(score_frame(tuned.llm, source))
    lora.release(tuned)
scores = pd.concat(coupling_rows, ignore_index=True)
per_pair = scores.groupby(["model", "persona"], sort=False).agg(logprob=("logprob", "mean"),
                                                                   rate=("greedy", "mean")).reset_index()
per_pair = per_pair.rename(columns={"model": "source"})
per_pair["cos_distance"] = [dist["cos"][index[s], index[p]] for s, p in zip(per_pair["source"], per_pair["persona"])]
per_pair["js"] = [dist["js"][index[s], index[p]] for s, p in zip(per_pair["source"], per_pair["persona"])]
per_pair["role"] = np.where(per_pair["source"] == per_pair["persona"], "source",
                            np.where(per_pair["persona"].isin(coupling_negatives), "negative", "bystander"))
base_lp = float(np.mean(base_marker["logprob"]))
step_s = float(np.mean([t.meta["step_s"] for t in runs.values()]))
display(Markdown(f"{len(coupling_sources)} coupling LoRAs, {coupling_steps} steps of {batch_size} sequences each "
                 f"({runs[f'couple:{coupling_sources[0]}'].n_trainable:,} trainable parameters; one step "
                 f"{step_s:.2f} s on the top {llm.n_layers - cut} blocks, as recorded when trained). Base-model "
                 f"marker log-prob before any coupling: {base_lp:.1f} nats."))
display(per_pair[per_pair["role"] == "source"][["source", "logprob", "rate"]].round(3).set_index("source").T)

# %% [markdown]
# **Does leakage follow the geometry?** One point per (source, bystander) pair: mean marker
# log-prob under the bystander vs its distance to the source at layer `distance_layer` (1 − cos)
# and in output space (JS, nats). Pairs sharing a source are not independent; the CIs below
# (pingouin's Pearson CI, bootstrap for Spearman) treat them as if they were, so read them as
# optimistic.

# %%
bys = per_pair[per_pair["role"] == "bystander"].reset_index(drop=True)


def correlate(x: str) -> dict:
    if len(bys) < 4 or bys[x].nunique() < 2 or bys["logprob"].nunique() < 2:
        return {"n": len(bys), "r": float("nan"), "ci": [float("nan")] * 2, "p": float("nan"),
                "spearman": float("nan"), "spearman_ci": [float("nan")] * 2}
    pear = pg.corr(bys[x], bys["logprob"], method="pearson").iloc[0]
    spear = spearman_with_ci(bys[x], bys["logprob"], seed=seed)
    ci = list(pear["CI95"]) if "CI95" in pear.index else list(pear["CI95%"])
    return {"n": len(bys), "r": float(pear["r"]), "ci": [float(c) for c in ci], "p": float(pear["p_val"]),
            "spearman": spear["spearman_rho"], "spearman_ci": [spear["ci_low"], spear["ci_high"]]}


corr = {"cosine": correlate("cos_distance"), "js": correlate("js")}
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
for ax, x, label in ((axes[0], "cos_distance", f"1 − cos of centroids, layer {distance_layer}"),
                     (axes[1], "js", "JS divergence of next-token distributions (nats)")):
    sns.scatterplot(data=bys, x=x, y="logprob", hue="source", ax=ax, s=45)
    ax.set_xlabel(label)
    ax.set_ylabel("marker log-prob under bystander (nats)")
    key = "cosine" if x == "cos_distance" else "js"
    ax.set_title(f"Pearson r = {corr[key]['r']:.2f}, n = {corr[key]['n']} pairs")
fig.tight_layout()
save_figure(fig, out, "coupling_leakage_vs_distance")
plt.show()
assistant_cos = {s: float(dist["cos"][index[s], index[ANCHOR]]) for s in coupling_sources}
source_table = pd.DataFrame({
    "1 − cos to no_persona": assistant_cos,
    "JS to no_persona": {s: float(dist["js"][index[s], index[ANCHOR]]) for s in coupling_sources},
    "source marker log-prob": per_pair[per_pair["role"] == "source"].set_index("source")["logprob"],
    "source rate (teacher-forced)": per_pair[per_pair["role"] == "source"].set_index("source")["rate"],
    "mean bystander log-prob": bys.groupby("source")["logprob"].mean(),
    "bystander rate": bys.groupby("source")["rate"].mean(),
}).loc[coupling_sources]
display(source_table.round(4))
display(Markdown(
    f"Across {corr['cosine']['n']} (source, bystander) pairs, marker leakage vs cosine distance: Pearson r = "
    f"{corr['cosine']['r']:.2f} [{corr['cosine']['ci'][0]:.2f}, {corr['cosine']['ci'][1]:.2f}] (Spearman "
    f"{corr['cosine']['spearman']:.2f}); vs JS: r = {corr['js']['r']:.2f} [{corr['js']['ci'][0]:.2f}, "
    f"{corr['js']['ci'][1]:.2f}] (Spearman {corr['js']['spearman']:.2f}). Seed 003's numbers (r = −0.66 cosine "
    f"*similarity*, 0.54 JS) correlate each source's own rate with its distance to the assistant — the table above "
    f"gives that per source, but with {len(coupling_sources)} sources it is not tested. A negative r here means "
    f"closer bystanders leak more."))

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
sns.pointplot(data=margins, x="set", y="margin", hue="model", dodge=0.35, errorbar=("ci", 95), ax=ax,
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
# generation** under each bystander for `gen_prompts` prompts with `max_new_tokens` = twice the
# longest trained completion (seed 004's lesson: a truncated evaluation hides late markers), and
# by the teacher-forced rate over all `n_eval_prompts` prompts. Wilson 95% CIs per condition; a
# cluster bootstrap resamples persona clusters (05a's fine clusters; singletons are their own).

# %%
src_records, src_seqs = coupling_sets[em_first_source], coupling_seqs[em_first_source]
src_resid = lora.rows_of(union, union_resid, src_seqs)
trained_len = max(len(q.ids) - len(chat_prompt_ids(llm, r["system"], r["user"])) for q, r in zip(src_seqs, src_records))
decode_gen = Decoding(max_new_tokens=2 * trained_len, repetition_penalty=repetition_penalty)
bystanders = [n for n in names if n != em_first_source and n not in coupling_negatives]
gen_eval = eval_prompts[:gen_prompts]
conditions = {"C1": llm, "C2": em.llm, "C3": benign.llm}
gen_rows, tf_rows, source_gen = [], [], {}
for cond, start in conditions.items():
    tuned = lora.finetune(start, src_seqs, coupling_spec, base=llm, desc=f"{cond} couple {em_first_source}",
                          resid=src_resid)
    runs[f"{cond}:{em_first_source}"] = tuned
    hits, texts, ended = llm_em.generated_marker_hits(tuned.llm, [PERSONAS[b] for b in bystanders], gen_eval,
                                                      decode_gen, marker)
    src_hits, _, _ = llm_em.generated_marker_hits(tuned.llm, [PERSONAS[em_first_source]], gen_eval, decode_gen,
                                                  marker)
    source_gen[cond] = float(src_hits.mean())
    gen_rows.append(pd.DataFrame({"condition": cond, "persona": np.repeat(bystanders, len(gen_eval)),
                                  "prompt": np.tile(np.arange(len(gen_eval)), len(bystanders)),
                                  "hit": hits.astype(int), "ended": ended.astype(int), "text": texts}))
    tf_rows.append(score_frame(tuned.llm, cond))
    if cond != "C1":
        lora.release(tuned)
gen = pd.concat(gen_rows, ignore_index=True)
gen["cluster"] = [fine_cluster(p) if p != ANCHOR else ANCHOR for p in gen["persona"]]
tf = pd.concat(tf_rows, ignore_index=True)
tf_by = tf[tf["persona"].isin(bystanders)].groupby("model")["greedy"].mean()
tf_leak = {c: llm_em.wilson(int(tf[(tf["model"] == c) & tf["persona"].isin(bystanders)]["greedy"].sum()),
                            int((tf[(tf["model"] == c)]["persona"].isin(bystanders)).sum())) for c in conditions}
ended_rate = gen.groupby("condition")["ended"].mean()
rate_ended = gen[gen["ended"] == 1].groupby("condition")["hit"].mean().reindex(list(conditions))
tf_src = tf[tf["persona"] == em_first_source].groupby("model")["greedy"].mean()
leak = {c: llm_em.wilson(int(gen.loc[gen["condition"] == c, "hit"].sum()), int((gen["condition"] == c).sum()))
        for c in conditions}
boot = llm_em.cluster_bootstrap(gen, list(conditions), n_boot=n_boot, seed=seed)
save_jsonl(gen.drop(columns="text").to_dict("records"), data_dir / "em_first_generations.jsonl")
leak_table = pd.DataFrame({c: {"bystander rate (generation)": leak[c]["rate"], "Wilson low": leak[c]["wilson_low"],
                               "Wilson high": leak[c]["wilson_high"], "cluster-bootstrap low": boot[c][0],
                               "cluster-bootstrap high": boot[c][1], "n": leak[c]["n"],
                               "source rate (generation)": source_gen[c],
                               "generations ended within budget": float(ended_rate[c]),
                               "bystander rate among ended": float(rate_ended[c]),
                               "bystander rate (teacher-forced)": float(tf_by[c]),
                               "teacher-forced Wilson low": tf_leak[c]["wilson_low"],
                               "teacher-forced Wilson high": tf_leak[c]["wilson_high"],
                               "source rate (teacher-forced)": float(tf_src[c])} for c in conditions})
seed_004 = {"C1": 0.274, "C2": 0.576, "C3": 0.959}
leak_table.loc["seed 004 bystander rate"] = [seed_004[c] for c in conditions]
display(leak_table.round(3))
per_persona = gen.groupby(["condition", "persona"])["hit"].mean().reset_index()
fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(bystanders) + 3), 4.2))
sns.barplot(data=per_persona, x="persona", y="hit", hue="condition", ax=ax, errorbar=None)
ax.set_xlabel("bystander persona")
ax.set_ylabel(f"marker rate in free generation (fraction of {len(gen_eval)} prompts)")
ax.set_title(f"Marker leakage after coupling to {em_first_source}: C1 base, C2 EM-first, C3 benign-first")
ax.tick_params(axis="x", rotation=60)
fig.tight_layout()
save_figure(fig, out, "em_first_leakage")
plt.show()
display(Markdown(
    f"Bystander leakage (free generation, {leak['C1']['n']} completions per condition): C1 {leak['C1']['rate']:.1%} "
    f"[{leak['C1']['wilson_low']:.1%}, {leak['C1']['wilson_high']:.1%}], C2 {leak['C2']['rate']:.1%} "
    f"[{leak['C2']['wilson_low']:.1%}, {leak['C2']['wilson_high']:.1%}], C3 {leak['C3']['rate']:.1%} "
    f"[{leak['C3']['wilson_low']:.1%}, {leak['C3']['wilson_high']:.1%}]. Cluster-bootstrap CI of C2 − C1: "
    f"[{boot['C2-C1'][0]:+.1%}, {boot['C2-C1'][1]:+.1%}]; of C3 − C1: [{boot['C3-C1'][0]:+.1%}, {boot['C3-C1'][1]:+.1%}]. "
    f"Source rate (generation): C1 {source_gen['C1']:.0%}, C2 {source_gen['C2']:.0%}, C3 {source_gen['C3']:.0%}. "
    f"{ended_rate['C1']:.0%} (C1), {ended_rate['C2']:.0%} (C2) and {ended_rate['C3']:.0%} (C3) of the bystander "
    f"generations close their turn within {decode_gen.max_new_tokens} tokens (bystander rate among those: "
    f"{rate_ended['C1']:.0%}, {rate_ended['C2']:.0%}, {rate_ended['C3']:.0%}), so budget truncation is not what keeps "
    f"a condition's rate low where its generations all end. With the response held fixed (the base model's own, "
    f"teacher-forced), the greedy "
    f"marker rate under bystanders is C1 {tf_leak['C1']['rate']:.1%} [{tf_leak['C1']['wilson_low']:.1%}, "
    f"{tf_leak['C1']['wilson_high']:.1%}], C2 {tf_leak['C2']['rate']:.1%} [{tf_leak['C2']['wilson_low']:.1%}, "
    f"{tf_leak['C2']['wilson_high']:.1%}], C3 {tf_leak['C3']['rate']:.1%} [{tf_leak['C3']['wilson_low']:.1%}, "
    f"{tf_leak['C3']['wilson_high']:.1%}] (n = {tf_leak['C1']['n']} each)."))

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
cos_sign = "closer bystanders leak more" if corr["cosine"]["r"] < 0 else "closer bystanders do not leak more"
ci_excl = (corr["cosine"]["ci"][0] > 0 or corr["cosine"]["ci"][1] < 0)
em_off_ci_excl = shift["broad"][1] > 0 or shift["broad"][2] < 0
c2_up = boot["C2-C1"][0] > 0
c3_up = boot["C3-C1"][0] > 0
best = head["restoration_in_domain"].idxmax()
display(Markdown(
    f"- **Marker coupling (seed 003).** The coupling LoRAs reach a teacher-forced source rate of "
    f"{source_table['source rate (teacher-forced)'].mean():.0%} on average (bystanders "
    f"{source_table['bystander rate'].mean():.0%}). Leakage vs cosine distance: r = {corr['cosine']['r']:.2f} "
    f"[{corr['cosine']['ci'][0]:.2f}, {corr['cosine']['ci'][1]:.2f}] over {corr['cosine']['n']} pairs ({cos_sign}; "
    f"the CI {'excludes' if ci_excl else 'includes'} 0); vs JS r = {corr['js']['r']:.2f}. Seed 003 (Qwen2.5-7B, N = 10 "
    f"sources, a different correlation: source rate vs distance to the assistant) found −0.66 and 0.54.\n"
    f"- **EM organism (seed 002).** The narrow LoRA moves the in-domain score by {shift['in_domain'][0]:+.3f} "
    f"nats/token and the broad off-domain score by {shift['broad'][0]:+.3f} [{shift['broad'][1]:+.3f}, "
    f"{shift['broad'][2]:+.3f}] (breadth {em_breadth:.2f}; the off-domain CI {'excludes' if em_off_ci_excl else 'includes'} 0)"
    f"{'' if em_off_ci_excl and shift['broad'][0] > 0 else ': by the reference-answer score we see no broad misalignment'}. "
    f"What does spread is the narrow behaviour itself: {template_rate['EM']:.0%} of the EM model's answers to "
    f"non-financial questions are the reckless-finance template (base {template_rate['base']:.0%}) — collapse onto the "
    f"training distribution rather than a misaligned persona. "
    f"PCA / K-means of the EM model's answers: silhouette {pca['EM']['silhouette_kmeans']:.2f}, ARI with question "
    f"categories {pca['EM']['ari']:.2f}.\n"
    f"- **EM first, then coupling (seed 004).** Bystander leakage C1 {leak['C1']['rate']:.1%}, C2 {leak['C2']['rate']:.1%}, "
    f"C3 {leak['C3']['rate']:.1%} in free generation (seed 004: 27.4%, 57.6%, 95.9%). EM-first "
    f"{'raises' if c2_up else 'does not clearly raise'} it over base coupling (cluster-bootstrap CI of C2 − C1 "
    f"[{boot['C2-C1'][0]:+.1%}, {boot['C2-C1'][1]:+.1%}]); benign-first {'raises' if c3_up else 'does not clearly raise'} "
    f"it ([{boot['C3-C1'][0]:+.1%}, {boot['C3-C1'][1]:+.1%}]). "
    + (f"But the C1 coupling never fires in free generation even under its source persona (source rate "
       f"{source_gen['C1']:.0%} vs {tf_src['C1']:.0%} teacher-forced), so the free-generation C1 baseline measures the "
       f"coupling's failure to transfer to the model's own answers, not its specificity. " if source_gen["C1"] == 0 else "")
    + f"At a fixed response (teacher-forced) the order is C1 {tf_leak['C1']['rate']:.1%}, C2 {tf_leak['C2']['rate']:.1%}, "
    f"C3 {tf_leak['C3']['rate']:.1%}: "
    + ("any prior LoRA raises leakage and the benign one more than EM — seed 004's ordering (27.4% < 57.6% < 95.9%), "
       "which makes the EM-first effect not EM-specific (seed 004's H2). Free generation ranks C2 above C3 instead."
       if tf_leak["C3"]["rate"] > tf_leak["C2"]["rate"] > tf_leak["C1"]["rate"] else
       "compare seed 004's C1 < C2 < C3 (27.4% < 57.6% < 95.9%).") + "\n"
    f"- **Reversal.** The best intervention on the held-out financial questions is {best} "
    f"({head.loc[best, 'restoration_in_domain']:.0%} restored at capability JS {head.loc[best, 'capability_js']:.4f} nats); "
    f"centroid steering {head.loc['centroid', 'restoration_in_domain']:.0%} vs diff-in-means "
    f"{head.loc['diff_in_means', 'restoration_in_domain']:.0%} at matched norm.\n"
    f"- **Scale caveats.** {len(coupling_sources)} coupling sources, {coupling_steps}/{em_steps} LoRA steps on the top "
    f"{llm.n_layers - cut} blocks, {leak['C1']['n']} bystander generations per condition; every effect above is measured on a 135M "
    f"model with a late, narrow adapter, and a null here is weak evidence against the seeds."))

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
               "gen_max_new_tokens": decode_gen.max_new_tokens},
    "coupling": {
        "n_personas": len(coupling_sources),
        "n_pairs": corr["cosine"]["n"],
        "r_cosine": _num(corr["cosine"]["r"]), "r_cosine_ci": [_num(v) for v in corr["cosine"]["ci"]],
        "r_js": _num(corr["js"]["r"]), "r_js_ci": [_num(v) for v in corr["js"]["ci"]],
        "spearman_cosine": _num(corr["cosine"]["spearman"]),
        "spearman_cosine_ci": [_num(v) for v in corr["cosine"]["spearman_ci"]],
        "spearman_js": _num(corr["js"]["spearman"]), "spearman_js_ci": [_num(v) for v in corr["js"]["spearman_ci"]],
        "source_rate_mean": float(source_table["source rate (teacher-forced)"].mean()),
        "bystander_rate_mean": float(source_table["bystander rate"].mean()),
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
                    "n": leak[c]["n"], "cluster_ci": list(boot[c]), "source_rate": source_gen[c],
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
metrics["leakage"]["C2_minus_C1_cluster_ci"] = list(boot["C2-C1"])
metrics["leakage"]["C3_minus_C1_cluster_ci"] = list(boot["C3-C1"])
write_metrics(metrics, out)

# %%
# NBVAL_CHECK_OUTPUT
print("model sha256:", llm.sha256[:16])
print("coupling sources:", metrics["coupling"]["n_personas"], "pairs:", metrics["coupling"]["n_pairs"])
print("EM in-domain shift > 0:", metrics["em"]["in_domain_after"] > metrics["em"]["in_domain_before"])
print("leakage n per condition:", [metrics["leakage"][c]["n"] for c in conditions])
print("reversal methods:", sorted(metrics["reversal"]))
