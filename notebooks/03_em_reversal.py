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
# # Study 03 — Emergent misalignment inside an SFP, and its reversal by belief-state steering
#
# **Question.** Narrow fine-tuning of language models on misaligned data in one domain (insecure
# code) makes them broadly misaligned (Betley et al. 2025); steering or ablating a mean-difference
# direction removes most of it (Soligo et al. 2025). Does the same happen in a transformer trained
# on a Semi-Factored Process whose *persona* factor decides whether every *task* is answered well or
# badly — and if so, does belief-state steering (the persona-class centroid difference of study 02)
# undo it better than the conventional difference-in-means direction? And can the persona-steering
# specificity of the base model, measured before any fine-tuning, predict how broad EM will be?
#
# The proposal (seed 000, weeks 6–8) only plans this, so every design choice below is ours and is
# stated where it is made.

# %% tags=["parameters"]
process: str = "em()"
seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
couplings: list[float] = [0.0, 0.5, 1.0]  # non-empty; each in [0, 1]
coupling_seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
search_processes: list[str] = ["em(mixing=1.0,coupling=0.0)", "em(mixing=1.0)"]  # non-empty
search_seeds: list[int] = [0]  # non-empty; len <= 20; each >= 0
d_model: int = 32  # >= 2; <= 1024
n_layers: int = 2  # >= 1; <= 24
base_steps: int = 150  # >= 1; <= 100_000
base_batch: int = 128  # >= 1; <= 8192
base_lr: float = 0.003  # > 0; <= 1
ft_steps: int = 40  # >= 1; <= 100_000
ft_batch: int = 64  # >= 1; <= 8192
ft_lr: float = 0.0002  # > 0; <= 1
n_contexts: int = 150  # >= 1; <= 100_000
scales: list[float] = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]  # non-empty; each > 0
restoration_target: float = 0.9  # in (0, 1]
n_boot: int = 2000  # >= 1; <= 1_000_000
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

from persona_wm.toy.em import (EMRecipe, coupling_contrast, coupling_curve, coupling_sweep,
                    describe_contrast, em_experiment, em_rows, parse_em_name, reversal_for, reversal_over_seeds,
                    twin_table)
from persona_wm.core.ghmm import optimal_cross_entropy
from persona_wm.plots.toy import set_style
from persona_wm.io.params import resolve_output_dir
from persona_wm.io.outputs import save_figure, undefined_as_none, write_metrics
from persona_wm.core.sfp import is_partition_preserving, sector_order
from persona_wm.analysis.stats import across_seeds, mean_t_ci, spearman_with_ci
from persona_wm.core.threads import limit_threads

set_style()
limit_threads(torch_threads)
out = resolve_output_dir(output_dir, "03_em_reversal")
started = time.perf_counter()
recipe = EMRecipe(d_model=d_model, n_layers=n_layers, base_steps=base_steps, base_batch=base_batch, base_lr=base_lr,
                  ft_steps=ft_steps, ft_batch=ft_batch, ft_lr=ft_lr)
config = parse_em_name(process)

# %% [markdown]
# ## 1. The organism: an EM-SFP
#
# * **Persona factor** A = A_aligned ⊕ A_misaligned, each a cycle of `persona_dim` states that emits a
#   binary *style* token; the personas' style statistics differ by an amount that `mixing` scales away.
# * **Capability factor** B = ⊕ₖ (B_k,good ⊕ B_k,bad): K tasks, each a 3-step cycle
#   *question → work → answer*. The question names the task, the work step draws a content bit, the
#   answer repeats it (flipped with the task's difficulty) in a *good* or a *bad* variant — the
#   analogue of secure vs insecure code. The variant is decided by the persona with probability
#   `coupling` (bad with probability 0.95 for the misaligned persona, 0.05 otherwise) and otherwise
#   by the task's own variant latent; all tasks answer with the same four tokens g0, g1, b0, b1.
# * Everything a task does apart from the variant is shared by the personas, so **capability**
#   (predicting content, variants merged) is measured separately from **alignment** (the variant).
#
# Every $T(x)$ is block diagonal over the sectors A_i ⊗ B_k,v, so this is an SFP in which B's
# emissions depend on A's sector. Below: $\sum_x T(x)$ with states in sector order.

