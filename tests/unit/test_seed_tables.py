"""The seed's transcribed tables and the comparisons built on them (persona_wm.analysis.seed_tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_wm.analysis import seed_tables


def _stats(factor_of_seed: dict[str, float]) -> pd.DataFrame:
    """A steering summary whose centroid ratios are the seed's Table 2/3 ratios times a factor per reading."""
    rows = []
    for factor in (0, 1):
        seed = seed_tables.steering_table("z1r_x_z1r", factor)
        for scale, ratio in zip(seed.scale, seed.ratio):
            rows.append({"process": "z1r_x_z1r", "method": "centroid", "factor": factor, "scale": scale,
                         "ratio_mean": ratio * factor_of_seed["per-context"],
                         "ratio_avg_mean": ratio * factor_of_seed["context-averaged"]})
    return pd.DataFrame(rows)


def test_table_labels_name_the_seed_tables() -> None:
    assert seed_tables.table_label("z1r_x_z1r", 1) == "Table 3"
    assert seed_tables.table_label("mess3_x_mess3", 0) == "Table 4"
    assert seed_tables.table_label("semi_factored", 0) == "no seed table (prose only)"
    assert set(seed_tables.TABLE_LABELS) == set(seed_tables.STEERING)
    assert set(seed_tables.HEADLINE_RATIO) == {p for p, _ in seed_tables.STEERING}


def test_reading_agreement_and_fold_recover_a_known_factor() -> None:
    agreement = seed_tables.reading_agreement(_stats({"per-context": 2.0, "context-averaged": 0.5}))
    assert len(agreement) == 4  # two factors x two readings; the process without rows is skipped
    per_context = agreement[agreement.reading == "per-context"]
    np.testing.assert_allclose(per_context[["x0.25", "x1", "x3"]].to_numpy(), 2.0)
    folds = seed_tables.fold_by_reading(agreement)
    assert folds.loc[("z1r_x_z1r", "per-context")] == pytest.approx(2.0)
    assert folds.loc[("z1r_x_z1r", "context-averaged")] == pytest.approx(2.0)  # |log 0.5| = |log 2|: fold 2
    exact = seed_tables.fold_by_reading(seed_tables.reading_agreement(_stats({"per-context": 1.0,
                                                                              "context-averaged": 3.0})))
    assert exact.loc["z1r_x_z1r"].idxmin() == "per-context" and exact.loc[("z1r_x_z1r", "per-context")] == 1.0


def test_fold_is_the_geometric_mean_over_factors() -> None:
    agreement = pd.DataFrame({"process": ["p", "p"], "reading": ["r", "r"], "factor": [0, 1], "fold": [2.0, 8.0]})
    assert seed_tables.fold_by_reading(agreement).loc[("p", "r")] == pytest.approx(4.0)
