"""Semi-Factored Processes: sectors, partition preservation, correlated priors, density matrices.

An SFP (appendix B of seed 000) lives on V = (x)_f ((+)_i I_i^(f)) = (+)_sigma V_sigma with
V_sigma = (x)_f I_{sigma(f)}^(f); every T(x) must map each sector V_sigma into itself (eq. 5), i.e.
be block diagonal over the sectors (eq. 7). Inside a block the dynamics may be anything.

States of the joint space are indexed in the tensor-product basis (s = s_1 |I^(2)| + s_2 for two
factors), so a sector is a set of joint indices, generally not contiguous; figures reorder states
into sector order with :func:`sector_order`.

The belief of a two-factor process defines the classical density matrix
rho_AB = sum p(s_A, s_B) |s_A s_B><s_A s_B| (eq. 9); the factors are uncorrelated iff
rho_AB = rho_A (x) rho_B, and the mutual information of p(s_A, s_B) measures how far they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import reduce

import numpy as np

from persona_wm.core.ghmm import GHMM, ProcessError, check_number, entropy, marginals
from persona_wm.core.names import PRODUCT_SEPARATOR, format_term

__all__ = [
    "product",
    "PRODUCT_SEPARATOR",
    "Leak",
    "PartitionVerdict",
    "is_partition_preserving",
    "product_partition",
    "sector_order",
    "correlated_sector_prior",
    "semi_factored_process",
    "sfp_from_blocks",
    "leaky",
    "restrict_to_sector",
    "density_matrix",
    "factor_marginals",
    "product_of_marginals",
    "mutual_information",
    "mutual_information_by_position",
]

Sigma = tuple[int, ...]


# --------------------------------------------------------------------------- partitions
@dataclass(frozen=True)
class Leak:
    """Mass that T(token) moves from one sector to another (a violation of eq. 5)."""

    token: int
    source: str
    target: str
    max_entry: float


@dataclass(frozen=True)
class PartitionVerdict:
    """Outcome of :func:`is_partition_preserving`; truthy iff the partition is preserved.

    ``leak_mass`` quantifies the violation: the largest, over tokens and states, fraction of a
    state's outgoing |mass| that T(x) sends outside the state's sector (0 for an exact SFP).
    """

    preserving: bool
    leaks: tuple[Leak, ...] = field(default_factory=tuple)
    leak_mass: float = 0.0

    def __bool__(self) -> bool:
        return self.preserving

    def __str__(self) -> str:
        if self.preserving:
            return "partition preserved: every T(x) is block diagonal over the sectors"
        shown = ", ".join(f"T({leak.token}): {leak.source}->{leak.target} ({leak.max_entry:.3g})" for leak in self.leaks[:6])
        more = f" and {len(self.leaks) - 6} more" if len(self.leaks) > 6 else ""
        return f"partition violated (leak mass {self.leak_mass:.3g}): {shown}{more}"


def _sector_labels(partition: Sequence[Sequence[int]], labels: Sequence[str] | None) -> list[str]:
    return list(labels) if labels is not None else [f"V{i}" for i in range(len(partition))]


def is_partition_preserving(
    process: GHMM,
    partition: Sequence[Sequence[int]] | None = None,
    labels: Sequence[str] | None = None,
    tol: float = 1e-12,
) -> PartitionVerdict:
    """Check eq. (5): T(x) V_sigma within V_sigma for every token and sector.

    Uses the process's own ``partition`` unless one is given. Lists every (token, source sector,
    target sector) block with an entry larger than ``tol``.
    """
    if partition is None:
        partition, labels = process.partition, labels or process.partition_labels
    if partition is None:
        raise ProcessError(f"process {process.name!r} has no partition to check; pass one explicitly")
    flat = sorted(s for sector in partition for s in sector)
    if flat != list(range(process.n_states)):
        raise ProcessError(f"partition must cover each of the {process.n_states} states of {process.name!r} once")
    names = _sector_labels(partition, labels)
    sector_of = np.empty(process.n_states, dtype=int)
    for i, sector in enumerate(partition):
        sector_of[list(sector)] = i
    off_block = sector_of[:, None] != sector_of[None, :]
    magnitude = np.abs(process.transfer)
    leaks = []
    for x, s_from, s_to in zip(*np.nonzero((magnitude > tol) & off_block[None])):
        leaks.append((int(x), int(sector_of[s_from]), int(sector_of[s_to]), float(magnitude[x, s_from, s_to])))
    merged: dict[tuple[int, int, int], float] = {}
    for x, a, b, value in leaks:
        merged[(x, a, b)] = max(merged.get((x, a, b), 0.0), value)
    row_total = magnitude.sum(axis=(0, 2))
    row_leak = (magnitude * off_block[None]).sum(axis=(0, 2))
    leak_mass = float(np.max(np.where(row_total > 0, row_leak / np.where(row_total > 0, row_total, 1), 0.0)))
    return PartitionVerdict(
        preserving=not merged,
        leaks=tuple(Leak(x, names[a], names[b], v) for (x, a, b), v in sorted(merged.items())),
        leak_mass=leak_mass,
    )


def _joint_index(states: Sequence[int], dims: Sequence[int]) -> int:
    return int(np.ravel_multi_index(tuple(states), tuple(dims)))


def _factor_subspaces(process: GHMM) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """A single factor's subspaces and their labels (one subspace = all states if unpartitioned)."""
    if process.partition is None:
        return (tuple(range(process.n_states)),), ("*",)
    return process.partition, tuple(_sector_labels(process.partition, process.partition_labels))


