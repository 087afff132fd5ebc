"""Study 03 (emergent misalignment carried by a persona, and its reversal) on the v3 organism: one function per
notebook section and the frozen records their results live in; :class:`EMReversalResult` assembles them and
writes ``metrics.json``'s dict.

Sections: :func:`organism` (the process and the marginal check), :func:`train_all` (every model first),
:func:`contrast` (the pre-registered coupled − factored headline), :func:`coupling_sweep` (breadth per
(tasks_per_sequence, coupling)), :func:`search` (every configuration of the stated search space),
:func:`mechanism` (persona-belief probe, shift, causal patch), :func:`reversal` (belief-state, difference-in-means,
ablation against a null of random directions), :func:`diagnostic` (the specificity parts against breadth).

Verdict thresholds live here (:data:`TARGET_COUPLED`, ...), not in the notebook.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.analysis.stats import mean_t_ci, spearman_with_ci, welch_difference
from persona_wm.core.ghmm import optimal_cross_entropy
from persona_wm.core.values import undefined_as_none
from persona_wm.processes.em_seq import EMSeqConfig, em_seq_process, first_answer_bad_rate, parse_em_seq_name
from persona_wm.toy.em import (
    MIN_INCREASE,
    PLACES,
    EMExperiment,
    EMRecipe,
    belief_shift,
    belief_state_direction,
    best_settings,
    damage_at_restoration,
    diff_in_means_direction,
    em_configs,
    em_experiment,
    mean_change,
    model_diff_direction,
    patch_out_change,
    persona_probe,
    random_directions,
    reversal_sweep,
    specificity_parts,
    summarise_reversal,
    with_knobs,
)
from persona_wm.toy.stacked import trained_models
from persona_wm.toy.train import TrainedModel

__all__ = ["TARGET_COUPLED", "TARGET_FACTORED", "TARGET_DIFFERENCE", "TARGET_REMOVED", "Design", "Organism",
           "organism", "Training", "train_all", "Experiments", "Headline", "Contrast", "contrast", "CouplingSweep", "coupling_sweep", "Search",
           "search", "PATCH_DIRECTIONS", "Mechanism", "mechanism", "Reversal", "reversal", "Diagnostic", "diagnostic",
           "EMReversalResult"]

#: Pre-registered target (the issue's): coupled breadth >= 0.5, factored <= 0.2, and the CI of the difference
#: above 0.2.
TARGET_COUPLED, TARGET_FACTORED, TARGET_DIFFERENCE = 0.5, 0.2, 0.2
#: The mechanism's expectation: removing the fine-tune's change along the persona-belief direction removes at
#: least this share of the coupled organism's held-out increase.
TARGET_REMOVED = 0.5
#: What ran before the params were fixed, counted in ``n_configs_tried``'s spirit: the pilot that checked the v3
#: organism trains and shows EM (every configuration lies inside the search space, so none is added to it), and
#: the one analysis choice changed after the first default run (the causal patch's direction readings).
PILOT = {
    "runs": "3 seeds x tasks_per_sequence {1, 3, 6} x couplings {0, 1} x fine-tune lr {2e-4, 1e-3} x steps {20, 40, 80}"
            " at prior 0.5, with 250 and (tasks_per_sequence 6) 600 base steps: 36 coupled/factored pairs",
    "added_after_first_run": "the causal patch along the probe's pattern (encoding direction) and along the mean "
                             "change (ceiling), beside the probe's weights (decoding direction), which the first "
                             "default run had used alone",
}
#: Null quantiles reported for random directions.
NULL_QUANTILES = (0.05, 0.5, 0.95)


# =========================================================================== the design
@dataclass(frozen=True)
class Design:
    """The pre-registered design: the headline organism (coupled) and its factored twin, and the search space.

    ``process`` is the headline's coupled organism; its twin is the same name with ``coupling=0.0``. The sweep
    varies ``tasks_per_sequence`` x ``couplings`` at the headline's persona prior and fine-tune; the search varies
    ``tasks_per_sequence`` x ``persona_priors`` x the recipe's ``ft_step_grid`` x ``ft_lr_grid`` for coupled/factored
    pairs (couplings 1 and 0).
    """

    process: str
    tasks_per_sequence: tuple[int, ...]
    couplings: tuple[float, ...]
    persona_priors: tuple[float, ...]
    seeds: tuple[int, ...]
    recipe: EMRecipe

    def __post_init__(self) -> None:
        head = parse_em_seq_name(self.process)
        if head.coupling != 1.0:
            raise ValueError(f"Design: the headline organism must be fully coupled (coupling=1.0), got {self.process}")
        if head.tasks_per_sequence not in self.tasks_per_sequence:
            raise ValueError(f"Design: tasks_per_sequence {list(self.tasks_per_sequence)} must contain the headline's "
                             f"{head.tasks_per_sequence}")
        if head.persona_prior not in self.persona_priors:
            raise ValueError(f"Design: persona_priors {list(self.persona_priors)} must contain the headline's "
                             f"{head.persona_prior}")
        if not {0.0, 1.0} <= set(self.couplings):
            raise ValueError(f"Design: couplings {list(self.couplings)} must contain 0.0 and 1.0")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Design:
        """The design of a params mapping (or a notebook's ``globals()``): the same-named entries and the recipe."""
        return cls(params["process"], tuple(params["tasks_per_sequence"]), tuple(params["couplings"]),
                   tuple(params["persona_priors"]), tuple(params["seeds"]), EMRecipe.from_params(params))

    @property
    def head(self) -> EMSeqConfig:
        return parse_em_seq_name(self.process)

    def organism(self, tasks_per_sequence: int, coupling: float, persona_prior: float | None = None) -> str:
        prior = self.head.persona_prior if persona_prior is None else persona_prior
        return with_knobs(self.process, tasks_per_sequence=int(tasks_per_sequence), coupling=float(coupling),
                          persona_prior=float(prior))

    @property
    def factored(self) -> str:
        return with_knobs(self.process, coupling=0.0)

    @property
    def sweep_names(self) -> list[str]:
        return [self.organism(t, c) for t in self.tasks_per_sequence for c in self.couplings]

    @property
    def search_names(self) -> list[str]:
        return [self.organism(t, c, p) for t in self.tasks_per_sequence for p in self.persona_priors for c in (0.0, 1.0)]

    @property
    def unit_names(self) -> list[str]:
        """The configurations that are units of the across-configuration analyses (mechanism, diagnostic): the
        sweep and the search's organisms, each at the headline fine-tune."""
        return list(dict.fromkeys(self.sweep_names + self.search_names))

    @property
    def search_axes(self) -> dict[str, list]:
        return {"tasks_per_sequence": list(self.tasks_per_sequence), "persona_prior": list(self.persona_priors),
                "ft_steps": list(self.recipe.ft_step_grid), "ft_lr": list(self.recipe.ft_lr_grid)}

    def configs(self) -> list:
        """Every model the study trains: the sweep at the headline learning rate, the search's pairs at every one."""
        return list(dict.fromkeys(em_configs(self.sweep_names, self.seeds, self.recipe)
                                  + em_configs(self.search_names, self.seeds, self.recipe, self.recipe.ft_lr_grid)))

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        return {"coupled": self.process, "factored": self.factored, "place": "fresh", "ft_steps": r.ft_steps,
                "ft_lr": r.ft_lr, "seeds": list(self.seeds), "base_steps": r.base_steps, "d_model": r.d_model,
                "n_layers": r.n_layers, "ci": "Welch t over seeds (scipy.stats.ttest_ind, equal_var=False)"}


# =========================================================================== 1. the organism
@dataclass(frozen=True)
class Organism:
    """The headline organism, its optimal cross-entropy and the check that couplings only change dependence."""

    name: str
    n_states: int
    n_tokens: int
    sectors: tuple[str, ...]
    optimal_ce: float  # mean Bayes-optimal CE over one sequence's predicted positions (nats)
    marginals: pd.DataFrame  # per coupling and task: exact P(first answer bad)

    @property
    def marginal_spread(self) -> float:
        """Largest difference, over tasks, of the first-answer bad rate between couplings (0 = held equal)."""
        return float(self.marginals.groupby("task").bad_rate.agg(np.ptp).max())


def organism(design: Design) -> Organism:
    process = em_seq_process(design.head)
    length = 3 * design.head.tasks_per_sequence
    rows = [{"coupling": c, "task": k + 1, "bad_rate": first_answer_bad_rate(parse_em_seq_name(
        with_knobs(design.process, coupling=float(c))), k)} for c in design.couplings for k in range(design.head.n_tasks)]
    return Organism(design.process, process.n_states, process.n_tokens, process.partition_labels,
                    float(optimal_cross_entropy(process, length).mean()), pd.DataFrame(rows))


# =========================================================================== 2. training
@dataclass(frozen=True)
class Training:
    """Every model the study analyses, trained (or loaded from the model cache) in one call before any analysis."""

    models: list[TrainedModel]
    trainer: str
    wall_seconds: float

    @property
    def n_trained(self) -> int:
        return sum(not m.from_cache for m in self.models)

    @property
    def base_ce(self) -> pd.DataFrame:
        """Final CE / optimal of every base model, per organism (mean, max over seeds)."""
        frame = pd.DataFrame([{"process": m.config.process, "seed": m.config.seed, "ce_ratio": m.final_eval["ce_ratio"]}
                              for m in self.models if m.config.init_from is None])
        return frame.groupby("process", sort=False).ce_ratio.agg(["mean", "max"]).reset_index()

    def summary(self) -> str:
        bases = sum(m.config.init_from is None for m in self.models)
        return (f"{len(self.models)} models ({bases} base models, {len(self.models) - bases} fine-tuning runs), "
                f"trainer `{self.trainer}`: {self.n_trained} trained now, {len(self.models) - self.n_trained} loaded "
                f"from the model cache, in {self.wall_seconds:.0f} s.")


def train_all(design: Design, threads: int | None = None) -> Training:
    start = time.perf_counter()
    models = trained_models(design.configs(), design.recipe.trainer, threads=threads)
    return Training(models, design.recipe.trainer, time.perf_counter() - start)


# =========================================================================== experiments, memoised per run
@dataclass
class Experiments:
    """Every experiment of one study run, made on first use (one per organism, seed, fine-tune steps and lr)."""

    design: Design
    n_contexts: int
    analysis_seed: int
    threads: int | None = None
    training: Training | None = None  # its models are used before the cache is looked up
    _made: dict = field(default_factory=dict)

    @cached_property
    def _models(self) -> dict:
        return {} if self.training is None else {m.config: m for m in self.training.models}

    def get(self, name: str, seed: int, ft_steps: int | None = None, ft_lr: float | None = None) -> EMExperiment:
        r = self.design.recipe
        key = (name, seed, r.ft_steps if ft_steps is None else ft_steps, r.ft_lr if ft_lr is None else ft_lr)
        if key not in self._made:
            self._made[key] = em_experiment(name, seed, r, self.n_contexts, self.analysis_seed, key[2], key[3],
                                            self.threads, self._models)
        return self._made[key]

    def rows(self, names: list[str], ft_steps: int | None = None, ft_lr: float | None = None,
             desc: str = "experiments", progress: bool = True) -> pd.DataFrame:
        """One row per name x seed: the organism's knobs, the fine-tune, and every EM measure."""
        out = []
        for name, seed in tqdm([(n, s) for n in names for s in self.design.seeds], desc=desc, disable=not progress,
                               leave=False):
            e = self.get(name, seed, ft_steps, ft_lr)
            c = e.config
            out.append({"process": name, "tasks_per_sequence": c.tasks_per_sequence, "coupling": c.coupling,
                        "persona_prior": c.persona_prior, "ft_steps": e.ft_steps, "ft_lr": e.ft_lr, "seed": seed,
                        "base_ce_ratio": e.base.final_eval["ce_ratio"], **e.measures.row()})
        return pd.DataFrame(out)


# =========================================================================== 3. the headline contrast
@dataclass(frozen=True)
class Contrast:
    """Coupled − factored breadth in one place, Welch 95% CI over seeds."""

    place: str
    coupled: float
    factored: float
    difference: float
    ci_low: float
    ci_high: float
    p: float
    n_seeds: int
    per_seed: pd.DataFrame  # seed, coupling, breadth, increases

    @property
    def meets_target(self) -> bool:
        """Coupled >= 0.5, factored <= 0.2 and the difference's CI above 0.2 (the pre-registered target)."""
        return bool(self.coupled >= TARGET_COUPLED and self.factored <= TARGET_FACTORED
                    and self.ci_low > TARGET_DIFFERENCE)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.ci_low > 0 or self.ci_high < 0)

    def text(self) -> str:
        return (f"coupled {self.coupled:.2f} vs factored {self.factored:.2f}, difference {self.difference:+.3f} "
                f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}] ({self.n_seeds} seeds, Welch 95% CI)")

    def metrics(self) -> dict[str, Any]:
        return {"coupled": self.coupled, "factored": self.factored, "difference": self.difference,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "p": self.p, "n_seeds": self.n_seeds,
                "meets_target": self.meets_target}


