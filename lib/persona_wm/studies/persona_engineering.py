"""Study 04 (persona engineering): the sweep section, the committed dense GPU grid, and the result
dataclass whose :meth:`PersonaEngineeringResult.metrics` is ``metrics.json``'s dict.

Every point is measured by :mod:`persona_wm.toy.engineering` (fidelity, robustness, specificity of one EM-SFP
configuration and seed, on the recipe of :mod:`persona_wm.toy.em`); this module assembles the sweep, its
summaries and the study's metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.values import undefined_as_none
from persona_wm.toy.em import EMRecipe
from persona_wm.toy.engineering import engineering_grid, engineering_summary, equivalent_pairs, leak_table

__all__ = ["EngineeringSweep", "engineering_sweep", "BEHAVIOUR", "DENSE_GRID_PATH", "DenseGrid", "dense_grid",
           "PersonaEngineeringResult"]

#: Per-configuration means that fix a configuration's observable behaviour (equal in all = equivalent).
BEHAVIOUR = ["fidelity_mean", "robustness_mean", "base_ce_ratio_mean"]
#: The dense grid's output, written by ``python -m persona_wm.io.sweep --params full`` on a GPU and committed.
DENSE_GRID_PATH = REPO_ROOT / "outputs" / "04_persona_engineering_full" / "grid_full_gpu.json"


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
    def clear_improvements(self) -> int:
        return int(self.improvements["clear"].sum()) if len(self.improvements) else 0

    def metrics(self) -> dict[str, Any]:
        points, improvements = self.points, self.improvements
        return {
            "grid": [{"axis": r.axis, "value": r.value, "process": r.process, "seed": int(r.seed),
                      "fidelity": r.fidelity, "robustness": r.robustness, "specificity": r.specificity,
                      "breadth": r.breadth, "heldout_misaligned_after": r.heldout_misaligned_after}
                     for r in self.grid.itertuples()],
            "points": points.drop(columns=["pareto"]).to_dict("records"),
            "pareto": {"front": points[points.pareto].process.tolist(),
                       "improvements_over_baseline": len(improvements),
                       "clear_improvements": self.clear_improvements,
                       "improving_configs": improvements.process.tolist()},
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
    """The committed dense-grid run (:mod:`persona_wm.io.sweep`'s output) as the notebook summarises it."""

    points: pd.DataFrame
    n_jobs: int
    device: str
    wall_s: float
    workers: int
    trainer: str  # "stacked": every model trained first on the GPU, N at a time; "sequential": by each job
    pareto_front: list[str]
    improvements: list[str]
    clear_improvements: list[str]

    @property
    def title(self) -> str:
        return (f"Dense grid: {self.n_jobs} runs on {self.device} ({self.trainer} training, {self.workers} workers) "
                f"in {self.wall_s / 60:.1f} min")


def dense_grid(path: Path = DENSE_GRID_PATH) -> DenseGrid | None:
    """Read the dense grid's JSON; None when that file is absent (the notebook then skips the section)."""
    if not Path(path).exists():
        return None
    full = json.loads(Path(path).read_text(encoding="utf-8"))
    return DenseGrid(pd.DataFrame(full["points"]), full["n_jobs"], full["device"], full["wall_s"], full["workers"],
                     full.get("trainer", "sequential"), full["pareto_front"], full["improvements_over_baseline"], full["clear_improvements"])


@dataclass(frozen=True)
class PersonaEngineeringResult:
    """Everything study 04 reports; :meth:`metrics` is its ``metrics.json``."""

    seeds: list[int]
    sweep: EngineeringSweep
    tracking: dict[str, float]  # Spearman rho(specificity, robustness) over configurations, with its CI
    runtime_s: float  # recorded training time of the sweep's models (read from the model cache)

    def metrics(self) -> dict[str, Any]:
        """The metrics dict; undefined numbers (an sd from one seed, a CI from too few points) are None."""
        return undefined_as_none({"baseline": self.sweep.baseline_process, "seeds": self.seeds,
                                  **self.sweep.metrics(), "specificity_tracks_robustness": self.tracking,
                                  "runtime_s": self.runtime_s})
