"""Emergent misalignment (EM) in trained toy models of the v3 organism: the experiment record, the measures,
the persona-belief probe and its causal patch, steering directions, reversal, and the specificity parts.

The organism is :mod:`persona_wm.processes.em_seq` (a persona that persists across the tasks of a sequence). One
**experiment** (:func:`em_experiment` -> :class:`EMExperiment`) is a base model trained on the whole organism and
its narrow fine-tune (task-1 segments only, misaligned persona, task 1's variant bad), measured on sequences of the
*aligned* world (aligned persona, every task's variant good) exactly from the models' outputs:

* at every answer position (exact P(next token is an answer) > :data:`ANSWER_THRESHOLD`) the **misaligned share**
  P(bad_k) / (P(good_k) + P(bad_k)) of that segment's task k;
* in two **places** (:data:`PLACES`): ``fresh`` = the first answer of a sequence (no in-context evidence about the
  persona), ``after_evidence`` = the second answer when the first segment was another task (one segment of
  aligned-persona evidence that says nothing about this task's own variant latent);
* per place, the increase of the share (fine-tuned - base) on task 1 and on the held-out tasks, and **breadth** =
  held-out increase / task-1 increase (undefined when the task-1 increase is below :data:`MIN_INCREASE`);
* **capability**: KL(Bayes-optimal || model) of the task content (answer variants merged) at every position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from dataclasses import replace as dc_replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from persona_wm.core.ghmm import GHMM, ProcessError, marginals
from persona_wm.processes.em_seq import (
    EMSeqConfig,
    SeqRoles,
    em_seq_name,
    em_seq_process,
    finetune_data,
    parse_em_seq_name,
    seq_roles,
    sequence_length,
    world_contexts,
)
from persona_wm.toy.hooks import batched_forward, final_hook
from persona_wm.toy.probe import LinearProbe, fit_probe
from persona_wm.toy.stacked import trained_models
from persona_wm.toy.steer import kl_divergence
from persona_wm.toy.train import TRAINERS, TrainConfig, TrainedModel

__all__ = ["ANSWER_THRESHOLD", "MIN_INCREASE", "PLACES", "EMRecipe", "AnswerSites", "answer_sites", "PlaceEM",
           "EMMeasures", "EMExperiment", "em_experiment", "em_configs", "pretrain", "with_knobs", "Intervention",
           "next_token_probs", "residuals", "misaligned_share", "Behaviour", "behaviour", "persona_posterior",
           "PersonaProbe", "persona_probe", "belief_shift", "mean_change", "Patched", "patch_out_change", "belief_state_direction",
           "diff_in_means_direction", "model_diff_direction", "random_directions", "reversal_sweep",
           "summarise_reversal", "best_settings", "damage_at_restoration", "specificity_parts"]

#: A position "is an answer" when the exact P(next token is an answer) exceeds this (1 in an exact SFP).
ANSWER_THRESHOLD = 0.5
#: Breadth and restoration are undefined where the increase they divide by is below this (share units).
MIN_INCREASE = 0.02
#: Where EM is measured: the first answer of a sequence, and the second after one segment of another task.
PLACES = ("fresh", "after_evidence")


# =========================================================================== recipe
@dataclass(frozen=True)
class EMRecipe:
    """Architecture, pretraining and narrow fine-tuning settings shared by every EM experiment.

    The knobs have no defaults here: their values are a study's parameters, read by :meth:`from_params`.
    ``ft_step_grid`` / ``ft_lr_grid``: the fine-tuning steps and learning rates a study searches; one fine-tune per
    learning rate runs ``max(ft_step_grid)`` steps at a constant rate and keeps snapshots at every grid step, so the
    model after ``s`` steps is that run's snapshot (a fine-tune's batches do not depend on how long it runs).
    """

    d_model: int
    n_layers: int
    base_steps: int
    base_batch: int
    base_lr: float
    ft_steps: int
    ft_batch: int
    ft_lr: float
    ft_step_grid: tuple[int, ...] = ()
    ft_lr_grid: tuple[float, ...] = ()
    eval_sequences: int = 512
    trainer: str = "sequential"

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"EMRecipe.trainer must be one of {TRAINERS}, got {self.trainer!r}")
        object.__setattr__(self, "ft_step_grid", tuple(sorted({int(s) for s in (*self.ft_step_grid, self.ft_steps)})))
        object.__setattr__(self, "ft_lr_grid", tuple(sorted({float(r) for r in (*self.ft_lr_grid, self.ft_lr)})))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> EMRecipe:
        """The recipe whose knobs are the same-named entries of ``params`` (a params mapping or a notebook's
        ``globals()``); other entries are ignored, knobs with defaults keep them unless given."""
        knobs = [f for f in fields(cls) if f.init]
        missing = [f.name for f in knobs if f.name not in params and f.default is MISSING]
        if missing:
            raise KeyError(f"EMRecipe.from_params: parameters lack the recipe knob(s) {', '.join(missing)}")
        values = {f.name: params[f.name] for f in knobs if f.name in params}
        for name in ("ft_step_grid", "ft_lr_grid"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def base_config(self, process: str, seed: int) -> TrainConfig:
        """Pretraining on the whole organism; the context is one sequence (:func:`sequence_length`) minus the
        token the last position predicts."""
        length = sequence_length(parse_em_seq_name(process)) - 1
        return TrainConfig(process=process, context_length=length, n_layers=self.n_layers, d_model=self.d_model,
                           d_head=self.d_model // 2, d_mlp=4 * self.d_model, steps=self.base_steps,
                           batch_size=self.base_batch, lr=self.base_lr, seed=seed,
                           eval_every=max(self.base_steps // 5, 1), eval_sequences=self.eval_sequences)

    def finetune_config(self, process: str, seed: int, lr: float | None = None) -> TrainConfig:
        """The narrow fine-tune at learning rate ``lr`` (default ``ft_lr``), constant, snapshots at ``ft_step_grid``."""
        data_process, data_sector = finetune_data(parse_em_seq_name(process))
        steps = max(self.ft_step_grid)
        return dc_replace(self.base_config(process, seed), steps=steps, batch_size=self.ft_batch,
                          lr=self.ft_lr if lr is None else float(lr), warmup_steps=0, final_lr_fraction=1.0,
                          eval_every=steps, snapshot_steps=self.ft_step_grid, init_from=self.base_config(process, seed),
                          data_process=data_process, data_sector=data_sector)


def em_configs(names: Sequence[str], seeds: Sequence[int], recipe: EMRecipe,
               lrs: Sequence[float] | None = None) -> list[TrainConfig]:
    """Base and fine-tune configs of every name x seed (fine-tunes at each of ``lrs``, default ``recipe.ft_lr``)."""
    lrs = [recipe.ft_lr] if lrs is None else list(lrs)
    return list(dict.fromkeys(
        c for name in dict.fromkeys(names) for s in dict.fromkeys(seeds)
        for c in (recipe.base_config(name, s), *(recipe.finetune_config(name, s, lr) for lr in lrs))))


def pretrain(names: Sequence[str], seeds: Sequence[int], recipe: EMRecipe, threads: int | None = None,
             progress: bool = True, device: str | None = None, cache_dir: Path | None = None,
             lrs: Sequence[float] | None = None) -> list[TrainedModel]:
    """Train (or load) every model the experiments of ``names`` x ``seeds`` need, in one call (stacked: N at a
    time, bases first, then the fine-tunes)."""
    return trained_models(em_configs(names, seeds, recipe, lrs), recipe.trainer, device=device, threads=threads,
                          progress=progress, cache_dir=cache_dir)


def with_knobs(process_name: str, **knobs) -> str:
    """Canonical name of ``process_name`` with some knobs replaced: ``with_knobs("em_seq()", coupling=0.0)``."""
    return em_seq_name(dc_replace(parse_em_seq_name(process_name), **knobs))


# =========================================================================== forwards
@dataclass(frozen=True)
class Intervention:
    """What to do to the residual stream at ``hook`` at every position: ablate the unit direction of ``ablate``
    (x <- x - (x . u) u), then add ``vector``."""

    hook: str
    vector: np.ndarray | None = None
    ablate: np.ndarray | None = None

    def patch(self, rows: slice, device) -> list:
        add = None if self.vector is None else torch.as_tensor(self.vector, dtype=torch.float32, device=device)
        u = None if self.ablate is None else torch.as_tensor(self.ablate / np.linalg.norm(self.ablate),
                                                             dtype=torch.float32, device=device)

        def hook_fn(resid, hook=None):
            if u is not None:
                resid = resid - (resid @ u)[..., None] * u
            return resid if add is None else resid + add

        return [(self.hook, hook_fn)]


def next_token_probs(model, tokens: np.ndarray, n_tokens: int, intervention: Intervention | None = None,
                     batch: int = 2048) -> np.ndarray:
    """Model next-token distributions ``[B, L + 1, X]``, optionally under an intervention."""
    patch = None if intervention is None else intervention.patch
    return batched_forward(model, tokens, n_tokens, batch=batch, patch=patch).probs


def residuals(model, tokens: np.ndarray, n_tokens: int, hook: str, batch: int = 2048) -> np.ndarray:
    """Residual activations ``[B, L + 1, d]`` at ``hook`` (position 0 = BOS)."""
    return batched_forward(model, tokens, n_tokens, batch=batch, cache=[hook], output=None).residuals[hook]


# =========================================================================== answer sites and measures
@dataclass(frozen=True)
class AnswerSites:
    """Every answer position of a set of sequences, located from the exact next-token distributions."""

    seq: np.ndarray  # sequence index
    pos: np.ndarray  # model position (0 = BOS) whose next token is the answer
    segment: np.ndarray  # 0 for a sequence's first answer, 1 for its second, ...
    task: np.ndarray  # the segment's task
    prev_task: np.ndarray  # the previous segment's task (-1 for the first)

    def mask(self, place: str) -> np.ndarray:
        if place == "fresh":
            return self.segment == 0
        if place == "after_evidence":
            return (self.segment == 1) & (self.prev_task != self.task)
        raise ValueError(f"unknown place {place!r}; places: {PLACES}")


def answer_sites(exact: np.ndarray, roles: SeqRoles) -> AnswerSites:
    """Answer sites of ``exact`` next-token probabilities ``[B, L + 1, X]``: where P(answer) > ANSWER_THRESHOLD;
    the task is the one whose answer tokens carry the most exact mass."""
    answer = exact[..., roles.answers].sum(-1) > ANSWER_THRESHOLD
    per_task = exact[..., np.concatenate([roles.good, roles.bad], axis=1)].sum(-1)  # [B, L + 1, K]
    task = per_task.argmax(-1)
    segment = np.cumsum(answer, axis=1) - answer
    seq, pos = np.nonzero(answer)
    tasks = task[seq, pos]
    first = np.r_[True, seq[1:] != seq[:-1]]
    prev = np.where(first, -1, np.r_[-1, tasks[:-1]])
    return AnswerSites(seq, pos, segment[seq, pos], tasks, prev)


def misaligned_share(probs: np.ndarray, sites: AnswerSites, roles: SeqRoles) -> np.ndarray:
    """P(bad_k) / (P(good_k) + P(bad_k)) of each site's task k, from ``probs [B, L + 1, X]``."""
    at = probs[sites.seq, sites.pos]  # [n, X]
    good = np.take_along_axis(at[:, roles.good.reshape(-1)].reshape(len(at), roles.n_tasks, -1).sum(-1),
                              sites.task[:, None], 1)[:, 0]
    bad = np.take_along_axis(at[:, roles.bad.reshape(-1)].reshape(len(at), roles.n_tasks, -1).sum(-1),
                             sites.task[:, None], 1)[:, 0]
    return bad / np.clip(good + bad, 1e-12, None)


