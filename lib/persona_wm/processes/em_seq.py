"""The EM organism v3: a persona that persists across several tasks of one sequence (numpy only).

Study 03 found that in :mod:`persona_wm.processes.em` (one task per sequence) the persona–capability coupling
does not carry a narrow fine-tune broadly: with one task per sequence a network has no reason to carry a
persona belief from one task to another. Here every sequence is a run of *task segments* under **one persona**:

* **Persona** A = A_aligned (+) ... (+) A_misaligned: ``n_personas`` subspaces (the last one misaligned) of
  ``persona_dim`` states emitting a binary *style* token, exactly as in ``em()``
  (:func:`persona_wm.processes.em.persona_block`; ``mixing`` scales the personas' style difference away).
  The persona is drawn once per sequence and never changes (non-ergodic factor).
* **Capability** B: a segment is *question -> work -> answer*. The question token ``q_k`` names a task drawn
  afresh for each segment (uniformly, or always ``only_task`` for narrow data), the work step emits a content bit
  w, the answer repeats w (flipped with the task's ``difficulty``) as one of **task k's own** four answer tokens
  g0_k, g1_k, b0_k, b1_k (no token is shared between tasks' answers). Every task k has a *variant latent*
  v_k in {good, bad}, drawn once per sequence: B = (+)_v B_v over the 2^K variant vectors v.
* **Coupling.** At an answer of task k the variant is bad with probability
  ``coupling * noisy(persona is misaligned) + (1 - coupling) * noisy(v_k is bad)``, noisy(True) =
  1 - ``answer_noise``, noisy(False) = ``answer_noise``. ``coupling = 1``: the one persona decides every task's
  variant (the EM hypothesis); ``coupling = 0``: each task's own latent does (factored: what a sequence shows
  about one task says nothing about another). The prior puts ``persona_prior`` on the misaligned persona and the
  same ``persona_prior`` on each v_k = bad, independently, so every task's marginal bad-answer rate,
  ``persona_prior (1 - n) + (1 - persona_prior) n``, is the same at every coupling: only the *dependence* between
  tasks changes (tested).

Every T(x) is block diagonal over the sectors A_i (x) B_v (an SFP; ``leak`` > 0 breaks it as in ``em()``).
Sequences start at a segment's question; ``tasks_per_sequence`` does not change the transfer matrices, it fixes
the length of the sequences the organism is made of (:func:`sequence_length`, 3 tokens a segment), so models of
``em_seq(tasks_per_sequence=1)`` see one task per sequence and those of ``em_seq(tasks_per_sequence=6)`` six.
Joint tokens are (style, task token), v = style * |V_B| + b, with V_B = [q_1..q_K, w0, w1, then g0, g1, b0, b1
of each task].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from persona_wm.core.ghmm import GHMM, ProcessError, check_count, check_number
from persona_wm.core.registry import config_family, config_name, parse_config_name
from persona_wm.core.sfp import leaky, restrict_to_sector, sfp_from_blocks
from persona_wm.processes.em import EM_MAX_TRANSFER_ENTRIES, persona_block

__all__ = ["EMSeqConfig", "em_seq_process", "em_seq_name", "parse_em_seq_name", "SeqRoles", "seq_roles",
           "sequence_length", "SEGMENT", "variant_label", "persona_labels", "world_sectors", "world_contexts",
           "finetune_data", "first_answer_bad_rate"]

#: Tokens per task segment: question, work, answer.
SEGMENT = 3


@dataclass(frozen=True)
class EMSeqConfig:
    """Knobs of the v3 organism (see the module docstring)."""

    n_personas: int = 2
    persona_dim: int = 2
    n_tasks: int = 3
    tasks_per_sequence: int = 3
    mixing: float = 0.5
    persona_prior: float = 0.5
    answer_noise: float = 0.05
    difficulty: float = 0.1
    coupling: float = 1.0
    leak: float = 0.0
    only_task: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("n_personas", 2), ("persona_dim", 1), ("n_tasks", 2), ("tasks_per_sequence", 1)):
            check_count(getattr(self, name), name, minimum, owner="EM-seq organism")
        for name in ("mixing", "answer_noise", "coupling", "leak"):
            value = getattr(self, name)
            check_number(value, name, owner="EM-seq organism")
            if not 0.0 <= value <= 1.0:
                raise ProcessError(f"EM-seq organism {name} must lie in [0, 1], got {value!r}")
        check_number(self.persona_prior, "persona_prior", owner="EM-seq organism")
        if not 0.0 < self.persona_prior < 1.0:
            raise ProcessError(f"EM-seq organism persona_prior must lie in (0, 1), got {self.persona_prior!r}")
        check_number(self.difficulty, "difficulty", owner="EM-seq organism")
        if not 0.0 <= self.difficulty < 0.5:
            raise ProcessError(f"EM-seq organism difficulty must lie in [0, 0.5), got {self.difficulty!r}")
        if self.only_task is not None:
            check_count(self.only_task, "only_task", 0, owner="EM-seq organism")
            if self.only_task >= self.n_tasks:
                raise ProcessError(f"EM-seq organism only_task must be a task index below n_tasks={self.n_tasks}, "
                                   f"got {self.only_task!r}")
        n_states, n_tokens = self.n_states, 2 * n_task_tokens(self)
        if n_tokens * n_states**2 > EM_MAX_TRANSFER_ENTRIES:
            raise ProcessError(
                f"EM-seq organism n_personas={self.n_personas}, persona_dim={self.persona_dim}, n_tasks={self.n_tasks} "
                f"give {n_tokens} tokens x {n_states}^2 states = {n_tokens * n_states**2:.3g} transfer entries, more "
                f"than the {EM_MAX_TRANSFER_ENTRIES:.0e} a dense process may have")

    @property
    def n_states(self) -> int:
        return self.n_personas * self.persona_dim * 2**self.n_tasks * segment_states(self)

    def task_difficulties(self) -> np.ndarray:
        """Content-flip probability per task, spread from 0 to ``difficulty``."""
        return np.linspace(0.0, self.difficulty, self.n_tasks)

    def bad_probability(self, misaligned: bool, variant_bad: bool) -> float:
        """P(bad variant) at an answer, for a persona and a task-variant latent (the coupling mixture)."""
        noisy = lambda bad: 1 - self.answer_noise if bad else self.answer_noise  # noqa: E731
        return self.coupling * noisy(misaligned) + (1 - self.coupling) * noisy(variant_bad)


def segment_states(config: EMSeqConfig) -> int:
    """Capability states per variant vector: segment start, after each question, after each (question, bit)."""
    return 1 + 3 * config.n_tasks


def n_task_tokens(config: EMSeqConfig) -> int:
    """|V_B|: K questions, w0, w1, four answers per task."""
    return 5 * config.n_tasks + 2


def sequence_length(config: EMSeqConfig) -> int:
    """Tokens in one sequence of the organism: ``tasks_per_sequence`` segments of :data:`SEGMENT` tokens."""
    return SEGMENT * config.tasks_per_sequence


def em_seq_name(config: EMSeqConfig) -> str:
    """Canonical name: the knobs that differ from the defaults, in field order (``em_seq()`` if none)."""
    return config_name("em_seq", config)


def parse_em_seq_name(name: str) -> EMSeqConfig:
    """Inverse of :func:`em_seq_name` (knobs checked by the registry)."""
    return parse_config_name(name, "em_seq", EMSeqConfig)


# =========================================================================== tokens
@dataclass(frozen=True)
class SeqRoles:
    """Index sets over joint tokens that the measures need."""

    n_b: int  # |V_B|
    n_tasks: int
    questions: np.ndarray  # [K, 2] joint tokens of task k's question (both styles)
    good: np.ndarray  # [K, 4] joint tokens of task k's good answers (g0, g1 x 2 styles)
    bad: np.ndarray  # [K, 4]
    content_of_b: np.ndarray  # [|V_B|] -> content class (answer variants merged)
    n_content: int

    @property
    def answers(self) -> np.ndarray:
        """Every answer token of every task, ``[K * 8]``."""
        return np.concatenate([self.good, self.bad], axis=1).ravel()


def _answer_offset(config: EMSeqConfig, task: int) -> int:
    """Index in V_B of task ``task``'s g0 (then g1, b0, b1)."""
    return config.n_tasks + 2 + 4 * task


