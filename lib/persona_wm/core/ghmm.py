"""Generalized hidden Markov models (GHMMs): transfer matrices, beliefs, word probabilities.

Notation follows appendix B of the proposal (seed 000), itself after Riechers et al. (2025):

* ``transfer[x]`` is T(x), the transfer matrix of token x; the net operator is T = sum_x T(x) (eq. 1);
* ``initial`` is the row vector <<eta(empty)|, normalised so that <<eta(empty)|1>> = 1;
* ``right`` is |1>>, the right eigenvector of T with eigenvalue 1 (all ones for an HMM);
* Pr(w) = <<eta(empty)| T(w) |1>> (eq. 2) and the belief / predictive vector after w is
  <<eta(empty)| T(w) normalised by Pr(w) (eq. 3).

Everything is batched over sequences: a batch of token sequences is an integer array
``[batch, length]`` and beliefs come back as ``[batch, length + 1, states]`` (position 0 is the
prior). Numbers are float64 numpy: these are the *exact* ground truths the transformers are
compared against, so they should not inherit float32 error.

Structure metadata (``factor_states``, ``factor_tokens``, ``factors``, ``partition``) is optional
and is filled in by :mod:`persona_wm.processes.catalog` and :mod:`persona_wm.core.sfp`; it is what lets later code take
per-factor marginals of beliefs and of next-token distributions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import scipy.sparse

__all__ = [
    "GHMM",
    "ProcessError",
    "check_count",
    "check_number",
    "marginals",
    "stationary_distribution",
    "entropy",
    "optimal_cross_entropy",
    "block_entropies",
    "mixed_states",
    "all_words",
]

#: Absolute tolerance of the stochasticity / normalisation checks.
DEFAULT_TOL = 1e-9


#: Relative size of a negative probability that counts as float round-off (clipped to 0 silently);
#: anything more negative means a generalized HMM that is not a valid process (an error).
ROUNDOFF = 1e-12
#: :meth:`GHMM.sample_from_uniforms` multiplies by T(x) as a sparse matrix, in chunks of SPARSE_SAMPLER_ROWS
#: sequences, when the HMM has at least SPARSE_MIN_STATES states and at most SPARSE_MAX_DENSITY non-zero entries:
#: em_seq() (320 states, 0.05% non-zero) samples 2.5x faster (64k sequences of 9 tokens: 1.0 s vs 2.5 s on the
#: 2-core workstation); small dense processes keep the BLAS path. Same tokens up to float ties.
SPARSE_MIN_STATES = 64
SPARSE_MAX_DENSITY = 0.05
SPARSE_SAMPLER_ROWS = 1024


class ProcessError(ValueError):
    """A process definition or a request on it is invalid; the message names the problem."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_count(value, field: str, minimum: int = 0, owner: str = "") -> int:
    """``value`` as an int >= ``minimum``; a float (1.5, even 2.0) or a bool (True) is an error naming ``field``."""
    where = f"{owner}: " if owner else ""
    if not _is_int(value):
        raise ProcessError(
            f"{where}{field} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ProcessError(f"{where}{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(
    value, field: str, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False, owner: str = "",
) -> float:
    """``value`` as a finite real number inside the interval; a bool, string or NaN/inf is an error naming ``field``.

    Returns the value unchanged (an int stays an int), so canonical names printed from it do not move.
    """
    where = f"{owner}: " if owner else ""
    rule = "a finite number"
    if low is not None or high is not None:
        lo, hi = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        rule += " in " + ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise ProcessError(f"{where}{field} must be {rule}, got {value!r} ({type(value).__name__})")
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        raise ProcessError(f"{where}{field} must be {rule}, got {value!r}")
    return value


def _real_array(value, field: str, name: str) -> np.ndarray:
    """``value`` as a float64 array; strings, ragged nesting, complex, bool or non-numbers are a ProcessError."""
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting (numpy >= 1.24), odd objects
        raise ProcessError(
            f"process {name!r}: {field} must be a rectangular array of real numbers; got a ragged nesting "
            f"(rows of different lengths) or an unreadable {type(value).__name__}: {_short(value)}"
        ) from None
    if raw.dtype.kind == "O":  # Fractions, Decimals, or a nesting numpy could not make rectangular
        try:
            raw = raw.astype(np.float64)
        except (ValueError, TypeError):
            raise ProcessError(
                f"process {name!r}: {field} must be a rectangular array of real numbers; got entries that "
                f"are not numbers or a ragged nesting: {_short(value)}"
            ) from None
    if raw.dtype.kind not in "iuf":
        what = {"U": "strings", "S": "bytes", "b": "booleans", "c": "complex numbers"}.get(raw.dtype.kind, str(raw.dtype))
        raise ProcessError(
            f"process {name!r}: {field} must contain real numbers, got {what}: {_short(value)}"
        )
    return raw.astype(np.float64)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, eq=False)
class GHMM:
    """A finite generalized hidden Markov model.

    Args:
        transfer: ``[n_tokens, n_states, n_states]`` transfer matrices T(x).
        initial: ``[n_states]`` initial row vector eta(empty).
        name: used in error messages and figure labels.
        right: |1>>; defaults to all ones, the HMM case.
        hmm: if True (default) the entries of T(x) and eta must be non-negative, i.e. this is an
            HMM whose T(x)[s, s'] = Pr(s', x | s).
        partition: optional sectors (tuples of state indices) the dynamics is meant to preserve;
            see :func:`persona_wm.core.sfp.is_partition_preserving`.
        partition_labels: names of the sectors, same order as ``partition``.
        factor_states / factor_tokens: state- and vocabulary dimensions of the factors when the
            state space is a tensor product (state s = s_1 |S_2| + s_2, token v = v_1 |V_2| + v_2).
        factors: the factor processes, set only when this process *is* their Kronecker product
            (transfer matrices and initial vector both factorise), which makes exact quantities
            additive over factors.
    """

    transfer: np.ndarray
    initial: np.ndarray
    name: str = "ghmm"
    right: np.ndarray | None = None
    hmm: bool = True
    partition: tuple[tuple[int, ...], ...] | None = None
    partition_labels: tuple[str, ...] | None = None
    factor_states: tuple[int, ...] | None = None
    factor_tokens: tuple[int, ...] | None = None
    factors: tuple[GHMM, ...] | None = field(default=None, repr=False)
    tol: float = DEFAULT_TOL

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ProcessError(f"process name must be a string, got {self.name!r}")
        if not isinstance(self.hmm, (bool, np.bool_)):
            raise ProcessError(f"process {self.name!r}: hmm must be True or False, got {self.hmm!r}")
        check_number(self.tol, "tol", 0.0, None, low_open=True, owner=f"process {self.name!r}")
        transfer = _real_array(self.transfer, "transfer matrices", self.name)
        initial = _real_array(self.initial, "initial vector", self.name)
        object.__setattr__(self, "transfer", transfer)
        object.__setattr__(self, "initial", initial)
        if transfer.ndim != 3 or transfer.shape[1] != transfer.shape[2] or transfer.shape[0] == 0:
            raise ProcessError(
                f"process {self.name!r}: transfer matrices must have shape [tokens, states, states], "
                f"got {transfer.shape}"
            )
        n_states = transfer.shape[1]
        right = np.ones(n_states) if self.right is None else _real_array(self.right, "|1>> (right)", self.name)
        object.__setattr__(self, "right", right)
        if initial.shape != (n_states,) or right.shape != (n_states,):
            raise ProcessError(
                f"process {self.name!r}: initial vector {initial.shape} and |1>> {right.shape} must both "
                f"have shape ({n_states},) to match the transfer matrices"
            )
        for label, values in (("transfer matrices", transfer), ("initial vector", initial), ("|1>> (right)", right)):
            if not np.all(np.isfinite(values)):
                where = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
                raise ProcessError(
                    f"process {self.name!r}: {label} must be finite, but entry {where} is {values[where]} (NaN/inf)"
                )
        if self.hmm:
            if np.any(transfer < -self.tol):
                x, s, t = np.argwhere(transfer < -self.tol)[0]
                raise ProcessError(
                    f"process {self.name!r}: an HMM needs non-negative transfer matrices, but "
                    f"T({x})[{s},{t}] = {transfer[x, s, t]:.3g}"
                )
            if np.any(initial < -self.tol):
                s = int(np.flatnonzero(initial < -self.tol)[0])
                raise ProcessError(
                    f"process {self.name!r}: an HMM needs a non-negative initial vector, but "
                    f"initial[{s}] = {initial[s]:.3g}"
                )
        row_mass = transfer.sum(axis=0) @ right
        bad = np.flatnonzero(np.abs(row_mass - right) > 1e3 * self.tol)
        if bad.size:
            s = int(bad[0])
            raise ProcessError(
                f"process {self.name!r}: net operator is not stochastic (T|1>> != |1>>): state {s} has "
                f"(T|1>>)[{s}] = {row_mass[s]:.6g} but |1>>[{s}] = {right[s]:.6g}"
                + (" (an HMM's rows of sum_x T(x) must sum to 1)" if self.hmm else "")
            )
        norm = float(initial @ right)
        if abs(norm - 1.0) > 1e3 * self.tol:
            raise ProcessError(
                f"process {self.name!r}: initial vector is not normalised: <<eta|1>> = {norm:.6g}, expected 1"
            )
        self._check_structure(n_states)

    def _check_structure(self, n_states: int) -> None:
        if self.partition is not None:
            try:
                flat = sorted(s for sector in self.partition for s in sector)
            except TypeError:
                flat = None
            if flat is None or not all(_is_int(s) for s in flat):
                raise ProcessError(
                    f"process {self.name!r}: partition must be sectors of integer state indices, got {self.partition!r}"
                )
            if flat != list(range(n_states)):
                raise ProcessError(
                    f"process {self.name!r}: partition {self.partition} must cover each of the "
                    f"{n_states} states exactly once"
                )
            if self.partition_labels is not None and len(self.partition_labels) != len(self.partition):
                raise ProcessError(f"process {self.name!r}: partition_labels and partition differ in length")
        for label in ("factor_states", "factor_tokens"):
            dims = getattr(self, label)
            if dims is not None and (isinstance(dims, (str, bytes)) or not all(_is_int(d) and d >= 1 for d in dims)):
                raise ProcessError(f"process {self.name!r}: {label} must be integers >= 1, got {dims!r}")
        if self.factor_states is not None and int(np.prod(self.factor_states)) != n_states:
            raise ProcessError(
                f"process {self.name!r}: factor_states {self.factor_states} do not multiply to {n_states} states"
            )
        if self.factor_tokens is not None and int(np.prod(self.factor_tokens)) != self.n_tokens:
            raise ProcessError(
                f"process {self.name!r}: factor_tokens {self.factor_tokens} do not multiply to "
                f"{self.n_tokens} tokens"
            )

    # ----------------------------------------------------------------- basic properties
    @property
    def n_tokens(self) -> int:
        return int(self.transfer.shape[0])

    @property
    def n_states(self) -> int:
        return int(self.transfer.shape[1])

    @property
    def n_factors(self) -> int:
        return 1 if self.factor_states is None else len(self.factor_states)

    @property
    def net(self) -> np.ndarray:
        """Net transition operator T = sum_x T(x) (eq. 1)."""
        return self.transfer.sum(axis=0)

    @property
    def emission(self) -> np.ndarray:
        """``[states, tokens]`` matrix E[s, x] = (T(x)|1>>)[s]: Pr(next token | belief) = belief @ E."""
        return np.einsum("xst,t->sx", self.transfer, self.right)

    def with_initial(self, initial: np.ndarray, name: str | None = None) -> GHMM:
        """Same dynamics, another initial vector; drops ``factors`` (the prior may no longer factorise)."""
        return replace(self, initial=np.asarray(initial, dtype=np.float64), name=name or self.name, factors=None)

    # ----------------------------------------------------------------- sequences
    def _check_tokens(self, sequences: np.ndarray) -> np.ndarray:
        seqs = np.asarray(sequences)
        if seqs.ndim == 1:
            seqs = seqs[None, :]
        if seqs.ndim != 2 or not np.issubdtype(seqs.dtype, np.integer):
            raise ProcessError(
                f"process {self.name!r}: sequences must be an integer array [batch, length], got "
                f"{seqs.dtype} {seqs.shape}"
            )
        if seqs.size and (seqs.min() < 0 or seqs.max() >= self.n_tokens):
            raise ProcessError(
                f"process {self.name!r}: token ids must lie in [0, {self.n_tokens}), got "
                f"[{seqs.min()}, {seqs.max()}]"
            )
        return seqs

    def forward(self, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised forward pass: beliefs ``[B, L+1, S]`` and per-token probabilities ``[B, L]``.

        ``probs[b, t]`` = Pr(x_{t+1} | x_{1:t}); impossible prefixes get probability 0 and NaN beliefs
        from there on (the scaled recursion avoids underflow on long sequences).
        """
        seqs = self._check_tokens(sequences)
        batch, length = seqs.shape
        beliefs = np.empty((batch, length + 1, self.n_states))
        token_probs = np.empty((batch, length))
        belief = np.broadcast_to(self.initial, (batch, self.n_states)).copy()
        beliefs[:, 0] = belief
        absolute = None
        for t in range(length):
            unnormalised = self._propagate(belief, seqs[:, t])
            mass = unnormalised @ self.right
            if not self.hmm or np.any(mass < 0):  # an HMM gets here only with entries in [-tol, 0)
                absolute = np.abs(self.transfer) if absolute is None else absolute
                scale = self._propagate(np.abs(belief), seqs[:, t], absolute) @ np.abs(self.right)
                mass = self._nonnegative(mass, scale, lambda i, t=t: (
                    f"Pr(x_{t + 1} = {seqs[i[0], t]} | the first {t} tokens of sequence {i[0]})"))
            token_probs[:, t] = np.where(np.isnan(mass), 0.0, mass)
            with np.errstate(invalid="ignore", divide="ignore"):
                belief = np.where(mass[:, None] > 0, unnormalised / mass[:, None], np.nan)
            beliefs[:, t + 1] = belief
        return beliefs, token_probs

    def beliefs(self, sequences: np.ndarray, allow_impossible: bool = False) -> np.ndarray:
        """Belief states (eq. 3) after every prefix: ``[B, L+1, S]``, position 0 is the prior.

        Raises :class:`ProcessError` on a sequence of probability zero unless ``allow_impossible``
        (then its beliefs are NaN from the first impossible token on).
        """
        beliefs, token_probs = self.forward(sequences)
        if not allow_impossible and np.any(token_probs <= 0):
            b, t = np.argwhere(token_probs <= 0)[0]
            raise ProcessError(
                f"process {self.name!r}: sequence {b} has probability zero at token {t}; its belief is undefined"
            )
        return beliefs

    def word_probability(self, words: np.ndarray) -> np.ndarray:
        """Pr(w) = <<eta|T(w)|1>> (eq. 2) for a batch of words ``[B, L]``."""
        _, token_probs = self.forward(words)
        return np.prod(token_probs, axis=1)

    def log_likelihood(self, sequences: np.ndarray) -> np.ndarray:
        """log Pr(x_{t+1} | x_{1:t}) per token, ``[B, L]`` (-inf for impossible tokens)."""
        _, token_probs = self.forward(sequences)
        with np.errstate(divide="ignore"):
            return np.log(token_probs)

    def _nonnegative(self, probs: np.ndarray, scale: np.ndarray, describe) -> np.ndarray:
        """Probabilities with float round-off around 0 snapped to 0; a real negative one is a ProcessError.

        ``scale`` is the size of the terms summed into each probability (sum of |products|, 1 for a
        stochastic HMM), so the round-off allowance is ``ROUNDOFF * max(1, scale)`` (plus ``tol`` for an
        HMM, whose entries may lie in [-tol, 0)). ``describe(index)`` names the offending probability (``index``: a tuple into ``probs``).
        """
        allowance = (ROUNDOFF + (self.tol if self.hmm else 0.0)) * np.maximum(1.0, scale)
        bad = probs < -allowance  # NaN (an impossible prefix) compares False
        if np.any(bad):
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ProcessError(
                f"process {self.name!r} is not a valid process: {describe(index)} = "
                f"{float(probs[index]):.6g} < 0 (a generalized HMM must give every word a probability >= 0; "
                f"negatives within {ROUNDOFF:g} x the term size are float round-off and are clipped to 0)"
            )
        if self.hmm:  # sums of non-negative terms: a tiny positive value is exact, only negatives are round-off
            return np.where(probs < 0, 0.0, probs)
        # a GHMM's terms cancel, so an exact 0 comes out as +-round-off: snap both signs to 0, otherwise a
        # tiny positive mass would "normalise" a belief of an impossible prefix into garbage
        return np.where(np.abs(probs) <= allowance, 0.0, probs)

    def next_token_probs(self, beliefs: np.ndarray) -> np.ndarray:
        """Bayes-optimal next-token distribution(s) for belief(s) ``[..., S]`` -> ``[..., X]``.

        For a GHMM a negative probability beyond float round-off raises :class:`ProcessError`.
        """
        beliefs = np.asarray(beliefs)
        probs = beliefs @ self.emission
        if self.hmm:
            return np.clip(probs, 0.0, None)
        scale = np.abs(beliefs) @ np.einsum("xst,t->sx", np.abs(self.transfer), np.abs(self.right))
        return self._nonnegative(probs, scale, lambda i: f"Pr(next token {i[-1]} | belief {i[:-1] or ''})")

    def sample(self, n_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """Sample ``[n_sequences, length]`` token sequences.

        Sampling goes through the belief (Pr(x | belief) then update), which is valid for any GHMM,
        stationary or not, and is vectorised over the batch. The update multiplies the beliefs that
        drew token x by T(x), one matrix product per distinct token, rather than gathering a
        ``[batch, S, S]`` stack of T(token) per position (that copy was most of a toy model's
        training step on a CPU).
        """
        n_sequences = check_count(n_sequences, "n_sequences", 0, owner=f"process {self.name!r}: sample")
        length = check_count(length, "length", 0, owner=f"process {self.name!r}: sample")
        # rng.random((L, R)) is the same stream as L successive rng.random(R) calls, one per position
        return self.sample_from_uniforms(rng.random((length, n_sequences)))

    def sample_from_uniforms(self, uniforms: np.ndarray, *, sparse: bool | None = None) -> np.ndarray:
        """:meth:`sample` with its uniform draws given: ``uniforms [L, R]`` -> tokens ``[R, L]``.

        Row t holds the draws for position t, so many batches (e.g. many models' data streams, see
        :mod:`persona_wm.toy.stacked`) can be sampled in one vectorised pass without changing any tokens.
        ``sparse``: None (default) takes the sparse chunked path for a large sparse HMM and the dense row-by-row
        path otherwise; False forces the dense path; True requires the sparse one (ValueError where the process
        does not qualify). Both give the same tokens (tested); the switch is for comparing them.
        """
        if sparse and not (self.hmm and self._sparse_transposed is not None):
            raise ValueError(f"process {self.name!r}: sample_from_uniforms(sparse=True) needs an HMM with >= "
                             f"{SPARSE_MIN_STATES} states and <= {SPARSE_MAX_DENSITY:.0%} non-zero transfer entries")
        if sparse is not False and self.hmm and self._sparse_transposed is not None:
            emission = np.ascontiguousarray(self.emission.T)  # [X, S], once for every chunk
            return np.concatenate([self._sample_sparse(uniforms[:, start:start + SPARSE_SAMPLER_ROWS], emission)
                                   for start in range(0, max(np.shape(uniforms)[1], 1), SPARSE_SAMPLER_ROWS)])
        length, n_sequences = np.shape(uniforms)
        tokens = np.empty((n_sequences, length), dtype=np.int64)
        belief = np.broadcast_to(self.initial, (n_sequences, self.n_states)).copy()
        emission = self.emission
        for t in range(length):
            probs = np.clip(belief @ emission, 0.0, None) if self.hmm else self.next_token_probs(belief)
            cumulative = np.cumsum(probs, axis=1)
            draws = uniforms[t] * cumulative[:, -1]
            token = np.minimum((draws[:, None] >= cumulative).sum(axis=1), self.n_tokens - 1)
            tokens[:, t] = token
            if t == length - 1:
                break  # the last belief update is never used
            unnormalised = self._propagate(belief, token)
            belief = unnormalised / (unnormalised @ self.right)[:, None]
        return tokens

    def _sample_sparse(self, uniforms: np.ndarray, emission: np.ndarray) -> np.ndarray:
        """:meth:`sample_from_uniforms` for a large sparse HMM, on one chunk of :data:`SPARSE_SAMPLER_ROWS` rows
        (``emission``: the ``[X, S]`` transpose of :attr:`emission`).

        Beliefs are kept transposed, ``[S, R]``, with the sequences sorted by their last token, so that each T(x)
        multiplies one contiguous block of columns as a sparse matrix; a chunk's arrays stay in cache (the dense
        path's ``[R, S]`` passes were bound by memory bandwidth). Same tokens as the dense path up to a float tie
        at a cumulative-probability boundary (the products are summed in another order).
        """
        length, n_sequences = np.shape(uniforms)
        tokens = np.empty((n_sequences, length), dtype=np.int64)
        where = np.arange(n_sequences)  # column j of the beliefs is sequence where[j]
        belief = np.broadcast_to(self.initial[:, None], (self.n_states, n_sequences)).copy()
        transposed = self._sparse_transposed
        for t in range(length):
            cumulative = np.cumsum(np.clip(emission @ belief, 0.0, None), axis=0)  # [X, R]
            draws = uniforms[t, where] * cumulative[-1]
            token = np.minimum((draws[None, :] >= cumulative).sum(axis=0), self.n_tokens - 1)
            tokens[where, t] = token
            if t == length - 1:
                break
            order = np.argsort(token, kind="stable")
            token, where, belief = token[order], where[order], belief[:, order]
            values, starts = np.unique(token, return_index=True)
            unnormalised = np.empty_like(belief)
            for x, start, stop in zip(values, starts, [*starts[1:], n_sequences]):
                unnormalised[:, start:stop] = transposed[x] @ belief[:, start:stop]
            belief = unnormalised / (self.right @ unnormalised)[None, :]
        return tokens

    @cached_property
    def _sparse_transposed(self) -> list[scipy.sparse.csr_array] | None:
        """T(x)^T as CSR matrices (for :meth:`_sample_sparse`, which keeps beliefs as columns) when the process
        is large and sparse (:data:`SPARSE_MIN_STATES`, :data:`SPARSE_MAX_DENSITY`), else None."""
        if self.n_states < SPARSE_MIN_STATES or np.count_nonzero(self.transfer) > SPARSE_MAX_DENSITY * self.transfer.size:
            return None
        return [scipy.sparse.csr_array(m.T) for m in self.transfer]

    def _propagate(self, belief: np.ndarray, token: np.ndarray, matrices: np.ndarray | None = None) -> np.ndarray:
        """``belief[b] @ T(token[b])`` for every row ``b`` (``matrices`` replaces ``transfer``), one matmul per
        distinct token over the rows that carry it: S^2 work per row, where gathering a ``[B, S, S]`` stack
        of matrices first costs a copy of S^2 floats per row (0.55 s vs 0.03 s for 512 x 10 tokens of a
        192-state EM-SFP)."""
        matrices = self.transfer if matrices is None else matrices
        out = np.empty_like(belief)
        for x in np.unique(token):
            rows = token == x
            out[rows] = belief[rows] @ matrices[x]
        return out


# --------------------------------------------------------------------------- helpers
def marginals(values: np.ndarray, dims: Sequence[int]) -> list[np.ndarray]:
    """Per-factor marginals of distributions over a tensor-product index.

    ``values[..., prod(dims)]`` (beliefs over joint states, or next-token distributions over joint
    tokens) is reshaped to ``[..., *dims]`` and summed over every other factor.
    """
    values = np.asarray(values)
    dims = tuple(int(d) for d in dims)
    if values.shape[-1] != int(np.prod(dims)):
        raise ProcessError(f"last axis has size {values.shape[-1]}, expected prod{dims} = {int(np.prod(dims))}")
    joint = values.reshape(values.shape[:-1] + dims)
    lead = values.ndim - 1
    return [joint.sum(axis=tuple(lead + g for g in range(len(dims)) if g != f)) for f in range(len(dims))]


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


def stationary_distribution(net: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """The unique left eigenvector of ``net`` with eigenvalue 1, normalised to sum 1.

    Raises if eigenvalue 1 is degenerate: products of periodic processes and non-ergodic processes
    have several stationary vectors, and picking "the" one silently would change every number
    downstream. Build their initial vector explicitly instead (``persona_wm.processes.catalog.product``,
    ``persona_wm.core.sfp``).
    """
    values, vectors = np.linalg.eig(np.asarray(net, dtype=np.float64).T)
    unit = np.flatnonzero(np.abs(values - 1.0) < 1e-7)
    if unit.size != 1:
        raise ProcessError(
            f"eigenvalue 1 of the net operator has multiplicity {unit.size}: the stationary vector is not "
            "unique (periodic product or non-ergodic process); give the initial vector explicitly"
        )
    vec = np.real(vectors[:, unit[0]])
    vec = vec / vec.sum()
    if np.any(vec < -tol):
        raise ProcessError("stationary vector has negative entries; is the net operator stochastic?")
    return np.clip(vec, 0.0, None) / np.clip(vec, 0.0, None).sum()


def all_words(n_tokens: int, length: int) -> np.ndarray:
    """Every word of ``length`` tokens, ``[n_tokens**length, length]``, in lexicographic order."""
    grids = np.indices((n_tokens,) * length).reshape(length, -1).T
    return grids.astype(np.int64)


def mixed_states(process: GHMM, depth: int, decimals: int = 12, max_states: int = 2_000_000):
    """Distinct beliefs and their probabilities at each depth 0..depth (the mixed-state presentation).

    Identical beliefs (after rounding to ``decimals``) are merged, which keeps processes such as Z1R
    tiny at any depth; processes with fractal belief sets (Mess3) grow like |X|^depth, so
    ``max_states`` stops runaway enumerations with a clear error.

    Returns a list of ``(beliefs [N_t, S], probs [N_t])``.
    """
    depth = check_count(depth, "depth", 0, owner=f"process {process.name!r}: mixed_states")
    beliefs = process.initial[None, :].copy()
    probs = np.ones(1)
    levels = [(beliefs, probs)]
    for t in range(depth):
        unnormalised = np.einsum("ns,xst->nxt", beliefs, process.transfer).reshape(-1, process.n_states)
        mass = unnormalised @ process.right
        if not process.hmm or np.any(mass < 0):  # GHMM: round-off is snapped to 0, a real negative raises
            scale = np.einsum("ns,xst,t->nx", np.abs(beliefs), np.abs(process.transfer),
                              np.abs(process.right)).reshape(-1)
            mass = process._nonnegative(mass, scale, lambda i, t=t: (
                f"Pr(token {i[0] % process.n_tokens} | mixed state {i[0] // process.n_tokens} at depth {t})"))
        branch = np.repeat(probs, process.n_tokens) * mass
        keep = branch > 1e-300
        unnormalised, mass, branch = unnormalised[keep], mass[keep], branch[keep]
        candidates = unnormalised / mass[:, None]
        keys = np.round(candidates, decimals)
        keys[keys == 0] = 0.0  # merge -0.0 with 0.0
        unique_keys, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        beliefs = candidates[first]
        probs = np.bincount(inverse.ravel(), weights=branch, minlength=len(unique_keys))
        if len(beliefs) > max_states:
            raise ProcessError(
                f"process {process.name!r}: {len(beliefs)} distinct beliefs at depth {t + 1} exceed "
                f"max_states={max_states}; use a factored decomposition or a shorter context"
            )
        levels.append((beliefs, probs))
    return levels


def optimal_cross_entropy(process: GHMM, length: int, **kwargs) -> np.ndarray:
    """Exact Bayes-optimal next-token cross-entropy (nats) at positions 1..length.

    Entry t-1 is H(X_t | X_{1:t-1}), the expected log loss of the Bayes-optimal predictor at
    position t (position 1 predicts the first token from the initial vector). For an exact
    Kronecker product the factors' values are summed (tokens are independent), which makes
    products of fractal processes tractable; otherwise the mixed-state tree is enumerated.
    """
    length = check_count(length, "length", 1, owner=f"process {process.name!r}: optimal_cross_entropy")
    if process.factors:
        return np.sum([optimal_cross_entropy(f, length, **kwargs) for f in process.factors], axis=0)
    levels = mixed_states(process, length - 1, **kwargs)
    return np.array([float(p @ entropy(process.next_token_probs(b))) for b, p in levels])


def block_entropies(process: GHMM, length: int, **kwargs) -> np.ndarray:
    """Block entropies H(1..length) = H(X_{1:L}) in nats, the running sum of the per-position CE."""
    length = check_count(length, "length", 1, owner=f"process {process.name!r}: block_entropies")
    return np.cumsum(optimal_cross_entropy(process, length, **kwargs))