def _sectors(factor_states: Sequence[int], factor_subspaces: Sequence[Sequence[Sequence[int]]]):
    """Yield (sigma, joint state indices of V_sigma in tensor-product basis order)."""
    for sigma in itertools.product(*(range(len(subs)) for subs in factor_subspaces)):
        blocks = [factor_subspaces[f][i] for f, i in enumerate(sigma)]
        states = tuple(_joint_index(combo, factor_states) for combo in itertools.product(*blocks))
        yield sigma, states


def product_partition(processes: Sequence[GHMM]) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Sectors V_sigma of a Kronecker product from its factors' partitions (eq. 4), with labels."""
    factors = [f for p in processes for f in (p.factors or (p,))]
    subspaces, names = zip(*(_factor_subspaces(f) for f in factors))
    dims = [f.n_states for f in factors]
    partition, labels = [], []
    for sigma, states in _sectors(dims, subspaces):
        partition.append(states)
        labels.append("(" + ",".join(names[f][i] for f, i in enumerate(sigma)) + ")")
    return tuple(partition), tuple(labels)


def sector_order(process: GHMM) -> np.ndarray:
    """Permutation of the states that lists sector by sector, so block diagonality is visible."""
    if process.partition is None:
        return np.arange(process.n_states)
    return np.array([s for sector in process.partition for s in sector])


# --------------------------------------------------------------------------- building SFPs
def product(*processes: GHMM) -> GHMM:
    """Kronecker product of processes: T(v) = T_1(v_1) (x) T_2(v_2) (x) ..., v = v_1 |V_2| + v_2.

    The initial vector is the Kronecker product of the factors' initial vectors; sectors are the
    products of the factors' sectors (one sector per factor if it has no partition).
    """
    if len(processes) == 0:
        raise ProcessError("product() needs at least one process")
    if len(processes) == 1:
        return processes[0]
    transfer = reduce(
        lambda acc, nxt: np.einsum("xab,ycd->xyacbd", acc, nxt).reshape(
            acc.shape[0] * nxt.shape[0], acc.shape[1] * nxt.shape[1], acc.shape[2] * nxt.shape[2]
        ),
        [p.transfer for p in processes],
    )
    initial = reduce(np.kron, [p.initial for p in processes])
    right = reduce(np.kron, [p.right for p in processes])
    partition, labels = product_partition(processes)
    factors = tuple(f for p in processes for f in (p.factors or (p,)))
    return GHMM(
        transfer,
        initial,
        name=PRODUCT_SEPARATOR.join(p.name for p in processes),
        right=right,
        hmm=all(p.hmm for p in processes),
        partition=partition,
        partition_labels=labels,
        factor_states=tuple(f.n_states for f in factors),
        factor_tokens=tuple(f.n_tokens for f in factors),
        factors=factors,
    )


