"""Named processes (Z1R, Mess3, the partition-preserving Z1R of eq. 8, ...) and a registry.

Processes are plain tensors ``T[x, s, s']`` wrapped in :class:`persona_wm.core.ghmm.GHMM`. Names compose with
``_x_`` into Kronecker products, so ``get_process("mess3_x_mess3")`` is the fully factored
Mess3 x Mess3 process of appendix A, with joint token v = v1 |V2| + v2 and initial vector the
Kronecker product of the factors' initial vectors (never "the" stationary vector of the joint,
which is not unique for products of periodic processes such as Z1R x Z1R).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from persona_wm.core.ghmm import GHMM, ProcessError, check_number, stationary_distribution
from persona_wm.core.sfp import PRODUCT_SEPARATOR, correlated_sector_prior, product, sfp_from_blocks
from persona_wm.processes.em import em_process, parse_em_name

__all__ = ["z1r", "mess3", "pp_z1r", "pp_mess3", "semi_factored_z1r", "product", "get_process", "REGISTRY", "PRODUCT_SEPARATOR"]

def z1r() -> GHMM:
    """Zero-One-Random: S0 emits 0 -> S1, S1 emits 1 -> SR, SR emits a fair coin -> S0.

    Periodic with period 3, so its stationary vector (uniform) is unique but a product of two
    copies has a three-fold degenerate eigenvalue 1.
    """
    transfer = np.zeros((2, 3, 3))
    transfer[0, 0, 1] = 1.0  # S0 --0--> S1
    transfer[1, 1, 2] = 1.0  # S1 --1--> SR
    transfer[0, 2, 0] = 0.5  # SR --0--> S0
    transfer[1, 2, 0] = 0.5  # SR --1--> S0
    return GHMM(transfer, stationary_distribution(transfer.sum(0)), name="z1r")


def mess3(x: float = 0.15, alpha: float = 0.6) -> GHMM:
    """Mess3(x, alpha) of Marzen & Crutchfield: 3 states, 3 tokens, a fractal belief simplex.

    With beta = (1 - alpha) / 2 and y = 1 - 2x, token a is emitted from state a with weight
    alpha*y (staying) etc. Stationary distribution is uniform by symmetry.
    """
    check_number(x, "x", owner="mess3")
    check_number(alpha, "alpha", owner="mess3")
    if not (0 < x < 0.5 and 0 < alpha < 1):
        raise ProcessError(f"mess3 needs 0 < x < 0.5 and 0 < alpha < 1, got x={x}, alpha={alpha}")
    beta, y = (1 - alpha) / 2, 1 - 2 * x
    transfer = np.empty((3, 3, 3))
    for token in range(3):
        for s in range(3):
            for t in range(3):
                weight = alpha if t == token else beta
                transfer[token, s, t] = weight * (y if s == t else x)
    name = "mess3" if (x, alpha) == (0.15, 0.6) else f"mess3({x},{alpha})"
    return GHMM(transfer, stationary_distribution(transfer.sum(0)), name=name)


def _sector_mixture(sector_stationaries: list[np.ndarray], weights: np.ndarray, sectors) -> np.ndarray:
    """Initial vector of a non-ergodic process: weight w_i on sector i, spread as its own stationary vector."""
    n_states = sum(len(s) for s in sectors)
    initial = np.zeros(n_states)
    for w, sector, pi in zip(weights, sectors, sector_stationaries):
        initial[list(sector)] = w * pi
    return initial


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


#: Atomic processes by name; products are written ``a_x_b``.
REGISTRY: dict[str, Callable[[], GHMM]] = {
    "z1r": z1r,
    "mess3": mess3,
    "pp_z1r": pp_z1r,
    "pp_mess3": pp_mess3,
    "semi_factored": semi_factored_z1r,
}


def get_process(name: str) -> GHMM:
    """Build a process from its name: an atom of :data:`REGISTRY`, atoms joined by ``_x_``, or ``em(...)``."""
    if not isinstance(name, str) or not name:
        raise ProcessError(f"process name must be a non-empty string, got {name!r}")
    if name.startswith("em("):  # parametric EM-SFP family of study 03: em(key=value, ...)
        return em_process(parse_em_name(name))
    atoms = name.split(PRODUCT_SEPARATOR)
    unknown = [a for a in atoms if a not in REGISTRY]
    if unknown:
        raise ProcessError(
            f"unknown process {unknown[0]!r} in {name!r}; known processes: {', '.join(sorted(REGISTRY))} "
            f"(join with {PRODUCT_SEPARATOR!r} for products)"
        )
    return product(*(REGISTRY[a]() for a in atoms))