def _contrast(rows: pd.DataFrame, place: str) -> Contrast:
    col = f"{place}_breadth"
    coupled, factored = rows[rows.coupling == 1.0][col].dropna(), rows[rows.coupling == 0.0][col].dropna()
    d = welch_difference(coupled, factored)
    return Contrast(place, d["a"], d["b"], d["difference"], d["ci_low"], d["ci_high"], d["p"], d["n_a"],
                    rows[["seed", "coupling", f"{place}_task1_increase", f"{place}_heldout_increase", col]])


@dataclass(frozen=True)
class Headline:
    """The pre-registered contrast in each place, the experiments behind it, and their behaviour table."""

    design: Design
    rows: pd.DataFrame  # Experiments.rows of the coupled and factored organism
    contrasts: dict[str, Contrast]  # place -> contrast
    behaviour: pd.DataFrame  # per organism, seed, place, model and task: misaligned share

    @property
    def fresh(self) -> Contrast:
        return self.contrasts["fresh"]


def contrast(experiments: Experiments) -> Headline:
    """The headline: the coupled organism against its factored twin at the headline fine-tune, every place."""
    design = experiments.design
    names = [design.process, design.factored]
    rows = experiments.rows(names, desc="headline")
    behaviour = []
    for name, seed in itertools.product(names, design.seeds):
        e = experiments.get(name, seed)
        for place, em in e.measures.places.items():
            for model, shares in (("base", em.base), ("fine-tuned", em.tuned)):
                behaviour += [{"organism": "coupled" if e.config.coupling == 1.0 else "factored", "seed": seed,
                               "place": place, "model": model, "task": f"task {k + 1}", "misaligned": v}
                              for k, v in enumerate(shares)]
    places = [p for p in PLACES if rows[f"{p}_breadth"].notna().any()]
    return Headline(design, rows, {p: _contrast(rows, p) for p in places}, pd.DataFrame(behaviour))


