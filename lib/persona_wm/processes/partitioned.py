"""Partitioned processes and SFPs (numpy only), each registered as a family; and the wrapper families.

Atoms: ``pp_z1r`` (eq. 8), ``pp_mess3`` (Mess3 (+) Mess3'), ``semi_factored`` (study 02's SFP).

Wrappers, whose knob is another process's name (a string literal, so its ``_x_`` does not split the
outer name; printed canonically):

* ``restricted(process='em()',sectors=('(mis,t0b)',))`` — the process started inside some of its
  sectors (:func:`persona_wm.core.sfp.restrict_to_sector`);
* ``leaky(process='pp_z1r_x_pp_z1r',epsilon=0.05)`` — every transition leaks mass ``epsilon`` to all
  states (:func:`persona_wm.core.sfp.leaky`);
* ``sfp(factors=('pp_z1r','pp_z1r'),correlation=0.5)`` — the factors' product with a correlated sector
  prior (:func:`persona_wm.core.sfp.semi_factored_process`; optional ``weights``).

These are the names the core functions print, so whatever they return can be rebuilt by name.
"""

from __future__ import annotations

import numpy as np

from persona_wm.core.ghmm import GHMM
from persona_wm.core.registry import ProcessName, family, get_process
from persona_wm.core.sfp import (
    correlated_sector_prior,
    leaky,
    restrict_to_sector,
    semi_factored_process,
    sfp_from_blocks,
)
from persona_wm.processes.classic import mess3

__all__ = ["pp_z1r", "pp_mess3", "semi_factored_z1r", "restricted", "leaky_process", "sfp"]


def _sector_mixture(sector_stationaries: list[np.ndarray], weights: np.ndarray, sectors) -> np.ndarray:
    """Initial vector of a non-ergodic process: weight w_i on sector i, spread as its own stationary vector."""
    n_states = sum(len(s) for s in sectors)
    initial = np.zeros(n_states)
    for w, sector, pi in zip(weights, sectors, sector_stationaries):
        initial[list(sector)] = w * pi
    return initial


@family("pp_z1r")
def pp_z1r() -> GHMM:
    """The partition-preserving Z1R-like process of eq. (8), with partition span{S0} (+) span{S1, SR}.

    S0 emits 0 forever; S1 emits 1 -> SR and SR emits a fair coin -> S1. The process is
    non-ergodic, so its stationary vector is not unique: following the foundation issue, each
    sector gets weight 1/2 and its own stationary vector inside it, i.e. [1/2, 1/4, 1/4].
    """
    transfer = np.array(
        [
            [[1, 0, 0], [0, 0, 0], [0, 0.5, 0]],  # T'_0
            [[0, 0, 0], [0, 0, 1], [0, 0.5, 0]],  # T'_1
        ],
        dtype=np.float64,
    )
    sectors = ((0,), (1, 2))
    initial = _sector_mixture([np.ones(1), np.full(2, 0.5)], np.array([0.5, 0.5]), sectors)
    return GHMM(transfer, initial, name="pp_z1r", partition=sectors, partition_labels=("S0", "S1SR"))


@family("pp_mess3")
def pp_mess3(first: tuple[float, float] = (0.15, 0.6), second: tuple[float, float] = (0.05, 0.85)) -> GHMM:
    """Two Mess3 sectors with different (x, alpha) on a shared alphabet: Mess3 (+) Mess3'.

    A partition-preserving process whose sector is *not* revealed after a few tokens (unlike
    eq. 8, where one token 1 identifies it), so correlations between factors' sectors survive
    long contexts. Used to show factor correlation that persists over the context.
    """
    a, b = mess3(*first), mess3(*second)
    transfer = np.zeros((3, 6, 6))
    transfer[:, :3, :3] = a.transfer
    transfer[:, 3:, 3:] = b.transfer
    sectors = ((0, 1, 2), (3, 4, 5))
    initial = _sector_mixture([a.initial, b.initial], np.array([0.5, 0.5]), sectors)
    return GHMM(transfer, initial, name="pp_mess3", partition=sectors, partition_labels=("M", "M'"))


@family("semi_factored")
def semi_factored_z1r(correlation: float = 0.5) -> GHMM:
    """The semi-factored process of study 02: two eq.-8 factors whose blocks are *not* all products.

    Factor A ("persona") and factor B ("capability") are copies of :func:`pp_z1r`, giving the four
    sectors P_ij = A_i (x) B_j (i, j = 0 for span{S0}, 1 for span{S1, SR}). Inside P_0j the block
    is the plain product T_A(a) (x) T_B(b); inside P_1j factor B's *token meaning is flipped*
    (it emits 1 - b), the analogue of the misaligned persona turning the task's output into its
    "bad" variant. Every T(x) stays block diagonal over the sectors (partition preserving), but
    what factor B's tokens mean depends on factor A's sector, so the factors are entangled in one
    direction only: moving A across its partition changes B's predictions, moving B does not
    change A's. The sector prior has correlation ``correlation`` (see
    :func:`persona_wm.core.sfp.correlated_sector_prior`). The seed leaves its semi-factored process
    unspecified beyond "partition-preserving Z1R, factors share partition structure but are not
    fully independent"; this is our concrete, documented choice.
    """
    factor = pp_z1r()
    flipped = factor.transfer[::-1]  # token b of the flipped factor is token 1 - b of the original
    subspaces = factor.partition
    prior = correlated_sector_prior(2, 2, correlation)
    blocks, initials, weights = {}, {}, {}
    for i, sector_a in enumerate(subspaces):
        for j, sector_b in enumerate(subspaces):
            t_b = flipped if i == 1 else factor.transfer
            blocks[(i, j)] = np.stack([
                np.kron(factor.transfer[a][np.ix_(sector_a, sector_a)], t_b[b][np.ix_(sector_b, sector_b)])
                for a in range(2) for b in range(2)
            ])
            initials[(i, j)] = np.kron(factor.initial[list(sector_a)], factor.initial[list(sector_b)])
            weights[(i, j)] = prior[i, j]
    return sfp_from_blocks(
        (3, 3), (subspaces, subspaces), blocks, weights, initials, name="semi_factored",
        factor_tokens=(2, 2), subspace_names=(("0", "1"), ("0", "1")),
    )


# --------------------------------------------------------------------------- wrappers of other processes
@family("restricted")
def restricted(process: ProcessName, sectors: tuple[str, ...]) -> GHMM:
    """``process`` started inside ``sectors`` (labels such as ``'(mis,t0b)'``), their prior weights kept."""
    return restrict_to_sector(get_process(process), sectors)


@family("leaky")
def leaky_process(process: ProcessName, epsilon: float) -> GHMM:
    """``process`` with leak ``epsilon``: T_eps(x) = T(x) [(1 - eps) I + eps U] (no longer partition preserving)."""
    return leaky(get_process(process), epsilon)


@family("sfp")
def sfp(factors: tuple[ProcessName, ...], correlation: float = 0.0, weights: tuple[float, ...] | None = None) -> GHMM:
    """The product of partitioned ``factors`` with the correlated sector prior (correlation c, subspace ``weights``)."""
    return semi_factored_process([get_process(f) for f in factors], correlation, weights)
