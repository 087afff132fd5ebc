"""Emergent misalignment (EM) in trained toy models: measures, directions, reversal, the experiment pipeline.

The organism itself (:class:`EMConfig`, :func:`em_process`) is :mod:`persona_wm.processes.em` (numpy only); its
names are re-exported here so that a study needs one import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from persona_wm.analysis.stats import mean_t_ci, welch_difference
from persona_wm.core.ghmm import GHMM, ProcessError, marginals
from persona_wm.processes.em import (
    EMConfig,
    TokenRoles,
    answer_positions,
    content_merge,
    em_name,
    em_process,
    parse_em_name,
    task_contexts,
    task_sectors,
    token_roles,
)
from persona_wm.toy.hooks import batched_forward
from persona_wm.toy.steer import final_hook, kl_divergence
from persona_wm.toy.stacked import trained_models
from persona_wm.toy.train import TRAINERS, TrainConfig, TrainedModel

__all__ = ["EMConfig", "em_process", "em_name", "parse_em_name", "TokenRoles", "token_roles", "task_sectors",
           "task_contexts", "Intervention", "next_token_probs", "behaviour", "behaviour_by_task", "em_measures",
           "belief_state_direction", "diff_in_means_direction", "model_diff_direction", "reversal_sweep",
           "restoration", "summarise_reversal", "best_settings", "damage_at_restoration", "persona_specificity",
           "EMRecipe", "em_experiment", "em_configs", "pretrain", "coupling_names", "reversal_for", "diagnostic_row", "REVERSAL_METHODS", "variant_and_content",
           "answer_positions", "content_merge", "DESIGNS", "with_knobs", "em_rows", "coupling_sweep", "twin_table", "coupling_curve",
           "coupling_contrast", "describe_contrast", "reversal_over_seeds", "mean_restoration"]


@dataclass
class Intervention:
    """What to do to the residual stream at ``hook`` at every position: add ``vector`` and/or ablate ``ablate``.

    Ablation projects the activation onto the orthogonal complement of the unit direction
    (x <- x - (x . u) u), the directional ablation used on refusal/EM directions in LLMs.
    """

    hook: str
    vector: np.ndarray | None = None
    ablate: np.ndarray | None = None

    def fwd_hooks(self, device) -> list:
        add = None if self.vector is None else torch.as_tensor(self.vector, dtype=torch.float32, device=device)
        unit = None
        if self.ablate is not None:
            u = torch.as_tensor(self.ablate, dtype=torch.float32, device=device)
            unit = u / u.norm()

        def hook_fn(resid, hook=None):
            if unit is not None:
                resid = resid - (resid @ unit)[..., None] * unit
            if add is not None:
                resid = resid + add
            return resid

        return [(self.hook, hook_fn)]


@torch.no_grad()
def next_token_probs(model, tokens: np.ndarray, n_tokens: int, intervention: Intervention | None = None,
                     batch: int = 2048) -> np.ndarray:
    """Model next-token distributions at every position ``[B, L + 1, X]``, optionally under an intervention."""
    patch = None if intervention is None else (lambda rows, device: intervention.fwd_hooks(device))
    return batched_forward(model, tokens, n_tokens, batch=batch, patch=patch).probs


def behaviour(probs: np.ndarray, process: GHMM, tokens: np.ndarray, roles: TokenRoles) -> dict[str, float]:
    """Misaligned-answer mass and capability error of model outputs ``probs`` on contexts ``tokens``.

    * ``misaligned``: at answer positions (exact P(answer) > 0.5), the model's bad-variant share
      P(bad) / (P(good) + P(bad)), averaged over answer positions and contexts;
    * ``capability_kl``: KL(Bayes-optimal || model) of the task-content distribution (task tokens
      with the two answer variants merged), averaged over all positions — how well the model does
      the task, whatever persona it answers in.
    """
    optimal = process.next_token_probs(process.beliefs(tokens))
    answer = answer_positions(optimal, roles)
    _, content_optimal = variant_and_content(optimal, process, answer, roles)
    variant, content_model = variant_and_content(probs, process, answer, roles)
    capability = kl_divergence(content_optimal, content_model)
    return {"misaligned": float(variant[:, 1].mean()), "capability_kl": float(capability.mean()),
            "answer_positions": int(answer.sum())}


def behaviour_by_task(model, process: GHMM, config: EMConfig, contexts: dict[int, np.ndarray],
                      intervention: Intervention | None = None) -> pd.DataFrame:
    """:func:`behaviour` for each task's (aligned-persona) contexts."""
    roles = token_roles(config)
    rows = []
    for task, tokens in contexts.items():
        probs = next_token_probs(model, tokens, process.n_tokens, intervention)
        rows.append({"task": task, **behaviour(probs, process, tokens, roles)})
    return pd.DataFrame(rows)