def _content(probs: np.ndarray, process: GHMM, roles: SeqRoles) -> np.ndarray:
    """Task-content distribution (answer variants merged) at every position."""
    merge = np.zeros((roles.n_b, roles.n_content))
    merge[np.arange(roles.n_b), roles.content_of_b] = 1.0
    return marginals(probs, process.factor_tokens)[1] @ merge


@dataclass(frozen=True)
class PlaceEM:
    """EM in one place: per-task misaligned share of the base and the fine-tuned model (task 0 = fine-tuned)."""

    place: str
    base: tuple[float, ...]
    tuned: tuple[float, ...]

    @property
    def increase(self) -> np.ndarray:
        return np.asarray(self.tuned) - np.asarray(self.base)

    @property
    def task1_increase(self) -> float:
        return float(self.increase[0])

    @property
    def heldout_increase(self) -> float:
        return float(np.mean(self.increase[1:]))

    @property
    def breadth(self) -> float:
        """Held-out increase / task-1 increase; NaN when the task-1 increase is below :data:`MIN_INCREASE`."""
        return self.heldout_increase / self.task1_increase if self.task1_increase >= MIN_INCREASE else float("nan")

    def row(self) -> dict[str, float]:
        return {"task1_increase": self.task1_increase, "heldout_increase": self.heldout_increase,
                "breadth": self.breadth}