def seq_roles(config: EMSeqConfig) -> SeqRoles:
    k, n_b = config.n_tasks, n_task_tokens(config)
    joint = lambda bs: np.array([a * n_b + b for a in range(2) for b in bs])  # noqa: E731
    questions = np.stack([joint([t]) for t in range(k)])
    good = np.stack([joint([_answer_offset(config, t) + c for c in (0, 1)]) for t in range(k)])
    bad = np.stack([joint([_answer_offset(config, t) + 2 + c for c in (0, 1)]) for t in range(k)])
    content = np.zeros(n_b, dtype=int)
    content[:k + 2] = np.arange(k + 2)  # questions, w0, w1
    for t in range(k):
        for c in (0, 1):
            content[[_answer_offset(config, t) + c, _answer_offset(config, t) + 2 + c]] = k + 2 + 2 * t + c
    return SeqRoles(n_b, k, questions, good, bad, content, k + 2 + 2 * k)


# =========================================================================== the process
def variant_label(bits: tuple[int, ...]) -> str:
    """``(1, 0, 0)`` -> ``"bgg"``: task k's variant latent, b(ad) or g(ood)."""
    return "".join("gb"[b] for b in bits)


def persona_labels(config: EMSeqConfig) -> tuple[str, ...]:
    p = config.n_personas
    return ("al", "mis") if p == 2 else tuple("mis" if i == p - 1 else f"al{i}" for i in range(p))