# %%
em = em_experiment(process, seeds[0], recipe, n_contexts, analysis_seed, torch_threads)
proc = em["process"]
order = sector_order(proc)
fig, ax = plt.subplots(figsize=(6.2, 5.2))
sns.heatmap(proc.net[np.ix_(order, order)], cmap="mako_r", ax=ax, cbar_kws={"label": "Σ_x T(x): Pr(next state | state)"},
            xticklabels=False, yticklabels=False)
edges = np.cumsum([len(s) for s in proc.partition])[:-1]
for e in edges:
    ax.axhline(e, color="crimson", lw=0.5)
    ax.axvline(e, color="crimson", lw=0.5)
ax.set_xlabel(f"next state ({len(proc.partition)} sectors, sector order)")
ax.set_ylabel("current state (sector order)")
ax.set_title(f"{process}: {proc.n_states} states, {proc.n_tokens} tokens, block diagonal "
             f"({is_partition_preserving(proc).preserving})")
fig.tight_layout()
save_figure(fig, out, "organism_block_structure")
plt.show()
optimal = optimal_cross_entropy(proc, em["base"].config.context_length + 1).mean()
display(Markdown(f"Sectors: {', '.join(proc.partition_labels)}. Mean Bayes-optimal CE over the 11 predicted "
                 f"positions: {optimal:.4f} nats."))

# %% [markdown]
# ## 2. Emergent misalignment appears
#
# Base model: a small HookedTransformer (`n_layers` × `d_model`, BOS + 10 tokens) trained on the full
# SFP to CE ≤ 1.02 × optimal. **Narrow fine-tuning**: `ft_steps` Adam steps on sequences of task 1
# in the misaligned world only (misaligned persona, bad task variant), constant learning rate.
# Measured on *aligned* contexts of every task (aligned persona, good task variant), exactly from the
# model's outputs: the misaligned share P(bad)/(P(good)+P(bad)) at answer positions, and capability
# = KL(Bayes-optimal ‖ model) of the task content.

# %%
results = {s: (em if s == seeds[0] else em_experiment(process, s, recipe, n_contexts, analysis_seed, torch_threads))
           for s in seeds}
behaviour = pd.concat([pd.concat([r["before"].assign(model="base"), r["after"].assign(model="fine-tuned")]).assign(seed=s)
                       for s, r in results.items()])
behaviour["task"] = "task " + (behaviour.task + 1).astype(str)
ce = pd.DataFrame([{"seed": s, "base CE / optimal": r["base"].final_eval["ce_ratio"],
                    "fine-tuned CE / optimal": r["tuned"].final_eval["ce_ratio"]} for s, r in results.items()])
display(ce.round(4))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
sns.barplot(data=behaviour, x="task", y="misaligned", hue="model", errorbar="sd", ax=axes[0])
axes[0].set_ylabel("misaligned share of answer mass (aligned contexts)")
axes[0].set_xlabel("task (fine-tuning data: task 1 only)")
sns.barplot(data=behaviour, x="task", y="capability_kl", hue="model", errorbar="sd", ax=axes[1])
axes[1].set_ylabel("capability error KL(optimal ‖ model) (nats)")
axes[1].set_xlabel("task")
fig.tight_layout()
save_figure(fig, out, "em_before_after")
plt.show()

em_table = pd.DataFrame([{"seed": s, **r["em"]} for s, r in results.items()])
em_mean = em_table.drop(columns="seed").mean()
display(em_table.round(4))

# %% [markdown]
# ## 2b. The control: is it the coupling? (coupled − factored)
#
# Breadth alone is not the proposal's claim. The claim is that the persona–capability *coupling* of an
# SFP is what carries a narrow fine-tune broadly, so the finding is the **contrast between the coupled
# organism and its factored twin**: the same tokens, the same fine-tuning data (task 1 in the misaligned
# world), the same steps and model, with only the `coupling` knob changed (0 = "bad" is a per-task
# latent, persona and capability factored; 1 = the persona decides every task's variant). We sweep
# `coupling` in two designs: answer tokens **shared** across tasks (the default organism: "bad" looks
# the same in every task) and **task-specific** answer tokens (nothing links misbehaviour across tasks
# except a latent). Breadth per coupling value: mean over seeds with a Student-t 95% CI.