# =========================================================================== 4. the sweep
@dataclass(frozen=True)
class CouplingSweep:
    """Breadth per (tasks_per_sequence, coupling) at the headline prior and fine-tune, in each place."""

    rows: pd.DataFrame

    @cached_property
    def table(self) -> pd.DataFrame:
        out = []
        for (tps, coupling), group in self.rows.groupby(["tasks_per_sequence", "coupling"]):
            row = {"tasks_per_sequence": int(tps), "coupling": float(coupling)}
            for place in PLACES:
                mean, low, high = mean_t_ci(group[f"{place}_breadth"])
                row[place] = {"mean": mean, "ci_low": low, "ci_high": high,
                              "n_seeds": int(group[f"{place}_breadth"].notna().sum())}
            out.append(row)
        return pd.DataFrame(out)

    def display_table(self) -> pd.DataFrame:
        flat = self.table.copy()
        for place in PLACES:
            flat[place] = [f"{v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if np.isfinite(v["mean"])
                           else "—" for v in flat[place]]
        return flat

    def contrast(self, tasks_per_sequence: int, place: str = "fresh") -> Contrast:
        return _contrast(self.rows[self.rows.tasks_per_sequence == tasks_per_sequence], place)

    def metrics(self) -> list[dict[str, Any]]:
        return self.table.to_dict("records")


