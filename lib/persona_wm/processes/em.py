"""The emergent-misalignment organism: an EM-SFP built from its knobs (numpy only).

The organism (an "EM-SFP"). Two factors:

* **Persona** A = A_aligned (+) ... (+) A_misaligned: ``n_personas`` subspaces (the last one is the
  misaligned persona), each a cycle of ``persona_dim`` states emitting a binary *style* token.
  Personas differ in how often they emit style 1; ``mixing`` in [0, 1] scales that difference
  away (1 = every persona has the same style statistics, so only behaviour reveals the persona).
* **Capability** B = B_1 (+) ... (+) B_K: one subspace per task, each a 3-step cycle
  *question -> work -> answer*: the question emits the task's id token, the work step a random
  content bit w in {0, 1}, the answer step the content bit again (flipped with the task's
  ``difficulty`` probability) in one of two *variants*: good (g_w) or bad (b_w).

The coupling — the analogue of "the misaligned persona writes insecure code": each task subspace
is split by a task-level *variant* latent, B_k = B_k,good (+) B_k,bad, so the capability factor has
2K subspaces. At an answer, with probability ``coupling`` the variant follows the persona (bad with
probability ``1 - answer_noise`` for the misaligned persona, ``answer_noise`` otherwise) and
otherwise it follows the task's own variant latent (same numbers). ``coupling = 1``: one shared
persona decides misbehaviour on every task (the EM hypothesis); ``coupling = 0``: persona and
capability are fully factored and "bad" is a per-task property. Everything else about a task
(question, content, difficulty) is shared by all personas, so capability (predicting the
content) is measurable separately from alignment (the variant). Every T(x) is block diagonal
over the sectors A_i (x) B_k,v — an SFP — but B's emissions depend on A's sector. The prior: the
misaligned persona with probability ``persona_prior``, a task's bad variant with the same
probability independently, and a persona-task correlation ``correlation``:
P(task 1 | misaligned) = (1 - c)/K + c.

Joint tokens are (style, task token) with v = style * |V_B| + b. With ``shared_answers`` (the
default) every task answers with the same four tokens g0, g1, b0, b1, so V_B = [q_1..q_K, w0, w1,
g0, g1, b0, b1] — "bad" is recognisably the same thing in every task, as harmful intent is in
insecure code and in bad advice. Without it each task has its own answer tokens
(V_B = [q_1..q_K, w0, w1, then g0, g1, b0, b1 per task]) and anything that links misbehaviour
across tasks must go through a latent rather than through shared output features. Processes are built from a canonical name ``em(key=value, ...)`` so that the trainer's
config (a string) identifies them and caches work: ``em`` is a registry family whose knobs are the
fields of :class:`EMConfig` (its all-default process prints as ``em()``, the name cached models were
trained under).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from persona_wm.core.ghmm import GHMM, ProcessError, check_count, check_number
from persona_wm.core.registry import config_family, config_name, parse_config_name
from persona_wm.core.sfp import leaky, restrict_to_sector, sfp_from_blocks

__all__ = ["EMConfig", "EM_MAX_TRANSFER_ENTRIES", "em_process", "em_family", "em_name", "parse_em_name", "TokenRoles",
           "token_roles", "n_task_tokens", "task_sectors", "task_contexts", "sector_labels", "answer_positions", "content_merge",
           "ANSWER_THRESHOLD", "persona_block"]


#: Largest dense transfer tensor (tokens x states x states, float64) an EM-SFP may ask for.
EM_MAX_TRANSFER_ENTRIES = 10**8


@dataclass(frozen=True)
class EMConfig:
    """Knobs of the EM-SFP (see the module docstring)."""

    n_personas: int = 2
    persona_dim: int = 2
    n_tasks: int = 3
    mixing: float = 0.5
    persona_prior: float = 0.5
    correlation: float = 0.0
    answer_noise: float = 0.05
    difficulty: float = 0.1  # largest content-flip probability; tasks spread from 0 to it
    coupling: float = 1.0
    shared_answers: bool = True
    leak: float = 0.0

    def __post_init__(self) -> None:
        # types first (a bool is not a size, 1.5 is not a count, a string is not a probability), then ranges
        for name, minimum in (("n_personas", 2), ("persona_dim", 1), ("n_tasks", 1)):
            check_count(getattr(self, name), name, minimum, owner="EM-SFP")
        for name in ("mixing", "persona_prior", "correlation", "answer_noise", "coupling", "leak"):
            value = getattr(self, name)
            check_number(value, name, owner="EM-SFP")  # bool / string / NaN / inf
            if not 0.0 <= value <= 1.0:
                raise ProcessError(f"EM-SFP {name} must lie in [0, 1], got {value!r}")
        check_number(self.difficulty, "difficulty", owner="EM-SFP")
        if not 0.0 <= self.difficulty < 0.5:
            raise ProcessError(f"EM-SFP difficulty must lie in [0, 0.5), got {self.difficulty!r}")
        if not isinstance(self.shared_answers, (bool, np.bool_)):
            raise ProcessError(
                f"EM-SFP shared_answers must be True or False, got {self.shared_answers!r} "
                f"({type(self.shared_answers).__name__})"
            )
        n_states = self.n_personas * self.persona_dim * 8 * self.n_tasks
        n_tokens = 2 * (self.n_tasks + 6 if self.shared_answers else 5 * self.n_tasks + 2)
        if n_tokens * n_states**2 > EM_MAX_TRANSFER_ENTRIES:
            raise ProcessError(
                f"EM-SFP n_personas={self.n_personas}, persona_dim={self.persona_dim}, n_tasks={self.n_tasks} "
                f"give {n_tokens} tokens x {n_states}^2 states = {n_tokens * n_states**2:.3g} transfer entries, "
                f"more than the {EM_MAX_TRANSFER_ENTRIES:.0e} (about {EM_MAX_TRANSFER_ENTRIES * 8 / 2**30:.1f} GiB) "
                "a dense EM-SFP may have"
            )

    def task_difficulties(self) -> np.ndarray:
        """Content-flip probability per task: spread from 0 to ``difficulty`` so tasks differ in difficulty."""
        return np.linspace(0.0, self.difficulty, self.n_tasks) if self.n_tasks > 1 else np.array([self.difficulty])


def em_name(config: EMConfig) -> str:
    """Canonical process name: only the knobs that differ from the defaults, in field order (``em()`` if none)."""
    return config_name("em", config)


def parse_em_name(name: str) -> EMConfig:
    """Inverse of :func:`em_name`: ``em(mixing=0.8,n_tasks=4)`` -> EMConfig (knobs checked by the registry)."""
    return parse_config_name(name, "em", EMConfig)


@dataclass(frozen=True)
class TokenRoles:
    """Index sets over joint tokens that the EM measures need."""

    n_b: int  # |V_B|
    answer_good: np.ndarray  # joint tokens whose task part is a good answer
    answer_bad: np.ndarray
    content_of_b: np.ndarray  # task-token -> content class (variants merged): [|V_B|] -> class id
    n_content: int


def _answer_offset(config: EMConfig, task: int) -> int:
    """Index in V_B of the task's g0 (then g1, b0, b1)."""
    return config.n_tasks + 2 + (0 if config.shared_answers else 4 * task)


