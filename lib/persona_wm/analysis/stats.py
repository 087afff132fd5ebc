"""Thin wrappers over scipy/pingouin for the statistics the reports quote.

Kept in one place so every study aggregates over seeds the same way: mean, sample standard
deviation and a percentile-bootstrap confidence interval (scipy.stats.bootstrap) of the mean.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = ["across_seeds", "bootstrap_mean_ci", "spearman_with_ci", "mean_t_ci", "welch_difference", "trend_correlation", "mean_sd_text",
           "crossed_effects_means", "within_cluster_permutation", "crossed_slope", "mixed_contrasts",
           "weighted_rate", "CheckedIntervals", "checked_bootstrap", "centred_bootstrap_p", "holm", "CI_METHODS"]


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


MIN_BOOT_PAIRS = 6  # spearman_with_ci's bootstrap CI needs this many pairs (else NaN)


def spearman_with_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman rho and its p value (pingouin.corr) with a percentile bootstrap 95% CI over pairs
    (pingouin.compute_bootci, seeded; NaN below :data:`MIN_BOOT_PAIRS` pairs or for a constant input)."""
    import pingouin as pg

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # rho is undefined (a smoke run's handful of points)
        return {"n": int(len(x)), "spearman_rho": float("nan"), "p": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan")}
    with warnings.catch_warnings():  # pingouin's power column warns below 5 pairs; power is not used
        warnings.filterwarnings("ignore", message="Sample size is too small to estimate power")
        result = pg.corr(x, y, method="spearman").iloc[0]
    if len(x) < MIN_BOOT_PAIRS:  # resampling a handful of pairs gives constant draws, not an interval
        low = high = float("nan")
    else:
        low, high = pg.compute_bootci(x, y, func="spearman", paired=True, n_boot=n_boot, seed=seed, method="per",
                                      decimals=6)
    return {"n": int(len(x)), "spearman_rho": float(result["r"]), "p": float(result["p_val"]),
            "ci_low": float(low), "ci_high": float(high)}


def mean_t_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of the mean (scipy); (mean, nan, nan) below 2 values.

    With a handful of seeds a percentile bootstrap is too narrow (it cannot reach past the
    observed range); the t interval is the honest small-sample choice.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(x) < 2:
        return float(x.mean()), float("nan"), float("nan")
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0]), float(x[0])
    ci = sps.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return float(x.mean()), float(ci.low), float(ci.high)


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean(a) - mean(b) with Welch's confidence interval and two-sided p (scipy.stats.ttest_ind,
    unequal variances; pingouin rounds its CI to two decimals, too coarse for small effects)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out = {"a": float(a.mean()), "b": float(b.mean()), "difference": float(a.mean() - b.mean()),
           "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n_a": int(len(a)), "n_b": int(len(b))}
    if len(a) >= 2 and len(b) >= 2 and (np.ptp(a) > 0 or np.ptp(b) > 0):
        result = sps.ttest_ind(a, b, equal_var=False)
        ci = result.confidence_interval(confidence)
        out.update(ci_low=float(ci.low), ci_high=float(ci.high), p=float(result.pvalue))
    return out


def trend_correlation(frame: pd.DataFrame, x: str, y: str, subject: str = "seed") -> dict[str, float]:
    """Monotone trend of ``y`` with ``x``: Spearman over all points (pingouin.corr) and, with at least
    3 subjects, the repeated-measures correlation within subjects (pingouin.rm_corr), which respects
    that points of one subject (e.g. snapshots of one training seed) are not independent."""
    import pingouin as pg

    data = frame[[x, y, subject]].replace([np.inf, -np.inf], np.nan).dropna()
    out = {"n": int(len(data)), "spearman_rho": float("nan"), "p": float("nan"),
           "rm_r": float("nan"), "rm_p": float("nan"), "rm_ci_low": float("nan"), "rm_ci_high": float("nan")}
    if len(data) >= 3 and data[x].nunique() > 1 and data[y].nunique() > 1:
        with warnings.catch_warnings():  # pingouin's power column warns below 5 points; power is not used
            warnings.filterwarnings("ignore", message="Sample size is too small to estimate power")
            result = pg.corr(data[x], data[y], method="spearman").iloc[0]
        out.update(spearman_rho=float(result["r"]), p=float(result["p_val"]))
    if data[subject].nunique() >= 3 and len(data) > data[subject].nunique() + 1:
        rm = pg.rm_corr(data=data, x=x, y=y, subject=subject).iloc[0]
        ci = rm["CI95%"] if "CI95%" in rm else rm["CI95"]
        out.update(rm_r=float(rm["r"]), rm_p=float(rm["p_val"] if "p_val" in rm else rm["pval"]),
                   rm_ci_low=float(ci[0]), rm_ci_high=float(ci[1]))
    return out