def coupling_sweep(experiments: Experiments) -> CouplingSweep:
    return CouplingSweep(experiments.rows(experiments.design.sweep_names, desc="coupling sweep"))


# =========================================================================== 5. the search
@dataclass(frozen=True)
class Search:
    """Every coupled/factored pair of the stated search space, its contrast over seeds, and the target's verdict."""

    axes: dict[str, list]
    rows: pd.DataFrame  # one row per (organism, seed, ft_steps, ft_lr)
    pairs: pd.DataFrame  # per (tasks_per_sequence, persona_prior, ft_steps, ft_lr): the fresh contrast

    @property
    def n_configs_tried(self) -> int:
        return len(self.pairs)

    @property
    def n_trainings(self) -> int:
        """Models trained for the search: one base per (organism, seed), one fine-tuning run per learning rate."""
        bases = self.rows[["process", "seed"]].drop_duplicates()
        return len(bases) + len(self.rows[["process", "seed", "ft_lr"]].drop_duplicates())

    @property
    def meeting_target(self) -> pd.DataFrame:
        return self.pairs[self.pairs.meets_target]

    def metrics(self) -> dict[str, Any]:
        return {"axes": self.axes, "n_configs_tried": self.n_configs_tried, "n_trainings": self.n_trainings,
                "pairs_meeting_target": int(self.pairs.meets_target.sum()), "pairs": self.pairs.to_dict("records")}


def search(experiments: Experiments, progress: bool = True) -> Search:
    design = experiments.design
    r = design.recipe
    frames = [experiments.rows(design.search_names, steps, lr, desc=f"search steps={steps} lr={lr:g}",
                               progress=progress) for steps in r.ft_step_grid for lr in r.ft_lr_grid]
    rows = pd.concat(frames, ignore_index=True)
    pairs = []
    keys = ["tasks_per_sequence", "persona_prior", "ft_steps", "ft_lr"]
    for values, group in rows.groupby(keys):
        c = _contrast(group, "fresh")
        pairs.append({**dict(zip(keys, values)), **c.metrics()})
    return Search(design.search_axes, rows, pd.DataFrame(pairs))


# =========================================================================== 6. the mechanism
#: The directions the causal patch is run along, by how each is built. The probe's two readings are both
#: "the persona-belief direction"; the mean change is the ceiling for any one direction (it is built from the
#: change being removed, on the same sequences); random directions are the null.
PATCH_DIRECTIONS = {
    "probe_weights": "the persona probe's weights (decoding direction)",
    "probe_pattern": "covariance of the base activations with the persona posterior (encoding direction)",
    "mean_change": "mean fine-tuned − base residual at the held-out fresh answers (ceiling, not a test)",
    "random": "isotropic random unit directions (the null)",
}


