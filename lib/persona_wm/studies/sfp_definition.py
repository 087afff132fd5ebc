"""Study 01 (Semi-Factored Processes: definition and exact ground truth): one function per notebook section
and the frozen dataclasses their results live in; :class:`SFPDefinitionResult` assembles them and builds
``metrics.json``'s dict.

Sections: :func:`transfer_table` and :func:`word_mass` (GHMM notation), :func:`belief_cloud` (the Mess3
fractal), :func:`factorised_beliefs` (beliefs of a product factorise), :func:`prefix_beliefs` (the
sector a non-ergodic process reveals), :func:`partition_check` (SFP block structure, and a leak
breaking it), :func:`mutual_information_sweep` (factor correlation against the sector-prior knob),
:func:`optimal_ce_table` (Bayes-optimal cross-entropy per position). Every quantity is exact except the
mutual-information curves, which average exact beliefs over sampled prefixes (with a standard error).
Figures come from :mod:`persona_wm.plots.toy` (:func:`~persona_wm.plots.toy.plot_mutual_information` draws the sweep).

The sampling sections draw from one generator in notebook order (:func:`belief_cloud`, then
:func:`factorised_beliefs`, then :func:`mutual_information_sweep`), so a study's numbers depend on its
seed and on that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from persona_wm.core.ghmm import GHMM, all_words, optimal_cross_entropy
from persona_wm.core.sfp import (
    PartitionVerdict,
    factor_marginals,
    is_partition_preserving,
    leaky,
    mutual_information,
    mutual_information_by_position,
    product_of_marginals,
    semi_factored_process,
)
from persona_wm.processes import get_process, pp_mess3, pp_z1r

__all__ = ["CE_PROCESSES", "Z1R_STATES", "MI_FAMILIES", "MI_REPORTED", "transfer_table", "word_mass",
           "BeliefCloud", "belief_cloud", "FactorisedBeliefs", "factorised_beliefs", "prefix_beliefs",
           "PartitionCheck", "partition_check", "MutualInformationSweep", "mutual_information_sweep",
           "optimal_ce_table", "SFPDefinitionResult"]

#: Processes whose Bayes-optimal cross-entropy the study tabulates (the floors of study 02).
CE_PROCESSES = ("z1r", "mess3", "z1r_x_z1r", "mess3_x_mess3", "pp_z1r_x_pp_z1r")
#: Z1R's states, in the order of its transfer matrices.
Z1R_STATES = ("S0", "S1", "SR")
#: The two SFP families of section 6 (label -> factor builder): transient and persistent correlation.
MI_FAMILIES = {"pp_z1r ⊗ pp_z1r": pp_z1r, "pp_mess3 ⊗ pp_mess3": pp_mess3}
#: The family whose final-position MI metrics.json reports (label, process name).
MI_REPORTED = ("pp_mess3 ⊗ pp_mess3", "pp_mess3_x_pp_mess3")


# =========================================================================== 1. GHMM notation
def transfer_table(process: GHMM, states: Sequence[str], symbol: str = "T") -> pd.DataFrame:
    """Every transfer matrix ``symbol(x)`` side by side, rows and columns labelled by ``states``."""
    if len(states) != process.n_states:
        raise ValueError(f"transfer_table: {len(states)} state labels for {process.name!r}, which has "
                         f"{process.n_states} states")
    return pd.concat({f"{symbol}({x})": pd.DataFrame(process.transfer[x], index=list(states), columns=list(states))
                      for x in range(process.n_tokens)}, axis=1)


def word_mass(process: GHMM, lengths: Sequence[int]) -> dict[int, float]:
    """Total probability (eq. 2) of all words of each length: 1 at every length for a valid process."""
    return {length: process.word_probability(all_words(process.n_tokens, length)).sum() for length in lengths}


# =========================================================================== 2. the Mess3 fractal
@dataclass(frozen=True)
class BeliefCloud:
    """Beliefs after 1..L tokens of sampled sequences, with the token that produced each."""

    points: np.ndarray  # [n * L, S]
    last_token: np.ndarray  # [n * L]


def belief_cloud(process: GHMM, n_sequences: int, length: int, rng: np.random.Generator) -> BeliefCloud:
    """Sample ``n_sequences`` words of ``length`` tokens; every belief after 1..length tokens."""
    tokens = process.sample(n_sequences, length, rng)
    beliefs = process.beliefs(tokens)
    return BeliefCloud(beliefs[:, 1:].reshape(-1, process.n_states), tokens.reshape(-1))


# =========================================================================== 3. factored processes
@dataclass(frozen=True)
class FactorisedBeliefs:
    """Joint beliefs of a two-factor product, each factor's marginal after the last token, and the largest
    deviation of the joint belief from the product of its marginals (over every prefix and position)."""

    joint: np.ndarray  # [n, L + 1, S]
    factor_a: np.ndarray  # [n, S_A]
    factor_b: np.ndarray  # [n, S_B]
    product_gap: float


def factorised_beliefs(process: GHMM, n_sequences: int, length: int, rng: np.random.Generator) -> FactorisedBeliefs:
    """Sample words of a two-factor process; how far its beliefs are from factorising."""
    joint = process.beliefs(process.sample(n_sequences, length, rng))
    factor_a, factor_b = factor_marginals(joint[:, -1], process)
    gap = float(np.abs(joint - product_of_marginals(joint, process)).max())
    return FactorisedBeliefs(joint, factor_a, factor_b, gap)


# =========================================================================== 4. non-ergodic processes
def prefix_beliefs(process: GHMM, words: np.ndarray, state: int, label: str, decimals: int = 4) -> pd.DataFrame:
    """Belief in ``state`` after every prefix of each word (one column per prefix, ``∅`` = nothing seen)."""
    words = np.asarray(words)
    beliefs = process.beliefs(words)
    prefixes = ["".join(map(str, w[:t])) or "∅" for w in words for t in range(words.shape[1] + 1)]
    return pd.DataFrame({"prefix": prefixes, label: np.round(beliefs[:, :, state].ravel(), decimals)}).T


# =========================================================================== 5. SFP block structure
@dataclass(frozen=True)
class PartitionCheck:
    """The partition verdict of an SFP and of the same process with ``epsilon`` of every transition leaked."""

    process: str
    verdict: PartitionVerdict
    perturbed: PartitionVerdict
    epsilon: float


def partition_check(process: GHMM, epsilon: float) -> PartitionCheck:
    """:func:`~persona_wm.core.sfp.is_partition_preserving` before and after :func:`~persona_wm.core.sfp.leaky`."""
    return PartitionCheck(process.name, is_partition_preserving(process), is_partition_preserving(leaky(process, epsilon)),
                          epsilon)


# =========================================================================== 6. factor correlation
@dataclass(frozen=True)
class MutualInformationSweep:
    """Mean factor mutual information I(A;B) by position for each SFP family and sector-prior correlation c,
    and the same curve for a fully factored reference process."""

    table: pd.DataFrame  # process, correlation c, position, MI (nats), stderr
    reference: np.ndarray  # [L + 1] mean MI of the reference product
    reference_name: str
    context_length: int
    n_sequences: int

    @property
    def final(self) -> pd.DataFrame:
        """Rows of the reported family (:data:`MI_REPORTED`) at the last position."""
        table = self.table
        return table[(table.position == self.context_length) & (table.process == MI_REPORTED[0])]

    @property
    def by_correlation(self) -> pd.Series:
        """The reported family's final-position MI, indexed by correlation c."""
        return self.final.set_index("correlation c")["MI (nats)"]

    @property
    def monotone(self) -> bool:
        """Whether that MI rises strictly with c."""
        return bool(np.all(np.diff(self.by_correlation.to_numpy()) > 0))

    def metrics(self) -> dict[str, Any]:
        return {
            "process": MI_REPORTED[1],
            "position": self.context_length,
            "n_sequences": self.n_sequences,
            "by_correlation": [{"correlation": float(r["correlation c"]), "mi": float(r["MI (nats)"]),
                                "stderr": float(r["stderr"])} for _, r in self.final.iterrows()],
            "monotone": self.monotone,
        }