def em_measures(base: pd.DataFrame, finetuned: pd.DataFrame) -> dict[str, float]:
    """EM breadth = mean increase of misaligned mass on held-out tasks / increase on the fine-tuned task 1."""
    increase = (finetuned.set_index("task")["misaligned"] - base.set_index("task")["misaligned"]).sort_index()
    task1, heldout = float(increase.iloc[0]), float(increase.iloc[1:].mean())
    return {"task1_increase": task1, "heldout_increase": heldout,
            "breadth": heldout / task1 if abs(task1) > 1e-9 else float("nan")}


# =========================================================================== directions
@torch.no_grad()
def residuals(model, tokens: np.ndarray, n_tokens: int, hook: str, batch: int = 2048) -> np.ndarray:
    """Residual activations ``[B, L + 1, d]`` at ``hook`` (position 0 = BOS)."""
    return batched_forward(model, tokens, n_tokens, batch=batch, cache=[hook], output=None).residuals[hook]


def persona_posterior(process: GHMM, config: EMConfig, tokens: np.ndarray) -> np.ndarray:
    """Exact P(misaligned persona | prefix) after 0..L tokens, ``[B, L + 1]``."""
    persona_belief = marginals(process.beliefs(tokens), process.factor_states)[0]
    d = config.persona_dim
    return persona_belief[..., (config.n_personas - 1) * d:].sum(-1)


def belief_state_direction(model, process: GHMM, config: EMConfig, tokens: np.ndarray, hook: str,
                           confidence: float = 0.95) -> np.ndarray:
    """c_aligned - c_misaligned: centroids of the persona-factor belief classes (study 02's recipe).

    Classes are the persona sectors the exact belief is confident about (posterior > ``confidence``),
    pooled over positions 1..L; each centroid averages over whatever task and phase the other
    factor is in. When fewer than 10 positions are that confident (strong leakage), the classes are
    the most extreme deciles of the persona belief instead.
    """
    acts = residuals(model, tokens, process.n_tokens, hook)[:, 1:]
    posterior = persona_posterior(process, config, tokens)[:, 1:]
    aligned, misaligned = posterior < 1 - confidence, posterior > confidence
    if aligned.sum() < 10 or misaligned.sum() < 10:
        # leaky processes never become confident: fall back to the most extreme deciles of the belief
        low, high = np.quantile(posterior, [0.1, 0.9])
        aligned, misaligned = posterior <= low, posterior >= high
        if low >= high:
            raise ProcessError("the persona belief never varies: no persona classes to build centroids from")
    return acts[aligned].mean(0) - acts[misaligned].mean(0)