@dataclass(frozen=True)
class Mechanism:
    """The persona-belief probe of the base models, how far the fine-tune moves its reading, whether that predicts
    breadth across configurations, and the causal patch along the persona directions (against random ones)."""

    units: pd.DataFrame  # per (organism, seed) at the headline fine-tune: probe R^2, belief shift, breadth
    configs: pd.DataFrame  # per organism: seed means of the above
    shift_spearman: dict[str, float]  # rho(belief shift, breadth) over configurations
    patches: pd.DataFrame  # per (organism, seed, direction): held-out increase before/after, share removed
    n_random: int

    def _headline(self, coupled: bool) -> pd.DataFrame:
        return self.units[self.units.coupling == (1.0 if coupled else 0.0)].query("headline")

    @property
    def probe_r2(self) -> float:
        return float(self._headline(True).probe_r2.mean())

    @property
    def belief_shift(self) -> tuple[float, float, float]:
        """Mean belief shift of the coupled headline organism with its t 95% CI over seeds."""
        return mean_t_ci(self._headline(True).belief_shift)

    @property
    def belief_shift_factored(self) -> tuple[float, float, float]:
        return mean_t_ci(self._headline(False).belief_shift)

    def removed(self, coupled: bool, direction: str) -> dict[str, Any]:
        """Share of the held-out increase the patch along ``direction`` removes (mean and t 95% CI over seeds),
        beside the random directions' null quantiles; undefined (None) when the lower end of the unpatched held-out
        increase's CI is below MIN_INCREASE (no increase to remove a share of)."""
        p = self.patches[self.patches.coupling == (1.0 if coupled else 0.0)]
        mine, null = p[p.direction == direction], p[p.direction.str.startswith("random_")]
        inc_mean, inc_low, _ = mean_t_ci(mine.unpatched_heldout_increase)
        defined = bool(np.isfinite(inc_low) and inc_low > MIN_INCREASE)
        mean, low, high = mean_t_ci(mine.heldout_removed) if defined else (np.nan,) * 3
        values = null.heldout_removed.dropna()
        quantiles = np.quantile(values, NULL_QUANTILES) if len(values) else [np.nan] * 3
        return {"removed": mean, "ci_low": low, "ci_high": high, "defined": defined, "heldout_increase": inc_mean,
                "heldout_increase_patched": float(mine.patched_heldout_increase.mean()),
                "random_null": dict(zip(("q05", "q50", "q95"), (float(q) for q in quantiles))),
                "n_seeds": int(len(mine)), "n_random": self.n_random, "built_as": PATCH_DIRECTIONS[direction]}

    def meets_expectation(self, direction: str) -> bool:
        """The CI of the coupled organism's removed share lies at or above TARGET_REMOVED."""
        c = self.removed(True, direction)
        return bool(c["defined"] and c["ci_low"] >= TARGET_REMOVED)

    def text(self, n_seeds: int) -> str:
        """The conclusion's sentences, every number from this record."""
        (shift, low, high), (fshift, flow, fhigh) = self.belief_shift, self.belief_shift_factored
        rho = self.shift_spearman
        readings = {d: self.removed(True, d) for d in ("probe_weights", "probe_pattern", "mean_change")}
        null, factored = readings["probe_pattern"]["random_null"], self.removed(False, "probe_pattern")
        pct = lambda r: f"{r['removed']:.0%} [{r['ci_low']:.0%}, {r['ci_high']:.0%}]" if r["defined"] else "undefined"  # noqa: E731
        return (
            f"The persona probe reads the base models' persona posterior with R² {self.probe_r2:.3f} (coupled "
            f"headline, mean over seeds). The fine-tune moves its reading at the held-out tasks' fresh answers by "
            f"{shift:+.3f} [{low:+.3f}, {high:+.3f}] in the coupled organism and {fshift:+.3f} [{flow:+.3f}, "
            f"{fhigh:+.3f}] in the factored twin (t 95% CIs over seeds). Across {rho['n']} configurations (seed "
            f"means) the shift predicts breadth with Spearman ρ = {rho['spearman_rho']:.2f} [{rho['ci_low']:.2f}, "
            f"{rho['ci_high']:.2f}]. Putting the base model's value back along a direction removes this share of the "
            "coupled organism's held-out increase: "
            + "; ".join(f"{d.replace('_', ' ')} {pct(r)}" for d, r in readings.items())
            + f" (random directions: median {null['q50']:.1%}, 95th percentile {null['q95']:.1%}, {self.n_random} × "
            f"{n_seeds} seeds). Expectation ≥ {TARGET_REMOVED:.0%} along the persona direction: "
            + ", ".join(f"{d.replace('_', ' ')} **{'met' if self.meets_expectation(d) else 'not met'}**"
                        for d in ("probe_weights", "probe_pattern"))
            + ". The probe's weights (decoding) and its pattern (encoding) are both readings of \"the persona-belief "
            "direction\"; the mean change is the ceiling for one direction, not a test. In the factored twin the "
            f"held-out increase is {factored['heldout_increase']:+.3f}"
            + (f", of which the pattern patch removes {pct(factored)}." if factored["defined"] else
               ", too small for a removed share to be defined (its CI reaches below 0.02)."))

    def metrics(self) -> dict[str, Any]:
        shift, low, high = self.belief_shift
        fshift, flow, fhigh = self.belief_shift_factored
        readings = [d for d in PATCH_DIRECTIONS if d != "random"]
        patch = {f"{organism}": {d: self.removed(organism == "coupled", d) for d in readings}
                 for organism in ("coupled", "factored")}
        return {"probe_r2": self.probe_r2, "probe_r2_factored": float(self._headline(False).probe_r2.mean()),
                "belief_shift": shift, "belief_shift_ci": [low, high],
                "belief_shift_factored": fshift, "belief_shift_factored_ci": [flow, fhigh],
                "shift_breadth_spearman": self.shift_spearman,
                "ablation_breadth_removed_coupled": {d: patch["coupled"][d]["removed"] for d in readings},
                "ablation_breadth_removed_factored": {d: patch["factored"][d]["removed"] for d in readings},
                "patch": patch, "configs": self.configs.to_dict("records")}


