"""Study 03 (emergent misalignment inside an SFP, and its reversal): one function per notebook section and
the frozen dataclasses their results live in; :class:`EMReversalResult` assembles them and writes
``metrics.json``'s dict.

Sections: :func:`train_all` (every model, before any analysis), :func:`em_breadth` (EM appears, over seeds), :func:`coupling_test` (coupled vs factored twin
over the coupling knob), :func:`coupling_search` (every other configuration tried), :func:`reversal`
(belief-state steering vs difference-in-means), :func:`specificity_diagnostic` (pre-fine-tuning
specificity vs breadth).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from persona_wm.analysis.stats import across_seeds, mean_t_ci, spearman_with_ci
from persona_wm.core.values import undefined_as_none
from persona_wm.toy.em import (
    DESIGNS,
    EMRecipe,
    coupling_contrast,
    coupling_curve,
    coupling_names,
    coupling_sweep,
    em_configs,
    em_experiment,
    em_rows,
    reversal_for,
    reversal_over_seeds,
    twin_table,
)
from persona_wm.toy.stacked import trained_models
from persona_wm.toy.train import TrainedModel

__all__ = ["EM_MEASURES", "BEST_MEASURES", "Training", "train_all", "Breadth", "em_breadth", "CouplingTest", "coupling_test",
           "CouplingSearch", "coupling_search", "Reversal", "reversal", "Diagnostic", "specificity_diagnostic",
           "EMReversalResult"]

#: The EM measures of :func:`persona_wm.toy.em.em_measures`, in report order.
EM_MEASURES = ("task1_increase", "heldout_increase", "breadth")
#: What :func:`persona_wm.toy.em.best_settings` reports per reversal method.
BEST_MEASURES = ("scale", "restoration_heldout", "restoration_task1", "capability_damage")


# =========================================================================== 1. training
@dataclass(frozen=True)
class Training:
    """Every model the study analyses, trained (or loaded from the model cache) in one call before any analysis."""

    models: list[TrainedModel]
    trainer: str
    wall_seconds: float  # this call: training the missing models and loading the rest

    @property
    def n_trained(self) -> int:
        return sum(not m.from_cache for m in self.models)

    def summary(self) -> str:
        bases = sum(m.config.init_from is None for m in self.models)
        return (f"{len(self.models)} models ({bases} base models, {len(self.models) - bases} fine-tunes), trainer "
                f"`{self.trainer}`: {self.n_trained} trained now, {len(self.models) - self.n_trained} loaded from the "
                f"model cache, in {self.wall_seconds:.0f} s.")


def train_all(process: str, seeds: list[int], couplings: list[float], coupling_seeds: list[int],
              search_processes: list[str], search_seeds: list[int], recipe: EMRecipe,
              threads: int | None = None) -> Training:
    """The base and fine-tuned models of sections 2 (``process`` x ``seeds``), 2b (the coupling sweep) and the
    search, in one :func:`persona_wm.toy.stacked.trained_models` call (stacked: N models at a time)."""
    configs = (em_configs([process], seeds, recipe) + em_configs(coupling_names(process, couplings), coupling_seeds,
                                                                 recipe)
               + em_configs(search_processes, search_seeds, recipe))
    start = time.perf_counter()
    models = trained_models(list(dict.fromkeys(configs)), recipe.trainer, threads=threads)
    return Training(models, recipe.trainer, time.perf_counter() - start)


# =========================================================================== 2. EM appears
@dataclass(frozen=True)
class Breadth:
    """EM of one organism over seeds: every seed's experiment, its behaviour and EM measures."""

    experiments: dict[int, dict]
    behaviour: pd.DataFrame  # per seed, model (base / fine-tuned) and task: misaligned share, capability KL
    ce: pd.DataFrame  # per seed: base and fine-tuned CE / optimal
    table: pd.DataFrame  # per seed: EM_MEASURES

    @property
    def mean(self) -> pd.Series:
        return self.table.drop(columns="seed").mean()

    @property
    def breadth_ci(self) -> tuple[float, float, float]:
        """Mean breadth with its Student-t 95% CI over seeds."""
        return mean_t_ci(self.table.breadth)

    def metrics(self) -> dict[str, Any]:
        mean, (_, low, high) = self.mean, self.breadth_ci
        return {"em": {k: float(mean[k]) for k in EM_MEASURES},
                "em_sd": {k: float(self.table[k].std(ddof=1)) if len(self.table) > 1 else 0.0 for k in EM_MEASURES},
                "em_ci": {"breadth_ci_low": low, "breadth_ci_high": high, "method": "Student t over seeds"}}