def correlated_sector_prior(
    n_factors: int, n_subspaces: int, correlation: float, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Prior over sectors sigma with a tunable coupling between the factors' subspaces.

    pi_c(sigma) = (1 - c) prod_f w(sigma_f) + c * w(i) [sigma = (i, ..., i)]: at c = 0 the sectors
    are independent (a fully factored prior); at c = 1 every factor sits in the same-index subspace
    (persona determines task). Each factor's marginal is ``w`` for every c, so the knob moves only
    the coupling, and the mutual information between the factors' sectors increases monotonically
    with c (it is convex along the line from the independent joint, where it is zero).
    """
    check_number(correlation, "sector correlation", 0.0, 1.0)
    w = np.full(n_subspaces, 1.0 / n_subspaces) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n_subspaces,) or np.any(w < 0) or abs(w.sum() - 1) > 1e-9:
        raise ProcessError(f"sector weights must be {n_subspaces} non-negative numbers summing to 1, got {weights}")
    independent = np.ones((n_subspaces,) * n_factors)
    for f in range(n_factors):
        independent = independent * w.reshape((1,) * f + (n_subspaces,) + (1,) * (n_factors - f - 1))
    diagonal = np.zeros_like(independent)
    for i in range(n_subspaces):
        diagonal[(i,) * n_factors] = w[i]
    return (1 - correlation) * independent + correlation * diagonal


def _within_sector(initial: np.ndarray, sector: Sequence[int]) -> np.ndarray:
    """A factor's initial vector restricted to one sector and renormalised (its stationary vector there)."""
    part = initial[list(sector)]
    if part.sum() <= 0:
        raise ProcessError(f"initial vector puts no mass on sector {tuple(sector)}; cannot condition on it")
    return part / part.sum()


def semi_factored_process(
    factors: Sequence[GHMM],
    correlation: float = 0.0,
    weights: Sequence[float] | None = None,
    name: str | None = None,
) -> GHMM:
    """SFP whose blocks are Kronecker products of partitioned factor processes, with a correlated prior.

    Dynamics: T(v) = (x)_f T_f(v_f), block diagonal over the sectors because each T_f is. Prior:
    :func:`correlated_sector_prior` over sectors, and inside sector sigma the product of each
    factor's within-sector initial vector. All factors need the same number N of subspaces. With
    ``correlation=0`` and the factors' own sector weights, this is exactly their product.
    Named (unless ``name`` is given) as the registry's ``sfp`` family builds it:
    ``sfp(factors=('pp_z1r','pp_z1r'),correlation=0.5)``.
    """
    if len(factors) < 2:
        raise ProcessError("an SFP needs at least two factors")
    subspaces = [_factor_subspaces(f)[0] for f in factors]
    n_sub = {len(s) for s in subspaces}
    if len(n_sub) != 1:
        raise ProcessError(f"every factor needs the same number of subspaces, got {[len(s) for s in subspaces]}")
    n_subspaces = n_sub.pop()
    joint = product(*factors)
    prior = correlated_sector_prior(len(factors), n_subspaces, correlation, weights)
    initial = np.zeros(joint.n_states)
    for sigma, states in _sectors([f.n_states for f in factors], subspaces):
        within = [_within_sector(f.initial, subspaces[k][i]) for k, (f, i) in enumerate(zip(factors, sigma))]
        inside = within[0]
        for w in within[1:]:
            inside = np.kron(inside, w)
        initial[list(states)] = prior[sigma] * inside
    weights_knob = None if weights is None else tuple(float(w) for w in weights)
    label = name or format_term("sfp", {"factors": tuple(f.name for f in factors), "correlation": correlation,
                                        "weights": weights_knob}, {"correlation": 0.0, "weights": None})
    result = joint.with_initial(initial, name=label)
    if np.allclose(initial, joint.initial, atol=1e-15, rtol=0):
        return replace(result, factors=joint.factors)
    return result


def sfp_from_blocks(
    factor_states: Sequence[int],
    factor_subspaces: Sequence[Sequence[Sequence[int]]],
    blocks: Mapping[Sigma, np.ndarray],
    sector_prior: Mapping[Sigma, float],
    block_initials: Mapping[Sigma, np.ndarray],
    name: str = "sfp",
    factor_tokens: Sequence[int] | None = None,
    subspace_names: Sequence[Sequence[str]] | None = None,
) -> GHMM:
    """General SFP builder: arbitrary dynamics inside each sector block (eq. 7).

    ``blocks[sigma]`` is ``[n_tokens, d_sigma, d_sigma]`` over the states of V_sigma listed in
    tensor-product basis order (lexicographic in the factors' state indices), so a block that is
    a Kronecker product of factor pieces drops in unchanged. ``block_initials[sigma]`` is the
    within-sector initial vector and ``sector_prior[sigma]`` its weight. Sectors missing from
    ``blocks`` are an error: every sector needs dynamics, even if it has prior weight 0.
    """
    factor_states = tuple(int(d) for d in factor_states)
    n_states = int(np.prod(factor_states))
    sectors = list(_sectors(factor_states, factor_subspaces))
    missing = [sigma for sigma, _ in sectors if sigma not in blocks]
    if missing:
        raise ProcessError(f"sfp_from_blocks: no block given for sector(s) {missing}")
    n_tokens = {np.asarray(b).shape[0] for b in blocks.values()}
    if len(n_tokens) != 1:
        raise ProcessError(f"sfp_from_blocks: blocks disagree on the number of tokens: {sorted(n_tokens)}")
    transfer = np.zeros((n_tokens.pop(), n_states, n_states))
    initial = np.zeros(n_states)
    prior_total = 0.0
    for sigma, states in sectors:
        block = np.asarray(blocks[sigma], dtype=np.float64)
        if block.shape[1:] != (len(states), len(states)):
            raise ProcessError(
                f"sfp_from_blocks: block {sigma} has shape {block.shape[1:]}, sector has {len(states)} states"
            )
        idx = np.array(states)
        transfer[:, idx[:, None], idx[None, :]] = block
        weight = float(sector_prior.get(sigma, 0.0))
        prior_total += weight
        if weight > 0:
            inside = np.asarray(block_initials[sigma], dtype=np.float64)
            initial[idx] = weight * inside / inside.sum()
    if abs(prior_total - 1.0) > 1e-9:
        raise ProcessError(f"sfp_from_blocks: sector prior sums to {prior_total:.6g}, expected 1")
    names = subspace_names or [[f"{f}{i}" for i in range(len(subs))] for f, subs in enumerate(factor_subspaces)]
    return GHMM(
        transfer,
        initial,
        name=name,
        partition=tuple(states for _, states in sectors),
        partition_labels=tuple(
            "(" + ",".join(names[f][i] for f, i in enumerate(sigma)) + ")" for sigma, _ in sectors
        ),
        factor_states=factor_states,
        factor_tokens=tuple(factor_tokens) if factor_tokens is not None else None,
    )


def restrict_to_sector(process: GHMM, label: str | Sequence[str]) -> GHMM:
    """The same process started inside one sector (or a set of sectors), prior restricted and renormalised.

    Because an SFP never leaves a sector, this samples "sequences of that sector" (e.g. task 1 in
    the misaligned persona, the narrow fine-tuning data of study 03). A set of sectors keeps their
    relative prior weights. Named as the registry's ``restricted`` family builds it:
    ``restricted(process='em()',sectors=('(mis,t0b)',))``.
    """
    labels = process.partition_labels or ()
    wanted = [label] if isinstance(label, str) else list(label)
    unknown = [w for w in wanted if w not in labels]
    if unknown:
        raise ProcessError(f"unknown sector {unknown[0]!r} of {process.name!r}; sectors: {labels}")
    states = [s for w in wanted for s in process.partition[labels.index(w)]]
    initial = np.zeros(process.n_states)
    initial[states] = process.initial[states]
    if initial.sum() <= 0:
        initial[states] = 1.0  # sectors with prior weight 0: start uniformly inside them
    name = format_term("restricted", {"process": process.name, "sectors": tuple(wanted)})
    return replace(process, initial=initial / initial.sum(), name=name, factors=None)


def leaky(process: GHMM, epsilon: float, name: str | None = None) -> GHMM:
    """Break exact SFP structure: T_eps(x) = T(x) [(1 - eps) I + eps U], U = uniform over all states.

    After each transition a fraction eps of the mass is redistributed over all states, so every
    block leaks into every other while sum_x T_eps(x) stays stochastic (HMMs only). The prior
    and structure metadata are kept, so :func:`is_partition_preserving` reports the violation.
    Named (unless ``name`` is given) as the registry's ``leaky`` family builds it:
    ``leaky(process='pp_z1r_x_pp_z1r',epsilon=0.05)``.
    """
    if not process.hmm:
        raise ProcessError("leaky() needs an HMM (all-ones |1>>)")
    check_number(epsilon, "leak epsilon", 0.0, 1.0)
    n = process.n_states
    mixing = (1 - epsilon) * np.eye(n) + epsilon * np.full((n, n), 1.0 / n)
    return replace(
        process, transfer=process.transfer @ mixing, factors=None,
        name=name or format_term("leaky", {"process": process.name, "epsilon": epsilon}),
    )


# --------------------------------------------------------------------------- density matrices
def _two_factor_dims(process_or_dims) -> tuple[int, ...]:
    dims = process_or_dims.factor_states if isinstance(process_or_dims, GHMM) else process_or_dims
    if dims is None or len(dims) < 2:
        raise ProcessError("density-matrix quantities need a process with at least two factors")
    return tuple(int(d) for d in dims)


def density_matrix(belief: np.ndarray) -> np.ndarray:
    """Classical density matrix rho_AB = sum_s p(s) |s><s| (eq. 9) of belief(s) ``[..., S]`` -> ``[..., S, S]``."""
    belief = np.asarray(belief, dtype=np.float64)
    return belief[..., :, None] * np.eye(belief.shape[-1])


def factor_marginals(beliefs: np.ndarray, process_or_dims) -> list[np.ndarray]:
    """Per-factor marginal beliefs (the diagonals of rho_A, rho_B, ...)."""
    return marginals(beliefs, _two_factor_dims(process_or_dims))


def product_of_marginals(beliefs: np.ndarray, process_or_dims) -> np.ndarray:
    """Diagonal of rho_A (x) rho_B (x) ...: what the joint belief would be without correlation."""
    out = None
    for m in factor_marginals(beliefs, process_or_dims):
        out = m if out is None else (out[..., :, None] * m[..., None, :]).reshape(*m.shape[:-1], -1)
    return out


def mutual_information(beliefs: np.ndarray, process_or_dims) -> np.ndarray:
    """Mutual information (nats) between the factors under each belief; total correlation for F > 2.

    sum_f H(rho_f) - H(rho_AB): zero iff rho_AB = rho_A (x) rho_B. Batched over leading axes.
    """
    dims = _two_factor_dims(process_or_dims)
    joint = entropy(beliefs)
    mi = np.sum([entropy(m) for m in marginals(beliefs, dims)], axis=0) - joint
    # H(A) + H(B) - H(AB) cancels to ~1e-16 for exact products: snap that round-off to an exact 0
    return np.where(mi < 1e-12, 0.0, mi)


def mutual_information_by_position(
    process: GHMM, n_sequences: int, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Expected factor mutual information after 0..length tokens, with its Monte Carlo standard error.

    The expectation over prefixes is estimated on sampled sequences (each belief itself is exact):
    for fractal sectors such as Mess3 the number of distinct prefixes grows like |X|^length, so
    exact enumeration is out of reach at length 10. Returns ``(mean, stderr)``, each ``[length + 1]``.
    """
    mi = mutual_information(process.beliefs(process.sample(n_sequences, length, rng)), process)
    return mi.mean(axis=0), mi.std(axis=0, ddof=1) / np.sqrt(n_sequences)