def mechanism(experiments: Experiments, n_random: int, n_boot: int, progress: bool = True) -> Mechanism:
    design = experiments.design
    units, probes = [], {}
    for name, seed in tqdm([(n, s) for n in design.unit_names for s in design.seeds], desc="probes",
                           disable=not progress, leave=False):
        e = experiments.get(name, seed)
        probes[name, seed] = probe = persona_probe(e, seed=experiments.analysis_seed)
        units.append({"process": name, "seed": seed, "tasks_per_sequence": e.config.tasks_per_sequence,
                      "coupling": e.config.coupling, "persona_prior": e.config.persona_prior,
                      "headline": name in (design.process, design.factored), "probe_r2": probe.r2,
                      "belief_shift": belief_shift(e, probe), "breadth": e.measures.fresh.breadth,
                      "heldout_increase": e.measures.fresh.heldout_increase})
    units = pd.DataFrame(units)
    configs = units.groupby("process", sort=False)[["tasks_per_sequence", "coupling", "persona_prior", "probe_r2",
                                                     "belief_shift", "breadth", "heldout_increase"]].mean().reset_index()
    usable = configs.dropna(subset=["belief_shift", "breadth"])
    rho = spearman_with_ci(usable.belief_shift, usable.breadth, n_boot=n_boot, seed=experiments.analysis_seed)
    patches = []
    for name, seed in itertools.product((design.process, design.factored), design.seeds):
        e, probe = experiments.get(name, seed), probes[name, seed]
        directions = {"probe_weights": probe.direction, "probe_pattern": probe.pattern,
                      "mean_change": mean_change(e)}
        for i, u in enumerate(random_directions(n_random, probe.direction.size, [experiments.analysis_seed, seed, 7])):
            directions[f"random_{i:02d}"] = u
        for label, direction in directions.items():
            patched = patch_out_change(e, direction, label)
            patches.append({"process": name, "seed": seed, "coupling": e.config.coupling, "direction": label,
                            "unpatched_heldout_increase": patched.unpatched.heldout_increase,
                            "patched_heldout_increase": patched.em.heldout_increase,
                            "heldout_removed": patched.heldout_removed})
    return Mechanism(units, configs, rho, pd.DataFrame(patches), n_random)


# =========================================================================== 7. reversal
#: How each reversal direction is built (named by construction, as the metrics name them).
DIRECTION_BUILDS = {
    "belief_state": "persona-class centroid difference (aligned − misaligned) in the base model",
    "belief_state_ft": "the same centroid difference in the fine-tuned model",
    "diff_in_means": "fine-tuned model's mean activation where it answers aligned − where it answers misaligned",
    "model_diff": "mean base − fine-tuned activation",
    "ablation_belief_state": "project out the base model's persona-class centroid difference",
    "ablation_diff_in_means": "project out the diff-in-means direction",
    "random": "isotropic random unit directions, same added norm (the null)",
}


