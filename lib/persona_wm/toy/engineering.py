"""Persona engineering (study 04): alignment fidelity, robustness to EM, and Pareto fronts.

Each point of a sweep is one EM-SFP configuration trained, narrowly fine-tuned and measured with
the recipe of :mod:`persona_wm.toy.em`; this module adds the two axes the proposal trades off — fidelity
(in-distribution persona adherence before fine-tuning) and robustness (1 - EM breadth) — and the
Pareto analysis over configurations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from persona_wm.analysis.stats import across_seeds
from persona_wm.core.ghmm import GHMM
from persona_wm.core.sfp import is_partition_preserving
from persona_wm.processes import get_process
from persona_wm.toy.em import (
    EMConfig,
    EMRecipe,
    answer_positions,
    em_configs,
    em_experiment,
    next_token_probs,
    parse_em_name,
    pretrain,
    token_roles,
    variant_and_content,
)
from persona_wm.toy.stacked import trained_models

__all__ = ["fidelity", "engineering_point", "engineering_row", "engineering_grid", "sweep_jobs", "pareto_front",
           "engineering_summary", "ENGINEERING_MEASURES", "AXIS_KNOB", "leak_table", "equivalent_pairs",
           "recorded_train_seconds"]

#: Sweep axis -> the EMConfig knob it varies ("joint" and other axes are labelled by process name).
AXIS_KNOB = {"mixing": "mixing", "persona_dim": "persona_dim", "n_personas": "n_personas", "leak": "leak"}


def sweep_jobs(sweep_processes: dict[str, list[str]], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(axis, process name, seed) for every point of every axis."""
    return [(axis, name, seed) for axis, names in sweep_processes.items() for name in names for seed in seeds]


def engineering_row(axis: str, name: str, seed: int, recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                    threads: int | None = None) -> dict:
    """One grid row: the axis, the knob's value, and :func:`engineering_point`'s measures."""

    knob = AXIS_KNOB.get(axis)
    value = getattr(parse_em_name(name), knob) if knob else name
    return {"axis": axis, "value": value, "process": name, "seed": seed,
            **engineering_point(name, seed, recipe, n_contexts, analysis_seed, threads)}


