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
# method) and `persona_wm.processes.partitioned.semi_factored_z1r` (the semi-factored process); each is stated where
# it matters below. Each section below is one call into `persona_wm.studies.steering_specificity`, which returns
# a small result object; the notebook shows it and says what it means.

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
trainer: str = "stacked"  # one of: stacked, sequential  # stacked: N models per step (persona_wm.toy.stacked)
output_dir: str | None = None

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from IPython.display import Markdown, display

from persona_wm.analysis import seed_tables
from persona_wm.analysis.stats import mean_sd_text
from persona_wm.core.threads import limit_threads
from persona_wm.io.outputs import save_figure, write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.plots import steering as figures
from persona_wm.plots.toy import plot_simplex, plot_training_curves, set_style
from persona_wm.studies import steering_specificity as study

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "02_steering_specificity")
started = time.perf_counter()

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
plan = study.TrainingPlan(tuple(processes), tuple(seeds), train_steps, batch_size, learning_rate,
                          tuple(snapshot_fractions), eval_sequences)
models = study.train_models(plan, threads=torch_threads, trainer=trainer)
training = study.training_summary(models)
display(plan.table(models))

# %%
fig = plot_training_curves(training.history)
save_figure(fig, out, "training_curves")
plt.show()
display(training.ce.round(5))

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
probes = study.probe_section(models, processes, n_probe_sequences, analysis_seed)
display(probes.wide.round(3))

# %%
demo = study.probe_demo(models, probes, processes, analysis_seed, model_seed=seeds[0])
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
plot_simplex(demo.true, axes[0], title=f"{demo.process}: exact factor-0 belief", size=3)
plot_simplex(demo.predicted_on_simplex, axes[1], title="probe prediction from the residual stream (held-in contexts)",
             size=3)
fig.tight_layout()
save_figure(fig, out, "probe_simplex")
plt.show()
display(probes.angles)

# %% [markdown]
# The principal angles between the two factors' probe read-out subspaces say how orthogonal the
# factors' representations are (90° = orthogonal). They are shown per training seed: a cold rerun of
# this study on another machine moved one of them from 64° to 34°, so a single model's angles are not
# a finding. The conclusion quotes them only with their spread over seeds.
#
# **How the representation sharpens with training** (concatenated-residual probe, saved snapshots):

