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
# # Study 01 — Semi-Factored Processes: definition and exact ground truth
#
# **Question.** What exactly is a Semi-Factored Process (SFP), how does it sit between a fully
# factored process (independent factors) and a non-ergodic one (a hidden, persistent sector), and
# what are the exact quantities — belief states, Bayes-optimal cross-entropies, factor
# correlations — that every later study compares trained transformers against?
#
# This is the reference report of the `lib` core (appendix B of the proposal, seed 000): every
# number below is computed exactly from the transfer matrices (or, where the expectation over
# prefixes is too large to enumerate, estimated from sampled prefixes with exact beliefs and a
# stated standard error).
#
# The arc: GHMM notation → the Mess3 belief fractal → factored processes (beliefs factorise) →
# non-ergodic processes (eq. 8) → SFP definition and block structure (eqs. 4–7) → factor
# correlation (eq. 9) as a function of the sector-prior knob → a table of optimal cross-entropies.
# Each section is a call into `persona_wm.studies.sfp_definition`; the notebook shows and narrates the result.

# %% tags=["parameters"]
context_length: int = 10  # >= 1; <= 100
n_simplex_sequences: int = 3000  # >= 1; <= 500_000
simplex_length: int = 8  # >= 1; <= 100
n_mi_sequences: int = 2000  # >= 1; <= 500_000
correlations: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]  # non-empty; each in [0, 1]
leak_epsilon: float = 0.01  # in [0, 1]
seed: int = 0  # >= 0
output_dir: str | None = None

# %%
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from IPython.display import Markdown, display

from persona_wm.io.outputs import save_figure, write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.plots.toy import plot_mutual_information, plot_simplex, plot_transfer_blocks, set_style
from persona_wm.processes import get_process, pp_z1r
from persona_wm.studies import sfp_definition as study

set_style()
out = resolve_output_dir(output_dir, "01_sfp_definition")
rng = np.random.default_rng(seed)  # one generator, drawn from section by section in this order

# %% [markdown]
# ## 1. GHMM notation
#
# A GHMM is a set of transfer matrices $T(x)$, one per token, with net operator
# $T=\sum_x T(x)$ (eq. 1), right eigenvector $T|1\rangle\rangle=|1\rangle\rangle$ and an initial
# row vector $\langle\langle\eta(\emptyset)|$. Word probabilities are
# $\Pr(w)=\langle\langle\eta(\emptyset)|T(w)|1\rangle\rangle$ (eq. 2) and the belief after $w$ is the
# normalised row vector $\langle\langle\eta(\emptyset)|T(w)/\Pr(w)$ (eq. 3). For an HMM,
# $T(x)_{s s'}=\Pr(s',x\mid s)$. Z1R (zero, one, random) is the smallest interesting example:

# %%
z1r = get_process("z1r")
display(study.transfer_table(z1r, study.Z1R_STATES))
word_mass = study.word_mass(z1r, (1, 5, 10))
display(Markdown(f"Initial vector (stationary): {np.round(z1r.initial, 4).tolist()}. "
                 f"Total probability of all words: " + ", ".join(f"L={L}: {m:.12f}" for L, m in word_mass.items())
                 + " — eq. 2 defines a distribution at every length."))

# %% [markdown]
# ## 2. Beliefs: the Mess3 fractal
#
# Mess3$(x=0.15,\alpha=0.6)$ has 3 states and 3 tokens, yet its beliefs after all possible
# prefixes fill a fractal inside the 2-simplex: every token applies one of three contracting maps.
# A transformer trained on Mess3 linearly embeds this fractal in its residual stream, which is
# why belief states (not hidden states) are the natural coordinates for steering.

# %%
mess3 = get_process("mess3")
cloud = study.belief_cloud(mess3, n_simplex_sequences, simplex_length, rng)
fig, ax = plt.subplots(figsize=(5.2, 4.8))
plot_simplex(cloud.points, ax, hue=np.array(["A", "B", "C"])[cloud.last_token], hue_name="last token",
             vertex_labels=("state 0", "state 1", "state 2"),
             title=f"Mess3 beliefs after 1..{simplex_length} tokens ({len(cloud.points)} prefixes)", palette="Set2")
save_figure(fig, out, "mess3_belief_simplex")
plt.show()