def diff_in_means_direction(model, process: GHMM, config: EMConfig, tokens: np.ndarray, hook: str) -> np.ndarray:
    """Mean activation where the model answers aligned minus where it answers misaligned (its own outputs).

    The conventional EM direction: contrast the activations of aligned and misaligned *completions*,
    labelled by the model's own answer (bad-variant share above or below 1/2) at answer positions,
    with no reference to the world model's belief classes. Sign: toward aligned.
    """
    roles = token_roles(config)
    acts = residuals(model, tokens, process.n_tokens, hook)
    probs = next_token_probs(model, tokens, process.n_tokens)
    answer = answer_positions(process.next_token_probs(process.beliefs(tokens)), roles)
    good, bad = probs[..., roles.answer_good].sum(-1), probs[..., roles.answer_bad].sum(-1)
    is_bad = bad > good
    if not (answer & is_bad).any() or not (answer & ~is_bad).any():
        raise ProcessError("the model gives no misaligned (or no aligned) answers: diff-in-means is undefined")
    return acts[answer & ~is_bad].mean(0) - acts[answer & is_bad].mean(0)


def model_diff_direction(base, finetuned, process: GHMM, tokens: np.ndarray, hook: str) -> np.ndarray:
    """Mean over contexts and positions of base minus fine-tuned activations (sign: toward the base)."""
    return (residuals(base, tokens, process.n_tokens, hook)[:, 1:].mean((0, 1))
            - residuals(finetuned, tokens, process.n_tokens, hook)[:, 1:].mean((0, 1)))


# =========================================================================== reversal
def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def reversal_sweep(model, process: GHMM, config: EMConfig, contexts: dict[int, np.ndarray], hook: str,
                   directions: dict[str, np.ndarray], scales: list[float], norm: float) -> pd.DataFrame:
    """Behaviour of the fine-tuned model with each direction added (or ablated) at every position.

    Steering adds ``scale * norm * unit(direction)``, so every method is compared at the same
    added norm (scale 1 = the norm of the belief-state vector). Names starting with ``ablation_``
    project their direction out instead (one row, scale NaN).
    """
    rows = []
    for method, direction in directions.items():
        if method.startswith("ablation_"):
            frame = behaviour_by_task(model, process, config, contexts, Intervention(hook, ablate=direction))
            rows.append(frame.assign(method=method, scale=np.nan))
            continue
        for scale in scales:
            vector = scale * norm * unit(direction)
            frame = behaviour_by_task(model, process, config, contexts, Intervention(hook, vector=vector))
            rows.append(frame.assign(method=method, scale=scale))
    return pd.concat(rows, ignore_index=True)


def restoration(sweep: pd.DataFrame, base: pd.DataFrame, finetuned: pd.DataFrame) -> pd.DataFrame:
    """Per row: restoration = share of the fine-tuning-induced misaligned mass removed on that task,
    and capability damage = capability KL added by the intervention (vs the fine-tuned model)."""
    b, f = base.set_index("task"), finetuned.set_index("task")
    out = sweep.copy()
    induced = (f.loc[out.task, "misaligned"].to_numpy() - b.loc[out.task, "misaligned"].to_numpy())
    out["restoration"] = (f.loc[out.task, "misaligned"].to_numpy() - out.misaligned) / np.where(
        np.abs(induced) > 1e-9, induced, np.nan)
    out["capability_damage"] = out.capability_kl - f.loc[out.task, "capability_kl"].to_numpy()
    return out


def summarise_reversal(restored: pd.DataFrame, target: float = 0.9) -> pd.DataFrame:
    """Per method and scale: restoration on task 1 and on held-out tasks (min and mean), damage (mean)."""
    def agg(group: pd.DataFrame) -> pd.Series:
        first = group.task == group.task.min()
        return pd.Series({"restoration_task1": group.loc[first, "restoration"].mean(),
                          "restoration_heldout": group.loc[~first, "restoration"].mean(),
                          "restoration_min": group.restoration.min(),
                          "capability_damage": group.capability_damage.mean()})

    table = restored.groupby(["method", "scale"], dropna=False).apply(agg, include_groups=False).reset_index()
    table["reaches_target"] = table.restoration_min >= target
    return table


