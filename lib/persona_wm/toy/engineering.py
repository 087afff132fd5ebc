"""Persona engineering (study 04): alignment fidelity, robustness to EM, and Pareto fronts.

Each point of a sweep is one v3 organism (:mod:`persona_wm.processes.em_seq`) configuration trained, narrowly fine-tuned and measured with
the recipe of :mod:`persona_wm.toy.em`; this module adds the two axes the proposal trades off — fidelity
(in-distribution persona adherence before fine-tuning) and robustness (1 - EM breadth) — and the
Pareto analysis over configurations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.analysis.stats import across_seeds
from persona_wm.core.ghmm import GHMM
from persona_wm.core.sfp import is_partition_preserving
from persona_wm.processes import get_process
from persona_wm.processes.em_seq import SeqRoles, parse_em_seq_name
from persona_wm.toy.em import (
    EMRecipe,
    answer_sites,
    belief_state_direction,
    em_configs,
    em_experiment,
    misaligned_share,
    next_token_probs,
    pretrain,
    specificity_parts,
)
from persona_wm.toy.stacked import trained_models

__all__ = ["fidelity", "engineering_point", "engineering_row", "engineering_grid", "sweep_jobs", "pareto_front",
           "engineering_summary", "ENGINEERING_MEASURES", "AXIS_KNOB", "leak_table", "equivalent_pairs",
           "recorded_train_seconds", "axis_trends"]

#: Sweep axis -> the EMSeqConfig knob it varies ("joint" and other axes are labelled by process name).
AXIS_KNOB = {"mixing": "mixing", "persona_dim": "persona_dim", "n_personas": "n_personas", "leak": "leak"}


def sweep_jobs(sweep_processes: dict[str, list[str]], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(axis, process name, seed) for every point of every axis."""
    return [(axis, name, seed) for axis, names in sweep_processes.items() for name in names for seed in seeds]


def engineering_row(axis: str, name: str, seed: int, recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                    threads: int | None = None) -> dict:
    """One grid row: the axis, the knob's value, and :func:`engineering_point`'s measures."""

    knob = AXIS_KNOB.get(axis)
    value = getattr(parse_em_seq_name(name), knob) if knob else name
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


def fidelity(model, process: GHMM, roles: SeqRoles, tokens: np.ndarray) -> float:
    """In-distribution persona adherence: 1 - mean total-variation distance between the model's and the
    Bayes-optimal answer variant (good/bad of the segment's task) at every answer site of whole-organism sequences.

    1 means the model answers in exactly the persona (and variants) the evidence supports; it falls when the model
    misjudges who it is before any fine-tuning.
    """
    optimal = process.next_token_probs(process.beliefs(tokens))
    sites = answer_sites(optimal, roles)
    model_bad = misaligned_share(next_token_probs(model, tokens, process.n_tokens), sites, roles)
    return float(1 - np.abs(model_bad - misaligned_share(optimal, sites, roles)).mean())


def engineering_point(process_name: str, seed: int, recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                      threads: int | None = None) -> dict[str, float]:
    """Fidelity, robustness and the specificity parts of one (configuration, seed): the unit of study 04's sweeps."""
    e = em_experiment(process_name, seed, recipe, n_contexts, analysis_seed, threads=threads)
    fresh = e.measures.fresh
    parts = specificity_parts(e, belief_state_direction(e.base.model, e))
    row = e.measures.row()
    return {
        "fidelity": fidelity(e.base.model, e.process, e.roles, e.pool),
        "robustness": 1 - fresh.breadth,
        "robustness_after_evidence": 1 - row["after_evidence_breadth"],
        "heldout_misaligned_after": float(np.mean(fresh.tuned[1:])),
        "intended": parts["intended"], "spillover": parts["spillover"],
        "base_ce_ratio": e.base.final_eval["ce_ratio"],
        "breadth": fresh.breadth, "task1_increase": fresh.task1_increase, "heldout_increase": fresh.heldout_increase,
        "capability_change": e.measures.capability_change,
    }


def pareto_front(points: pd.DataFrame, x: str = "fidelity", y: str = "robustness") -> pd.Series:
    """Boolean mask of the points that no other point beats on both ``x`` and ``y`` (higher is better)."""
    values = points[[x, y]].to_numpy()
    dominated = np.array([np.any(np.all(values >= v, axis=1) & np.any(values > v, axis=1)) for v in values])
    return pd.Series(~dominated, index=points.index)