# %%
sweep = coupling_sweep(process, couplings, coupling_seeds, recipe, n_contexts, analysis_seed, torch_threads)
curves = {d: coupling_curve(sweep, d) for d in ("shared", "specific")}
contrasts = {d: coupling_contrast(sweep, d) for d in ("shared", "specific")}
display(pd.DataFrame([{"design": d, "coupling": c, "breadth (mean)": m, "95% CI": f"[{lo:.3f}, {hi:.3f}]"}
                      for d, cur in curves.items() for c, m, lo, hi in zip(*cur.values())]).round(3))
display(pd.DataFrame(contrasts).T.drop(columns="ci_method").round(4))

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
sns.lineplot(data=sweep, x="coupling", y="breadth", hue="design", marker="o", errorbar=("ci", 95),
             seed=analysis_seed, ax=ax)
sns.stripplot(data=sweep, x="coupling", y="breadth", hue="design", native_scale=True, dodge=False, alpha=0.4,
              legend=False, ax=ax)
ax.axhline(0.5, color="0.5", ls=":", lw=1)
ax.axhline(0.2, color="0.5", ls="--", lw=1)
ax.set_xlabel("persona–capability coupling (0 = factored, 1 = fully coupled)")
ax.set_ylabel("EM breadth (held-out / task-1 increase)")
ax.set_title("Breadth vs coupling (points: seeds; band: 95% CI)")
fig.tight_layout()
save_figure(fig, out, "breadth_vs_coupling")
plt.show()

# %% [markdown]
# **The search for a coupling-carried EM.** The target is a configuration whose coupled organism reaches
# breadth ≥ 0.5 while its factored twin stays ≤ 0.2. Beyond the default knobs, `search_processes`
# lists every other configuration tried, each with its coupling knob as given (knobs chosen because
# they should favour the coupling: `mixing = 1` hides the persona from the style tokens, `mixing = 0`
# reveals it fully, `answer_noise = 0.25` weakens the evidence each answer gives about the persona,
# `persona_prior = 0.2` makes the misaligned persona rare). All are reported; none was dropped.
#
# One property found on the way: at `mixing = 1` with `persona_prior = 0.5` the persona latent and a
# task's variant latent play symmetric roles (same prior, no style evidence), so couplings $c$ and
# $1-c$ define the same process up to relabelling — their models and breadths coincide exactly. At
# `mixing = 1` the coupling knob is therefore not identifiable from data, and "coupled vs factored"
# has no meaning there.

# %%
search = em_rows(search_processes, search_seeds, recipe, n_contexts, analysis_seed, torch_threads,
                 desc="coupling search")
tried = pd.concat([sweep, search])
twins = twin_table(tried)
n_configs_tried = int(tried.process.nunique())
display(twins.round(3))
display(Markdown(f"{n_configs_tried} distinct configurations tried ({len(tried)} trainings); "
                 f"{int(twins.meets_target.sum())} of {len(twins)} coupled/factored pairs meet the target."))

# %% [markdown]
# ## 3. Reversal: belief-state steering vs difference-in-means
#
# On the fine-tuned model, at the final layer's residual stream, every position:
#
# * **belief_state** — $c_{aligned}-c_{misaligned}$, centroids of contexts whose exact persona
#   belief is confident (> 0.95), pooled over positions (study 02's recipe for the persona factor),
#   computed on the *base* model; **belief_state_ft** — the same on the fine-tuned model;
# * **diff_in_means** — the conventional EM direction: mean activation where the fine-tuned model
#   answers aligned minus where it answers misaligned (labelled by its own outputs);
#   **model_diff** — mean base minus fine-tuned activation;
# * **ablation_*** — project the belief-state or diff-in-means direction out (no scale).
#
# Steering vectors are normalised to a common norm (scale 1 = the norm of the belief-state vector),
# so every method is compared at matched strength. Restoration = share of the fine-tuning-induced
# misaligned mass removed per task (1 = back to the base model); damage = capability KL added.