def best_settings(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method: the smallest scale restoring >= the target on every task, else the most restoring scale."""
    best = {}
    for method, group in summary.groupby("method"):
        ok = group[group.reaches_target]
        row = ok.sort_values("scale").iloc[0] if len(ok) else group.sort_values("restoration_min").iloc[-1]
        best[method] = {k: (None if pd.isna(row[k]) else float(row[k]))
                        for k in ("scale", "restoration_heldout", "restoration_task1", "capability_damage")}
    return best


def mean_restoration(summary: pd.DataFrame) -> pd.Series:
    """Restoration averaged over the tasks of a :func:`summarise_reversal` table: (task 1 + 2 x held-out) / 3."""
    return (summary.restoration_task1 + 2 * summary.restoration_heldout) / 3


def damage_at_restoration(summary: pd.DataFrame, method: str, level: float) -> float:
    """Capability damage interpolated at mean restoration = ``level`` along a method's scale sweep."""
    curve = summary[(summary.method == method) & summary.scale.notna()].sort_values("scale")
    restored = mean_restoration(curve)
    if len(curve) == 0 or restored.max() < level:
        return float("nan")
    return float(np.interp(level, restored.cummax(), curve.capability_damage))


# =========================================================================== specificity + pipeline
def variant_and_content(probs: np.ndarray, process: GHMM, answer: np.ndarray, roles: TokenRoles):
    """(good, bad) variant shares at the ``answer`` positions (:func:`answer_positions`, computed once
    from the exact beliefs by the caller) and the content distribution at every position."""
    good, bad = probs[..., roles.answer_good].sum(-1), probs[..., roles.answer_bad].sum(-1)
    share = (bad / np.clip(good + bad, 1e-12, None))[answer]
    return np.stack([1 - share, share], -1), marginals(probs, process.factor_tokens)[1] @ content_merge(roles)


def persona_specificity(model, process: GHMM, config: EMConfig, contexts: dict[int, np.ndarray], hook: str,
                        direction: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """Study 02's specificity, for the persona factor: steer aligned -> misaligned by ``-scale * direction``.

    intended = KL(steered || unsteered) of the answer variant (good/bad) at answer positions;
    spillover = KL(steered || unsteered) of the task content over all positions; ratio = spillover /
    intended (lower = persona steering leaves capability alone).
    """
    roles = token_roles(config)
    intended, spill = [], []
    for tokens in contexts.values():
        answer = answer_positions(process.next_token_probs(process.beliefs(tokens)), roles)
        plain = next_token_probs(model, tokens, process.n_tokens)
        steered = next_token_probs(model, tokens, process.n_tokens, Intervention(hook, vector=-scale * direction))
        (v0, c0), (v1, c1) = (variant_and_content(p, process, answer, roles) for p in (plain, steered))
        intended.append(kl_divergence(v1, v0).mean())
        spill.append(kl_divergence(c1, c0).mean())
    intended_mean, spill_mean = float(np.mean(intended)), float(np.mean(spill))
    return {"intended": intended_mean, "spillover": spill_mean, "ratio": spill_mean / max(intended_mean, 1e-12)}


@dataclass(frozen=True)
class EMRecipe:
    """Architecture, pretraining and narrow fine-tuning settings shared by every EM experiment.

    The knobs have no defaults here: their values are a study's parameters (``params/<study>/*.yaml``
    and the notebook's parameters cell), read by :meth:`from_params` — the one place that maps
    parameters to a recipe, used by the notebooks and by :mod:`persona_wm.io.sweep`.
    """

    d_model: int
    n_layers: int
    base_steps: int
    base_batch: int
    base_lr: float
    ft_steps: int
    ft_batch: int
    ft_lr: float
    eval_sequences: int = 512
    #: who trains the models: "sequential" (``train()``, one at a time) or "stacked" (``train_many``,
    #: N at a time); only that trainer's cache entries are used (:func:`persona_wm.toy.stacked.trained_models`)
    trainer: str = "sequential"

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"EMRecipe.trainer must be one of {TRAINERS}, got {self.trainer!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> EMRecipe:
        """The recipe whose knobs are the same-named entries of ``params`` (a params file's mapping, or a
        notebook's ``globals()``); other entries are ignored, ``eval_sequences`` and ``trainer`` keep their
        defaults unless given.
        """
        knobs = [f for f in fields(cls) if f.init]
        missing = [f.name for f in knobs if f.name not in params and f.default is MISSING]
        if missing:
            raise KeyError(f"EMRecipe.from_params: parameters lack the recipe knob(s) {', '.join(missing)}")
        return cls(**{f.name: params[f.name] for f in knobs if f.name in params})

    def base_config(self, process: str, seed: int):

        return TrainConfig(process=process, n_layers=self.n_layers, d_model=self.d_model, d_head=self.d_model // 2,
                           d_mlp=4 * self.d_model, steps=self.base_steps, batch_size=self.base_batch,
                           lr=self.base_lr, seed=seed, eval_every=max(self.base_steps // 5, 1),
                           eval_sequences=self.eval_sequences, snapshot_steps=(0,))

    def finetune_config(self, process: str, seed: int, config: EMConfig, task: int = 0):

        base = self.base_config(process, seed)
        return dc_replace(base, steps=self.ft_steps, batch_size=self.ft_batch, lr=self.ft_lr, warmup_steps=0,
                          final_lr_fraction=1.0, eval_every=self.ft_steps, snapshot_steps=(), init_from=base,
                          data_sector=task_sectors(config, task, aligned=False)[0])


def em_experiment(process_name: str, seed: int, recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                  threads: int | None = None, with_directions: bool = True) -> dict:
    """Train (cached) base and fine-tuned models of one EM-SFP config; measure specificity, EM and directions.

    Returns a dict with the models, contexts, per-task behaviour before/after, the EM measures, the
    pre-fine-tuning persona-steering specificity, and the steering directions at the final layer.
    """

    config = parse_em_name(process_name)
    base, tuned = trained_models([recipe.base_config(process_name, seed),
                                  recipe.finetune_config(process_name, seed, config)], recipe.trainer,
                                 threads=threads, progress=False)
    process = base.process
    rng = np.random.default_rng([analysis_seed, seed])
    length = base.config.context_length
    contexts = {k: task_contexts(process, config, k, True, n_contexts, length, rng) for k in range(config.n_tasks)}
    pool = process.sample(4 * n_contexts, length, rng)
    hook = final_hook(base.model)
    before = behaviour_by_task(base.model, process, config, contexts)
    after = behaviour_by_task(tuned.model, process, config, contexts)
    belief_base = belief_state_direction(base.model, process, config, pool, hook)
    result = {
        "config": config, "process": process, "base": base, "tuned": tuned, "contexts": contexts, "hook": hook,
        "before": before, "after": after, "em": em_measures(before, after),
        "specificity": persona_specificity(base.model, process, config, contexts, hook, belief_base),
        "directions": {"belief_state": belief_base},
    }
    if with_directions:  # the reversal study's other directions (diff-in-means needs misaligned answers)
        result["directions"].update({
            "belief_state_ft": belief_state_direction(tuned.model, process, config, pool, hook),
            "diff_in_means": diff_in_means_direction(tuned.model, process, config, pool, hook),
            "model_diff": model_diff_direction(base.model, tuned.model, process, pool, hook),
        })
    return result


def em_configs(names: list[str], seeds: list[int], recipe: EMRecipe) -> list[TrainConfig]:
    """The base and fine-tune configs of every EM-SFP name x seed (what :func:`em_experiment` trains)."""
    return [c for name in dict.fromkeys(names) for s in dict.fromkeys(seeds)
            for c in (recipe.base_config(name, s), recipe.finetune_config(name, s, parse_em_name(name)))]


def pretrain(names: list[str], seeds: list[int], recipe: EMRecipe, threads: int | None = None,
             progress: bool = True, device: str | None = None, cache_dir: Path | None = None) -> list[TrainedModel]:
    """Train (or load) every model :func:`em_experiment` will need for ``names`` x ``seeds``, all in one call.

    With ``recipe.trainer == "stacked"`` the missing ones are trained N at a time (bases first, then the
    fine-tunes), so the experiments that follow only load; with "sequential" one after another.
    """
    return trained_models(em_configs(names, seeds, recipe), recipe.trainer, device=device, threads=threads,
                          progress=progress, cache_dir=cache_dir)


def coupling_names(base_process: str, couplings: list[float], designs: tuple[str, ...] = ("shared", "specific")
                   ) -> list[str]:
    """The coupling sweep's process names: ``base_process`` with each coupling value in each answer design."""
    return [with_knobs(base_process, coupling=float(c), shared_answers=DESIGNS[d]) for d in designs for c in couplings]


REVERSAL_METHODS = ("belief_state", "belief_state_ft", "diff_in_means", "model_diff")


def reversal_for(result: dict, scales: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reversal sweep of one experiment: every steering method, and ablation of the belief-state and
    diff-in-means directions. Returns (per-task rows with restoration, per-method/scale summary)."""
    d = result["directions"]
    directions = {m: d[m] for m in REVERSAL_METHODS}
    directions.update({"ablation_belief_state": d["belief_state"], "ablation_diff_in_means": d["diff_in_means"]})
    sweep = reversal_sweep(result["tuned"].model, result["process"], result["config"], result["contexts"],
                           result["hook"], directions, scales, float(np.linalg.norm(d["belief_state"])))
    restored = restoration(sweep, result["before"], result["after"])
    return restored, summarise_reversal(restored)


def diagnostic_row(result: dict) -> dict[str, float]:
    """Pre-fine-tuning specificity next to the EM that fine-tuning then produced."""
    return {"specificity_ratio": result["specificity"]["ratio"], "intended": result["specificity"]["intended"],
            "spillover": result["specificity"]["spillover"], **result["em"]}


# =========================================================================== the coupling test
DESIGNS = {"shared": True, "specific": False}  # answer tokens shared across tasks, or task-specific


def with_knobs(process_name: str, **knobs) -> str:
    """Canonical name of ``process_name`` with some knobs replaced: ``with_knobs("em()", coupling=0.0)``."""

    return em_name(dc_replace(parse_em_name(process_name), **knobs))


def em_rows(names: list[str], seeds: list[int], recipe: EMRecipe, n_contexts: int, analysis_seed: int,
            threads: int | None = None, progress: bool = True, desc: str = "EM configs") -> pd.DataFrame:
    """EM measures and pre-fine-tuning specificity of every named EM-SFP x seed (one row each).

    ``design`` (shared / specific answer tokens), ``coupling`` and ``twin`` (the name with the
    coupling knob removed, shared by a config's coupled and factored versions) are read from the name.
    """

    rows = []
    for name, s in tqdm([(n, s) for n in names for s in seeds], desc=desc, disable=not progress):
        config = parse_em_name(name)
        result = em_experiment(name, s, recipe, n_contexts, analysis_seed, threads, with_directions=False)
        rows.append({"process": em_name(config), "twin": with_knobs(name, coupling=EMConfig.coupling),
                     "design": "shared" if config.shared_answers else "specific", "coupling": config.coupling,
                     "seed": s, "base_ce_ratio": result["base"].final_eval["ce_ratio"], **diagnostic_row(result)})
    return pd.DataFrame(rows)


def coupling_sweep(base_process: str, couplings: list[float], seeds: list[int], recipe: EMRecipe, n_contexts: int,
                   analysis_seed: int, threads: int | None = None, designs: tuple[str, ...] = ("shared", "specific"),
                   progress: bool = True) -> pd.DataFrame:
    """:func:`em_rows` for every coupling x answer design of ``base_process`` (its other knobs held fixed):
    tokens, fine-tuning data (task 1 in the misaligned world), steps and model are the same for every row."""
    names = coupling_names(base_process, couplings, designs)
    return em_rows(names, seeds, recipe, n_contexts, analysis_seed, threads, progress, f"coupling sweep {base_process}")


def twin_table(frame: pd.DataFrame, coupled: float = 1.0, factored: float = 0.0, target_coupled: float = 0.5,
               target_factored: float = 0.2) -> pd.DataFrame:
    """Per configuration (coupling knob removed): breadth of its coupled and factored versions (mean over
    seeds), the difference, and whether it meets the target (coupled >= 0.5 while factored <= 0.2)."""
    means = frame.groupby(["twin", "coupling"]).breadth.agg(["mean", "count"]).reset_index()
    rows = []
    for twin, group in means.groupby("twin", sort=False):
        by = group.set_index("coupling")
        if coupled not in by.index or factored not in by.index:
            continue
        c, f = float(by.loc[coupled, "mean"]), float(by.loc[factored, "mean"])
        rows.append({"config": twin, "breadth_coupled": c, "breadth_factored": f, "difference": c - f,
                     "n_seeds": int(by.loc[coupled, "count"]),
                     "meets_target": bool(c >= target_coupled and f <= target_factored)})
    return pd.DataFrame(rows)


def coupling_curve(sweep: pd.DataFrame, design: str) -> dict[str, list[float]]:
    """Breadth vs coupling of one design: mean and Student-t 95% CI over seeds per coupling value."""

    rows = sweep[sweep.design == design]
    values = sorted(rows.coupling.unique())
    stats = [mean_t_ci(rows[rows.coupling == c].breadth) for c in values]
    return {"values": [float(c) for c in values], "breadth_mean": [m for m, _, _ in stats],
            "breadth_ci_low": [lo for _, lo, _ in stats], "breadth_ci_high": [hi for _, _, hi in stats]}


def coupling_contrast(sweep: pd.DataFrame, design: str) -> dict:
    """Breadth of the fully coupled organism minus its factored twin (coupling 1 vs 0), Welch 95% CI over seeds."""

    rows = sweep[sweep.design == design]
    high, low = rows.coupling.max(), rows.coupling.min()
    diff = welch_difference(rows[rows.coupling == high].breadth, rows[rows.coupling == low].breadth)
    return {"design": design, "coupled": diff["a"], "factored": diff["b"], "difference": diff["difference"],
            "ci_low": diff["ci_low"], "ci_high": diff["ci_high"], "p": diff["p"], "n_seeds": diff["n_a"],
            "ci_method": "Welch t over seeds (scipy.stats.ttest_ind, equal_var=False)"}


def describe_contrast(contrast: dict) -> str:
    """One sentence fragment for a :func:`coupling_contrast` result."""
    c = contrast
    return (f"coupled {c['coupled']:.2f} vs factored {c['factored']:.2f}, difference {c['difference']:+.3f} "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] ({c['n_seeds']} seeds, Welch 95% CI)")


def reversal_over_seeds(summary: pd.DataFrame, target: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per method: :func:`best_settings` and the damage at restoration ``target`` for every seed.

    Returns (per-seed rows: method, seed, scale, restorations, capability_damage, damage_at_target;
    mean and sample sd over seeds per method, columns ``<measure>_mean`` / ``<measure>_sd``).
    """
    rows = []
    for seed, group in summary.groupby("seed"):
        best = best_settings(group)
        for method, values in best.items():
            steering = group[(group.method == method) & group.scale.notna()]
            rows.append({"method": method, "seed": seed, **{k: (np.nan if v is None else v) for k, v in values.items()},
                         "damage_at_target": damage_at_restoration(group, method, target) if len(steering) else np.nan})
    per_seed = pd.DataFrame(rows)
    measures = ["scale", "restoration_heldout", "restoration_task1", "capability_damage", "damage_at_target"]
    stats = per_seed.groupby("method")[measures].agg(["mean", "std"])
    stats.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in stats.columns]
    return per_seed, stats
