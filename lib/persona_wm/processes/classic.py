"""Classic processes: Zero-One-Random and Mess3 (numpy only); each registers itself as a family.

Names: ``z1r``; ``mess3`` (x=0.15, alpha=0.6), ``mess3(x=0.1,alpha=0.5)``. Products such as
``get_process("mess3_x_mess3")`` are the fully factored Mess3 x Mess3 of appendix A, with joint
token v = v1 |V2| + v2 and initial vector the Kronecker product of the factors' initial vectors
(never "the" stationary vector of the joint, which is not unique for products of periodic
processes such as Z1R x Z1R).
"""

from __future__ import annotations

import numpy as np

from persona_wm.core.ghmm import GHMM, ProcessError, check_number, stationary_distribution
from persona_wm.core.registry import family

__all__ = ["z1r", "mess3"]


@family("z1r")
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


@family("mess3")
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
    return GHMM(transfer, stationary_distribution(transfer.sum(0)), name="mess3")