def engineering_grid(sweep_processes: dict[str, list[str]], seeds: list[int], recipe: EMRecipe, n_contexts: int,
                     analysis_seed: int, threads: int | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`engineering_row` for every point of every axis and seed, in :func:`sweep_jobs` order (one process).

    Every model is trained (or loaded) first, in one :func:`~persona_wm.toy.em.pretrain` call, so a stacked
    recipe trains them N at a time; the rows then only load them.
    """
    jobs = sweep_jobs(sweep_processes, seeds)
    pretrain([name for _, name, _ in jobs], seeds, recipe, threads, progress)
    return pd.DataFrame([engineering_row(axis, name, seed, recipe, n_contexts, analysis_seed, threads)
                         for axis, name, seed in tqdm(jobs, desc="sweep points", disable=not progress)])


def leak_table(names: list[str]) -> pd.DataFrame:
    """Per distinct process name (sorted): whether it is partition preserving, and its leak mass
    (:func:`persona_wm.core.sfp.is_partition_preserving`)."""
    return pd.DataFrame([{"process": name, "partition preserving": bool(v), "leak mass": v.leak_mass}
                         for name in sorted(set(names)) for v in [is_partition_preserving(get_process(name))]])


def equivalent_pairs(points: pd.DataFrame, columns: list[str], label: str = "process") -> list[tuple[str, str]]:
    """(a, b) labels of every pair of rows (a before b) that are equal in every one of ``columns``, exactly."""
    return [(a[label], b[label]) for i, a in points.iterrows() for j, b in points.iterrows()
            if i < j and all(a[c] == b[c] for c in columns)]


def recorded_train_seconds(recipe: EMRecipe, grid: pd.DataFrame) -> float:
    """Training time (as recorded in the model cache when trained) of the base and fine-tuned models of every
    distinct (process, seed) of ``grid``; a model not in the cache is trained first."""
    pairs = grid[["process", "seed"]].drop_duplicates().itertuples(index=False)
    configs = [c for p, s in pairs for c in em_configs([p], [s], recipe)]
    return float(sum(m.train_seconds for m in trained_models(configs, recipe.trainer, progress=False)))


def fidelity(model, process: GHMM, config: EMConfig, tokens: np.ndarray) -> float:
    """In-distribution persona adherence: 1 - mean total-variation distance between the model's and the
    Bayes-optimal answer variant (good/bad) at answer positions, on contexts of the whole process.

    1 means the model answers in exactly the persona the evidence supports; it falls when the model
    misjudges who it is (or ignores the persona) before any fine-tuning.
    """
    roles = token_roles(config)
    probs = next_token_probs(model, tokens, process.n_tokens)
    optimal = process.next_token_probs(process.beliefs(tokens))
    answer = answer_positions(optimal, roles)
    model_variant, _ = variant_and_content(probs, process, answer, roles)
    optimal_variant, _ = variant_and_content(optimal, process, answer, roles)
    return float(1 - 0.5 * np.abs(model_variant - optimal_variant).sum(-1).mean())


def engineering_point(process_name: str, seed: int, recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                      threads: int | None = None) -> dict[str, float]:
    """Fidelity, robustness and specificity of one (configuration, seed): the unit of study 04's sweeps."""
    result = em_experiment(process_name, seed, recipe, n_contexts, analysis_seed, threads, with_directions=False)
    rng = np.random.default_rng([analysis_seed, seed, 11])
    pool = result["process"].sample(n_contexts, result["base"].config.context_length, rng)
    after = result["after"]
    return {
        "fidelity": fidelity(result["base"].model, result["process"], result["config"], pool),
        "robustness": 1 - result["em"]["breadth"],
        "heldout_misaligned_after": float(after.loc[after.task > after.task.min(), "misaligned"].mean()),
        "specificity": result["specificity"]["ratio"],
        "base_ce_ratio": result["base"].final_eval["ce_ratio"],
        **result["em"],
    }


def pareto_front(points: pd.DataFrame, x: str = "fidelity", y: str = "robustness") -> pd.Series:
    """Boolean mask of the points that no other point beats on both ``x`` and ``y`` (higher is better)."""
    values = points[[x, y]].to_numpy()
    dominated = np.array([np.any(np.all(values >= v, axis=1) & np.any(values > v, axis=1)) for v in values])
    return pd.Series(~dominated, index=points.index)


ENGINEERING_MEASURES = ["fidelity", "robustness", "heldout_misaligned_after", "specificity", "breadth", "base_ce_ratio"]


def engineering_summary(grid: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-configuration means/sds over seeds with the Pareto mask, and the Pareto improvements over the baseline.

    An improvement is at least as good as the baseline on both fidelity and robustness and better on
    one; it is "clear" when that gain exceeds the combined seed spread (sd) of the two points.
    """

    points = across_seeds(grid.drop_duplicates(["process", "seed"]), ["process"], ENGINEERING_MEASURES)
    points["pareto"] = pareto_front(points.rename(columns={"fidelity_mean": "fidelity",
                                                           "robustness_mean": "robustness"}))
    base = points.set_index("process").loc[baseline]
    better_f, better_r = points.fidelity_mean - base.fidelity_mean, points.robustness_mean - base.robustness_mean
    improvements = points[(better_f >= 0) & (better_r >= 0) & ((better_f > 0) | (better_r > 0))
                          & (points.process != baseline)].copy()
    sd = lambda col: np.hypot(improvements[f"{col}_sd"].fillna(0), np.nan_to_num(base[f"{col}_sd"]))  # noqa: E731
    improvements["clear"] = ((improvements.robustness_mean - base.robustness_mean > sd("robustness"))
                             | (improvements.fidelity_mean - base.fidelity_mean > sd("fidelity")))
    return points, improvements