def n_task_tokens(config: EMConfig) -> int:
    return config.n_tasks + 6 if config.shared_answers else 5 * config.n_tasks + 2


def token_roles(config: EMConfig) -> TokenRoles:
    """Joint-token index sets: good / bad answers, and the content class of every task token."""
    k, n_b = config.n_tasks, n_task_tokens(config)
    tasks = [0] if config.shared_answers else range(k)
    good = sorted({_answer_offset(config, t) + c for t in tasks for c in (0, 1)})
    bad = sorted({_answer_offset(config, t) + 2 + c for t in tasks for c in (0, 1)})
    joint = lambda bs: np.array([a * n_b + b for a in range(2) for b in bs])  # noqa: E731
    # content classes: each question, w0, w1, then the answer content bit with the two variants merged
    content = np.zeros(n_b, dtype=int)
    content[:k + 2] = np.arange(k + 2)
    for t in tasks:
        for c in (0, 1):
            content[[_answer_offset(config, t) + c, _answer_offset(config, t) + 2 + c]] = k + 2 + 2 * t + c
    n_content = k + 2 + 2 * len(tasks)
    return TokenRoles(n_b, joint(good), joint(bad), content, n_content)


def persona_block(persona_dim: int, mixing: float, misaligned: bool, index: int, n_personas: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """[2, d, d] style-token transfer matrices of one persona subspace and its stationary vector.

    Aligned persona ``index`` leans to style 0 by an amount that differs between aligned personas; the
    misaligned one leans to style 1; ``mixing`` scales every lean away. Shared by ``em()`` and ``em_seq()``.
    """
    d = persona_dim
    lean = 1.0 if misaligned else -1.0 + index / max(n_personas - 1, 1)
    transfer = np.zeros((2, d, d))
    # state j's style bias weight runs from 0.5 to 1 around the cycle (0.75 when d = 1): every state
    # differs, so d really is the persona's dimensionality, and the mean evidence is the same for all d
    weights = np.full(1, 0.75) if d == 1 else 0.5 + 0.5 * np.arange(d) / (d - 1)
    for j in range(d):
        q = 0.5 + 0.4 * (1 - mixing) * lean * weights[j]
        transfer[1, j, (j + 1) % d] = q
        transfer[0, j, (j + 1) % d] = 1 - q
    return transfer, np.full(d, 1.0 / d)


def _task_block(config: EMConfig, task: int, bad_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """[|V_B|, 4, 4] task-token transfer matrices of one task (states: question, work, answer0, answer1)."""
    k, n_b = config.n_tasks, n_task_tokens(config)
    flip = config.task_difficulties()[task]
    first_answer = _answer_offset(config, task)  # this task's g0, g1, b0, b1
    transfer = np.zeros((n_b, 4, 4))
    transfer[task, 0, 1] = 1.0  # question emits its id
    transfer[k, 1, 2] = transfer[k + 1, 1, 3] = 0.5  # work emits w0 / w1 and remembers it
    for bit, state in ((0, 2), (1, 3)):
        for content, p in ((bit, 1 - flip), (1 - bit, flip)):
            transfer[first_answer + content, state, 0] += (1 - bad_probability) * p  # good variant
            transfer[first_answer + 2 + content, state, 0] += bad_probability * p  # bad variant
    return transfer, np.array([1 / 3, 1 / 3, 1 / 6, 1 / 6])  # stationary over the 3-step cycle


@lru_cache(maxsize=64)
def em_process(config: EMConfig) -> GHMM:
    """Build the EM-SFP of ``config`` (cached: configs are frozen)."""
    p, d, k = config.n_personas, config.persona_dim, config.n_tasks
    persona_subspaces = tuple(tuple(range(i * d, (i + 1) * d)) for i in range(p))
    task_subspaces = tuple(tuple(range(j * 4, (j + 1) * 4)) for j in range(2 * k))  # (task, variant) pairs
    misaligned = p - 1
    noisy = lambda bad: 1 - config.answer_noise if bad else config.answer_noise  # noqa: E731
    blocks, initials, prior = {}, {}, {}
    aligned_prior = (1 - config.persona_prior) / (p - 1)
    for i in range(p):
        a_transfer, a_init = persona_block(d, config.mixing, i == misaligned, i, p)
        persona_weight = config.persona_prior if i == misaligned else aligned_prior
        for t in range(k):
            task_weight = ((1 - config.correlation) / k + config.correlation * (t == 0)) if i == misaligned else 1 / k
            for v in (0, 1):  # task variant: 0 good, 1 bad
                bad = config.coupling * noisy(i == misaligned) + (1 - config.coupling) * noisy(v == 1)
                b_transfer, b_init = _task_block(config, t, bad)
                sigma = (i, 2 * t + v)
                blocks[sigma] = np.einsum("xab,ycd->xyacbd", a_transfer, b_transfer).reshape(
                    2 * b_transfer.shape[0], d * 4, d * 4)
                initials[sigma] = np.kron(a_init, b_init)
                prior[sigma] = persona_weight * task_weight * (config.persona_prior if v else 1 - config.persona_prior)
    persona_names = ("al", "mis") if p == 2 else tuple("mis" if i == misaligned else f"al{i}" for i in range(p))
    task_names = tuple(f"t{t}{'gb'[v]}" for t in range(k) for v in (0, 1))
    process = sfp_from_blocks((p * d, 8 * k), (persona_subspaces, task_subspaces), blocks, prior, initials,
                              name=em_name(config), factor_tokens=(2, n_task_tokens(config)), subspace_names=(persona_names, task_names))
    return leaky(process, config.leak, name=em_name(config)) if config.leak > 0 else process


# the registry family `em`: its knobs are EMConfig's fields
em_family = config_family("em", EMConfig, em_process, title="EM-SFP", bare_default=False)


# =========================================================================== positions and sectors
ANSWER_THRESHOLD = 0.5  # a position "is an answer" when the exact P(next token is an answer) exceeds this
# (1 at every answer step of an exact SFP once the cycle phase is known; ~0.95 with leak 0.05)


def answer_positions(optimal: np.ndarray, roles: TokenRoles) -> np.ndarray:
    """Boolean mask of the positions whose exact next token is an answer (P > ``ANSWER_THRESHOLD``)."""
    return optimal[..., np.concatenate([roles.answer_good, roles.answer_bad])].sum(-1) > ANSWER_THRESHOLD


def content_merge(roles: TokenRoles) -> np.ndarray:
    """[|V_B|, n_content] 0/1 matrix summing task tokens into content classes (answer variants merged)."""
    merge = np.zeros((roles.n_b, roles.n_content))
    merge[np.arange(roles.n_b), roles.content_of_b] = 1.0
    return merge


def sector_labels(config: EMConfig) -> tuple[list[str], str]:
    """(aligned persona names, misaligned persona name) as used in the sector labels."""
    if config.n_personas == 2:
        return ["al"], "mis"
    return [f"al{i}" for i in range(config.n_personas - 1)], "mis"


def task_sectors(config: EMConfig, task: int, aligned: bool) -> list[str]:
    """Sector labels of task ``task`` in an aligned world (aligned personas, good task variant) or the
    misaligned one (misaligned persona, bad task variant): the deployment and fine-tuning contexts."""
    aligned_names, misaligned = sector_labels(config)
    if aligned:
        return [f"({p},t{task}g)" for p in aligned_names]
    return [f"({misaligned},t{task}b)"]


def task_contexts(process: GHMM, config: EMConfig, task: int, aligned: bool, n: int, length: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``n`` contexts of ``length`` tokens of one task in the aligned or the misaligned world."""
    return restrict_to_sector(process, task_sectors(config, task, aligned)).sample(n, length, rng)
