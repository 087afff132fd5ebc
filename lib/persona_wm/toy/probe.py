"""Linear probes from residual-stream activations to exact Bayes-optimal beliefs.

The claim under test (Shai et al.): a transformer trained on a process linearly represents the
belief state — here also each factor's marginal belief, in subspaces that should be near
orthogonal for a factored process. Probes are ordinary least squares with a bias, fitted on a
training split of *sequences* (all positions of a sequence stay on one side, so held-out R^2 is
not inflated by near-duplicate prefixes) and scored on the rest.

R^2 is the variance-weighted coefficient of determination over all output coordinates,
1 - SSE / SST (sklearn's ``multioutput="variance_weighted"``), so a belief coordinate that
never varies cannot inflate the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.linalg import subspace_angles

from persona_wm.core.ghmm import GHMM, marginals
from persona_wm.toy.hooks import batched_forward, residual_hooks

__all__ = ["residual_hooks", "collect_activations", "LinearProbe", "fit_probe", "fit_probes", "r2_score",
           "probe_targets", "probe_table", "principal_angles", "angle_spread"]


def collect_activations(model, tokens: np.ndarray, n_tokens: int, hook_names: Sequence[str],
                        batch: int = 2048) -> dict[str, np.ndarray]:
    """Activations ``[B, L + 1, d_model]`` (position 0 = BOS) at each hook, for contexts ``[B, L]``."""
    return batched_forward(model, tokens, n_tokens, batch=batch, cache=hook_names, output=None).residuals


@dataclass(frozen=True)
class LinearProbe:
    """y = x @ weights + bias, with its held-out R^2."""

    weights: np.ndarray  # [d, k]
    bias: np.ndarray  # [k]
    r2: float
    r2_train: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights + self.bias


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Variance-weighted R^2 = 1 - sum of squared errors / total sum of squares (all coordinates)."""
    sse = float(((y_true - y_pred) ** 2).sum())
    sst = float(((y_true - y_true.mean(axis=0)) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def _split(groups: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask that keeps every group (sequence) on one side of the split."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    test_groups = rng.choice(unique, size=max(1, int(round(test_fraction * len(unique)))), replace=False)
    return np.isin(groups, test_groups)


def fit_probes(x: np.ndarray, targets: dict[str, np.ndarray], groups: np.ndarray, test_fraction: float = 0.2,
               seed: int = 0) -> dict[str, LinearProbe]:
    """One OLS-with-bias probe per target, sharing the split and a single least-squares solve."""
    test = _split(groups, test_fraction, seed)
    design = np.hstack([x, np.ones((len(x), 1))])
    names = list(targets)
    stacked = np.hstack([targets[n] for n in names])
    solution, *_ = np.linalg.lstsq(design[~test], stacked[~test], rcond=None)
    fitted = design @ solution
    probes, start = {}, 0
    for name in names:
        width = targets[name].shape[1]
        cols = slice(start, start + width)
        y = targets[name]
        probes[name] = LinearProbe(solution[:-1, cols], solution[-1, cols], r2_score(y[test], fitted[test, cols]),
                                   r2_score(y[~test], fitted[~test, cols]))
        start += width
    return probes


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, test_fraction: float = 0.2,
              seed: int = 0) -> LinearProbe:
    """OLS with bias from ``x [n, d]`` to ``y [n, k]``; rows sharing a ``group`` (sequence) stay together."""
    return fit_probes(x, {"y": y}, groups, test_fraction, seed)["y"]


def probe_targets(process: GHMM, beliefs: np.ndarray) -> dict[str, np.ndarray]:
    """The beliefs a probe should read out: the joint belief and each factor's marginal."""
    targets = {"joint": beliefs}
    if process.factor_states:
        for f, marginal in enumerate(marginals(beliefs, process.factor_states)):
            targets[f"factor{f}"] = marginal
    return targets


def probe_table(model, process: GHMM, tokens: np.ndarray, hook_names: Sequence[str] | None = None,
                include_concat: bool = True, seed: int = 0) -> tuple[list[dict], dict[tuple[str, str], LinearProbe]]:
    """Held-out R^2 of probes at every residual hook (and their concatenation) for every target.

    Positions 1..L (after at least one token) are pooled; position 0 (BOS) is the constant prior.
    Returns rows ``{layer, target, r2, r2_train}`` and the fitted probes keyed by (layer, target).
    """
    hook_names = list(hook_names or residual_hooks(model))
    acts = collect_activations(model, tokens, process.n_tokens, hook_names)
    beliefs = process.beliefs(tokens)[:, 1:]  # after 1..L tokens, aligned with model positions 1..L
    n, length = beliefs.shape[:2]
    groups = np.repeat(np.arange(n), length)
    features = {name: a[:, 1:].reshape(n * length, -1) for name, a in acts.items()}
    if include_concat and len(hook_names) > 1:
        features["concat"] = np.hstack([features[name] for name in hook_names])
    targets = {k: v.reshape(n * length, -1) for k, v in probe_targets(process, beliefs).items()}
    rows, probes = [], {}
    for layer, x in features.items():
        for target, probe in fit_probes(x, targets, groups, seed=seed).items():
            probes[(layer, target)] = probe
            rows.append({"layer": layer, "target": target, "r2": probe.r2, "r2_train": probe.r2_train})
    return rows, probes


def principal_angles(weights_a: np.ndarray, weights_b: np.ndarray, rtol: float = 1e-3) -> np.ndarray:
    """Principal angles (degrees, ascending) between the read-out subspaces of two probes.

    Each probe's subspace is the column space of its weight matrix, trimmed to singular values
    above ``rtol`` times the largest (a belief on a simplex has one redundant coordinate, which
    makes the weight matrix rank deficient). 90 degrees everywhere = orthogonal factors.
    """
    def basis(w: np.ndarray) -> np.ndarray:
        u, s, _ = np.linalg.svd(w, full_matrices=False)
        return u[:, s > rtol * s.max()]

    return np.sort(np.degrees(subspace_angles(basis(weights_a), basis(weights_b))))


def probe_frame(models: dict, n_sequences: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Held-out probe R^2 for every (process, seed) model, trained and at initialisation (step 0).

    The untrained control uses the snapshot saved at step 0 (same architecture and seed), so
    "how much of the belief is linearly decodable from a random network" is measured on exactly
    the network training started from. Returns the frame and the trained models' probes.
    """

    rows, probes = [], {}
    for (proc, model_seed), trained in models.items():
        process = trained.process
        tokens = process.sample(n_sequences, trained.config.context_length, np.random.default_rng([seed, model_seed]))
        for state, model in (("trained", trained.model), ("untrained", trained.snapshot_model(0))):
            table, fitted = probe_table(model, process, tokens, seed=seed)
            rows += [{"process": proc, "seed": model_seed, "model": state, **r} for r in table]
            if state == "trained":
                probes[(proc, model_seed)] = fitted
    return pd.DataFrame(rows), probes


def probe_r2_over_training(trained, n_sequences: int, seed: int, layer: str = "concat") -> list[dict]:
    """R^2 per factor of the ``layer`` probe at every saved snapshot: how the representation sharpens."""
    process = trained.process
    tokens = process.sample(n_sequences, trained.config.context_length, np.random.default_rng([seed, 99]))
    out = []
    for step in sorted(trained.snapshots):
        table, _ = probe_table(trained.snapshot_model(step), process, tokens, seed=seed)
        row = {"steps": step}
        row.update({r["target"]: r["r2"] for r in table if r["layer"] == layer and r["target"] != "joint"})
        out.append(row)
    return out


def angle_spread(angles: dict[str, list[list[float]]], unstable_sd: float = 10.0) -> dict[str, dict]:
    """Per process: the principal angles' mean and sample sd over training seeds (angle i with angle i),
    and whether every angle is stable (sd below ``unstable_sd`` degrees; None with one seed)."""
    out = {}
    for process, per_seed in angles.items():
        lengths = {len(a) for a in per_seed}
        if len(lengths) != 1:  # different ranks across seeds: nothing to pair up
            out[process] = {"mean": None, "sd": None, "stable": False, "n_seeds": len(per_seed)}
            continue
        stacked = np.asarray(per_seed, dtype=float)
        sd = stacked.std(0, ddof=1) if len(stacked) > 1 else None
        out[process] = {"mean": stacked.mean(0).round(2).tolist(), "sd": None if sd is None else sd.round(2).tolist(),
                        "stable": None if sd is None else bool((sd < unstable_sd).all()), "n_seeds": len(stacked)}
    return out