def mean_sd_text(values: Sequence[float], spec: str = ".4f") -> str:
    """"mean ± sd (n=k)" over seeds for prose; the sd is omitted (and n says so) with one value."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return "n/a"
    if len(x) == 1:
        return f"{x[0]:{spec}} (n=1)"
    return f"{x.mean():{spec}} ± {x.std(ddof=1):{spec}} (n={len(x)})"


def _crossed_fit(formula: str, data: pd.DataFrame, crossed: Sequence[str]) -> Any:
    """REML fit of ``formula`` with crossed random intercepts, one variance component per factor of
    ``crossed`` under a single all-encompassing group (statsmodels MixedLM's way to cross factors)."""
    import statsmodels.formula.api as smf

    vc = {name: f"0 + C({name})" for name in crossed}
    model = smf.mixedlm(formula, data.assign(_all=1), groups="_all", vc_formula=vc, re_formula="0")
    return model.fit(reml=True, method=["lbfgs", "powell"])


def crossed_effects_means(frame: pd.DataFrame, outcome: str, arm: str, crossed: Sequence[str],
                          confidence: float = 0.95) -> pd.DataFrame:
    """Per-arm mean of ``outcome`` with CIs from a linear mixed model whose random intercepts are
    *crossed* (e.g. coupling source x bystander persona), fitted with statsmodels MixedLM (one
    all-encompassing group + one variance component per crossed factor, REML).

    With 0/1 outcomes this is a linear probability model: the CIs respect that rows sharing a source
    or a bystander are not independent, which a Wilson interval over all rows ignores. Returns one
    row per arm: mean, ci_low, ci_high, n; and the variance components as ``frame.attrs['vc']``.
    """
    data = frame[[outcome, arm, *crossed]].dropna().copy()
    data[arm] = data[arm].astype(str)
    fit = _crossed_fit(f"{outcome} ~ 0 + C({arm})", data, crossed)
    ci = fit.conf_int(alpha=1 - confidence)
    rows = []
    for level in sorted(data[arm].unique()):
        name = f"C({arm})[{level}]"
        rows.append({arm: level, "mean": float(fit.fe_params[name]), "ci_low": float(ci.loc[name, 0]),
                     "ci_high": float(ci.loc[name, 1]), "n": int((data[arm] == level).sum())})
    out = pd.DataFrame(rows)
    out.attrs["vc"] = dict(zip(crossed, map(float, fit.vcomp)))
    return out


def within_cluster_permutation(frame: pd.DataFrame, outcome: str, arm: str, a: str, b: str, cluster: str,
                               n_permutations: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Difference mean(``a``) - mean(``b``) of ``outcome`` and its two-sided permutation p, arm labels
    shuffled only *within* each ``cluster`` (a stratified permutation test: scipy's permutation_test
    has no strata, so the shuffling is done here; p = (hits + 1) / (n + 1))."""
    data = frame[frame[arm].isin([a, b])][[outcome, arm, cluster]].dropna()
    groups = [g for _, g in data.groupby(cluster) if g[arm].nunique() == 2]
    if not groups:
        raise ValueError(f"no {cluster} has rows of both {a!r} and {b!r}")
    values = np.concatenate([g[outcome].to_numpy(float) for g in groups])
    labels = [(g[arm] == a).to_numpy() for g in groups]

    def difference(masks: list[np.ndarray]) -> float:
        in_a = np.concatenate(masks)
        return float(values[in_a].mean() - values[~in_a].mean())

    observed = difference(labels)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        hits += abs(difference([rng.permutation(m) for m in labels])) >= abs(observed) - 1e-12
    return {"difference": observed, "p": (hits + 1) / (n_permutations + 1), "n_clusters": len(groups),
            "n_permutations": n_permutations}


def crossed_slope(frame: pd.DataFrame, outcome: str, predictor: str, crossed: Sequence[str],
                  confidence: float = 0.95) -> dict[str, float]:
    """Slope of ``outcome`` on ``predictor`` in a linear mixed model with *crossed* random intercepts
    (e.g. coupling source x bystander persona; statsmodels MixedLM, one all-encompassing group + one
    variance component per factor, REML): the CI and p respect that pairs sharing a source or a
    bystander are not independent. NaN when the predictor or outcome is constant."""
    data = frame[[outcome, predictor, *crossed]].dropna().copy()
    nan = float("nan")
    if len(data) < 4 or data[predictor].nunique() < 2 or data[outcome].nunique() < 2:
        return {"slope": nan, "ci_low": nan, "ci_high": nan, "p": nan, "n": int(len(data))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boundary fits (a variance component at 0) are expected here
        fit = _crossed_fit(f"{outcome} ~ {predictor}", data, crossed)
    ci = fit.conf_int(alpha=1 - confidence)
    return {"slope": float(fit.fe_params[predictor]), "ci_low": float(ci.loc[predictor, 0]),
            "ci_high": float(ci.loc[predictor, 1]), "p": float(fit.pvalues[predictor]), "n": int(len(data))}


def mixed_contrasts(frame: pd.DataFrame, outcome: str, arm: str, contrasts: Sequence[tuple[str, str]],
                    random: Sequence[str], confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Differences between arms of ``outcome`` from one linear mixed model with ``arm`` fixed and a random
    intercept per factor of ``random`` (crossed: one all-encompassing group + one variance component each,
    statsmodels MixedLM, REML). A factor nested in ``arm`` (e.g. the LoRA adapter, whose labels are unique
    per arm) carries the between-adapter variance into every contrast's standard error, so no interval
    conditions on one trained model. Per contrast ``"a-b"``: diff, ci_low, ci_high, p (Wald z); NaN for an
    arm that is missing or where the fit fails."""
    data = frame[[outcome, arm, *random]].dropna().copy()
    data[arm] = data[arm].astype(str)
    nan = float("nan")
    out = {f"{a}-{b}": {"diff": nan, "ci_low": nan, "ci_high": nan, "p": nan} for a, b in contrasts}
    if len(data) < 4 or data[arm].nunique() < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boundary fits (a variance component at 0) are expected
        try:
            fit = _crossed_fit(f"{outcome} ~ 0 + C({arm})", data, random)
        except (ValueError, np.linalg.LinAlgError):
            return out
    names = list(fit.fe_params.index)
    for a, b in contrasts:
        ia, ib = f"C({arm})[{a}]", f"C({arm})[{b}]"
        if ia not in names or ib not in names:
            continue
        weights = np.zeros((1, len(names)))
        weights[0, names.index(ia)], weights[0, names.index(ib)] = 1.0, -1.0
        test = fit.t_test(weights)
        low, high = np.asarray(test.conf_int(alpha=1 - confidence)).ravel()
        out[f"{a}-{b}"] = {"diff": float(np.asarray(test.effect).ravel()[0]), "ci_low": float(low),
                           "ci_high": float(high), "p": float(np.asarray(test.pvalue).ravel()[0])}
    return out


def weighted_rate(hits: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted share of ``hits`` (0/1) with sampling weights (e.g. inverse stratum sampling fractions):
    the population rate a stratified sample estimates; NaN when no weight is positive."""
    h, w = np.asarray(hits, dtype=float), np.asarray(weights, dtype=float)
    return float((h * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Bootstrap intervals that contain their estimate


#: How :func:`checked_bootstrap` reports the interval it kept for an element.
CI_METHODS = ("BCa", "percentile", "percentile, widened to the estimate")


@dataclass(frozen=True)
class CheckedIntervals:
    """Elementwise 95% intervals of a vector statistic, each known to contain its estimate.

    ``method[i]`` is an index into :data:`CI_METHODS`: 0 where the BCa interval is finite and contains the
    estimate, 1 where BCa does not and the percentile interval does, 2 where neither does and the
    percentile interval is widened just enough to reach the estimate (a sign of a biased statistic:
    reported, never silent). ``distribution`` is the bootstrap distribution ([k, B]).
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    method: np.ndarray
    distribution: np.ndarray

    def counts(self) -> dict[str, int]:
        """How many intervals each method gave."""
        return {name: int((self.method == k).sum()) for k, name in enumerate(CI_METHODS)}

    def p_values(self) -> np.ndarray:
        """Two-sided bootstrap p of each element against 0 (:func:`centred_bootstrap_p`)."""
        return centred_bootstrap_p(self.distribution, self.estimate)


def checked_bootstrap(data: tuple[np.ndarray, ...], statistic: Any, n_resamples: int, seed: int,
                      paired: bool = False, confidence: float = 0.95) -> CheckedIntervals:
    """``scipy.stats.bootstrap`` (BCa, each sample of ``data`` resampled on its own unless ``paired``) of a
    vector ``statistic``, with a percentile fallback wherever BCa is undefined or excludes the estimate.

    Several samples with ``paired=False`` give a crossed (multi-way) bootstrap: e.g. user prompts and system
    prompts drawn independently, each draw passed to ``statistic(*samples)``. BCa's acceleration is scipy's
    multi-sample jackknife (leave one unit of each sample out in turn). An interval that excludes its own
    estimate is not a usable interval (BCa does this when nearly all replicates fall on one side of the
    estimate, and then its bias correction runs off the end of the distribution), so each element falls back
    to the percentile interval, and where that too misses the estimate it is widened to reach it.
    """
    estimate = np.atleast_1d(np.asarray(statistic(*data), dtype=float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate BCa elements warn; they are handled below
        res = sps.bootstrap(data, statistic, vectorized=False, paired=paired, n_resamples=n_resamples,
                            confidence_level=confidence, method="BCa", random_state=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=float).reshape(len(estimate), -1)
    low = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=float)).copy()
    high = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=float)).copy()
    tail = (1 - confidence) / 2 * 100
    method = np.zeros(len(estimate), dtype=int)
    bad = ~(np.isfinite(low) & np.isfinite(high) & (low <= estimate) & (estimate <= high))
    if bad.any():
        method[bad] = 1
        low[bad] = np.nanpercentile(dist[bad], tail, axis=-1)
        high[bad] = np.nanpercentile(dist[bad], 100 - tail, axis=-1)
    outside = (estimate < low) | (estimate > high)
    if outside.any():
        method[outside] = 2
        low[outside] = np.minimum(low[outside], estimate[outside])
        high[outside] = np.maximum(high[outside], estimate[outside])
    return CheckedIntervals(estimate, low, high, method, dist)


def centred_bootstrap_p(distribution: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Two-sided p of H0: parameter = 0, from a bootstrap distribution ``[k, B]`` centred at its estimate.

    Hall & Wilson's guideline: the spread of ``theta* - theta_hat`` stands in for the null distribution of
    ``theta_hat``; p = (1 + #{|theta*_b - theta_hat| >= |theta_hat|}) / (B + 1), so p >= 1 / (B + 1).
    """
    dist = np.atleast_2d(np.asarray(distribution, dtype=float))
    est = np.atleast_1d(np.asarray(estimate, dtype=float))
    dev = np.abs(dist - est[:, None])
    hits = (dev >= np.abs(est)[:, None]).sum(axis=-1)
    return (1 + hits) / (dist.shape[-1] + 1)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm-adjusted p values and rejections (statsmodels ``multipletests``, method ``holm``)."""
    from statsmodels.stats.multitest import multipletests

    reject, adjusted, _, _ = multipletests(np.asarray(p_values, dtype=float), alpha=alpha, method="holm")
    return adjusted, reject