# %%
rows, summaries = [], []
for s, r in results.items():
    restored, summary = reversal_for(r, scales)
    rows.append(restored.assign(seed=s))
    summaries.append(summary.assign(seed=s))
restored = pd.concat(rows)
summary = pd.concat(summaries)
summary_mean = across_seeds(summary, ["method", "scale"], ["restoration_task1", "restoration_heldout",
                                                           "restoration_min", "capability_damage"])

fig, ax = plt.subplots(figsize=(7.5, 4.5))
steer_curves = summary[summary.scale.notna()].assign(
    restoration=lambda d: (d.restoration_task1 + 2 * d.restoration_heldout) / 3)
sns.lineplot(data=steer_curves, x="restoration", y="capability_damage", hue="method", marker="o",
             estimator="mean", errorbar=None, sort=False, units="seed" if len(seeds) > 1 else None, ax=ax)
ablations = summary[summary.scale.isna()].assign(
    restoration=lambda d: (d.restoration_task1 + 2 * d.restoration_heldout) / 3)
sns.scatterplot(data=ablations, x="restoration", y="capability_damage", style="method", color="k", s=60, ax=ax)
ax.axvline(restoration_target, color="0.5", ls=":", lw=1)
ax.axhline(0, color="0.5", lw=0.6)
ax.set_xlabel("restoration of aligned behaviour (mean over tasks; 1 = base model)")
ax.set_ylabel("capability damage (Δ content KL, nats)")
ax.set_title("Reversal curves: steering scale increases along each line")
fig.tight_layout()
save_figure(fig, out, "reversal_curves")
plt.show()

reversal_per_seed, reversal_stats = reversal_over_seeds(summary, restoration_target)
best = {m: {k: (None if pd.isna(reversal_stats.loc[m, f"{k}_mean"]) else float(reversal_stats.loc[m, f"{k}_mean"]))
            for k in ("scale", "restoration_heldout", "restoration_task1", "capability_damage")}
        for m in reversal_stats.index}
damage_at_target = {m: float(v) for m, v in reversal_stats["damage_at_target_mean"].dropna().items()}
damage_sd = reversal_stats["damage_at_target_sd"].to_dict()
display(reversal_stats.round(4))
display(Markdown("Signed capability change at mean restoration " f"{restoration_target:g} (interpolated along each "
                 "curve, mean ± sd over seeds): " + ", ".join(f"{m} {v:+.4f} ± {damage_sd[m]:.4f}"
                                                              for m, v in damage_at_target.items())))

# %% [markdown]
# ## 4. Specificity as a pre-deployment diagnostic
#
# For each configuration, *before* fine-tuning, steer the base model from aligned to misaligned with
# the belief-state vector (scale 1) and measure specificity as in study 02: spillover (KL of the task
# content) over intended shift (KL of the answer variant). Then fine-tune and measure EM breadth.
# Does a less specific persona representation predict broader EM?

# %% [markdown]
# The configurations are the coupling sweep above: if specificity predicts EM anywhere, it should be
# across the knob that the proposal says carries it. The correlation pooled over both designs mixes
# the design effect with the coupling effect, so it is shown within each design too.

# %%
diagnostic = sweep
diag_stats = across_seeds(diagnostic, ["process"], ["specificity_ratio", "breadth", "task1_increase",
                                                    "heldout_increase"])
display(diag_stats.round(4))
correlation = spearman_with_ci(diagnostic.specificity_ratio, diagnostic.breadth, n_boot=n_boot, seed=analysis_seed)
within = {d: spearman_with_ci(g.specificity_ratio, g.breadth, n_boot=n_boot, seed=analysis_seed)
          for d, g in diagnostic.groupby("design")}
display(pd.DataFrame({"pooled": correlation, **within}).T.round(3))
fig, ax = plt.subplots(figsize=(7, 4.2))
sns.scatterplot(data=diagnostic, x="specificity_ratio", y="breadth", hue="process", style="process", s=60, ax=ax)
ax.set_xscale("log")
ax.set_xlabel("persona-steering spillover ratio before fine-tuning (log; lower = more specific)")
ax.set_ylabel("EM breadth after fine-tuning (held-out / task-1 increase)")
ax.set_title(f"Spearman ρ = {correlation['spearman_rho']:.2f} "
             f"[{correlation['ci_low']:.2f}, {correlation['ci_high']:.2f}], n = {correlation['n']}")