def em_breadth(process: str, seeds: list[int], recipe: EMRecipe, n_contexts: int, analysis_seed: int,
               threads: int | None = None, first: dict | None = None) -> Breadth:
    """:func:`persona_wm.toy.em.em_experiment` for every seed (``first``, if given, is seed ``seeds[0]``'s,
    already computed) and the tables of section 2."""
    experiments = {s: (first if first is not None and s == seeds[0] else
                       em_experiment(process, s, recipe, n_contexts, analysis_seed, threads)) for s in seeds}
    behaviour = pd.concat([pd.concat([r["before"].assign(model="base"), r["after"].assign(model="fine-tuned")])
                           .assign(seed=s) for s, r in experiments.items()])
    behaviour["task"] = "task " + (behaviour.task + 1).astype(str)
    ce = pd.DataFrame([{"seed": s, "base CE / optimal": r["base"].final_eval["ce_ratio"],
                        "fine-tuned CE / optimal": r["tuned"].final_eval["ce_ratio"]} for s, r in experiments.items()])
    table = pd.DataFrame([{"seed": s, **r["em"]} for s, r in experiments.items()])
    return Breadth(experiments, behaviour, ce, table)


# =========================================================================== 2b. the coupling test
@dataclass(frozen=True)
class CouplingTest:
    """Breadth over the coupling knob in each answer design, and the coupled − factored contrast."""

    sweep: pd.DataFrame  # one row per (process, seed): :func:`persona_wm.toy.em.em_rows`
    curves: dict[str, dict[str, list[float]]]  # design -> :func:`persona_wm.toy.em.coupling_curve`
    contrasts: dict[str, dict]  # design -> :func:`persona_wm.toy.em.coupling_contrast`

    def curve_table(self) -> pd.DataFrame:
        """Breadth (mean) and its 95% CI per design and coupling value."""
        return pd.DataFrame([{"design": d, "coupling": c, "breadth (mean)": m, "95% CI": f"[{lo:.3f}, {hi:.3f}]"}
                             for d, cur in self.curves.items() for c, m, lo, hi in zip(*cur.values())])

    def contrast_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.contrasts).T.drop(columns="ci_method")

    @property
    def contrast_ci_contains_zero(self) -> bool:
        """True when no design's coupled − factored contrast is distinguishable from 0."""
        return all(c["ci_low"] <= 0 <= c["ci_high"] for c in self.contrasts.values())


def coupling_test(process: str, couplings: list[float], seeds: list[int], recipe: EMRecipe, n_contexts: int,
                  analysis_seed: int, threads: int | None = None) -> CouplingTest:
    """Sweep the coupling knob of ``process`` in both answer designs (:data:`persona_wm.toy.em.DESIGNS`)."""
    sweep = coupling_sweep(process, couplings, seeds, recipe, n_contexts, analysis_seed, threads)
    return CouplingTest(sweep, {d: coupling_curve(sweep, d) for d in DESIGNS},
                        {d: coupling_contrast(sweep, d) for d in DESIGNS})


@dataclass(frozen=True)
class CouplingSearch:
    """Every configuration tried (the sweep and ``search_processes``) and its coupled/factored pairs."""

    tried: pd.DataFrame
    twins: pd.DataFrame  # :func:`persona_wm.toy.em.twin_table` of ``tried``

    @property
    def n_configs_tried(self) -> int:
        return int(self.tried.process.nunique())

    @property
    def pairs_meeting_target(self) -> int:
        return int(self.twins.meets_target.sum())


def coupling_search(test: CouplingTest, processes: list[str], seeds: list[int], recipe: EMRecipe, n_contexts: int,
                    analysis_seed: int, threads: int | None = None) -> CouplingSearch:
    """Measure every configuration of ``processes`` x ``seeds`` and pair all tried configurations with their twins."""
    search = em_rows(processes, seeds, recipe, n_contexts, analysis_seed, threads, desc="coupling search")
    tried = pd.concat([test.sweep, search])
    return CouplingSearch(tried, twin_table(tried))


# =========================================================================== 3. reversal
@dataclass(frozen=True)
class Reversal:
    """Every reversal method's sweep on each seed's fine-tuned model, and the per-method summaries."""

    restored: pd.DataFrame  # per seed, method, scale and task: restoration, capability damage
    summary: pd.DataFrame  # per seed, method and scale: :func:`persona_wm.toy.em.summarise_reversal`
    per_seed: pd.DataFrame  # per seed and method: best setting and damage at the target
    stats: pd.DataFrame  # per method: ``<measure>_mean`` / ``<measure>_sd`` over seeds
    target: float
    best: dict[str, dict[str, float | None]]  # method -> mean over seeds of its best setting's measures
    damage_at_target: dict[str, float]  # method -> mean damage at restoration ``target`` (steering methods)
    damage_sd: dict[str, float]  # method -> its sd over seeds

    def sd(self, method: str, measure: str) -> float:
        """Sample sd over seeds of ``measure`` (:data:`BEST_MEASURES`) for ``method``; 0 when undefined."""
        return float(np.nan_to_num(self.stats.loc[method, f"{measure}_sd"]))

    @property
    def ranked(self) -> list[str]:
        """Steering methods from the lowest to the highest capability damage at the target."""
        return sorted(self.damage_at_target, key=lambda m: self.damage_at_target[m])

    @property
    def keeper_separated(self) -> bool:
        """Whether the best-ranked method's damage lies more than one sd below the next one's."""
        r, damage, sd = self.ranked, self.damage_at_target, self.damage_sd
        return bool(len(r) > 1 and damage[r[0]] + sd[r[0]] < damage[r[1]] - sd[r[1]])

    def damage_text(self) -> str:
        """``method +d ± sd`` for every steering method, comma-separated (nats)."""
        return ", ".join(f"{m} {v:+.4f} ± {self.damage_sd[m]:.4f}" for m, v in self.damage_at_target.items())

    def metrics(self) -> dict[str, dict]:
        return {m: {"best": self.best[m], "damage_at_target": self.damage_at_target.get(m),
                    "damage_at_target_sd": self.damage_sd.get(m),
                    "restoration_heldout_sd": self.stats.loc[m, "restoration_heldout_sd"]} for m in self.best}


