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
# # Study 02 — Steering specificity: belief probes and belief-state steering in toy transformers
#
# **Question.** Small transformers trained on factored processes linearly represent each factor's
# belief. If we steer one factor by adding the difference of two belief-class centroids, does the
# other factor stay put? The proposal's headline (seed 000, appendix A) says yes, with spillover
# ratios of about 0.002 on Z1R × Z1R and below 0.01 on Mess3 × Mess3, while a *semi-factored*
# process shows spillover along its entangled factor — the toy signature of emergent misalignment.
#
# We reproduce Tables 2–6 side by side with the seed's numbers, over several training seeds, and
# then go further: layer dependence, an untrained-network control for the probes, a direct
# measurement of *why* centroid steering leaks, and a conditional variant of belief-state steering
# that removes the leak.
#
# Choices the seed leaves open are made in `persona_wm.toy.train` (BOS token, pre-LN, ReLU, Adam with warm-up
# and cosine decay), `persona_wm.toy.steer` (belief classes, the target distribution, the conditional
# method) and `persona_wm.processes.catalog.semi_factored_z1r` (the semi-factored process); each is stated where
# it matters below.

# %% tags=["parameters"]
processes: list[str] = ["z1r_x_z1r", "mess3_x_mess3", "semi_factored"]  # non-empty
seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
train_steps: dict[str, int] = {"z1r_x_z1r": 120, "mess3_x_mess3": 120, "semi_factored": 120}  # keys = processes; each in [1, 100_000]
batch_size: dict[str, int] = {"z1r_x_z1r": 128, "mess3_x_mess3": 128, "semi_factored": 128}  # keys = processes; each in [1, 8192]
learning_rate: dict[str, float] = {"z1r_x_z1r": 0.001, "mess3_x_mess3": 0.001, "semi_factored": 0.001}  # keys = processes; each in (0, 1]
snapshot_fractions: list[float] = [0.0, 0.25, 0.5, 1.0]  # non-empty; each in [0, 1]
eval_sequences: int = 1024  # >= 1; <= 100_000
n_probe_sequences: int = 300  # >= 1; <= 100_000
n_steering_sequences: int = 500  # >= 1; <= 100_000
scales: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]  # non-empty; contains 1.0  # the tables report scale 1
partition_scales: list[float] = [0.0, 0.5, 1.0, 2.0, 3.0, 5.0]  # non-empty
layer_scale: float = 1.0  # > 0
analysis_seed: int = 0  # >= 0
torch_threads: int = 1  # threads
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display

from persona_wm.analysis import seed_tables
from persona_wm.core.ghmm import marginals
from persona_wm.plots.toy import plot_simplex, set_style
from persona_wm.toy.probe import angle_spread as angle_spread_over_seeds
from persona_wm.toy.probe import principal_angles, probe_frame, probe_r2_over_training, residual_hooks
from persona_wm.processes import get_process
from persona_wm.io.params import resolve_output_dir
from persona_wm.io.outputs import save_figure, undefined_as_none, write_metrics
from persona_wm.analysis.stats import across_seeds
from persona_wm.analysis.stats import mean_sd_text, trend_correlation
from persona_wm.toy.steer import centroid_interaction, partition_frame, prepare_steering, steering_frame, training_trend
from persona_wm.core.threads import limit_threads
from persona_wm.toy.train import TrainConfig, history_frame, load_or_train

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "02_steering_specificity")
started = time.perf_counter()