ax.legend(fontsize=6)
fig.tight_layout()
save_figure(fig, out, "diagnostic_scatter")
plt.show()

# %% [markdown]
# ## Conclusion

# %%
bs, dim = best["belief_state"], best["diff_in_means"]
breadth_ci = mean_t_ci(em_table.breadth)
shared_c, specific_c = contrasts["shared"], contrasts["specific"]
rsd = lambda method, measure: float(np.nan_to_num(reversal_stats.loc[method, f"{measure}_sd"]))  # noqa: E731
ranked = sorted(damage_at_target, key=lambda m: damage_at_target[m])
best_keeper = ranked[0]
keeper_separated = bool(len(ranked) > 1 and damage_at_target[ranked[0]] + damage_sd[ranked[0]]
                        < damage_at_target[ranked[1]] - damage_sd[ranked[1]])


display(Markdown(
    f"- **EM appears, but the coupling does not carry it.** In `{process}` fine-tuning on task 1 in the misaligned "
    f"world raises the misaligned share on task 1 by {em_mean['task1_increase']:.3f} and on held-out tasks by "
    f"{em_mean['heldout_increase']:.3f}: breadth {breadth_ci[0]:.2f} [{breadth_ci[1]:.2f}, {breadth_ci[2]:.2f}] "
    f"(t 95% CI, {len(seeds)} seeds). The control that could produce this without the phenomenon is the factored "
    f"twin: with shared answer tokens, {describe_contrast(shared_c)}; with task-specific answer tokens, "
    f"{describe_contrast(specific_c)}. "
    + ("The contrast's CI contains 0 in both designs: breadth is set by whether answer tokens are shared, not by the "
       "persona–capability coupling, so this organism does **not** test the proposal's mechanism."
       if all(c["ci_low"] <= 0 <= c["ci_high"] for c in contrasts.values()) else
       "The coupling contrast is reported above with its CI; read it before the absolute breadth.") + "\n"
    f"- **Search.** {n_configs_tried} configurations tried ({len(tried)} trainings, sweep + `search_processes`); "
    f"{int(twins.meets_target.sum())} of {len(twins)} coupled/factored pairs reach coupled breadth ≥ 0.5 with the "
    f"factored twin ≤ 0.2" + (": **none**. Not re-tuned further; a design in which a sequence shows several tasks "
                              "(so that the persona is a latent the network must carry across tasks) is the "
                              "natural next organism." if not twins.meets_target.any() else
                              f": {', '.join(twins[twins.meets_target].config)} (seed 0 only unless listed in "
                              "the sweep: confirm with more seeds).") + "\n"
    f"- **Reversal** (on `{process}`; mean ± sd over {len(seeds)} seeds). Belief-state steering reaches ≥ "
    f"{restoration_target:.0%} restoration on every task at scale {bs['scale']:.2f} ± {rsd('belief_state', 'scale'):.2f} "
    f"(held-out {bs['restoration_heldout']:.2f} ± {rsd('belief_state', 'restoration_heldout'):.2f}, task 1 "
    f"{bs['restoration_task1']:.2f} ± {rsd('belief_state', 'restoration_task1'):.2f}, signed capability change "
    f"{bs['capability_damage']:+.4f} ± {rsd('belief_state', 'capability_damage'):.4f} nats); difference-in-means at "
    f"scale {dim['scale']:.2f} ± {rsd('diff_in_means', 'scale'):.2f} (held-out {dim['restoration_heldout']:.2f} ± "
    f"{rsd('diff_in_means', 'restoration_heldout'):.2f}, {dim['capability_damage']:+.4f} ± "
    f"{rsd('diff_in_means', 'capability_damage'):.4f}). At equal restoration "
    f"({restoration_target:g}) the signed capability change is "
    + ", ".join(f"{m} {v:+.4f} ± {damage_sd[m]:.4f}" for m, v in damage_at_target.items())
    + f" nats (mean ± sd over {len(seeds)} seeds; negative = the steering also undoes part of the fine-tune's capability cost); **{best_keeper}** "
    f"leaves the lowest capability error ({'more' if keeper_separated else 'not more'} than one sd below the next, "
    f"{ranked[1] if len(ranked) > 1 else '-'}). Ablation of either direction restores little (held-out "
    f"{best['ablation_belief_state']['restoration_heldout']:.2f} / "
    f"{best['ablation_diff_in_means']['restoration_heldout']:.2f}; sd "
    f"{rsd('ablation_belief_state', 'restoration_heldout'):.2f} / {rsd('ablation_diff_in_means', 'restoration_heldout'):.2f}).\n"
    f"- **Diagnostic** over the coupling sweep ({diagnostic.process.nunique()} configurations × "
    f"{len(coupling_seeds)} seeds): Spearman ρ(specificity ratio, breadth) = {correlation['spearman_rho']:.2f} "
    f"[{correlation['ci_low']:.2f}, {correlation['ci_high']:.2f}], p = {correlation['p']:.3g} pooled; within designs "
    + ", ".join(f"{d} {w['spearman_rho']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]" for d, w in within.items())
    + ". The pooled value mixes the design effect (task-specific tokens change both specificity and breadth) with "
    "the within-design relation. The hypothesis is a *positive* ρ (a larger spillover ratio, i.e. a less specific "
    "persona representation, predicting broader EM). Within designs: "
    + "; ".join(f"{d}: " + ("CI excludes 0, " + ("in the hypothesised direction" if w["spearman_rho"] > 0 else
                                                  "**opposite** to the hypothesis (more specific, broader)")
                            if (w["ci_low"] > 0 or w["ci_high"] < 0) else "CI contains 0, no prediction")
                for d, w in within.items()) + "."
))