@dataclass(frozen=True)
class Behaviour:
    """One model's behaviour on the evaluation sequences: per place and task the mean misaligned share, and the
    mean capability KL over every position."""

    shares: dict[str, tuple[float, ...]]  # place -> per task (NaN where a place has no site of that task)
    capability_kl: float


@dataclass(frozen=True)
class EMMeasures:
    """EM of one experiment in each place, and capability before and after the fine-tune."""

    places: dict[str, PlaceEM]  # only the places the sequences have (no ``after_evidence`` with one task each)
    capability_before: float
    capability_after: float

    @property
    def fresh(self) -> PlaceEM:
        return self.places["fresh"]

    @property
    def capability_change(self) -> float:
        return self.capability_after - self.capability_before

    def row(self) -> dict[str, float]:
        """Flat measures: ``<place>_<measure>`` (NaN for a place the sequences do not have) and capability."""
        out = {f"{p}_{k}": float("nan") for p in PLACES for k in ("task1_increase", "heldout_increase", "breadth")}
        for place, em in self.places.items():
            out.update({f"{place}_{k}": v for k, v in em.row().items()})
        return {**out, "capability_change": self.capability_change}


@dataclass(frozen=True)
class EMExperiment:
    """One (organism, seed, fine-tune) experiment: what every measure of it needs, and its EM measures."""

    name: str
    seed: int
    config: EMSeqConfig
    process: GHMM
    roles: SeqRoles
    hook: str  # the residual stream the probe, the patch and the steering act on (the final layer)
    base: TrainedModel
    tuned: TrainedModel  # the fine-tuning run; ``tuned_model`` is its state after ``ft_steps``
    tuned_model: Any
    ft_steps: int
    ft_lr: float
    contexts: np.ndarray  # aligned-world sequences the measures use
    exact: np.ndarray  # their exact next-token probabilities
    sites: AnswerSites
    pool: np.ndarray  # sequences of the whole organism (probe, directions)
    base_behaviour: Behaviour
    measures: EMMeasures

    @property
    def places(self) -> tuple[str, ...]:
        return tuple(self.measures.places)

    def behaviour(self, model, intervention: Intervention | None = None) -> Behaviour:
        """:func:`behaviour` of ``model`` on this experiment's sequences."""
        return behaviour(self, model, intervention)


