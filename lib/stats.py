"""Thin wrappers over scipy/pingouin for the statistics the reports quote.

Kept in one place so every study aggregates over seeds the same way: mean, sample standard
deviation and a percentile-bootstrap confidence interval (scipy.stats.bootstrap) of the mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = ["across_seeds", "bootstrap_mean_ci", "spearman_with_ci"]


def bootstrap_mean_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) with fewer than 2 finite values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def across_seeds(frame: pd.DataFrame, by: Sequence[str], values: Sequence[str], seed_column: str = "seed",
                 ci: bool = False) -> pd.DataFrame:
    """Mean and sample sd (and optionally a bootstrap CI) over seeds of each value, per group."""
    # keep only the needed columns: pandas' groupby misbehaves with a column named e.g. "axis"
    grouped = frame[list(dict.fromkeys([*by, seed_column, *values]))].groupby(list(by), sort=False)
    out = grouped[list(values)].agg(["mean", "std"])
    out.columns = [f"{v}_{stat.replace('std', 'sd')}" for v, stat in out.columns]
    out["n_seeds"] = grouped[seed_column].nunique()
    if ci:
        for v in values:
            bounds = grouped[v].apply(lambda s: bootstrap_mean_ci(s.to_numpy()))
            out[f"{v}_ci_low"] = [b[0] for b in bounds]
            out[f"{v}_ci_high"] = [b[1] for b in bounds]
    return out.reset_index()


def spearman_with_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman rho and its p value (pingouin.corr) with a percentile bootstrap 95% CI over pairs
    (pingouin.compute_bootci, seeded)."""
    import pingouin as pg

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    result = pg.corr(x, y, method="spearman").iloc[0]
    low, high = pg.compute_bootci(x, y, func="spearman", paired=True, n_boot=n_boot, seed=seed, method="per",
                                  decimals=6)
    return {"n": int(len(x)), "spearman_rho": float(result["r"]), "p": float(result["p_val"]),
            "ci_low": float(low), "ci_high": float(high)}
