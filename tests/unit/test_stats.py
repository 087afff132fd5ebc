"""Tests of the statistics wrappers the reports quote."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from persona_wm.analysis.stats import mean_sd_text, mean_t_ci, trend_correlation, welch_difference


def test_mean_t_ci_matches_scipy_and_handles_small_samples() -> None:
    x = [0.8, 0.9, 0.85, 0.7]
    mean, low, high = mean_t_ci(x)
    ref = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert mean == pytest.approx(np.mean(x)) and (low, high) == pytest.approx(ref)
    assert np.isnan(mean_t_ci([0.5])[1]) and mean_t_ci([0.5])[0] == 0.5
    assert mean_t_ci([0.2, 0.2]) == (0.2, 0.2, 0.2)


def test_welch_difference_ci_contains_difference_and_p_matches_scipy() -> None:
    a, b = [0.8, 0.9, 0.85], [0.1, 0.3, 0.15]
    out = welch_difference(a, b)
    assert out["ci_low"] < out["difference"] < out["ci_high"]
    assert out["p"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert np.isnan(welch_difference([1.0], [0.0])["ci_low"])


def test_trend_correlation_within_subjects() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": np.tile(np.arange(6.0), 3), "seed": np.repeat([0, 1, 2], 6)})
    frame["y"] = -frame.x + 10 * frame.seed + rng.normal(0, 0.1, 18)  # strong within-seed trend, seed offsets
    out = trend_correlation(frame, "x", "y")
    assert out["rm_r"] < -0.95 and out["rm_p"] < 1e-6
    one = trend_correlation(frame[frame.seed == 0], "x", "y")
    assert one["spearman_rho"] == pytest.approx(-1.0) and np.isnan(one["rm_r"])


def test_mean_sd_text() -> None:
    assert mean_sd_text([1.0, 3.0], ".1f") == "2.0 ± 1.4 (n=2)"
    assert mean_sd_text([1.0], ".1f") == "1.0 (n=1)"
    assert mean_sd_text([]) == "n/a"


def _crossed_data(effect: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sources, bystanders = rng.normal(0, 0.1, 8), rng.normal(0, 0.1, 12)
    rows = [{"source": s, "bystander": b, "arm": arm, "y": 0.3 + effect * (arm == "B") + sources[s] + bystanders[b]
             + rng.normal(0, 0.05)} for s in range(8) for b in range(12) for arm in ("A", "B")]
    return pd.DataFrame(rows)


def test_crossed_effects_means_recover_the_arms_and_their_components() -> None:
    from persona_wm.analysis.stats import crossed_effects_means

    out = crossed_effects_means(_crossed_data(0.2), "y", "arm", ["source", "bystander"]).set_index("arm")
    assert out.loc["A", "ci_low"] < 0.3 < out.loc["A", "ci_high"]
    assert out.loc["B", "mean"] - out.loc["A", "mean"] == pytest.approx(0.2, abs=0.03)
    # crossed clustering makes the interval much wider than the residual noise alone would
    assert out.loc["A", "ci_high"] - out.loc["A", "ci_low"] > 0.05


def test_within_cluster_permutation_detects_an_effect_and_not_a_null() -> None:
    from persona_wm.analysis.stats import within_cluster_permutation

    big = within_cluster_permutation(_crossed_data(0.2), "y", "arm", "B", "A", "source", n_permutations=500)
    none = within_cluster_permutation(_crossed_data(0.0, seed=1), "y", "arm", "B", "A", "source", n_permutations=500)
    assert big["p"] < 0.01 and big["difference"] == pytest.approx(0.2, abs=0.03) and big["n_clusters"] == 8
    assert none["p"] > 0.05
    with pytest.raises(ValueError, match="both"):
        within_cluster_permutation(_crossed_data(0.0), "y", "arm", "B", "C", "source")


def test_spearman_with_ci_on_a_handful_of_points_is_quiet_and_says_nan() -> None:
    """A smoke run's few points: rho where defined, no interval (resampled pairs are constant), no warning; a
    constant input: everything NaN, no warning."""
    import warnings

    from persona_wm.analysis.stats import MIN_BOOT_PAIRS, spearman_with_ci

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few = spearman_with_ci([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], n_boot=200)
        flat = spearman_with_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [2.0] * 7, n_boot=200)
    assert few["n"] == 4 < MIN_BOOT_PAIRS and few["spearman_rho"] == pytest.approx(0.8)
    assert np.isnan(few["ci_low"]) and np.isnan(few["ci_high"])
    assert all(np.isnan(flat[k]) for k in ("spearman_rho", "p", "ci_low", "ci_high"))