@dataclass(frozen=True)
class Reversal:
    """Every reversal direction on each seed's coupled headline model, summarised over seeds, and the random null."""

    sweep: pd.DataFrame  # per seed, method, scale, task
    summary: pd.DataFrame  # per seed, method, scale: summarise_reversal
    target: float
    n_random: int

    @cached_property
    def per_seed(self) -> pd.DataFrame:
        rows = []
        named = self.summary[~self.summary.method.str.startswith("random_")]
        for seed, group in named.groupby("seed"):
            for method, best in best_settings(group).items():
                rows.append({"method": method, "seed": seed, **best,
                             "change_at_target": damage_at_restoration(group, method, self.target)})
        return pd.DataFrame(rows)

    @cached_property
    def stats(self) -> pd.DataFrame:
        measures = ["scale", "restoration_heldout", "restoration_task1", "capability_change", "change_at_target"]
        out = self.per_seed.groupby("method")[measures].agg(["mean", "std"])
        out.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in out.columns]
        return out

    @cached_property
    def random_null(self) -> pd.DataFrame:
        """Per scale: quantiles over seeds x random directions of mean restoration and capability change."""
        rand = self.summary[self.summary.method.str.startswith("random_")]
        rows = []
        for scale, group in rand.groupby("scale"):
            row = {"scale": float(scale)}
            for col in ("restoration_mean", "capability_change"):
                for q, v in zip(("q05", "q50", "q95"), np.nanquantile(group[col], NULL_QUANTILES)):
                    row[f"{col}_{q}"] = float(v)
            rows.append(row)
        return pd.DataFrame(rows)

    def at_scale(self, method: str, scale: float, how: str = "mean") -> pd.Series:
        """Mean (``how="std"``: sd) over seeds of a method's summary row at ``scale``."""
        rows = self.summary[(self.summary.method == method) & np.isclose(self.summary.scale, scale)]
        return getattr(rows[["restoration_mean", "restoration_heldout", "restoration_task1", "capability_change"]], how)()

    def at_scale_metrics(self, method: str, scale: float) -> dict[str, float]:
        """:meth:`at_scale`'s means with their sds over seeds (``<measure>_sd``)."""
        return {**self.at_scale(method, scale).to_dict(),
                **{f"{k}_sd": v for k, v in self.at_scale(method, scale, "std").to_dict().items()}}

    def beyond_null(self, method: str, scale: float = 1.0) -> bool:
        """Whether a method's mean restoration at ``scale`` exceeds the random null's 95th percentile there."""
        null = self.random_null.set_index("scale")
        return bool(self.at_scale(method, scale).restoration_mean > null.loc[scale, "restoration_mean_q95"])

    def sd(self, method: str, measure: str) -> float:
        return float(np.nan_to_num(self.stats.loc[method, f"{measure}_sd"]))

    def text(self, n_seeds: int) -> str:
        """The conclusion's sentences, every number from this record."""
        steering = [m for m in ("belief_state", "belief_state_ft", "diff_in_means", "model_diff") if m in self.stats.index]
        at1 = {m: self.at_scale(m, 1.0) for m in steering}
        null1 = self.random_null.set_index("scale").loc[1.0]
        changes = [f"{m.replace('_', ' ')} {self.stats.loc[m].change_at_target_mean:+.4f} ± "
                   f"{self.sd(m, 'change_at_target'):.4f} nats" for m in steering
                   if np.isfinite(self.stats.loc[m].change_at_target_mean)]
        ablation = [f"{self.stats.loc[m].restoration_heldout_mean:.2f} ± {self.sd(m, 'restoration_heldout'):.2f} "
                    f"({m.removeprefix('ablation_').replace('_', ' ')})" for m in self.stats.index
                    if m.startswith("ablation_")]
        return (
            "At scale 1 (the base belief-state vector's norm) mean restoration over tasks (mean ± sd over seeds) is "
            + ", ".join(f"{m.replace('_', ' ')} {r.restoration_mean:.2f} ± "
                        f"{self.at_scale(m, 1.0, 'std').restoration_mean:.2f}" for m, r in at1.items())
            + f", against random directions of the same norm {null1.restoration_mean_q50:.2f} (median; 95th "
            f"percentile {null1.restoration_mean_q95:.2f}, {self.n_random} directions × {n_seeds} seeds): "
            + ", ".join(f"{m.replace('_', ' ')} {'beyond' if self.beyond_null(m) else 'within'}" for m in at1)
            + f" the null. Signed capability change at mean restoration {self.target:g} (interpolated along each "
            "scale sweep, mean ± sd over seeds; negative = the steering also undoes part of the fine-tune's "
            "capability cost): " + (", ".join(changes) or "no method reaches it")
            + ". Ablation restores held-out " + " and ".join(ablation) + ".")

    def metrics(self) -> dict[str, Any]:
        out = {}
        for method in self.stats.index:
            s = self.stats.loc[method]
            out[method] = {"built_as": DIRECTION_BUILDS.get(method, ""),
                           **{k: float(s[f"{k}_mean"]) for k in ("scale", "restoration_heldout", "restoration_task1",
                                                                  "capability_change", "change_at_target")},
                           **{f"{k}_sd": float(s[f"{k}_sd"]) for k in ("restoration_heldout", "capability_change",
                                                                      "change_at_target")},
                           "at_scale_1": self.at_scale_metrics(method, 1.0) if not method.startswith("ablation_")
                           else None}
        out["random_null"] = {"built_as": DIRECTION_BUILDS["random"], "n_directions": self.n_random,
                              "per_scale": self.random_null.to_dict("records")}
        return out