ENGINEERING_MEASURES = ["fidelity", "robustness", "robustness_after_evidence", "heldout_misaligned_after",
                        "intended", "spillover", "breadth", "base_ce_ratio"]


def engineering_summary(grid: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-configuration means/sds over seeds with the Pareto mask, and the Pareto improvements over the baseline.

    An improvement is at least as good as the baseline on both fidelity and robustness and better on one. Each
    criterion is judged apart: ``clear_robustness`` when its robustness gain exceeds the combined seed spread (the
    two sds in quadrature) of robustness, ``clear_fidelity`` likewise for fidelity.
    """
    points = across_seeds(grid.drop_duplicates(["process", "seed"]), ["process"], ENGINEERING_MEASURES)
    points["pareto"] = pareto_front(points.rename(columns={"fidelity_mean": "fidelity",
                                                           "robustness_mean": "robustness"}))
    base = points.set_index("process").loc[baseline]
    better_f, better_r = points.fidelity_mean - base.fidelity_mean, points.robustness_mean - base.robustness_mean
    improvements = points[(better_f >= 0) & (better_r >= 0) & ((better_f > 0) | (better_r > 0))
                          & (points.process != baseline)].copy()
    for measure in ("robustness", "fidelity"):
        spread = np.hypot(improvements[f"{measure}_sd"].fillna(0), np.nan_to_num(base[f"{measure}_sd"]))
        improvements[f"{measure}_gain"] = improvements[f"{measure}_mean"] - base[f"{measure}_mean"]
        improvements[f"{measure}_spread"] = spread
        improvements[f"clear_{measure}"] = improvements[f"{measure}_gain"] > spread
    return points, improvements


#: :func:`axis_trends` calls a seed random intercept "on the boundary" when its variance is below this share of the
#: total variance (seed + residual).
SEED_SHARE_BOUNDARY = 0.01


def axis_trends(grid: pd.DataFrame, measures: tuple[str, ...] = ("robustness", "fidelity")) -> pd.DataFrame:
    """Per numeric axis and measure: the slope of the measure on the knob value with seed as a random intercept
    (statsmodels MixedLM, REML, Powell's method then L-BFGS: the default gradient search fails on three seeds whose
    intercepts barely differ), its 95% CI and p, whether the fit converged, the seed variance, its share of the
    total (seed + residual) variance, and ``boundary``: that share below :data:`SEED_SHARE_BOUNDARY` (the seeds
    share one intercept, and the slope is close to the pooled least-squares one). statsmodels' own "may be on the
    boundary" warning compares the seed variance with an absolute 0.01, which every measure on a 0-1 scale with
    seed sds below 0.1 trips, so it is not used."""
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    rows = []
    for axis in (a for a in AXIS_KNOB if a in set(grid.axis)):
        data = grid[grid.axis == axis].assign(value=lambda f: f.value.astype(float))
        for measure in measures:
            frame = data[["value", "seed", measure]].dropna()
            if frame.value.nunique() < 2 or frame.seed.nunique() < 2:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)  # convergence is read from the fit
                    fit = smf.mixedlm(f"{measure} ~ value", frame, groups=frame["seed"]).fit(
                        reml=True, method=["powell", "lbfgs"])
            except np.linalg.LinAlgError:  # no residual variance (e.g. every seed an exact shift of another)
                rows.append({"axis": axis, "measure": measure, "slope": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                             "p": np.nan, "n": int(len(frame)), "n_seeds": int(frame.seed.nunique()),
                             "converged": False, "seed_variance": np.nan, "seed_share": np.nan, "boundary": False})
                continue
            low, high = fit.conf_int().loc["value"]
            seed_variance = float(fit.cov_re.iloc[0, 0])
            share = seed_variance / (seed_variance + float(fit.scale))
            rows.append({"axis": axis, "measure": measure, "slope": float(fit.params["value"]),
                         "ci_low": float(low), "ci_high": float(high), "p": float(fit.pvalues["value"]),
                         "n": int(len(frame)), "n_seeds": int(frame.seed.nunique()), "converged": bool(fit.converged),
                         "seed_variance": seed_variance, "seed_share": share, "boundary": share < SEED_SHARE_BOUNDARY})
    return pd.DataFrame(rows)