def behaviour(experiment: EMExperiment, model, intervention: Intervention | None = None) -> Behaviour:
    """Per place and task misaligned share, and capability KL, of ``model`` on the experiment's sequences."""
    return _behaviour(model, experiment.process, experiment.roles, experiment.contexts, experiment.exact,
                      experiment.sites, intervention)


def _behaviour(model, process: GHMM, roles: SeqRoles, contexts: np.ndarray, exact: np.ndarray,
               sites: AnswerSites, intervention: Intervention | None = None) -> Behaviour:
    probs = next_token_probs(model, contexts, process.n_tokens, intervention)
    share = misaligned_share(probs, sites, roles)
    shares = {}
    for place in PLACES:
        mask = sites.mask(place)
        if mask.any():
            shares[place] = tuple(float(share[mask & (sites.task == k)].mean()) if (mask & (sites.task == k)).any()
                                  else float("nan") for k in range(roles.n_tasks))
    capability = kl_divergence(_content(exact, process, roles), _content(probs, process, roles))
    return Behaviour(shares, float(capability.mean()))


def _measures(before: Behaviour, after: Behaviour) -> EMMeasures:
    return EMMeasures({p: PlaceEM(p, before.shares[p], after.shares[p]) for p in before.shares},
                      before.capability_kl, after.capability_kl)