# %% [markdown]
# ## 3. Factored processes: beliefs factorise
#
# In a Kronecker product the joint token is $v=v_1|V_2|+v_2$, the joint state is the pair of the
# factors' states and $T(v)=T_1(v_1)\otimes T_2(v_2)$. With a product initial vector (the product of
# the factors' stationary vectors — the joint operator of Z1R × Z1R has a three-fold eigenvalue 1, so
# "the" joint stationary vector does not exist), the belief after any prefix is the product of the
# factors' beliefs: $\rho_{AB}=\rho_A\otimes\rho_B$.

# %%
m3x2 = get_process("mess3_x_mess3")
factored = study.factorised_beliefs(m3x2, n_simplex_sequences, simplex_length, rng)
product_gap = factored.product_gap
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
plot_simplex(factored.factor_a, axes[0], hue=factored.factor_b.argmax(-1), hue_name="factor B most likely state",
             title="factor A marginal belief", palette="Set1", size=4)
plot_simplex(factored.factor_b, axes[1], hue=factored.factor_a.argmax(-1), hue_name="factor A most likely state",
             title="factor B marginal belief", palette="Set1", size=4)
fig.suptitle(f"Mess3 × Mess3 after {simplex_length} tokens: each factor draws its own fractal")
fig.tight_layout()
save_figure(fig, out, "product_factor_beliefs")
plt.show()
display(Markdown(f"Largest deviation $|\\rho_{{AB}}-\\rho_A\\otimes\\rho_B|$ over {factored.joint.shape[0]} prefixes × "
                 f"{factored.joint.shape[1]} positions: **{product_gap:.1e}** (float round-off). The colours "
                 "(the other factor's state) are mixed everywhere: factor A's belief says nothing about factor B."))

# %% [markdown]
# ## 4. Non-ergodic processes: the partition-preserving Z1R of eq. 8
#
# Eq. 8 splits Z1R's states into span{S0} ⊕ span{S1, SR}: S0 emits 0 forever, while S1 and SR
# alternate. No transition crosses the split, so the process never leaves the sector it starts in
# and its stationary vector is not unique. We use weight 1/2 per sector with the sector's own
# stationary vector inside, $\eta=(1/2, 1/4, 1/4)$. S1 always emits `1`, so the first `1` (or the
# first `00`) reveals the sector for good — at most two tokens:

# %%
ppz = pp_z1r()
display(study.transfer_table(ppz, study.Z1R_STATES, symbol="T'"))
example = np.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
display(study.prefix_beliefs(ppz, example, state=0, label="Pr(sector S0)"))

# %% [markdown]
# ## 5. Semi-Factored Processes (eqs. 4–7)
#
# Take two factors, each split into subspaces: $A=A_1\oplus A_2$, $B=B_1\oplus B_2$. Then
# $A\otimes B$ splits into four sectors $V_\sigma=A_{\sigma(1)}\otimes B_{\sigma(2)}$, and an SFP is any
# GHMM whose every $T(x)$ maps each sector into itself — block diagonal over the sectors, with
# arbitrary dynamics inside a block. Two copies of eq. 8 give the canonical 2 × 2 example
# (states re-ordered sector by sector; red lines are sector boundaries):

# %%
pp2 = get_process("pp_z1r_x_pp_z1r")
fig = plot_transfer_blocks(pp2, token_labels=["00", "01", "10", "11"])
fig.suptitle("pp-Z1R ⊗ pp-Z1R: every T(x) is block diagonal over the four sectors (state label = s_A s_B)", y=1.02)
save_figure(fig, out, "sfp_block_structure")
plt.show()

partition = study.partition_check(pp2, leak_epsilon)
verdict, perturbed_verdict = partition.verdict, partition.perturbed
display(Markdown(f"- `is_partition_preserving(pp_z1r ⊗ pp_z1r)`: **{verdict.preserving}** — {verdict}\n"
                 f"- after mixing ε = {leak_epsilon} of each transition uniformly over all states: "
                 f"**{perturbed_verdict.preserving}** — {len(perturbed_verdict.leaks)} leaking (token, sector → sector) "
                 f"blocks, largest off-block fraction of a state's outgoing mass {perturbed_verdict.leak_mass:.4f}"))