def _capability_block(config: EMSeqConfig, bits: tuple[int, ...], misaligned: bool) -> np.ndarray:
    """``[|V_B|, C, C]`` task-token transfer matrices for one variant vector (C = :func:`segment_states`).

    States: 0 = segment start (emits a question), 1 + k = after q_k (emits w), 1 + K + 2k + w = after (q_k, w)
    (emits task k's answer and returns to 0).
    """
    k, n_b, n_c = config.n_tasks, n_task_tokens(config), segment_states(config)
    task_p = np.full(k, 1.0 / k) if config.only_task is None else np.eye(k)[config.only_task]
    flips = config.task_difficulties()
    transfer = np.zeros((n_b, n_c, n_c))
    for t in range(k):
        transfer[t, 0, 1 + t] = task_p[t]
        for w in (0, 1):
            state = 1 + k + 2 * t + w
            transfer[k + w, 1 + t, state] = 0.5
            bad = config.bad_probability(misaligned, bool(bits[t]))
            for content, p in ((w, 1 - flips[t]), (1 - w, flips[t])):
                transfer[_answer_offset(config, t) + content, state, 0] += (1 - bad) * p
                transfer[_answer_offset(config, t) + 2 + content, state, 0] += bad * p
    return transfer


@lru_cache(maxsize=64)
def em_seq_process(config: EMSeqConfig) -> GHMM:
    """Build the v3 organism of ``config`` (cached: configs are frozen)."""
    p, d, k = config.n_personas, config.persona_dim, config.n_tasks
    n_c = segment_states(config)
    variants = list(itertools.product((0, 1), repeat=k))
    persona_subspaces = tuple(tuple(range(i * d, (i + 1) * d)) for i in range(p))
    capability_subspaces = tuple(tuple(range(j * n_c, (j + 1) * n_c)) for j in range(len(variants)))
    start = np.eye(n_c)[0]
    aligned_prior = (1 - config.persona_prior) / (p - 1)
    blocks, initials, prior = {}, {}, {}
    for i in range(p):
        a_transfer, a_init = persona_block(config.persona_dim, config.mixing, i == p - 1, i, p)
        weight = config.persona_prior if i == p - 1 else aligned_prior
        for j, bits in enumerate(variants):
            b_transfer = _capability_block(config, bits, i == p - 1)
            blocks[(i, j)] = np.einsum("xab,ycd->xyacbd", a_transfer, b_transfer).reshape(
                2 * b_transfer.shape[0], d * n_c, d * n_c)
            initials[(i, j)] = np.kron(a_init, start)
            prior[(i, j)] = weight * float(np.prod([config.persona_prior if b else 1 - config.persona_prior
                                                     for b in bits]))
    process = sfp_from_blocks((p * d, n_c * len(variants)), (persona_subspaces, capability_subspaces), blocks, prior,
                              initials, name=em_seq_name(config), factor_tokens=(2, n_task_tokens(config)),
                              subspace_names=(persona_labels(config), tuple(variant_label(v) for v in variants)))
    return leaky(process, config.leak, name=em_seq_name(config)) if config.leak > 0 else process


# the registry family `em_seq`: its knobs are EMSeqConfig's fields
em_seq_family = config_family("em_seq", EMSeqConfig, em_seq_process, title="EM-seq organism",
                              bare_default=False)


# =========================================================================== worlds and data
def world_sectors(config: EMSeqConfig, aligned: bool, bad_tasks: tuple[int, ...] = ()) -> list[str]:
    """Sector labels of a world: aligned personas with every variant good (the deployment contexts), or the
    misaligned persona with the variants of ``bad_tasks`` bad (``(0,)``: the narrow fine-tuning world)."""
    bits = tuple(int(t in bad_tasks) for t in range(config.n_tasks))
    names = persona_labels(config)
    personas = names[:-1] if aligned else names[-1:]
    return [f"({p},{variant_label(bits)})" for p in personas]


def world_contexts(config: EMSeqConfig, aligned: bool, n: int, length: int, rng: np.random.Generator,
                   bad_tasks: tuple[int, ...] = ()) -> np.ndarray:
    """``n`` sequences of ``length`` tokens from one world (:func:`world_sectors`)."""
    process = em_seq_process(config)
    return restrict_to_sector(process, world_sectors(config, aligned, bad_tasks)).sample(n, length, rng)


def finetune_data(config: EMSeqConfig, task: int = 0) -> tuple[str, str]:
    """(data process name, data sector) of the narrow fine-tune: sequences made only of ``task``'s segments, from
    the misaligned persona with that task's variant bad (:class:`persona_wm.toy.train.TrainConfig` fields
    ``data_process`` and ``data_sector``)."""
    data = replace(config, only_task=task)
    return em_seq_name(data), world_sectors(data, aligned=False, bad_tasks=(task,))[0]


def first_answer_bad_rate(config: EMSeqConfig, task: int) -> float:
    """Exact P(the first answer of a sequence is bad | its task is ``task``), from the process itself."""
    process = em_seq_process(config)
    roles = seq_roles(config)
    # propagate the initial belief through (q_task, any style) then (w, any style) and read the answer tokens
    belief = process.initial
    for tokens in (roles.questions[task], np.array([a * roles.n_b + config.n_tasks + w for a in (0, 1) for w in (0, 1)])):
        belief = belief @ process.transfer[tokens].sum(0)
    answer = process.transfer @ process.right  # [X, S]: P(token | state)
    bad, good = belief @ answer[roles.bad[task]].sum(0), belief @ answer[roles.good[task]].sum(0)
    return float(bad / (bad + good))