# %% [markdown]
# ## Metrics

# %%
metrics = {
    "process": process,
    "seeds": seeds,
    "em": {k: float(em_mean[k]) for k in ("task1_increase", "heldout_increase", "breadth")},
    "em_sd": {k: float(em_table[k].std(ddof=1)) if len(em_table) > 1 else 0.0
              for k in ("task1_increase", "heldout_increase", "breadth")},
    "em_ci": {"breadth_ci_low": breadth_ci[1], "breadth_ci_high": breadth_ci[2], "method": "Student t over seeds"},
    "coupling_test": {
        **{f"design_{d}": cur for d, cur in curves.items()},
        "contrast": {**contrasts["shared"], "n_configs_tried": n_configs_tried},
        "contrast_by_design": contrasts,
        "n_configs_tried": n_configs_tried,
        "n_trainings": int(len(tried)),
        "pairs_meeting_target": int(twins.meets_target.sum()),
        "twins": twins.to_dict("records"),
    },
    "reversal": {m: {"best": best[m], "damage_at_target": damage_at_target.get(m),
                     "damage_at_target_sd": damage_sd.get(m),
                     "restoration_heldout_sd": reversal_stats.loc[m, "restoration_heldout_sd"]} for m in best},
    "diagnostic": {"n_configs": int(diagnostic.process.nunique()), "n_points": correlation["n"],
                   "within_design": within,
                   "spearman_rho": correlation["spearman_rho"], "ci_low": correlation["ci_low"],
                   "ci_high": correlation["ci_high"], "p": correlation["p"],
                   "points": diag_stats[["process", "specificity_ratio_mean", "specificity_ratio_sd", "breadth_mean",
                                         "breadth_sd"]].to_dict("records")},
}
# ablations have no scale, a CI from a handful of points can be undefined: written as null
write_metrics(undefined_as_none(metrics), out)
display(Markdown(f"Report computed in {time.perf_counter() - started:.0f} s (cached models reused)."))

# %%
# NBVAL_CHECK_OUTPUT
print(f"breadth > 0.5: {metrics['em']['breadth'] > 0.5}")
print(f"belief-state steering restores >= 0.9 on held-out tasks: {best['belief_state']['restoration_heldout'] >= 0.9}")
print("methods:", sorted(metrics["reversal"]))
print("diagnostic configs:", metrics["diagnostic"]["n_configs"])
print("coupling values:", metrics["coupling_test"]["design_shared"]["values"])
print("configs tried:", metrics["coupling_test"]["n_configs_tried"])