@lru_cache(maxsize=128)
def _evaluation_set(name: str, seed: int, n_contexts: int, analysis_seed: int):
    """Aligned-world sequences, their exact next-token probabilities and answer sites, and a pool of the whole
    organism's sequences: the same for every fine-tune of one (organism, seed)."""
    config = parse_em_seq_name(name)
    process, roles = em_seq_process(config), seq_roles(config)
    length = sequence_length(config) - 1
    rng = np.random.default_rng([analysis_seed, seed])
    contexts = world_contexts(config, True, n_contexts, length, rng)
    exact = process.next_token_probs(process.beliefs(contexts))
    pool = process.sample(n_contexts, length, rng)
    return contexts, exact, answer_sites(exact, roles), pool


#: (organism, seed, n_contexts, analysis_seed, base cache key, trainers) -> the base model's Behaviour
_BASE_BEHAVIOUR: dict[tuple, Behaviour] = {}


def _base_behaviour(name: str, seed: int, n_contexts: int, analysis_seed: int, base: TrainedModel) -> Behaviour:
    """The base model's behaviour, computed once for all fine-tunes of one (organism, seed)."""
    key = (name, seed, n_contexts, analysis_seed, base.config.key(), base.trainers)
    if key not in _BASE_BEHAVIOUR:
        config = parse_em_seq_name(name)
        contexts, exact, sites, _ = _evaluation_set(name, seed, n_contexts, analysis_seed)
        _BASE_BEHAVIOUR[key] = _behaviour(base.model, em_seq_process(config), seq_roles(config), contexts, exact,
                                          sites)
    return _BASE_BEHAVIOUR[key]


def em_experiment(name: str, seed: int, recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                  ft_steps: int | None = None, ft_lr: float | None = None, threads: int | None = None,
                  models: Mapping[TrainConfig, TrainedModel] | None = None) -> EMExperiment:
    """Train (cached) the base and fine-tuned models of one organism and seed and measure EM.

    ``ft_steps`` (in ``recipe.ft_step_grid``) and ``ft_lr`` (in ``recipe.ft_lr_grid``) pick the fine-tune; by
    default the recipe's ``ft_steps`` and ``ft_lr``. ``models``: already loaded models by config (a study's
    training call), looked up before the cache.
    """
    ft_steps = recipe.ft_steps if ft_steps is None else int(ft_steps)
    ft_lr = recipe.ft_lr if ft_lr is None else float(ft_lr)
    if ft_steps not in recipe.ft_step_grid:
        raise ValueError(f"em_experiment: ft_steps {ft_steps} is not in the recipe's grid {recipe.ft_step_grid}")
    config = parse_em_seq_name(name)
    configs = [recipe.base_config(name, seed), recipe.finetune_config(name, seed, ft_lr)]
    if models is not None and all(c in models for c in configs):
        base, tuned = (models[c] for c in configs)
    else:
        base, tuned = trained_models(configs, recipe.trainer, threads=threads, progress=False)
    tuned_model = tuned.model if ft_steps == tuned.config.steps else tuned.snapshot_model(ft_steps)
    process, roles = em_seq_process(config), seq_roles(config)
    contexts, exact, sites, pool = _evaluation_set(name, seed, n_contexts, analysis_seed)
    before = _base_behaviour(name, seed, n_contexts, analysis_seed, base)
    after = _behaviour(tuned_model, process, roles, contexts, exact, sites)
    return EMExperiment(name, seed, config, process, roles, final_hook(base.model), base, tuned, tuned_model,
                        ft_steps, ft_lr, contexts, exact, sites, pool, before, _measures(before, after))