# %% [markdown]
# ## 6. Factor correlation: the sector-prior knob
#
# A fully factored prior makes the factors independent. An SFP couples them through the prior over
# sectors: $\pi_c(\sigma)=(1-c)\prod_f w(\sigma_f)+c\,w(i)[\sigma=(i,i)]$, which keeps each factor's
# sector marginal fixed and only moves the coupling (c = 0: factored; c = 1: factor A's sector
# determines factor B's, as the misaligned persona determines insecure code). The correlation of a
# belief is the mutual information of its joint distribution, $I(A;B)=H(\rho_A)+H(\rho_B)-H(\rho_{AB})$
# (eq. 9), here averaged over prefixes at each position.
#
# Two SFPs show two behaviours. With pp-Z1R factors at most two tokens reveal a factor's sector, after
# which the factors are independent again (inside a sector the dynamics is a product), so the
# correlation is *transient*. With Mess3 ⊕ Mess3′ factors (two Mess3 sectors with different
# parameters, `pp_mess3`) the sector stays ambiguous for many tokens and the correlation
# *persists* through the context — the regime where persona and capability stay entangled.

# %%
mi = study.mutual_information_sweep(correlations, n_mi_sequences, context_length, rng, reference=m3x2)
fig = plot_mutual_information(mi.table, mi.reference, reference_label="mess3 × mess3 (fully factored)")
save_figure(fig, out, "mutual_information_by_position")
plt.show()
display(mi.final[["correlation c", "MI (nats)", "stderr"]].reset_index(drop=True))

# %% [markdown]
# ## 7. Bayes-optimal cross-entropy per position
#
# $H(X_t\mid X_{1:t-1})$ in nats, exactly: the merged mixed-state tree for single processes, and
# the sum of the factors' values for Kronecker products (which the tests check against enumeration).
# Position 1 predicts the first token from the initial vector. These are the floors the trained
# transformers of study 02 are measured against.

# %%
ce = study.optimal_ce_table(study.CE_PROCESSES, context_length)
display(ce.T.round(4).assign(mean=ce.mean().round(5)))

fig, ax = plt.subplots(figsize=(6.5, 3.8))
sns.lineplot(data=ce.reset_index().melt(id_vars="position", var_name="process", value_name="CE (nats)"),
             x="position", y="CE (nats)", hue="process", marker="o", ax=ax)
ax.set_xlabel("position t (tokens predicted)")
ax.set_ylabel("Bayes-optimal cross-entropy H(X_t | X_<t) (nats)")
fig.tight_layout()
save_figure(fig, out, "optimal_cross_entropy")
plt.show()

# %% [markdown]
# ## Conclusion

# %%
mi_by_c, monotone = mi.by_correlation, mi.monotone
display(Markdown(
    f"- The GHMM core is exact: word probabilities sum to 1 at every length, and for products the joint "
    f"belief equals the product of the factors' beliefs to {product_gap:.0e}.\n"
    f"- The 2 × 2 SFP pp-Z1R ⊗ pp-Z1R is partition preserving ({verdict.preserving}); leaking ε = {leak_epsilon} "
    f"of each transition breaks it ({perturbed_verdict.preserving}), and the checker names every leaking block.\n"
    f"- The sector-prior knob controls factor correlation: with persistent (Mess3-type) sectors the mean MI at "
    f"position {context_length} rises from {mi_by_c.iloc[0]:.3f} nats at c = {mi_by_c.index[0]:g} to "
    f"{mi_by_c.iloc[-1]:.3f} nats at c = {mi_by_c.index[-1]:g} (monotone: {monotone}); with eq.-8 sectors the same "
    f"knob gives correlation that vanishes once the first tokens reveal the sectors.\n"
    f"- Mean Bayes-optimal CE over positions 1–{context_length}: "
    + ", ".join(f"{k} {v:.4f}" for k, v in ce.mean().items()) + " nats."
))

# %% [markdown]
# ## Metrics
#
# `metrics.json` is written from one result object that holds the sections' results (cross-entropy
# table, partition check, mutual-information sweep), so every number in it is one the sections above showed.

# %%
result = study.SFPDefinitionResult(context_length, optimal_ce=ce, partition=partition, mutual_information=mi)
write_metrics(result.metrics(), out)

# %%
# NBVAL_CHECK_OUTPUT
metrics = result.metrics()
for name, value in metrics["optimal_ce"].items():
    print(f"optimal_ce.{name} = {value:.6f}")
print("partition_preserving:", verdict.preserving, perturbed_verdict.preserving)
print("MI by correlation:", [f"{r['mi']:.4f}" for r in metrics["mutual_information"]["by_correlation"]])
print("monotone:", monotone)