def reversal(experiments: dict[int, dict], scales: list[float], target: float) -> Reversal:
    """:func:`persona_wm.toy.em.reversal_for` on every seed's experiment, summarised over seeds at ``target``."""
    rows, summaries = [], []
    for s, r in experiments.items():
        restored, summary = reversal_for(r, scales)
        rows.append(restored.assign(seed=s))
        summaries.append(summary.assign(seed=s))
    summary = pd.concat(summaries)
    per_seed, stats = reversal_over_seeds(summary, target)
    best = {m: {k: (None if pd.isna(stats.loc[m, f"{k}_mean"]) else float(stats.loc[m, f"{k}_mean"]))
                for k in BEST_MEASURES} for m in stats.index}
    damage = {m: float(v) for m, v in stats["damage_at_target_mean"].dropna().items()}
    return Reversal(pd.concat(rows), summary, per_seed, stats, target, best, damage,
                    stats["damage_at_target_sd"].to_dict())


# =========================================================================== 4. the diagnostic
@dataclass(frozen=True)
class Diagnostic:
    """Pre-fine-tuning specificity against EM breadth over the coupling sweep's configurations."""

    points: pd.DataFrame  # one row per (process, seed)
    stats: pd.DataFrame  # per process: mean and sd over seeds
    correlation: dict[str, float]  # pooled Spearman rho with its bootstrap CI
    within: dict[str, dict[str, float]]  # design -> the same within that design

    @property
    def n_configs(self) -> int:
        return int(self.points.process.nunique())

    def correlation_table(self) -> pd.DataFrame:
        return pd.DataFrame({"pooled": self.correlation, **self.within}).T

    def metrics(self) -> dict[str, Any]:
        c = self.correlation
        return {"n_configs": self.n_configs, "n_points": c["n"], "within_design": self.within,
                "spearman_rho": c["spearman_rho"], "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p": c["p"],
                "points": self.stats[["process", "specificity_ratio_mean", "specificity_ratio_sd", "breadth_mean",
                                      "breadth_sd"]].to_dict("records")}


def specificity_diagnostic(points: pd.DataFrame, n_boot: int, seed: int) -> Diagnostic:
    """Spearman rho(specificity ratio, breadth) pooled and within each design, with bootstrap CIs."""
    stats = across_seeds(points, ["process"], ["specificity_ratio", "breadth", "task1_increase", "heldout_increase"])
    correlation = spearman_with_ci(points.specificity_ratio, points.breadth, n_boot=n_boot, seed=seed)
    within = {d: spearman_with_ci(g.specificity_ratio, g.breadth, n_boot=n_boot, seed=seed)
              for d, g in points.groupby("design")}
    return Diagnostic(points, stats, correlation, within)


# =========================================================================== the study's result
@dataclass(frozen=True)
class EMReversalResult:
    """Everything study 03 reports; :meth:`metrics` is its ``metrics.json``."""

    process: str
    seeds: list[int]
    breadth: Breadth
    coupling: CouplingTest
    search: CouplingSearch
    reversal: Reversal
    diagnostic: Diagnostic

    def metrics(self) -> dict[str, Any]:
        """The metrics dict; undefined numbers (ablations have no scale, a CI from one seed) are None."""
        n_tried = self.search.n_configs_tried
        coupling = {**{f"design_{d}": cur for d, cur in self.coupling.curves.items()},
                    "contrast": {**self.coupling.contrasts["shared"], "n_configs_tried": n_tried},
                    "contrast_by_design": self.coupling.contrasts, "n_configs_tried": n_tried,
                    "n_trainings": len(self.search.tried),
                    "pairs_meeting_target": self.search.pairs_meeting_target,
                    "twins": self.search.twins.to_dict("records")}
        return undefined_as_none({"process": self.process, "seeds": self.seeds, **self.breadth.metrics(),
                                  "coupling_test": coupling, "reversal": self.reversal.metrics(),
                                  "diagnostic": self.diagnostic.metrics()})