# %%
probe_steps = study.probe_training(models, processes, seeds, n_probe_sequences, analysis_seed)
grid = sns.relplot(data=probe_steps.long, x="steps", y="R2", hue="factor", col="process", kind="line", marker="o",
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
steering = study.steering_section(models, processes, scales, n_steering_sequences, analysis_seed)
for process in processes:
    for factor in study.FACTORS:
        display(Markdown(f"**{process}, steering factor {factor}** — seed {seed_tables.table_label(process, factor)}: "
                         "spillover ratio, then the intended KL (mean ± sd over training seeds)"))
        display(seed_tables.beside_seed(steering.stats, process, factor, "ratio"))
        display(seed_tables.beside_seed(steering.stats, process, factor, "kl_steered"))

# %%
grid = figures.plot_kl_vs_scale(steering.stats)
save_figure(grid.figure, out, "kl_vs_scale")
plt.show()

grid = figures.plot_ratio_vs_scale(steering.stats)
save_figure(grid.figure, out, "spillover_ratio_vs_scale")
plt.show()

# %% [markdown]
# **Which reading reproduces the seed?** For the seed's method, ours / seed at every scale the seed
# reports, and the geometric-mean fold difference over scales (1 = exact). The shape matters as much as
# the level: the seed's Z1R × Z1R ratio is nearly flat from scale 0.25 to 3.

# %%
agreement = steering.agreement
display(agreement.round(3))
display(steering.fold_by_reading.round(3).to_frame("geometric-mean fold vs seed (both factors)"))

# %%
grid = figures.plot_bounded_spillover(steering.stats)
save_figure(grid.figure, out, "bounded_spillover")
plt.show()
display(steering.bounded_table().round(4))

# %% [markdown]
# ## 4. Why centroid steering leaks, and conditional belief-state steering
#
# A marginal centroid $c_t$ averages the activations of class $t$ over every state of the other
# factor. If the activations of the joint classes were additive, $c(i,j)=u_i+v_j$, the vector
# $c_t-c_s=u_t-u_s$ would be the same for every other-factor state and could not move the other
# factor. The fraction of the joint-class centroid variance that an additive fit leaves
# unexplained measures exactly what the marginal vector gets wrong:

# %%
interaction = study.interaction_section(models, n_steering_sequences, analysis_seed)
display(interaction.summary.round(3))

# %% [markdown]
# **Does better training make the factors more additive?** At every saved training snapshot: CE /
# optimal, the final-layer non-additive fraction, and the seed-method ratio at scale 1 (both readings,
# mean of the two factors). Trend: Spearman ρ over all snapshots and, since the snapshots of one seed
# are not independent, the repeated-measures correlation within seeds (pingouin `rm_corr`).

# %%
trend = study.trend_section(models, n_steering_sequences, analysis_seed)
display(trend.table.round(3))
grid = figures.plot_additivity_vs_training(trend.points)
save_figure(grid.figure, out, "additivity_vs_training")
plt.show()

# %% [markdown]
# **Conditional belief-state steering** uses the centroids of the *joint* classes instead:
# $c(t,j)-c(s,j)$ where $j$ is the other factor's class of the source context, decoded from the
# model's own final-layer activations by a linear probe fitted on separate contexts (no ground
# truth at steering time). It still moves only along directions the model uses for factor $f$'s
# belief, but it does so at the other factor's actual state.

# %%
display(steering.at_scale(1.0).round(5))
display(Markdown("Class-decoding accuracy of the probe used by the conditional method: "
                 + ", ".join(f"{p} {v:.3f}" for p, v in steering.decode_accuracy.items())))

# %% [markdown]
# ## 5. Layer dependence of specificity
#
# The same steering at every residual hook point (centroids computed at that hook), scale
# `layer_scale`:

# %%
layers = study.layer_section(models, layer_scale, n_steering_sequences, analysis_seed)
grid = figures.plot_ratio_by_layer(layers.frame, layers.scale)
save_figure(grid.figure, out, "ratio_by_layer")
plt.show()
display(layers.stats.round(4))

# %% [markdown]
# ## 6. Semi-factored process: asymmetric spillover and partition violation (Table 6)
#
# **The seed never defines its semi-factored process.** Ours (`persona_wm.processes.partitioned.semi_factored_z1r`,
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
partition = study.partition_section(models, partition_scales, n_steering_sequences, analysis_seed)
if partition is not None:
    display(partition.beside_seed().round(4))
    grid = figures.plot_partition(partition.frame)
    save_figure(grid.figure, out, "partition_violation")
    plt.show()


# %% [markdown]
# ## Conclusion
#
# First the targets the seed sets (and ours for the conditional method and Table 6), each with the value
# measured here; then the conclusion, built bullet by bullet from the sections' results.

# %%
targets = study.targets_table(processes, training, probes, steering, partition)
display(targets.round(5))

# %%
final, r2, r2_untrained = training.final, probes.table(), probes.table("untrained")
r2_sd = {m: probes.sd(m) for m in ("trained", "untrained")}
conclusion = [
    "- **Training.** CE / optimal: "
    + ", ".join(f"{p} {mean_sd_text(final[final.process == p].ce_ratio)}" for p in processes)
    + "; gap captured: " + ", ".join(f"{p} {mean_sd_text(final[final.process == p].gap_captured, '.3f')}"
                                     for p in processes) + " (mean ± sd over training seeds).\n",
    "- **Probes.** Concatenated-residual R² (factor 0 / factor 1, mean ± sd over seeds): "
    + ", ".join(f"{p} {r2.loc[p, 'factor0']:.3f} ± {r2_sd['trained'].loc[p, 'factor0']:.3f} / "
                f"{r2.loc[p, 'factor1']:.3f} ± {r2_sd['trained'].loc[p, 'factor1']:.3f}" for p in processes)
    + "; control, the same probe on the untrained network: "
    + ", ".join(f"{p} {r2_untrained.loc[p, 'factor0']:.3f} ± {r2_sd['untrained'].loc[p, 'factor0']:.3f} / "
                f"{r2_untrained.loc[p, 'factor1']:.3f} ± {r2_sd['untrained'].loc[p, 'factor1']:.3f}" for p in processes)
    + ". Principal angles between the two factors' read-outs (degrees, mean ± sd over seeds): "
    + "; ".join(f"{p} " + ", ".join(f"{m:.0f} ± {d:.0f}" for m, d in zip(v["mean"], v["sd"] or [np.nan] * len(v["mean"])))
                + ("" if v["stable"] is not False else " (**not stable across seeds**: sd ≥ 10°)")
                for p, v in probes.angle_spread.items() if v["mean"] is not None) + ".\n",
]

# %%
fold, closer = steering.fold_by_reading, steering.closer_reading
shape = agreement[agreement.reading == "context-averaged"].set_index(["process", "factor"])
small, large = ["x0.25", "x0.5", "x0.75"], ["x1", "x1.25", "x1.5", "x2", "x3"]
conclusion.append(
    "- **Seed method, both readings of the seed's averaging** (spillover ratio at scale 1, mean of both factors, "
    "mean ± sd over seeds): "
    + "; ".join(f"{p} per-context {mean_sd_text(steering.per_seed(p, 'centroid', 'ratio'))}, context-averaged "
                f"{mean_sd_text(steering.per_seed(p, 'centroid', 'ratio_avg'))}" for p in processes)
    + f" (seed: Z1R×Z1R {seed_tables.HEADLINE_RATIO['z1r_x_z1r']}, Mess3×Mess3 "
    f"{seed_tables.HEADLINE_RATIO['mess3_x_mess3']}). The reading closer to the seed's tables over all scales "
    "(geometric-mean fold, table in section 3): "
    + ", ".join(f"{p} {closer[p]} ({fold.loc[(p, closer[p])]:.2f}× vs {fold.loc[p].drop(closer[p]).iloc[0]:.2f}×)"
                for p in closer)
    + ". So the Z1R×Z1R gap is largely a definition: the seed does not say which reading it used, and the reading "
    "decides whether it reproduces. Left unexplained is the curve's shape: under the context-averaged reading ours / "
    "seed is "
    + "; ".join(f"{p} factor {f}: {shape.loc[(p, f), small].min():.1f}–{shape.loc[(p, f), small].max():.1f}× at scales "
                f"0.25–0.75 and {shape.loc[(p, f), large].min():.1f}–{shape.loc[(p, f), large].max():.1f}× at 1–3"
                for p, f in shape.index)
    + " (the seed's Z1R ratio is nearly flat over scale; ours falls with scale at small scales).\n")

# %%
conclusion.append(
    "- **Centroid non-additivity** is a second, separate cause of per-context spillover (final-layer non-additive "
    "fraction: " + ", ".join(f"{p} {mean_sd_text(g['non-additive fraction'], '.3f')}"
                              for p, g in interaction.final.groupby("process"))
    + "). Over training: "
    + "; ".join(f"{p} ρ(CE/optimal, non-additive fraction) = {d['interaction']['spearman_rho']:.2f} "
                f"(p = {d['interaction']['p']:.2g}), within seeds r = {d['interaction']['rm_r']:.2f} "
                f"(p = {d['interaction']['rm_p']:.2g})" for p, d in trend.stats.items())
    + " (positive ρ = the factors become more additive as CE approaches optimal). Late in training only "
    "(snapshots within 5% of optimal CE): "
    + "; ".join(f"{p} ρ = {d['spearman_rho']:.2f} (p = {d['p']:.2g}, n = {d['n']})" for p, d in trend.late.items())
    + ".\n")
conclusion.append(
    "- **Reading-free spillover** at scale 1 (seed method / conditional): mean TV of the other factor "
    + ", ".join(f"{p} {mean_sd_text(steering.per_seed(p, 'centroid', 'tv_unsteered'))} / "
                f"{mean_sd_text(steering.per_seed(p, 'conditional', 'tv_unsteered'))}" for p in processes)
    + "; other-factor argmax flips "
    + ", ".join(f"{p} {mean_sd_text(steering.per_seed(p, 'centroid', 'argmax_flip'), '.3f')} / "
                f"{mean_sd_text(steering.per_seed(p, 'conditional', 'argmax_flip'), '.3f')}" for p in processes) + ".\n")

# %%
conclusion.append(
    "- **Conditional belief-state steering** (ours; control: the seed's marginal vector on the same contexts): "
    "ratio at scale 1 per-context / context-averaged "
    + ", ".join(f"{p} {mean_sd_text(steering.per_seed(p, 'conditional', 'ratio'), '.5f')} / "
                f"{mean_sd_text(steering.per_seed(p, 'conditional', 'ratio_avg'), '.5f')}" for p in processes) + ".\n")
if partition is not None:
    conclusion.append(
        "- **Table 6** uses our own semi-factored process (the seed defines none). Forbidden mass at scale 1, P10 / P01: "
        + "; ".join(f"{m} {partition.mass(m, 'P10', 1.0):.4f} / {partition.mass(m, 'P01', 1.0):.4f}" for m in study.METHODS)
        + " (target ≤ 0.001 for the conditional method: "
        + ("met" if max(partition.mass("conditional", b, 1.0) for b in ("P10", "P01")) <= 0.001 else "**missed**")
        + "). The control is the unsteered model on the same contexts (scale 0): it already puts "
        + " / ".join(f"{partition.mass('conditional', b, 0.0):.4f}" for b in ("P10", "P01"))
        + " on forbidden tokens, so what steering adds at scale 1 is "
        + "; ".join(f"{m} " + " / ".join(f"{partition.added(m, b):+.4f}" for b in ("P10", "P01")) for m in study.METHODS)
        + ".\n")
conclusion.append(f"- **Targets met: {targets.met.sum()}/{len(targets)}** (table above; misses are reported with the "
                  "measured value).")
display(Markdown("".join(conclusion)))

# %% [markdown]
# ## Metrics
#
# `metrics.json` is written from one result object assembled from the sections' results; undefined values (a
# ratio at scale 0, where nothing moves) are written as null.

# %%
result = study.SteeringSpecificityResult(tuple(seeds), tuple(processes), training, probes, probe_steps, steering,
                                         interaction, trend, layers, partition, targets)
write_metrics(result.metrics(), out)
display(Markdown(f"Report computed in {time.perf_counter() - started:.0f} s (training cached where possible)."))

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
for p in processes:
    # two decimals: trained-model numbers may differ in the last digits across CPU instruction sets
    print(f"{p}: ce_ratio={metrics['ce_ratio'][p]:.2f} probe_r2_concat={metrics['probe_r2'][p]['factor0']:.1f}/"
          f"{metrics['probe_r2'][p]['factor1']:.1f}")
print("classes:", sorted(set(steering.frame.class_rule)))
print("scale 0 leaves outputs unchanged:", bool(steering.frame[steering.frame.scale == 0].kl_steered.abs().max() < 1e-9))
