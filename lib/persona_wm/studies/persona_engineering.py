"""Study 04 (persona engineering): the sweep section, the committed dense GPU grid, and the result
dataclass whose :meth:`PersonaEngineeringResult.metrics` is ``metrics.json``'s dict.

Every point is measured by :mod:`persona_wm.toy.engineering` (fidelity, robustness and the specificity parts of
one v3-organism configuration and seed, on the recipe of :mod:`persona_wm.toy.em`); this module assembles the
sweep, its summaries (robustness and fidelity judged apart, a mixed-model trend per axis) and the study's metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from statsmodels.stats.multitest import multipletests

from persona_wm.analysis.stats import spearman_with_ci
from persona_wm.core.files import REPO_ROOT
from persona_wm.core.values import undefined_as_none
from persona_wm.toy.em import EMRecipe
from persona_wm.toy.engineering import axis_trends, engineering_grid, engineering_summary, equivalent_pairs, leak_table

__all__ = ["EngineeringSweep", "engineering_sweep", "BEHAVIOUR", "DENSE_GRID_PATH", "DenseGrid", "dense_grid",
           "SpecificityTracking", "specificity_tracking", "PersonaEngineeringResult"]

#: Per-configuration means that fix a configuration's observable behaviour (equal in all = equivalent).
BEHAVIOUR = ["fidelity_mean", "robustness_mean", "base_ce_ratio_mean"]
#: The dense grid's output, written by ``python -m persona_wm.io.sweep --params full --out <this path>`` on a GPU
#: and committed (without ``--out`` a sweep writes a scratch file under ``.cache/sweep/``).
DENSE_GRID_PATH = REPO_ROOT / "outputs" / "04_persona_engineering_full" / "grid_full.json"


@dataclass(frozen=True)
class EngineeringSweep:
    """The one-axis sweeps around a baseline: every grid row, per-configuration summaries, the Pareto analysis."""

    baseline_process: str
    leak_table: pd.DataFrame  # per distinct process: partition preserving, leak mass
    grid: pd.DataFrame  # one row per (axis, process, seed): :func:`persona_wm.toy.engineering.engineering_row`
    points: pd.DataFrame  # per process: means and sds over seeds, Pareto mask
    improvements: pd.DataFrame  # Pareto improvements over the baseline, with ``clear``

    @property
    def baseline(self) -> pd.Series:
        return self.points.set_index("process").loc[self.baseline_process]

    @property
    def most_robust(self) -> pd.Series:
        """The configuration with the highest mean robustness (the last of ties in ``points`` order)."""
        return self.points.sort_values("robustness_mean").iloc[-1]

    @property
    def equivalent_pairs(self) -> list[tuple[str, str]]:
        """Configurations whose fidelity, robustness and base CE agree to every digit."""
        return equivalent_pairs(self.points, BEHAVIOUR)

    @property
    def robustness_clear(self) -> list[str]:
        """Pareto improvements whose robustness gain exceeds the combined seed spread of robustness."""
        return self.improvements[self.improvements.clear_robustness].process.tolist() if len(self.improvements) else []

    @property
    def fidelity_clear(self) -> list[str]:
        """Pareto improvements whose fidelity gain exceeds the combined seed spread of fidelity."""
        return self.improvements[self.improvements.clear_fidelity].process.tolist() if len(self.improvements) else []

    def trend_text(self) -> str:
        """One line per numeric axis and measure: the MixedLM slope with its CI and p."""
        return "".join(f"- Trend of {t.measure} along {t.axis} (MixedLM, seed random intercept): slope {t.slope:+.3f} "
                       f"[{t.ci_low:+.3f}, {t.ci_high:+.3f}] per unit of the knob, p = {t.p:.3g}"
                       f"{'' if t.converged else ' (the fit did not converge)'}"
                       f"; seeds carry {t.seed_share:.0%} of the variance"
                       f"{' (on the boundary: the seeds share one intercept)' if t.boundary else ''}.\n"
                       for t in self.trends.itertuples())

    @property
    def trends(self) -> pd.DataFrame:
        """Per numeric axis: robustness and fidelity against the knob, seed as a random intercept (MixedLM)."""
        return axis_trends(self.grid)

    def metrics(self) -> dict[str, Any]:
        points, improvements = self.points, self.improvements
        return {
            "grid": [{"axis": r.axis, "value": r.value, "process": r.process, "seed": int(r.seed),
                      "fidelity": r.fidelity, "robustness": r.robustness,
                      "robustness_after_evidence": r.robustness_after_evidence, "intended": r.intended,
                      "spillover": r.spillover, "breadth": r.breadth,
                      "heldout_misaligned_after": r.heldout_misaligned_after}
                     for r in self.grid.itertuples()],
            "points": points.drop(columns=["pareto"]).to_dict("records"),
            "pareto": {"front": points[points.pareto].process.tolist(),
                       "improvements_over_baseline": len(improvements),
                       "improving_configs": improvements.process.tolist(),
                       "improvements": improvements[["process", "robustness_gain", "robustness_spread",
                                                     "fidelity_gain", "fidelity_spread"]].to_dict("records")
                       if len(improvements) else []},
            "robustness_clear": self.robustness_clear,
            "fidelity_clear": self.fidelity_clear,
            "trends": self.trends.to_dict("records"),
        }


def engineering_sweep(baseline_process: str, sweep_processes: dict[str, list[str]], seeds: list[int],
                      recipe: EMRecipe, n_contexts: int, analysis_seed: int,
                      threads: int | None = None) -> EngineeringSweep:
    """Train (cached), fine-tune and measure every point of every axis for every seed, and summarise."""
    leaks = leak_table([n for names in sweep_processes.values() for n in names])
    grid = engineering_grid(sweep_processes, seeds, recipe, n_contexts, analysis_seed, threads)
    points, improvements = engineering_summary(grid, baseline_process)
    return EngineeringSweep(baseline_process, leaks, grid, points, improvements)


@dataclass(frozen=True)
class DenseGrid:
    """The committed dense-grid run (:mod:`persona_wm.studies.persona_engineering_sweep`'s output) as the notebook
    summarises it."""

    points: pd.DataFrame
    n_jobs: int
    device: str
    wall_s: float
    workers: int
    trainer: str  # "stacked": every model trained first on the GPU, N at a time; "sequential": by each job
    pareto_front: list[str]
    improvements: list[str]
    robustness_clear: list[str]
    fidelity_clear: list[str]

    @property
    def title(self) -> str:
        return (f"Dense grid: {self.n_jobs} runs on {self.device} ({self.trainer} training, {self.workers} workers) "
                f"in {self.wall_s / 60:.1f} min")


def dense_grid(path: Path = DENSE_GRID_PATH) -> DenseGrid | None:
    """Read the dense grid's JSON; None when that file is absent or holds a grid of another organism (the
    notebook then skips the section)."""
    if not Path(path).exists():
        return None
    full = json.loads(Path(path).read_text(encoding="utf-8"))
    if "robustness_clear" not in full:  # a grid of the former organism (em()), before the criteria were split
        return None
    return DenseGrid(pd.DataFrame(full["points"]), full["n_jobs"], full["device"], full["wall_s"], full["workers"],
                     full.get("trainer", "sequential"), full["pareto_front"], full["improvements_over_baseline"],
                     full["robustness_clear"], full["fidelity_clear"])


@dataclass(frozen=True)
class SpecificityTracking:
    """The two parts of persona-steering specificity against robustness, configurations as units (seed means),
    Spearman with bootstrap CIs, p values Holm-corrected over the two."""

    correlations: dict[str, dict[str, float]]

    def text(self) -> str:
        return "; ".join(f"{part} ρ = {c['spearman_rho']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] (Holm p = "
                         f"{c['p_holm']:.3g})" for part, c in self.correlations.items())

    def metrics(self) -> dict[str, Any]:
        return {"correction": "Holm over the correlations reported", **self.correlations}


def specificity_tracking(points: pd.DataFrame, n_boot: int, seed: int) -> SpecificityTracking:
    correlations = {part: spearman_with_ci(points[f"{part}_mean"], points.robustness_mean, n_boot=n_boot, seed=seed)
                    for part in ("intended", "spillover")}
    for c, p in zip(correlations.values(), multipletests([c["p"] for c in correlations.values()], method="holm")[1]):
        c["p_holm"] = float(p)
    return SpecificityTracking(correlations)


@dataclass(frozen=True)
class PersonaEngineeringResult:
    """Everything study 04 reports; :meth:`metrics` is its ``metrics.json``."""

    seeds: list[int]
    sweep: EngineeringSweep
    tracking: SpecificityTracking
    runtime_s: float  # recorded training time of the sweep's models (read from the model cache)

    def metrics(self) -> dict[str, Any]:
        """The metrics dict; undefined numbers (an sd from one seed, a CI from too few points) are None."""
        return undefined_as_none({"baseline": self.sweep.baseline_process, "seeds": self.seeds,
                                  **self.sweep.metrics(), "specificity_tracks_robustness": self.tracking.metrics(),
                                  "runtime_s": self.runtime_s})