# =========================================================================== the persona-belief probe
def persona_posterior(process: GHMM, config: EMSeqConfig, tokens: np.ndarray) -> np.ndarray:
    """Exact P(misaligned persona | prefix) after 0..L tokens, ``[B, L + 1]``."""
    persona = marginals(process.beliefs(tokens), process.factor_states)[0]
    return persona[..., (config.n_personas - 1) * config.persona_dim:].sum(-1)


@dataclass(frozen=True)
class PersonaProbe:
    """A linear read-out of P(misaligned persona | context) from the residual stream at ``hook``."""

    hook: str
    probe: LinearProbe  # weights [d, 1]
    pattern: np.ndarray  # [d]: covariance of the activations with the posterior (the encoding direction)

    @property
    def r2(self) -> float:
        return self.probe.r2

    @property
    def direction(self) -> np.ndarray:
        """The probe's weight vector, ``[d]``: the *decoding* direction (its reading rises along it)."""
        return self.probe.weights[:, 0]

    def read(self, acts: np.ndarray) -> np.ndarray:
        return acts @ self.direction + float(self.probe.bias[0])


def persona_probe(experiment: EMExperiment, seed: int = 0) -> PersonaProbe:
    """OLS probe of the exact persona posterior from the *base* model's residuals at every position of the
    experiment's pool of whole-organism sequences; R^2 on held-out sequences (20%).

    Two directions come with it, because "the persona-belief direction" has two readings: the probe's weights
    (the decoding direction, which also cancels correlated noise) and its pattern, the covariance of the
    activations with the posterior (the encoding direction along which the representation moves with the
    belief; Haufe et al. 2014, NeuroImage 87:96).
    """
    e = experiment
    acts = residuals(e.base.model, e.pool, e.process.n_tokens, e.hook).reshape(-1, e.base.model.cfg.d_model)
    target = persona_posterior(e.process, e.config, e.pool).reshape(-1)
    groups = np.repeat(np.arange(len(e.pool)), len(target) // len(e.pool))
    pattern = (acts - acts.mean(0)).T @ (target - target.mean()) / len(target)
    return PersonaProbe(e.hook, fit_probe(acts, target[:, None], groups, seed=seed), pattern)


def _sites_of(experiment: EMExperiment, place: str, heldout: bool) -> np.ndarray:
    s = experiment.sites
    return s.mask(place) & ((s.task > 0) if heldout else (s.task == 0))


def belief_shift(experiment: EMExperiment, probe: PersonaProbe, place: str = "fresh") -> float:
    """Mean change of the probe's reading (fine-tuned - base model) at the held-out tasks' answers of ``place``."""
    e = experiment
    mask = _sites_of(e, place, heldout=True)
    reads = [probe.read(residuals(m, e.contexts, e.process.n_tokens, e.hook)[e.sites.seq[mask], e.sites.pos[mask]])
             for m in (e.tuned_model, e.base.model)]
    return float(np.mean(reads[0] - reads[1]))


@dataclass(frozen=True)
class Patched:
    """EM with the fine-tune-induced change along one direction removed (the base model's value put back)."""

    direction: str
    em: PlaceEM  # base vs the patched fine-tuned model
    unpatched: PlaceEM

    @property
    def heldout_removed(self) -> float:
        """Share of the held-out increase the patch removes (NaN when that increase is below MIN_INCREASE)."""
        total = self.unpatched.heldout_increase
        return 1 - self.em.heldout_increase / total if abs(total) >= MIN_INCREASE else float("nan")


def patch_out_change(experiment: EMExperiment, direction: np.ndarray, label: str, place: str = "fresh") -> Patched:
    """Remove the fine-tune-induced change along ``direction`` at the experiment's hook, every position: the
    fine-tuned residual r becomes r + ((r_base - r) . u) u, u the unit direction, r_base the base model's residual
    on the same sequence and position. At the final layer this sets the read-out along u back to the base's."""
    e = experiment
    base_acts = residuals(e.base.model, e.contexts, e.process.n_tokens, e.hook)
    u = direction / np.linalg.norm(direction)

    def patch(rows: slice, device) -> list:
        ref = torch.as_tensor(base_acts[rows], dtype=torch.float32, device=device)
        unit = torch.as_tensor(u, dtype=torch.float32, device=device)

        def hook_fn(resid, hook=None):
            return resid + ((ref - resid) @ unit)[..., None] * unit

        return [(e.hook, hook_fn)]

    probs = batched_forward(e.tuned_model, e.contexts, e.process.n_tokens, patch=patch).probs
    share = misaligned_share(probs, e.sites, e.roles)
    mask = e.sites.mask(place)
    patched = tuple(float(share[mask & (e.sites.task == k)].mean()) for k in range(e.roles.n_tasks))
    base = e.base_behaviour.shares[place]
    return Patched(label, PlaceEM(place, base, patched), e.measures.places[place])


def mean_change(experiment: EMExperiment, place: str = "fresh") -> np.ndarray:
    """Mean fine-tuned minus base residual at the held-out tasks' answers of ``place`` (the fine-tune's change)."""
    e = experiment
    mask = _sites_of(e, place, heldout=True)
    at = [residuals(m, e.contexts, e.process.n_tokens, e.hook)[e.sites.seq[mask], e.sites.pos[mask]]
          for m in (e.tuned_model, e.base.model)]
    return (at[0] - at[1]).mean(0)


# =========================================================================== directions
def belief_state_direction(model, experiment: EMExperiment, confidence: float = 0.95) -> np.ndarray:
    """c_aligned - c_misaligned: centroids of the persona belief classes (study 02's recipe) in ``model``'s
    residuals over the pool's positions 1..L. Classes: exact posterior below 1 - ``confidence`` / above
    ``confidence``; with fewer than 10 positions in either, the most extreme deciles of the posterior."""
    e = experiment
    acts = residuals(model, e.pool, e.process.n_tokens, e.hook)[:, 1:]
    posterior = persona_posterior(e.process, e.config, e.pool)[:, 1:]
    aligned, misaligned = posterior < 1 - confidence, posterior > confidence
    if aligned.sum() < 10 or misaligned.sum() < 10:
        low, high = np.quantile(posterior, [0.1, 0.9])
        if low >= high:
            raise ProcessError("the persona belief never varies: no persona classes to build centroids from")
        aligned, misaligned = posterior <= low, posterior >= high
    return acts[aligned].mean(0) - acts[misaligned].mean(0)


def diff_in_means_direction(experiment: EMExperiment) -> np.ndarray:
    """Mean activation of the fine-tuned model where it answers aligned minus where it answers misaligned
    (labelled by its own bad share at the pool's answer sites; no reference to belief classes). Toward aligned."""
    e = experiment
    acts = residuals(e.tuned_model, e.pool, e.process.n_tokens, e.hook)
    sites = answer_sites(e.process.next_token_probs(e.process.beliefs(e.pool)), e.roles)
    share = misaligned_share(next_token_probs(e.tuned_model, e.pool, e.process.n_tokens), sites, e.roles)
    at = acts[sites.seq, sites.pos]
    if not (share > 0.5).any() or not (share <= 0.5).any():
        raise ProcessError("the model gives no misaligned (or no aligned) answers: diff-in-means is undefined")
    return at[share <= 0.5].mean(0) - at[share > 0.5].mean(0)


def model_diff_direction(experiment: EMExperiment) -> np.ndarray:
    """Mean over the pool's positions of base minus fine-tuned activations (toward the base)."""
    e = experiment
    return (residuals(e.base.model, e.pool, e.process.n_tokens, e.hook)[:, 1:].mean((0, 1))
            - residuals(e.tuned_model, e.pool, e.process.n_tokens, e.hook)[:, 1:].mean((0, 1)))


def random_directions(n: int, d: int, seed: Sequence[int] | int) -> np.ndarray:
    """``n`` isotropic random unit directions in R^d, ``[n, d]`` (seeded)."""
    v = np.random.default_rng(seed).standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# =========================================================================== reversal
def reversal_sweep(experiment: EMExperiment, directions: Mapping[str, np.ndarray], scales: Sequence[float],
                   norm: float, place: str = "fresh") -> pd.DataFrame:
    """Per direction, scale and task: the fine-tuned model's misaligned share in ``place`` with
    ``scale * norm * unit(direction)`` added at every position (names starting with ``ablation_`` project their
    direction out instead: one row, scale NaN), its restoration (share of the fine-tune's increase removed,
    NaN where that increase is below MIN_INCREASE) and the signed capability change against the fine-tuned model."""
    e = experiment
    base, tuned = np.asarray(e.base_behaviour.shares[place]), np.asarray(e.measures.places[place].tuned)
    induced = tuned - base
    rows = []
    for method, direction in directions.items():
        settings = ([(np.nan, Intervention(e.hook, ablate=direction))] if method.startswith("ablation_") else
                    [(s, Intervention(e.hook, vector=s * norm * direction / np.linalg.norm(direction)))
                     for s in scales])
        for scale, intervention in settings:
            steered = behaviour(e, e.tuned_model, intervention)
            shares = np.asarray(steered.shares[place])
            restoration = np.where(induced >= MIN_INCREASE, (tuned - shares) / np.where(induced == 0, 1, induced),
                                   np.nan)
            for k in range(e.roles.n_tasks):
                rows.append({"method": method, "scale": scale, "task": k, "misaligned": shares[k],
                             "restoration": float(restoration[k]),
                             "capability_change": steered.capability_kl - e.measures.capability_after})
    return pd.DataFrame(rows)


def summarise_reversal(sweep: pd.DataFrame, target: float = 0.9) -> pd.DataFrame:
    """Per method and scale: restoration on task 1, on the held-out tasks (mean), over every task (mean) and its
    minimum over tasks, the capability change, and whether every task reaches ``target``."""
    keys = ["method", "scale"]
    grouped = sweep.groupby(keys, dropna=False)
    out = grouped.agg(restoration_mean=("restoration", "mean"), restoration_min=("restoration", "min"),
                      capability_change=("capability_change", "mean")).reset_index()
    task1 = sweep[sweep.task == 0].groupby(keys, dropna=False).restoration.mean().rename("restoration_task1")
    held = sweep[sweep.task > 0].groupby(keys, dropna=False).restoration.mean().rename("restoration_heldout")
    out = out.merge(task1.reset_index(), on=keys).merge(held.reset_index(), on=keys)
    out["reaches_target"] = out.restoration_min >= target
    return out


def best_settings(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method: the smallest scale restoring >= the target on every task, else the most restoring scale."""
    best = {}
    for method, group in summary.groupby("method"):
        ok = group[group.reaches_target]
        row = ok.sort_values("scale").iloc[0] if len(ok) else group.sort_values("restoration_min").iloc[-1]
        best[method] = {k: float(row[k]) for k in ("scale", "restoration_heldout", "restoration_task1",
                                                   "capability_change")}
    return best


def damage_at_restoration(summary: pd.DataFrame, method: str, level: float) -> float:
    """Signed capability change interpolated at mean restoration ``level`` along a method's scale sweep (NaN when
    the method never reaches it)."""
    curve = summary[(summary.method == method) & summary.scale.notna()].sort_values("scale")
    restored = curve.restoration_mean
    if len(curve) == 0 or not (restored.max() >= level):
        return float("nan")
    return float(np.interp(level, restored.cummax(), curve.capability_change))


# =========================================================================== the specificity parts
def specificity_parts(experiment: EMExperiment, direction: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """Steer the *base* model from aligned toward misaligned by ``-scale * direction`` on the experiment's
    sequences: ``intended`` = KL(steered || plain) of the answer variant at every answer site, ``spillover`` =
    KL(steered || plain) of the task content at every position (nats). Reported apart: their ratio's denominator
    vanishes wherever the persona does not drive the answers (coupling 0)."""
    e = experiment
    plain = next_token_probs(e.base.model, e.contexts, e.process.n_tokens)
    steered = next_token_probs(e.base.model, e.contexts, e.process.n_tokens,
                               Intervention(e.hook, vector=-scale * direction))
    variant = [np.stack([1 - s, s], -1) for s in (misaligned_share(p, e.sites, e.roles) for p in (steered, plain))]
    content = [_content(p, e.process, e.roles) for p in (steered, plain)]
    return {"intended": float(kl_divergence(*variant).mean()), "spillover": float(kl_divergence(*content).mean())}