def config(process: str, seed: int) -> TrainConfig:
    steps = train_steps[process]
    return TrainConfig(process=process, steps=steps, batch_size=batch_size[process], lr=learning_rate[process],
                       seed=seed, eval_every=max(steps // 10, 1), eval_sequences=eval_sequences,
                       snapshot_steps=tuple(int(round(f * steps)) for f in snapshot_fractions))


# %% [markdown]
# ## 1. Setup: three processes and their transformers
#
# * **Z1R × Z1R** and **Mess3 × Mess3**: fully factored Kronecker products (joint token
#   $v=v_1|V_2|+v_2$, product initial vector).
# * **Semi-factored**: two copies of the partition-preserving Z1R of eq. 8 (sectors span{S0} ⊕
#   span{S1, SR}); in the sectors where factor A sits in span{S1, SR}, factor B's tokens are flipped
#   — factor A (the "persona") changes what factor B's outputs mean, factor B never affects A. Every
#   $T(x)$ is block diagonal over the four sectors, and the sector prior has correlation 0.5.
#
# Each model is a 2-layer, $d_{model}=64$, 2-head ($d_{head}=32$), $d_{mlp}=256$ HookedTransformer
# that sees BOS + 10 tokens and predicts every next token; training draws fresh samples every
# step. Models are cached by a hash of their full config, so re-running this report does not retrain.

# %%
models = {(p, s): load_or_train(config(p, s), threads=torch_threads) for p in processes for s in seeds}
history = history_frame(models)
display(pd.DataFrame([{"process": p, "states": get_process(p).n_states, "tokens": get_process(p).n_tokens,
                       "steps": train_steps[p], "batch": batch_size[p], "lr": learning_rate[p],
                       "train time (s, seed 0 or cache)": round(models[(p, seeds[0])].train_seconds, 1)}
                      for p in processes]))

# %%
fig, ax = plt.subplots(figsize=(7, 4))
curves = history[history.step > 0].assign(excess=lambda d: d.ce_ratio - 1)
sns.lineplot(data=curves, x="step", y="excess", hue="process", units="seed", estimator=None, ax=ax, lw=1)
ax.set_yscale("log")
ax.axhline(0.005, color="0.4", ls=":", lw=1)
ax.text(curves.step.max(), 0.005, " 1.005× optimal", va="center", fontsize=7)
ax.set_xlabel("training step (batches)")
ax.set_ylabel("model CE / Bayes-optimal CE − 1 (log scale)")
ax.set_title("Training curves against the exact Bayes-optimal cross-entropy (one line per seed)")
fig.tight_layout()
save_figure(fig, out, "training_curves")
plt.show()

final = history.sort_values("step").groupby(["process", "seed"]).tail(1)
ce = across_seeds(final, ["process"], ["ce_ratio", "gap_captured", "model_ce", "optimal_ce"])
display(ce.round(5))

# %% [markdown]
# Cross-entropy is measured against the exact next-token distribution of each prefix of a fixed
# evaluation set ($-\sum_x p_{opt}(x)\log p_{model}(x)$, no sampling noise from the next token),
# over all 11 predicted positions. For Mess3 × Mess3 the ratio says little — predicting
# uniformly is already within 1% of optimal — so the *gap captured*
# (uniform − model)/(uniform − optimal) is the meaningful number there.
#
# ## 2. Belief probes
#
# Linear regression (with bias) from residual activations to the exact joint belief and to each
# factor's marginal belief, pooled over positions 1–10, fitted on 80% of the sequences and scored
# (variance-weighted $R^2$) on the held-out 20%. We probe every residual hook and their
# concatenation (the headline), and the same probes on the same architecture at initialisation.

# %%
probes_df, probes = probe_frame(models, n_probe_sequences, analysis_seed)
r2 = across_seeds(probes_df, ["process", "model", "layer", "target"], ["r2"])
r2_wide = r2.pivot_table(index=["process", "layer"], columns=["model", "target"], values="r2_mean")
display(r2_wide.round(3))

# %%
demo = [p for p in ("mess3_x_mess3", "z1r_x_z1r") if p in processes][:1] or processes[:1]
demo_process = get_process(demo[0])
demo_tokens = demo_process.sample(600, 10, np.random.default_rng([analysis_seed, 5]))
from persona_wm.toy.probe import collect_activations  # noqa: E402  (one call, here for the figure)

acts = collect_activations(models[(demo[0], seeds[0])].model, demo_tokens, demo_process.n_tokens,
                           residual_hooks(models[(demo[0], seeds[0])].model))
features = np.concatenate([a[:, 1:] for a in acts.values()], axis=-1).reshape(-1, 64 * len(acts))
true = marginals(demo_process.beliefs(demo_tokens)[:, 1:].reshape(-1, demo_process.n_states),
                 demo_process.factor_states)[0]
predicted = probes[(demo[0], seeds[0])][("concat", "factor0")].predict(features)
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
plot_simplex(true, axes[0], title=f"{demo[0]}: exact factor-0 belief", size=3)
plot_simplex(np.clip(predicted, 0, 1) / np.clip(predicted, 0, 1).sum(-1, keepdims=True), axes[1],
             title="probe prediction from the residual stream (held-in contexts)", size=3)
fig.tight_layout()
save_figure(fig, out, "probe_simplex")
plt.show()

angles = pd.DataFrame([{"process": p, "seed": s, "angles (deg)": np.round(principal_angles(
    probes[(p, s)][("concat", "factor0")].weights, probes[(p, s)][("concat", "factor1")].weights), 1).tolist()}
    for p, s in models])
angle_spread = angle_spread_over_seeds({p: angles[angles.process == p]["angles (deg)"].tolist() for p in processes})
display(angles)

# %% [markdown]
# The principal angles between the two factors' probe read-out subspaces say how orthogonal the
# factors' representations are (90° = orthogonal). They are shown per training seed: a cold rerun of
# this study on another machine moved one of them from 64° to 34°, so a single model's angles are not
# a finding. The conclusion quotes them only with their spread over seeds.
#
# **How the representation sharpens with training** (concatenated-residual probe, saved snapshots):

# %%
r2_steps = {p: pd.DataFrame([row | {"seed": s} for s in seeds
                             for row in probe_r2_over_training(models[(p, s)], n_probe_sequences, analysis_seed)])
            for p in processes}
r2_steps_frame = pd.concat([d.assign(process=p) for p, d in r2_steps.items()]).melt(
    id_vars=["process", "seed", "steps"], value_vars=["factor0", "factor1"], var_name="factor", value_name="R2")
grid = sns.relplot(data=r2_steps_frame, x="steps", y="R2", hue="factor", col="process", kind="line", marker="o",
                   errorbar=("ci", 95), seed=analysis_seed, height=3, aspect=1.1, facet_kws={"sharex": False})
grid.set_axis_labels("training step (batches)", "held-out probe R² (concatenated residuals)")
save_figure(grid.figure, out, "probe_r2_vs_steps")
plt.show()

# %% [markdown]
# ## 3. Belief-state steering (Tables 2–5 and the semi-factored process)
#
# As appendix A describes it: 500 contexts of 10 tokens; final-layer residual at the final position;
# belief classes are the distinct per-factor marginal beliefs (rounded to $10^{-6}$). Z1R-type
# factors synchronise, so there are three large classes per factor (S0, S1, SR). Mess3 beliefs
# never repeat (every context is its own class), so for Mess3 we group contexts by their most
# likely hidden state — the three lobes of the fractal — which keeps 3 classes and 6 ordered
# pairs as in the seed. Steering vector $c_t-c_s$ × scale, added at the final position. Metrics
# (nats, averaged over source contexts then over the 6 ordered pairs):
# $D_{KL}(\hat p_f\Vert p_{target,f})$ against the model's own mean factor-$f$ output on contexts
# genuinely in the target class; $D_{KL}(\hat p_f\Vert p_f^{orig})$ (intended);
# $D_{KL}(\hat p_{\bar f}\Vert p_{\bar f}^{orig})$ (spillover); ratio = spillover / intended.
#
# `centroid` is the seed's method. `conditional` is ours (section 4).
#
# **Two readings of the seed's averaging.** The appendix does not say whether a KL is taken per context
# and then averaged (*per-context*), or taken once between the steered, unsteered and target
# distributions averaged over the source contexts (*context-averaged*). Both are valid readings; the
# second is never larger (KL is jointly convex) and lets opposite-sign shifts in different contexts
# cancel. Both are computed from the same forward passes and shown side by side with the seed, for
# both methods. Beside them, two spillover measures that need no averaging choice: the mean total
# variation (TV) of the other factor's token marginal and the fraction of contexts whose most likely
# other-factor token flips.

# %%
steer = steering_frame(models, scales, n_steering_sequences, analysis_seed)
steer_stats = across_seeds(steer, ["process", "method", "factor", "scale"],
                           ["kl_target", "kl_steered", "kl_unsteered", "ratio", "kl_target_avg", "kl_steered_avg",
                            "kl_unsteered_avg", "ratio_avg", "ratio_pairs", "tv_steered", "tv_unsteered",
                            "argmax_flip"])


for process in processes:
    for factor in (0, 1):
        label = {("z1r_x_z1r", 0): "Table 2", ("z1r_x_z1r", 1): "Table 3", ("mess3_x_mess3", 0): "Table 4",
                 ("mess3_x_mess3", 1): "Table 5"}.get((process, factor), "no seed table (prose only)")
        display(Markdown(f"**{process}, steering factor {factor}** — seed {label}: spillover ratio, then the "
                         "intended KL (mean ± sd over training seeds)"))
        display(seed_tables.beside_seed(steer_stats, process, factor, "ratio"))
        display(seed_tables.beside_seed(steer_stats, process, factor, "kl_steered"))

# %%
curves = steer_stats[steer_stats.scale > 0].melt(
    id_vars=["process", "method", "factor", "scale"], value_vars=["kl_steered_mean", "kl_unsteered_mean"],
    var_name="quantity", value_name="KL (nats)")
curves["quantity"] = curves["quantity"].map({"kl_steered_mean": "intended (steered factor)",
                                             "kl_unsteered_mean": "spillover (other factor)"})
curves["factor"] = "steer factor " + curves["factor"].astype(str)
grid = sns.relplot(data=curves, x="scale", y="KL (nats)", hue="quantity", style="method", col="process", row="factor",
                   kind="line", marker="o", height=2.8, aspect=1.2)
grid.set(yscale="log")
grid.set_titles("{row_name} · {col_name}")
grid.set_axis_labels("steering scale c (× centroid difference)", "D_KL vs unsteered output (nats, log)")
save_figure(grid.figure, out, "kl_vs_scale")
plt.show()

ratio_curves = steer_stats[steer_stats.scale > 0].assign(factor=lambda d: "steer factor " + d.factor.astype(str))
grid = sns.relplot(data=ratio_curves, x="scale", y="ratio_mean", hue="process", style="method", col="factor",
                   kind="line", marker="o", height=3.2, aspect=1.3)
grid.set(yscale="log")
grid.set_titles("{col_name}")
grid.set_axis_labels("steering scale c (× centroid difference)", "spillover ratio = spillover / intended (log)")
save_figure(grid.figure, out, "spillover_ratio_vs_scale")
plt.show()

# %% [markdown]
# **Which reading reproduces the seed?** For the seed's method, ours / seed at every scale the seed
# reports, and the geometric-mean fold difference over scales (1 = exact). The shape matters as much as
# the level: the seed's Z1R × Z1R ratio is nearly flat from scale 0.25 to 3.

# %%
agreement = seed_tables.reading_agreement(steer_stats)
display(agreement.round(3))
by_reading = agreement.groupby(["process", "reading"]).fold.apply(lambda f: float(np.exp(np.log(f).mean())))
display(by_reading.round(3).to_frame("geometric-mean fold vs seed (both factors)"))

# %%
bounded = steer_stats[steer_stats.scale > 0].melt(
    id_vars=["process", "method", "factor", "scale"], value_vars=["tv_unsteered_mean", "argmax_flip_mean"],
    var_name="measure", value_name="value")
bounded["measure"] = bounded.measure.map({"tv_unsteered_mean": "mean TV of the other factor",
                                          "argmax_flip_mean": "fraction of other-factor argmax flips"})
grid = sns.relplot(data=bounded, x="scale", y="value", hue="process", style="method", col="measure", kind="line",
                   marker="o", height=3.2, aspect=1.3, facet_kws={"sharey": False})
grid.set_titles("{col_name}")
grid.set_axis_labels("steering scale c (× centroid difference)", "spillover (probability / fraction of contexts)")
save_figure(grid.figure, out, "bounded_spillover")
plt.show()
display(steer_stats[steer_stats.scale.isin([0.5, 1.0, 2.0])].pivot_table(
    index=["process", "factor", "scale"], columns="method", values=["tv_unsteered_mean", "argmax_flip_mean"]).round(4))

# %% [markdown]
# ## 4. Why centroid steering leaks, and conditional belief-state steering
#
# A marginal centroid $c_t$ averages the activations of class $t$ over every state of the other
# factor. If the activations of the joint classes were additive, $c(i,j)=u_i+v_j$, the vector
# $c_t-c_s=u_t-u_s$ would be the same for every other-factor state and could not move the other
# factor. The fraction of the joint-class centroid variance that an additive fit leaves
# unexplained measures exactly what the marginal vector gets wrong:

# %%
interaction = []
for (p, s), trained in models.items():
    tokens = trained.process.sample(n_steering_sequences, 10, np.random.default_rng([analysis_seed, s, 7]))
    for hook in residual_hooks(trained.model):
        setup = prepare_steering(trained.model, trained.process, tokens, hook)
        interaction.append({"process": p, "seed": s, "hook": hook, "non-additive fraction": centroid_interaction(setup)})
interaction = pd.DataFrame(interaction)
display(across_seeds(interaction, ["process", "hook"], ["non-additive fraction"]).round(3))

# %% [markdown]
# **Does better training make the factors more additive?** At every saved training snapshot: CE /
# optimal, the final-layer non-additive fraction, and the seed-method ratio at scale 1 (both readings,
# mean of the two factors). Trend: Spearman ρ over all snapshots and, since the snapshots of one seed
# are not independent, the repeated-measures correlation within seeds (pingouin `rm_corr`).

# %%
trend = pd.DataFrame([row | {"process": p, "seed": s} for (p, s), trained in models.items()
                      for row in training_trend(trained, n_steering_sequences, analysis_seed)])
trend_stats = {p: {y: trend_correlation(g, "ce_ratio", y) for y in ("interaction", "ratio", "ratio_avg")}
               for p, g in trend.groupby("process")}
late_trend = {p: trend_correlation(g[g.ce_ratio < 1.05], "ce_ratio", "interaction") for p, g in trend.groupby("process")}
display(pd.DataFrame({(p, y): v for p, d in trend_stats.items() for y, v in d.items()}).T.round(3))
long_trend = trend.assign(excess=trend.ce_ratio - 1).melt(
    id_vars=["process", "seed", "steps", "excess"], value_vars=["interaction", "ratio"], var_name="quantity",
    value_name="value")
long_trend["quantity"] = long_trend.quantity.map({"interaction": "non-additive fraction of the centroids",
                                                  "ratio": "seed-method spillover ratio, scale 1 (per-context)"})
grid = sns.relplot(data=long_trend, x="excess", y="value", hue="process", style="seed", row="quantity",
                   kind="line", marker="o", sort=False, height=2.8, aspect=2.2, facet_kws={"sharey": False})
grid.set(xscale="log", yscale="log")
grid.set_titles("{row_name}")
grid.set_axis_labels("CE / Bayes-optimal CE − 1 at the snapshot (log; training runs right to left)",
                     "value (log; fraction or ratio)")
save_figure(grid.figure, out, "additivity_vs_training")
plt.show()

# %% [markdown]
# **Conditional belief-state steering** uses the centroids of the *joint* classes instead:
# $c(t,j)-c(s,j)$ where $j$ is the other factor's class of the source context, decoded from the
# model's own final-layer activations by a linear probe fitted on separate contexts (no ground
# truth at steering time). It still moves only along directions the model uses for factor $f$'s
# belief, but it does so at the other factor's actual state.

# %%
at_one = steer_stats[steer_stats.scale == 1.0].pivot_table(
    index=["process", "factor"], columns="method", values=["kl_steered_mean", "kl_unsteered_mean", "ratio_mean"])
display(at_one.round(5))
decode = steer.groupby("process")["decode_accuracy"].mean()
display(Markdown("Class-decoding accuracy of the probe used by the conditional method: "
                 + ", ".join(f"{p} {v:.3f}" for p, v in decode.items())))

# %% [markdown]
# ## 5. Layer dependence of specificity
#
# The same steering at every residual hook point (centroids computed at that hook), scale
# `layer_scale`:

# %%
by_layer = steering_frame(models, [layer_scale], n_steering_sequences, analysis_seed,
                          hooks=residual_hooks(next(iter(models.values())).model), progress=False)
layer_stats = across_seeds(by_layer, ["process", "method", "hook", "factor"], ["ratio", "ratio_avg", "kl_steered",
                                                                               "tv_unsteered"])
grid = sns.catplot(data=by_layer.assign(factor=lambda d: "steer factor " + d.factor.astype(str)),
                   x="hook", y="ratio", hue="method", col="process", row="factor", kind="bar", errorbar="sd",
                   height=3.0, aspect=1.1)
grid.set(yscale="log")
grid.set_titles("{row_name} · {col_name}")
grid.set_axis_labels("residual hook (steering site)", f"spillover ratio at scale {layer_scale:g} (log)")
for ax in grid.axes.flat:
    ax.tick_params(axis="x", rotation=30)
save_figure(grid.figure, out, "ratio_by_layer")
plt.show()
display(layer_stats.round(4))

# %% [markdown]
# ## 6. Semi-factored process: asymmetric spillover and partition violation (Table 6)
#
# **The seed never defines its semi-factored process.** Ours (`persona_wm.processes.catalog.semi_factored_z1r`,
# section 1) is our own construction, so the seed's Table 6 is a reference for the shape of the
# result, not a number we should expect to reproduce. Forbidden and target mass are reported for both
# methods.
#
# In the semi-factored process factor A's sector decides what factor B's tokens mean, so moving
# factor A across its partition *should* change factor B's predictions, while moving factor B
# should leave factor A alone. For Table 6 we take contexts whose sector is known to be P10
# (A in span{S1, SR}, B in span{S0}) or P01 (A in span{S0}, B in span{S1, SR}), steer the factor
# that varies inside the sector between its classes there, and measure the *forbidden* mass
# (tokens no state of the sector can emit) and the *target-class* mass (tokens in the support of
# the Bayes-optimal prediction of contexts genuinely in the target class).

# %%
semi_models = {k: v for k, v in models.items() if k[0] == "semi_factored"}
if semi_models:
    partition = partition_frame(semi_models, ["(1,0)", "(0,1)"], partition_scales, n_steering_sequences,
                                analysis_seed)
    partition["block"] = partition.sector.map({"(1,0)": "P10", "(0,1)": "P01"})
    part_stats = across_seeds(partition, ["method", "block", "scale"], ["forbidden", "target"])
    seed6 = seed_tables.partition_table()
    table6 = part_stats.merge(seed6, on=["block", "scale"], how="left", suffixes=("", "_seed"))
    display(table6.pivot_table(index=["block", "scale"], columns="method",
                               values=["forbidden_mean", "target_mean", "forbidden", "target"]).rename(
        columns={"forbidden": "forbidden (seed)", "target": "target (seed)"}).round(4))
    long = partition.melt(id_vars=["block", "scale", "method", "seed"], value_vars=["forbidden", "target"],
                          var_name="mass", value_name="probability")
    grid = sns.relplot(data=long, x="scale", y="probability", hue="block", style="method", col="mass", kind="line",
                       markers=True, errorbar="sd", height=3.2, aspect=1.2)
    grid.set_titles("{col_name} mass")
    grid.set_axis_labels("steering scale c", "probability mass (mean over contexts; sd over seeds)")
    save_figure(grid.figure, out, "partition_violation")
    plt.show()


# %% [markdown]
# ## Conclusion

# %%
def stat(process, factor, scale, col, method="centroid"):
    row = steer_stats[(steer_stats.process == process) & (steer_stats.factor == factor)
                      & (steer_stats.scale == scale) & (steer_stats.method == method)]
    return float(row[f"{col}_mean"].iloc[0]) if len(row) else float("nan")


def headline(process, method):
    return float(np.mean([stat(process, f, 1.0, "ratio", method) for f in (0, 1)]))


r2_headline = r2[(r2.model == "trained") & (r2.layer == "concat")].pivot_table(index="process", columns="target",
                                                                                values="r2_mean")
r2_last = r2[(r2.model == "trained") & (r2.layer == residual_hooks(next(iter(models.values())).model)[-1])
             ].pivot_table(index="process", columns="target", values="r2_mean")
r2_untrained = r2[(r2.model == "untrained") & (r2.layer == "concat")].pivot_table(index="process", columns="target",
                                                                                    values="r2_mean")
r2_sd = {m: r2[(r2.model == m) & (r2.layer == "concat")].pivot_table(index="process", columns="target",
                                                                     values="r2_sd", dropna=False).fillna(0.0)
         for m in ("trained", "untrained")}
ce_by = ce.set_index("process")
checks = []
if "z1r_x_z1r" in processes:
    checks += [("Z1R×Z1R CE ratio ≤ 1.005", ce_by.loc["z1r_x_z1r", "ce_ratio_mean"], 1.005, "≤"),
               ("Z1R×Z1R ratio at scale 1, seed method ≤ 0.002", headline("z1r_x_z1r", "centroid"), 0.002, "≤"),
               ("Z1R×Z1R ratio at scale 1, conditional ≤ 0.001", headline("z1r_x_z1r", "conditional"), 0.001, "≤")]
if "mess3_x_mess3" in processes:
    checks += [("Mess3×Mess3 gap captured ≥ 0.95", ce_by.loc["mess3_x_mess3", "gap_captured_mean"], 0.95, "≥"),
               ("Mess3×Mess3 ratio at scale 1, seed method ≤ 0.01", headline("mess3_x_mess3", "centroid"), 0.01, "≤"),
               ("Mess3×Mess3 ratio at scale 1, conditional ≤ 0.01", headline("mess3_x_mess3", "conditional"), 0.01,
                "≤")]
for p in processes:
    for f in ("factor0", "factor1"):
        checks.append((f"{p} probe R² {f} (concat) ≥ 0.95", r2_headline.loc[p, f], 0.95, "≥"))
if semi_models:
    part_by = part_stats.set_index(["method", "block", "scale"])
    for method in ("centroid", "conditional"):
        spill0 = stat("semi_factored", 0, 1.0, "kl_unsteered", method)
        spill1 = stat("semi_factored", 1, 1.0, "kl_unsteered", method)
        checks.append((f"semi-factored ({method}): factor-0 spillover ≥ 10× factor-1 at scale 1",
                       spill0 / max(spill1, 1e-12), 10, "≥"))
        checks += [(f"forbidden mass added by steering, {b} at scale 1 ({method}) ≤ 0.001",
                    part_by.loc[(method, b, 1.0), "forbidden_mean"] - part_by.loc[(method, b, 0.0), "forbidden_mean"],
                    0.001, "≤") for b in ("P10", "P01") if (method, b, 0.0) in part_by.index]
        checks += [(f"forbidden mass {b} at scale {c:g} ({method}) {op} {thr}",
                    part_by.loc[(method, b, c), "forbidden_mean"], thr, op)
                   for b in ("P10", "P01") for c, thr, op in ((1.0, 0.001, "≤"), (5.0, 0.1, "≥"))
                   if (method, b, c) in part_by.index]
targets = pd.DataFrame([{"target": name, "ours": value, "threshold": thr,
                         "met": bool(value <= thr if op == "≤" else value >= thr)} for name, value, thr, op in checks])
display(targets.round(5))

# %%
met = targets.met.sum()
final_hook_name = residual_hooks(next(iter(models.values())).model)[-1]
at1 = steer[steer.scale == 1.0]
per_seed = {(p, m, col): at1[(at1.process == p) & (at1.method == m)].groupby("seed")[col].mean()
            for p in processes for m in ("centroid", "conditional")
            for col in ("ratio", "ratio_avg", "tv_unsteered", "argmax_flip")}
seed_ratio = {"z1r_x_z1r": 0.0022, "mess3_x_mess3": 0.0057}  # seed 000, Table 1 / Tables 4-5 at scale 1
closer = {p: by_reading.loc[p].idxmin() for p in seed_ratio if p in processes}
final_interaction = interaction[interaction.hook == final_hook_name]
shape = agreement[agreement.reading == "context-averaged"].set_index(["process", "factor"])
small, large = ["x0.25", "x0.5", "x0.75"], ["x1", "x1.25", "x1.5", "x2", "x3"]
display(Markdown(
    f"- **Training.** CE / optimal: "
    + ", ".join(f"{p} {mean_sd_text(final[final.process == p].ce_ratio)}" for p in processes)
    + "; gap captured: " + ", ".join(f"{p} {mean_sd_text(final[final.process == p].gap_captured, '.3f')}"
                                     for p in processes) + " (mean ± sd over training seeds).\n"
    f"- **Probes.** Concatenated-residual R² (factor 0 / factor 1, mean ± sd over seeds): "
    + ", ".join(f"{p} {r2_headline.loc[p, 'factor0']:.3f} ± {r2_sd['trained'].loc[p, 'factor0']:.3f} / "
                f"{r2_headline.loc[p, 'factor1']:.3f} ± {r2_sd['trained'].loc[p, 'factor1']:.3f}" for p in processes)
    + "; control, the same probe on the untrained network: "
    + ", ".join(f"{p} {r2_untrained.loc[p, 'factor0']:.3f} ± {r2_sd['untrained'].loc[p, 'factor0']:.3f} / "
                f"{r2_untrained.loc[p, 'factor1']:.3f} ± {r2_sd['untrained'].loc[p, 'factor1']:.3f}" for p in processes)
    + ". Principal angles between the two factors' read-outs (degrees, mean ± sd over seeds): "
    + "; ".join(f"{p} " + ", ".join(f"{m:.0f} ± {d:.0f}" for m, d in zip(v["mean"], v["sd"] or [np.nan] * len(v["mean"])))
                + ("" if v["stable"] is not False else " (**not stable across seeds**: sd ≥ 10°)") for p, v in angle_spread.items()
                if v["mean"] is not None) + ".\n"
    f"- **Seed method, both readings of the seed's averaging** (spillover ratio at scale 1, mean of both factors, "
    f"mean ± sd over seeds): "
    + "; ".join(f"{p} per-context {mean_sd_text(per_seed[(p, 'centroid', 'ratio')])}, context-averaged "
                f"{mean_sd_text(per_seed[(p, 'centroid', 'ratio_avg')])}" for p in processes)
    + " (seed: Z1R×Z1R 0.0022, Mess3×Mess3 0.0057). The reading closer to the seed's tables over all scales "
    "(geometric-mean fold, table in section 3): "
    + ", ".join(f"{p} {closer[p]} ({by_reading.loc[(p, closer[p])]:.2f}× vs "
                f"{by_reading.loc[p].drop(closer[p]).iloc[0]:.2f}×)" for p in closer)
    + ". So the Z1R×Z1R gap is largely a definition: the seed does not say which reading it used, and the reading "
    "decides whether it reproduces. Left unexplained is the curve's shape: under the context-averaged reading ours / "
    "seed is "
    + "; ".join(f"{p} factor {f}: {shape.loc[(p, f), small].min():.1f}–{shape.loc[(p, f), small].max():.1f}× at scales "
                f"0.25–0.75 and {shape.loc[(p, f), large].min():.1f}–{shape.loc[(p, f), large].max():.1f}× at 1–3"
                for p, f in shape.index)
    + " (the seed's Z1R ratio is nearly flat over scale; ours falls with scale at small scales).\n"
    f"- **Centroid non-additivity** is a second, separate cause of per-context spillover (final-layer non-additive "
    f"fraction: " + ", ".join(f"{p} {mean_sd_text(g['non-additive fraction'], '.3f')}"
                               for p, g in final_interaction.groupby("process"))
    + "). Over training: "
    + "; ".join(f"{p} ρ(CE/optimal, non-additive fraction) = {d['interaction']['spearman_rho']:.2f} "
                f"(p = {d['interaction']['p']:.2g}), within seeds r = {d['interaction']['rm_r']:.2f} "
                f"(p = {d['interaction']['rm_p']:.2g})" for p, d in trend_stats.items())
    + " (positive ρ = the factors become more additive as CE approaches optimal). Late in training only "
    "(snapshots within 5% of optimal CE): "
    + "; ".join(f"{p} ρ = {d['spearman_rho']:.2f} (p = {d['p']:.2g}, n = {d['n']})" for p, d in late_trend.items())
    + ".\n"
    f"- **Reading-free spillover** at scale 1 (seed method / conditional): mean TV of the other factor "
    + ", ".join(f"{p} {mean_sd_text(per_seed[(p, 'centroid', 'tv_unsteered')])} / "
                f"{mean_sd_text(per_seed[(p, 'conditional', 'tv_unsteered')])}" for p in processes)
    + "; other-factor argmax flips "
    + ", ".join(f"{p} {mean_sd_text(per_seed[(p, 'centroid', 'argmax_flip')], '.3f')} / "
                f"{mean_sd_text(per_seed[(p, 'conditional', 'argmax_flip')], '.3f')}" for p in processes) + ".\n"
    f"- **Conditional belief-state steering** (ours; control: the seed's marginal vector on the same contexts): "
    "ratio at scale 1 per-context / context-averaged "
    + ", ".join(f"{p} {mean_sd_text(per_seed[(p, 'conditional', 'ratio')], '.5f')} / "
                f"{mean_sd_text(per_seed[(p, 'conditional', 'ratio_avg')], '.5f')}" for p in processes) + ".\n"
    + (f"- **Table 6** uses our own semi-factored process (the seed defines none). Forbidden mass at scale 1, "
       "P10 / P01: " + "; ".join(f"{m} {part_by.loc[(m, 'P10', 1.0), 'forbidden_mean']:.4f} / "
                                 f"{part_by.loc[(m, 'P01', 1.0), 'forbidden_mean']:.4f}"
                                 for m in ("centroid", "conditional"))
       + " (target ≤ 0.001 for the conditional method: "
       + ("met" if max(part_by.loc[("conditional", b, 1.0), "forbidden_mean"] for b in ("P10", "P01")) <= 0.001
          else "**missed**") + "). The control is the unsteered model on the same contexts (scale 0): it already puts "
       + " / ".join(f"{part_by.loc[('conditional', b, 0.0), 'forbidden_mean']:.4f}" for b in ("P10", "P01"))
       + " on forbidden tokens, so what steering adds at scale 1 is "
       + "; ".join(f"{m} " + " / ".join(f"{part_by.loc[(m, b, 1.0), 'forbidden_mean'] - part_by.loc[(m, b, 0.0), 'forbidden_mean']:+.4f}"
                                        for b in ("P10", "P01")) for m in ("centroid", "conditional"))
       + ".\n" if semi_models else "")
    + f"- **Targets met: {met}/{len(targets)}** (table above; misses are reported with the measured value)."
))

# %% [markdown]
# ## Metrics

# %%
def steering_metrics(method: str, suffix: str = "") -> dict:
    """Scale-0 ratios are undefined (nothing moves): written as null. ``suffix`` "_avg": context-averaged."""
    finite = lambda x: x if np.isfinite(x) else None  # noqa: E731
    return {p: {f"factor{f}": {f"scale_{float(c)}": {
        k: finite(stat(p, f, c, k + suffix, method)) for k in ("kl_target", "kl_steered", "kl_unsteered", "ratio")}
        for c in scales} for f in (0, 1)} for p in processes}


metrics = {
    "seeds": seeds,
    "ce_ratio": {p: float(ce_by.loc[p, "ce_ratio_mean"]) for p in processes},
    "ce_ratio_sd": {p: float(np.nan_to_num(ce_by.loc[p, "ce_ratio_sd"])) for p in processes},
    "gap_captured": {p: float(ce_by.loc[p, "gap_captured_mean"]) for p in processes},
    "probe_r2": {p: {t: float(r2_headline.loc[p, t]) for t in ("factor0", "factor1", "joint")} for p in processes},
    "probe_r2_final_layer": {p: {t: float(r2_last.loc[p, t]) for t in ("factor0", "factor1", "joint")}
                             for p in processes},
    "probe_r2_untrained": {p: {t: float(r2_untrained.loc[p, t]) for t in ("factor0", "factor1")} for p in processes},
    "probe_r2_sd": {m: {p: {t: float(r2_sd[m].loc[p, t]) for t in ("factor0", "factor1")} for p in processes}
                    for m in ("trained", "untrained")},
    "probe_r2_vs_steps": {p: d.groupby("steps", as_index=False)[["factor0", "factor1"]].mean().to_dict("records")
                          for p, d in r2_steps.items()},
    "principal_angles_deg": {p: angles[angles.process == p]["angles (deg)"].tolist() for p in processes},
    "centroid_non_additive_fraction": {p: float(v) for p, v in interaction[interaction.hook == residual_hooks(
        next(iter(models.values())).model)[-1]].groupby("process")["non-additive fraction"].mean().items()},
    "steering": steering_metrics("centroid"),
    "steering_conditional": steering_metrics("conditional"),
    "steering_averaged": steering_metrics("centroid", "_avg"),
    "steering_conditional_averaged": steering_metrics("conditional", "_avg"),
    "spillover_tv": {m: {p: {f"factor{f}": {f"scale_{float(c)}": stat(p, f, c, "tv_unsteered", m)
                                            for c in (0.5, 1.0, 2.0)} for f in (0, 1)} for p in processes}
                     for m in ("centroid", "conditional")},
    "argmax_flip": {m: {p: {f"factor{f}": {f"scale_{float(c)}": stat(p, f, c, "argmax_flip", m)
                                           for c in (0.5, 1.0, 2.0)} for f in (0, 1)} for p in processes}
                    for m in ("centroid", "conditional")},
    "reading_fold_vs_seed": {p: {r: float(v) for r, v in by_reading.loc[p].items()} for p in closer},
    "training_trend": {p: {"spearman_rho": d["interaction"]["spearman_rho"], "p": d["interaction"]["p"],
                           "rm_r": d["interaction"]["rm_r"], "rm_p": d["interaction"]["rm_p"],
                           "ratio_spearman_rho": d["ratio"]["spearman_rho"], "ratio_p": d["ratio"]["p"],
                           "late_spearman_rho": late_trend[p]["spearman_rho"], "late_p": late_trend[p]["p"],
                           "late_n": late_trend[p]["n"],
                           "points": trend[trend.process == p][["seed", "steps", "ce_ratio", "interaction", "ratio",
                                                                "ratio_avg"]].to_dict("records")}
                       for p, d in trend_stats.items()},
    "principal_angles_spread_deg": angle_spread,
    "steering_by_layer_averaged": {p: {m: {h: float(g.ratio_avg_mean.mean()) for h, g in d.groupby("hook")}
                                       for m, d in layer_stats[layer_stats.process == p].groupby("method")}
                                   for p in processes},
    "steering_by_layer": {p: {m: {h: float(g.ratio_mean.mean()) for h, g in d.groupby("hook")}
                              for m, d in layer_stats[layer_stats.process == p].groupby("method")} for p in processes},
    "targets": {row.target: {"value": float(row.ours), "met": bool(row.met)} for row in targets.itertuples()},
}
if semi_models:
    for key, method in (("partition", "centroid"), ("partition_conditional", "conditional")):
        metrics[key] = {f"scale_{float(c)}": {b: {
            "forbidden": float(part_by.loc[(method, b, c), "forbidden_mean"]),
            "target": float(part_by.loc[(method, b, c), "target_mean"])} for b in ("P10", "P01")}
            for c in partition_scales}
write_metrics(undefined_as_none(metrics), out)
display(Markdown(f"Report computed in {time.perf_counter() - started:.0f} s (training cached where possible)."))

# %%
# NBVAL_CHECK_OUTPUT
for p in processes:
    # two decimals: trained-model numbers may differ in the last digits across CPU instruction sets
    print(f"{p}: ce_ratio={metrics['ce_ratio'][p]:.2f} probe_r2_concat={metrics['probe_r2'][p]['factor0']:.1f}/"
          f"{metrics['probe_r2'][p]['factor1']:.1f}")
print("classes:", sorted(set(steer.class_rule)))
print("scale 0 leaves outputs unchanged:", bool(steer[steer.scale == 0].kl_steered.abs().max() < 1e-9))