def mutual_information_sweep(correlations: Sequence[float], n_sequences: int, context_length: int,
                             rng: np.random.Generator, reference: GHMM) -> MutualInformationSweep:
    """Section 6: for each family of :data:`MI_FAMILIES` and each c, the two-factor SFP with sector-prior
    correlation c (:func:`~persona_wm.core.sfp.semi_factored_process`) and its mean MI at every position
    (:func:`~persona_wm.core.sfp.mutual_information_by_position`); then the ``reference`` process's curve."""
    rows = []
    for family, build in MI_FAMILIES.items():
        factor = build()
        for c in correlations:
            sfp = semi_factored_process([factor, factor], c)
            mean, stderr = mutual_information_by_position(sfp, n_sequences, context_length, rng)
            rows += [{"process": family, "correlation c": c, "position": t, "MI (nats)": m, "stderr": s}
                     for t, (m, s) in enumerate(zip(mean, stderr))]
    curve = mutual_information(reference.beliefs(reference.sample(n_sequences, context_length, rng)), reference).mean(0)
    return MutualInformationSweep(pd.DataFrame(rows), curve, reference.name, context_length, n_sequences)


# =========================================================================== 7. optimal cross-entropy
def optimal_ce_table(names: Sequence[str], context_length: int) -> pd.DataFrame:
    """Exact Bayes-optimal H(X_t | X_<t) (nats) of each named process, positions 1..context_length."""
    return pd.DataFrame({name: optimal_cross_entropy(get_process(name), context_length) for name in names},
                        index=pd.RangeIndex(1, context_length + 1, name="position"))


# =========================================================================== the result
@dataclass(frozen=True)
class SFPDefinitionResult:
    """What study 01 reports: the cross-entropy table, the partition check and the MI sweep."""

    context_length: int
    optimal_ce: pd.DataFrame  # positions x processes (optimal_ce_table)
    partition: PartitionCheck
    mutual_information: MutualInformationSweep

    def metrics(self) -> dict[str, Any]:
        """The dict ``metrics.json`` is written from."""
        ce = self.optimal_ce
        return {
            "context_length": self.context_length,
            "optimal_ce": {name: float(ce[name].mean()) for name in ce.columns},
            "optimal_ce_by_position": {name: ce[name].tolist() for name in ce.columns},
            "partition_preserving": {
                self.partition.process: self.partition.verdict.preserving,
                "perturbed": self.partition.perturbed.preserving,
                "perturbed_leak_mass": self.partition.perturbed.leak_mass,
            },
            "mutual_information": self.mutual_information.metrics(),
        }