def reversal(experiments: Experiments, scales: list[float], target: float, n_random: int,
             progress: bool = True) -> Reversal:
    """Every direction on the coupled headline organism's fine-tuned models, each seed, at every scale (added norm
    = scale x the base belief-state vector's norm), plus ``n_random`` random directions at the same norms."""
    design = experiments.design
    sweeps = []
    for seed in tqdm(design.seeds, desc="reversal", disable=not progress, leave=False):
        e = experiments.get(design.process, seed)
        belief = belief_state_direction(e.base.model, e)
        directions = {"belief_state": belief, "belief_state_ft": belief_state_direction(e.tuned_model, e),
                      "diff_in_means": diff_in_means_direction(e), "model_diff": model_diff_direction(e),
                      "ablation_belief_state": belief, "ablation_diff_in_means": diff_in_means_direction(e)}
        for i, u in enumerate(random_directions(n_random, belief.size, [experiments.analysis_seed, seed, 13])):
            directions[f"random_{i:02d}"] = u
        sweeps.append(reversal_sweep(e, directions, scales, float(np.linalg.norm(belief))).assign(seed=seed))
    sweep = pd.concat(sweeps, ignore_index=True)
    summary = pd.concat([summarise_reversal(g, target).assign(seed=s) for s, g in sweep.groupby("seed")])
    return Reversal(sweep, summary, target, n_random)


# =========================================================================== 8. the diagnostic
@dataclass(frozen=True)
class Diagnostic:
    """The two parts of pre-fine-tuning persona-steering specificity against breadth, configurations as units."""

    points: pd.DataFrame  # per (organism, seed)
    configs: pd.DataFrame  # per organism: seed means
    correlations: dict[str, dict[str, float]]  # part -> Spearman with bootstrap CI and Holm-adjusted p

    def metrics(self) -> dict[str, Any]:
        return {"n_configs": int(len(self.configs)), "correction": "Holm over the correlations reported",
                "correlations": self.correlations, "configs": self.configs.to_dict("records")}


def diagnostic(experiments: Experiments, n_boot: int, progress: bool = True) -> Diagnostic:
    design = experiments.design
    points = []
    for name, seed in tqdm([(n, s) for n in design.unit_names for s in design.seeds], desc="diagnostic",
                           disable=not progress, leave=False):
        e = experiments.get(name, seed)
        parts = specificity_parts(e, belief_state_direction(e.base.model, e))
        points.append({"process": name, "seed": seed, "tasks_per_sequence": e.config.tasks_per_sequence,
                       "coupling": e.config.coupling, **parts, "breadth": e.measures.fresh.breadth})
    points = pd.DataFrame(points)
    configs = points.groupby("process", sort=False)[["tasks_per_sequence", "coupling", "intended", "spillover",
                                                     "breadth"]].mean().reset_index().dropna(subset=["breadth"])
    correlations = {part: spearman_with_ci(configs[part], configs.breadth, n_boot=n_boot,
                                           seed=experiments.analysis_seed) for part in ("intended", "spillover")}
    holm = multipletests([c["p"] for c in correlations.values()], method="holm")[1]
    for c, p in zip(correlations.values(), holm):
        c["p_holm"] = float(p)
    return Diagnostic(points, configs, correlations)


# =========================================================================== the study's result
@dataclass(frozen=True)
class EMReversalResult:
    """Everything study 03 reports; :meth:`metrics` is its ``metrics.json``."""

    design: Design
    organism: Organism
    headline: Headline
    sweep: CouplingSweep
    search: Search
    mechanism: Mechanism
    reversal: Reversal
    diagnostic: Diagnostic

    def metrics(self) -> dict[str, Any]:
        """The metrics dict; undefined numbers (a breadth whose task-1 increase vanishes, a CI from one seed) are
        None."""
        h = self.headline
        contrast = {**h.fresh.metrics(), "n_configs_tried": self.search.n_configs_tried,
                    "design": self.design.describe()}
        return undefined_as_none({"organism_v3": {
            "pilot": PILOT,
            "organism": {"name": self.organism.name, "n_states": self.organism.n_states,
                         "n_tokens": self.organism.n_tokens, "optimal_ce": self.organism.optimal_ce,
                         "marginal_bad_rate_spread": self.organism.marginal_spread},
            "contrast": contrast,
            "contrast_by_place": {p: c.metrics() for p, c in h.contrasts.items()},
            "sweep": self.sweep.metrics(),
            "search": self.search.metrics(),
            "mechanism": self.mechanism.metrics(),
            "reversal": self.reversal.metrics(),
            "diagnostic": self.diagnostic.metrics(),
        }})
