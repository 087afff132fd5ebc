"""Study 02 (steering specificity: belief probes and belief-state steering in toy transformers): one function
per notebook section and the frozen dataclasses their results live in; :class:`SteeringSpecificityResult`
assembles them and builds ``metrics.json``'s dict.

Sections: :func:`train_models` and :func:`training_summary` (three processes, their transformers),
:func:`probe_section`, :func:`probe_demo` and :func:`probe_training` (belief probes), :func:`steering_section`
(Tables 2-5 under both readings of the seed's averaging), :func:`interaction_section` and
:func:`trend_section` (why centroid steering leaks), :func:`layer_section` (layer dependence),
:func:`partition_section` (Table 6 on the semi-factored process) and :func:`targets_table` (the seed's
targets beside our values). The figures are drawn from these results' frames by :mod:`persona_wm.plots.steering`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from persona_wm.analysis import seed_tables
from persona_wm.analysis.stats import across_seeds, trend_correlation
from persona_wm.core.ghmm import marginals
from persona_wm.core.values import undefined_as_none
from persona_wm.processes import get_process
from persona_wm.toy.hooks import residual_hooks
from persona_wm.toy.probe import (
    angle_spread,
    collect_activations,
    principal_angles,
    probe_frame,
    probe_r2_over_training,
)
from persona_wm.toy.stacked import trained_models
from persona_wm.toy.steer import interaction_frame, partition_frame, steering_frame, training_trend
from persona_wm.toy.train import TrainConfig, TrainedModel, history_frame

__all__ = ["METHODS", "FACTORS", "STEERING_COLUMNS", "SECTORS", "TrainingPlan", "train_models", "Training",
           "training_summary", "Probes", "probe_section", "ProbeDemo", "probe_demo", "ProbeTraining", "probe_training",
           "Steering", "steering_section", "Interaction", "interaction_section", "Trend", "trend_section",
           "LayerSteering", "layer_section", "PartitionSteering", "partition_section", "targets_table",
           "SteeringSpecificityResult"]

Models = dict[tuple[str, int], TrainedModel]

#: Steering methods: the seed's marginal centroid vector and our conditional one (persona_wm.toy.steer).
METHODS = ("centroid", "conditional")
FACTORS = (0, 1)
#: Steering-frame columns summarised over training seeds.
STEERING_COLUMNS = ("kl_target", "kl_steered", "kl_unsteered", "ratio", "kl_target_avg", "kl_steered_avg",
                    "kl_unsteered_avg", "ratio_avg", "ratio_pairs", "tv_steered", "tv_unsteered", "argmax_flip")
#: Table 6's partition blocks of the semi-factored process: sector label -> block name.
SECTORS = {"(1,0)": "P10", "(0,1)": "P01"}
#: The scales at which reading-free spillover goes into metrics.json.
BOUNDED_SCALES = (0.5, 1.0, 2.0)
#: Snapshots this close to optimal CE are "late in training" for the trend.
LATE_CE_RATIO = 1.05


# =========================================================================== 1. setup
@dataclass(frozen=True)
class TrainingPlan:
    """The study's training parameters: one model per (process, seed)."""

    processes: tuple[str, ...]
    seeds: tuple[int, ...]
    train_steps: dict[str, int]
    batch_size: dict[str, int]
    learning_rate: dict[str, float]
    snapshot_fractions: tuple[float, ...]
    eval_sequences: int

    def __post_init__(self) -> None:
        for name in ("train_steps", "batch_size", "learning_rate"):
            missing = [p for p in self.processes if p not in getattr(self, name)]
            if missing:
                raise ValueError(f"TrainingPlan.{name} has no entry for process(es) {missing}")

    def config(self, process: str, seed: int) -> TrainConfig:
        """Evaluation every tenth of training; snapshots at the given fractions of the steps."""
        steps = self.train_steps[process]
        return TrainConfig(process=process, steps=steps, batch_size=self.batch_size[process],
                           lr=self.learning_rate[process], seed=seed, eval_every=max(steps // 10, 1),
                           eval_sequences=self.eval_sequences,
                           snapshot_steps=tuple(int(round(f * steps)) for f in self.snapshot_fractions))

    def table(self, models: Models) -> pd.DataFrame:
        """One row per process: its size, training settings and the first seed's training time."""
        return pd.DataFrame([{"process": p, "states": get_process(p).n_states, "tokens": get_process(p).n_tokens,
                              "steps": self.train_steps[p], "batch": self.batch_size[p], "lr": self.learning_rate[p],
                              "train time (s, seed 0 or cache)": round(models[(p, self.seeds[0])].train_seconds, 1)}
                             for p in self.processes])


def train_models(plan: TrainingPlan, threads: int | None = None, trainer: str = "sequential") -> Models:
    """Every (process, seed) model of the plan, from the model cache or trained (and cached) by ``trainer``:
    "stacked" trains the missing ones N at a time, "sequential" one after another
    (:func:`persona_wm.toy.stacked.trained_models`; only that trainer's cache entries are used)."""
    keys = [(p, s) for p in plan.processes for s in plan.seeds]
    return dict(zip(keys, trained_models([plan.config(p, s) for p, s in keys], trainer, threads=threads)))


@dataclass(frozen=True)
class Training:
    """Training histories, each model's final evaluation, and CE over seeds per process."""

    history: pd.DataFrame
    final: pd.DataFrame
    ce: pd.DataFrame  # process, {ce_ratio, gap_captured, model_ce, optimal_ce}_{mean, sd}, n_seeds

    @property
    def by_process(self) -> pd.DataFrame:
        return self.ce.set_index("process")

    def metrics(self, processes: Sequence[str]) -> dict[str, Any]:
        ce = self.by_process
        return {"ce_ratio": {p: float(ce.loc[p, "ce_ratio_mean"]) for p in processes},
                "ce_ratio_sd": {p: float(np.nan_to_num(ce.loc[p, "ce_ratio_sd"])) for p in processes},
                "gap_captured": {p: float(ce.loc[p, "gap_captured_mean"]) for p in processes}}


def training_summary(models: Models) -> Training:
    history = history_frame(models)
    final = history.sort_values("step").groupby(["process", "seed"]).tail(1)
    return Training(history, final, across_seeds(final, ["process"], ["ce_ratio", "gap_captured", "model_ce",
                                                                        "optimal_ce"]))


# =========================================================================== 2. belief probes
@dataclass(frozen=True)
class Probes:
    """Held-out probe R^2 (trained and untrained networks), the trained probes, and the principal angles
    between the two factors' concatenated-residual read-outs."""

    frame: pd.DataFrame  # per seed: process, seed, model, layer, target, r2, r2_train
    probes: dict  # (process, seed) -> {(layer, target): LinearProbe}
    r2: pd.DataFrame  # over seeds
    angles: pd.DataFrame  # process, seed, angles (deg)
    angle_spread: dict  # process -> mean / sd / stable / n_seeds
    final_layer: str

    @property
    def wide(self) -> pd.DataFrame:
        return self.r2.pivot_table(index=["process", "layer"], columns=["model", "target"], values="r2_mean")

    def table(self, model: str = "trained", layer: str = "concat") -> pd.DataFrame:
        """Mean R^2 over seeds, processes x targets."""
        r2 = self.r2
        return r2[(r2.model == model) & (r2.layer == layer)].pivot_table(index="process", columns="target",
                                                                          values="r2_mean")

    def sd(self, model: str = "trained") -> pd.DataFrame:
        """Sd over seeds of the concatenated-residual R^2 (0 with one seed)."""
        r2 = self.r2
        return r2[(r2.model == model) & (r2.layer == "concat")].pivot_table(
            index="process", columns="target", values="r2_sd", dropna=False).fillna(0.0)

    def metrics(self, processes: Sequence[str]) -> dict[str, Any]:
        concat, last, untrained = self.table(), self.table(layer=self.final_layer), self.table("untrained")
        sd = {m: self.sd(m) for m in ("trained", "untrained")}
        targets, factors = ("factor0", "factor1", "joint"), ("factor0", "factor1")
        return {
            "probe_r2": {p: {t: float(concat.loc[p, t]) for t in targets} for p in processes},
            "probe_r2_final_layer": {p: {t: float(last.loc[p, t]) for t in targets} for p in processes},
            "probe_r2_untrained": {p: {t: float(untrained.loc[p, t]) for t in factors} for p in processes},
            "probe_r2_sd": {m: {p: {t: float(sd[m].loc[p, t]) for t in factors} for p in processes} for m in sd},
            "principal_angles_deg": {p: self.angles[self.angles.process == p]["angles (deg)"].tolist()
                                     for p in processes},
            "principal_angles_spread_deg": self.angle_spread,
        }


def probe_section(models: Models, processes: Sequence[str], n_sequences: int, seed: int) -> Probes:
    """:func:`~persona_wm.toy.probe.probe_frame` for every model, R^2 over seeds, and the principal angles
    (degrees, one decimal) between the factor-0 and factor-1 concatenated-residual probes of each model."""
    frame, probes = probe_frame(models, n_sequences, seed)
    r2 = across_seeds(frame, ["process", "model", "layer", "target"], ["r2"])
    angles = pd.DataFrame([{"process": p, "seed": s, "angles (deg)": np.round(principal_angles(
        probes[(p, s)][("concat", "factor0")].weights, probes[(p, s)][("concat", "factor1")].weights), 1).tolist()}
        for p, s in models])
    spread = angle_spread({p: angles[angles.process == p]["angles (deg)"].tolist() for p in processes})
    return Probes(frame, probes, r2, angles, spread, residual_hooks(next(iter(models.values())).model)[-1])


@dataclass(frozen=True)
class ProbeDemo:
    """Exact factor-0 beliefs of one model's contexts and its concatenated-residual probe's prediction."""

    process: str
    true: np.ndarray  # [n, S_0]
    predicted: np.ndarray  # [n, S_0], unconstrained

    @property
    def predicted_on_simplex(self) -> np.ndarray:
        """The prediction clipped to [0, 1] and renormalised, for a simplex plot."""
        clipped = np.clip(self.predicted, 0, 1)
        return clipped / clipped.sum(-1, keepdims=True)


def probe_demo(models: Models, probes: Probes, processes: Sequence[str], seed: int, model_seed: int,
               n_sequences: int = 600, length: int = 10) -> ProbeDemo:
    """The factor-0 probe of the first Mess3 x Mess3 (else Z1R x Z1R, else first) model on fresh contexts."""
    name = ([p for p in ("mess3_x_mess3", "z1r_x_z1r") if p in processes][:1] or list(processes[:1]))[0]
    process, trained = get_process(name), models[(name, model_seed)]
    tokens = process.sample(n_sequences, length, np.random.default_rng([seed, 5]))
    acts = collect_activations(trained.model, tokens, process.n_tokens, residual_hooks(trained.model))
    features = np.concatenate([a[:, 1:] for a in acts.values()], axis=-1)
    features = features.reshape(-1, features.shape[-1])
    true = marginals(process.beliefs(tokens)[:, 1:].reshape(-1, process.n_states), process.factor_states)[0]
    return ProbeDemo(name, true, probes.probes[(name, model_seed)][("concat", "factor0")].predict(features))


@dataclass(frozen=True)
class ProbeTraining:
    """Per process: concatenated-residual probe R^2 of each factor at every saved snapshot of every seed."""

    by_process: dict[str, pd.DataFrame]  # seed, steps, factor0, factor1

    @property
    def long(self) -> pd.DataFrame:
        return pd.concat([d.assign(process=p) for p, d in self.by_process.items()]).melt(
            id_vars=["process", "seed", "steps"], value_vars=["factor0", "factor1"], var_name="factor",
            value_name="R2")

    def metrics(self) -> dict[str, Any]:
        return {"probe_r2_vs_steps": {p: d.groupby("steps", as_index=False)[["factor0", "factor1"]].mean()
                                      .to_dict("records") for p, d in self.by_process.items()}}


def probe_training(models: Models, processes: Sequence[str], seeds: Sequence[int], n_sequences: int,
                   seed: int) -> ProbeTraining:
    return ProbeTraining({p: pd.DataFrame([row | {"seed": s} for s in seeds
                                           for row in probe_r2_over_training(models[(p, s)], n_sequences, seed)])
                          for p in processes})


# =========================================================================== 3. belief-state steering
@dataclass(frozen=True)
class Steering:
    """The steering sweep at the final layer (every model, method, factor and scale) and its summary over
    training seeds, with the comparison to the seed's Tables 2-5."""

    frame: pd.DataFrame
    stats: pd.DataFrame  # process, method, factor, scale, <STEERING_COLUMNS>_{mean, sd}, n_seeds
    processes: tuple[str, ...]
    scales: tuple[float, ...]

    def stat(self, process: str, factor: int, scale: float, column: str, method: str = "centroid") -> float:
        """Mean over seeds of ``column`` (NaN where the sweep has no such row)."""
        s = self.stats
        row = s[(s.process == process) & (s.factor == factor) & (s.scale == scale) & (s.method == method)]
        return float(row[f"{column}_mean"].iloc[0]) if len(row) else float("nan")

    def headline(self, process: str, method: str) -> float:
        """Spillover ratio at scale 1, mean of the two factors."""
        return float(np.mean([self.stat(process, f, 1.0, "ratio", method) for f in FACTORS]))

    def per_seed(self, process: str, method: str, column: str, scale: float = 1.0) -> pd.Series:
        """``column`` at ``scale`` per training seed, averaged over the two factors."""
        f = self.frame[self.frame.scale == scale]
        return f[(f.process == process) & (f.method == method)].groupby("seed")[column].mean()

    @property
    def agreement(self) -> pd.DataFrame:
        return seed_tables.reading_agreement(self.stats)

    @property
    def fold_by_reading(self) -> pd.Series:
        return seed_tables.fold_by_reading(self.agreement)

    @property
    def closer_reading(self) -> dict[str, str]:
        """Per process with a seed table: the reading of the seed's averaging that reproduces it more closely."""
        folds = self.fold_by_reading
        return {p: folds.loc[p].idxmin() for p in seed_tables.HEADLINE_RATIO if p in self.processes}

    def at_scale(self, scale: float = 1.0) -> pd.DataFrame:
        """Intended and spillover KL and ratio of both methods at one scale."""
        s = self.stats
        return s[s.scale == scale].pivot_table(index=["process", "factor"], columns="method",
                                               values=["kl_steered_mean", "kl_unsteered_mean", "ratio_mean"])

    def bounded_table(self) -> pd.DataFrame:
        s = self.stats
        return s[s.scale.isin(list(BOUNDED_SCALES))].pivot_table(
            index=["process", "factor", "scale"], columns="method", values=["tv_unsteered_mean", "argmax_flip_mean"])

    @property
    def decode_accuracy(self) -> pd.Series:
        """Per process: how often the conditional method's probe decodes a context's class correctly."""
        return self.frame.groupby("process")["decode_accuracy"].mean()

    def _sweep_metrics(self, method: str, suffix: str = "") -> dict[str, Any]:
        return {p: {f"factor{f}": {f"scale_{float(c)}": {k: self.stat(p, f, c, k + suffix, method)
                                                        for k in ("kl_target", "kl_steered", "kl_unsteered", "ratio")}
                                   for c in self.scales} for f in FACTORS} for p in self.processes}

    def _bounded_metrics(self, column: str) -> dict[str, Any]:
        return {m: {p: {f"factor{f}": {f"scale_{float(c)}": self.stat(p, f, c, column, m) for c in BOUNDED_SCALES}
                        for f in FACTORS} for p in self.processes} for m in METHODS}

    def metrics(self) -> dict[str, Any]:
        """Scale-0 ratios are undefined (nothing moves): NaN here, null in metrics.json."""
        folds = self.fold_by_reading
        return {"steering": self._sweep_metrics("centroid"),
                "steering_conditional": self._sweep_metrics("conditional"),
                "steering_averaged": self._sweep_metrics("centroid", "_avg"),
                "steering_conditional_averaged": self._sweep_metrics("conditional", "_avg"),
                "spillover_tv": self._bounded_metrics("tv_unsteered"),
                "argmax_flip": self._bounded_metrics("argmax_flip"),
                "reading_fold_vs_seed": {p: {r: float(v) for r, v in folds.loc[p].items()} for p in self.closer_reading}}


def steering_section(models: Models, processes: Sequence[str], scales: Sequence[float], n_sequences: int,
                     seed: int) -> Steering:
    frame = steering_frame(models, scales, n_sequences, seed)
    stats = across_seeds(frame, ["process", "method", "factor", "scale"], list(STEERING_COLUMNS))
    return Steering(frame, stats, tuple(processes), tuple(scales))


# =========================================================================== 4. why centroid steering leaks
@dataclass(frozen=True)
class Interaction:
    """Non-additive fraction of the joint-class centroids at every residual hook of every model."""

    frame: pd.DataFrame  # process, seed, hook, non-additive fraction
    final_layer: str

    @property
    def summary(self) -> pd.DataFrame:
        return across_seeds(self.frame, ["process", "hook"], ["non-additive fraction"])

    @property
    def final(self) -> pd.DataFrame:
        return self.frame[self.frame.hook == self.final_layer]

    def metrics(self) -> dict[str, Any]:
        means = self.final.groupby("process")["non-additive fraction"].mean()
        return {"centroid_non_additive_fraction": {p: float(v) for p, v in means.items()}}


def interaction_section(models: Models, n_sequences: int, seed: int) -> Interaction:
    return Interaction(interaction_frame(models, n_sequences, seed),
                       residual_hooks(next(iter(models.values())).model)[-1])


@dataclass(frozen=True)
class Trend:
    """Additivity and seed-method spillover at every training snapshot, and their trend with CE / optimal:
    over all snapshots (``stats``: Spearman and within-seed repeated-measures correlation per quantity) and
    late in training (``late``: snapshots with CE / optimal below :data:`LATE_CE_RATIO`, non-additive fraction)."""

    points: pd.DataFrame  # steps, ce_ratio, interaction, ratio, ratio_avg, process, seed
    stats: dict[str, dict[str, dict[str, float]]]  # process -> quantity -> trend_correlation
    late: dict[str, dict[str, float]]

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame({(p, y): v for p, d in self.stats.items() for y, v in d.items()}).T

    def metrics(self) -> dict[str, Any]:
        points = ["seed", "steps", "ce_ratio", "interaction", "ratio", "ratio_avg"]
        return {"training_trend": {p: {
            "spearman_rho": d["interaction"]["spearman_rho"], "p": d["interaction"]["p"],
            "rm_r": d["interaction"]["rm_r"], "rm_p": d["interaction"]["rm_p"],
            "ratio_spearman_rho": d["ratio"]["spearman_rho"], "ratio_p": d["ratio"]["p"],
            "late_spearman_rho": self.late[p]["spearman_rho"], "late_p": self.late[p]["p"], "late_n": self.late[p]["n"],
            "points": self.points[self.points.process == p][points].to_dict("records")}
            for p, d in self.stats.items()}}


def trend_section(models: Models, n_sequences: int, seed: int) -> Trend:
    """:func:`~persona_wm.toy.steer.training_trend` of every model, and the trend statistics per process."""
    points = pd.DataFrame([row | {"process": p, "seed": s} for (p, s), trained in models.items()
                           for row in training_trend(trained, n_sequences, seed)])
    stats = {p: {y: trend_correlation(g, "ce_ratio", y) for y in ("interaction", "ratio", "ratio_avg")}
             for p, g in points.groupby("process")}
    late = {p: trend_correlation(g[g.ce_ratio < LATE_CE_RATIO], "ce_ratio", "interaction")
            for p, g in points.groupby("process")}
    return Trend(points, stats, late)


# =========================================================================== 5. layer dependence
@dataclass(frozen=True)
class LayerSteering:
    """Steering at every residual hook at one scale (centroids computed at that hook)."""

    frame: pd.DataFrame
    stats: pd.DataFrame  # process, method, hook, factor, {ratio, ratio_avg, kl_steered, tv_unsteered}_{mean, sd}
    scale: float

    def metrics(self, processes: Sequence[str]) -> dict[str, Any]:
        s = self.stats
        return {key: {p: {m: {h: float(g[column].mean()) for h, g in d.groupby("hook")}
                          for m, d in s[s.process == p].groupby("method")} for p in processes}
                for key, column in (("steering_by_layer_averaged", "ratio_avg_mean"), ("steering_by_layer", "ratio_mean"))}


def layer_section(models: Models, scale: float, n_sequences: int, seed: int) -> LayerSteering:
    frame = steering_frame(models, [scale], n_sequences, seed, hooks=residual_hooks(next(iter(models.values())).model),
                           progress=False)
    stats = across_seeds(frame, ["process", "method", "hook", "factor"], ["ratio", "ratio_avg", "kl_steered",
                                                                          "tv_unsteered"])
    return LayerSteering(frame, stats, scale)


# =========================================================================== 6. Table 6
@dataclass(frozen=True)
class PartitionSteering:
    """Forbidden and target-class mass when steering inside the P10 / P01 blocks of the semi-factored process."""

    frame: pd.DataFrame  # per seed: method, sector, block, scale, forbidden, target, steered_factor
    stats: pd.DataFrame  # method, block, scale, {forbidden, target}_{mean, sd}, n_seeds
    scales: tuple[float, ...]

    @property
    def by(self) -> pd.DataFrame:
        return self.stats.set_index(["method", "block", "scale"])

    def mass(self, method: str, block: str, scale: float, quantity: str = "forbidden") -> float:
        return self.by.loc[(method, block, scale), f"{quantity}_mean"]

    def added(self, method: str, block: str, scale: float = 1.0) -> float:
        """Forbidden mass added by steering at ``scale`` over the unsteered model (scale 0) on the same contexts."""
        return self.mass(method, block, scale) - self.mass(method, block, 0.0)

    def beside_seed(self) -> pd.DataFrame:
        """Ours (mean over seeds, per method) beside the seed's Table 6."""
        table = self.stats.merge(seed_tables.partition_table(), on=["block", "scale"], how="left", suffixes=("", "_seed"))
        return table.pivot_table(index=["block", "scale"], columns="method",
                                 values=["forbidden_mean", "target_mean", "forbidden", "target"]).rename(
            columns={"forbidden": "forbidden (seed)", "target": "target (seed)"})

    def metrics(self) -> dict[str, Any]:
        return {key: {f"scale_{float(c)}": {b: {"forbidden": float(self.mass(method, b, c)),
                                                "target": float(self.mass(method, b, c, "target"))}
                                            for b in SECTORS.values()} for c in self.scales}
                for key, method in (("partition", "centroid"), ("partition_conditional", "conditional"))}


def partition_section(models: Models, scales: Sequence[float], n_sequences: int, seed: int) -> PartitionSteering | None:
    """Table 6 for the semi-factored models (None when the study trains none)."""
    semi = {k: v for k, v in models.items() if k[0] == "semi_factored"}
    if not semi:
        return None
    frame = partition_frame(semi, list(SECTORS), scales, n_sequences, seed)
    frame["block"] = frame.sector.map(SECTORS)
    return PartitionSteering(frame, across_seeds(frame, ["method", "block", "scale"], ["forbidden", "target"]),
                             tuple(scales))


# =========================================================================== targets
def targets_table(processes: Sequence[str], training: Training, probes: Probes, steering: Steering,
                  partition: PartitionSteering | None) -> pd.DataFrame:
    """The seed's targets (and ours for the conditional method and Table 6): value, threshold, met."""
    ce, r2 = training.by_process, probes.table()
    checks = []
    if "z1r_x_z1r" in processes:
        checks += [("Z1R×Z1R CE ratio ≤ 1.005", ce.loc["z1r_x_z1r", "ce_ratio_mean"], 1.005, "≤"),
                   ("Z1R×Z1R ratio at scale 1, seed method ≤ 0.002", steering.headline("z1r_x_z1r", "centroid"), 0.002,
                    "≤"),
                   ("Z1R×Z1R ratio at scale 1, conditional ≤ 0.001", steering.headline("z1r_x_z1r", "conditional"),
                    0.001, "≤")]
    if "mess3_x_mess3" in processes:
        checks += [("Mess3×Mess3 gap captured ≥ 0.95", ce.loc["mess3_x_mess3", "gap_captured_mean"], 0.95, "≥"),
                   ("Mess3×Mess3 ratio at scale 1, seed method ≤ 0.01", steering.headline("mess3_x_mess3", "centroid"),
                    0.01, "≤"),
                   ("Mess3×Mess3 ratio at scale 1, conditional ≤ 0.01",
                    steering.headline("mess3_x_mess3", "conditional"), 0.01, "≤")]
    for p in processes:
        for f in ("factor0", "factor1"):
            checks.append((f"{p} probe R² {f} (concat) ≥ 0.95", r2.loc[p, f], 0.95, "≥"))
    if partition is not None:
        by = partition.by
        for method in METHODS:
            spill0 = steering.stat("semi_factored", 0, 1.0, "kl_unsteered", method)
            spill1 = steering.stat("semi_factored", 1, 1.0, "kl_unsteered", method)
            checks.append((f"semi-factored ({method}): factor-0 spillover ≥ 10× factor-1 at scale 1",
                           spill0 / max(spill1, 1e-12), 10, "≥"))
            checks += [(f"forbidden mass added by steering, {b} at scale 1 ({method}) ≤ 0.001",
                        partition.added(method, b), 0.001, "≤") for b in ("P10", "P01") if (method, b, 0.0) in by.index]
            checks += [(f"forbidden mass {b} at scale {c:g} ({method}) {op} {thr}", partition.mass(method, b, c), thr, op)
                       for b in ("P10", "P01") for c, thr, op in ((1.0, 0.001, "≤"), (5.0, 0.1, "≥"))
                       if (method, b, c) in by.index]
    return pd.DataFrame([{"target": name, "ours": value, "threshold": thr,
                          "met": bool(value <= thr if op == "≤" else value >= thr)} for name, value, thr, op in checks])


# =========================================================================== the result
@dataclass(frozen=True)
class SteeringSpecificityResult:
    """What study 02 reports; :meth:`metrics` is the dict ``metrics.json`` is written from."""

    seeds: tuple[int, ...]
    processes: tuple[str, ...]
    training: Training
    probes: Probes
    probe_training: ProbeTraining
    steering: Steering
    interaction: Interaction
    trend: Trend
    layers: LayerSteering
    partition: PartitionSteering | None
    targets: pd.DataFrame

    def metrics(self) -> dict[str, Any]:
        """Undefined values (a ratio where nothing moved, a correlation over too few points) are null."""
        processes = self.processes
        metrics = {"seeds": list(self.seeds), **self.training.metrics(processes), **self.probes.metrics(processes),
                   **self.probe_training.metrics(), **self.interaction.metrics(), **self.steering.metrics(),
                   **self.trend.metrics(), **self.layers.metrics(processes),
                   "targets": {row.target: {"value": float(row.ours), "met": bool(row.met)}
                               for row in self.targets.itertuples()}}
        if self.partition is not None:
            metrics.update(self.partition.metrics())
        return undefined_as_none(metrics)
