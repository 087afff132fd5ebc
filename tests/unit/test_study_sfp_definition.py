"""Study 01's section functions (persona_wm.studies.sfp_definition) on small inputs: exact quantities are
checked against what they must be, sampled ones against their definitions, and the result's metrics dict
against the keys and values metrics.json carries."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from persona_wm.core.sfp import mutual_information, semi_factored_process
from persona_wm.io.outputs import write_metrics
from persona_wm.plots.toy import plot_mutual_information
from persona_wm.processes import get_process, pp_mess3, pp_z1r
from persona_wm.studies import sfp_definition as study


def test_transfer_table_lays_out_every_matrix() -> None:
    z1r = get_process("z1r")
    table = study.transfer_table(z1r, study.Z1R_STATES)
    assert list(table.columns.get_level_values(0).unique()) == ["T(0)", "T(1)"]
    np.testing.assert_array_equal(table["T(1)"].to_numpy(), z1r.transfer[1])
    assert list(table.index) == list(study.Z1R_STATES)
    assert list(study.transfer_table(pp_z1r(), study.Z1R_STATES, symbol="T'").columns.levels[0]) == ["T'(0)", "T'(1)"]
    with pytest.raises(ValueError, match="2 state labels for 'z1r', which has 3 states"):
        study.transfer_table(z1r, ("a", "b"))


def test_word_mass_is_one_at_every_length() -> None:
    mass = study.word_mass(get_process("mess3"), (1, 3, 6))
    assert list(mass) == [1, 3, 6]
    np.testing.assert_allclose(list(mass.values()), 1.0, atol=1e-12)


def test_belief_cloud_pairs_each_belief_with_its_token() -> None:
    mess3 = get_process("mess3")
    cloud = study.belief_cloud(mess3, 7, 4, np.random.default_rng(0))
    tokens = mess3.sample(7, 4, np.random.default_rng(0))
    assert cloud.points.shape == (28, 3) and cloud.last_token.shape == (28,)
    np.testing.assert_array_equal(cloud.last_token, tokens.reshape(-1))
    np.testing.assert_allclose(cloud.points, mess3.beliefs(tokens)[:, 1:].reshape(-1, 3))


def test_factorised_beliefs_gap_is_zero_only_for_a_product() -> None:
    product = study.factorised_beliefs(get_process("mess3_x_mess3"), 50, 5, np.random.default_rng(1))
    assert product.product_gap < 1e-12
    assert product.factor_a.shape == (50, 3) and product.factor_b.shape == (50, 3)
    np.testing.assert_allclose(product.factor_a.sum(-1), 1.0)
    coupled = study.factorised_beliefs(semi_factored_process([pp_mess3(), pp_mess3()], 1.0), 50, 5,
                                       np.random.default_rng(1))
    assert coupled.product_gap > 1e-3, "a correlated SFP's beliefs must not factorise"


def test_prefix_beliefs_show_the_sector_revealed() -> None:
    table = study.prefix_beliefs(pp_z1r(), np.array([[0, 1, 0], [0, 0, 0]]), state=0, label="Pr(S0)")
    assert list(table.index) == ["prefix", "Pr(S0)"]
    assert table.loc["prefix"].tolist() == ["∅", "0", "01", "010", "∅", "0", "00", "000"]
    assert table.loc["Pr(S0)"].iloc[0] == 0.5  # the prior weight of sector S0
    assert table.loc["Pr(S0)"].iloc[2] == 0.0 and table.loc["Pr(S0)"].iloc[6] == 1.0  # a 1, then 00, decide


def test_partition_check_names_the_process_and_breaks_under_a_leak() -> None:
    check = study.partition_check(get_process("pp_z1r_x_pp_z1r"), 0.01)
    assert check.process == "pp_z1r_x_pp_z1r" and check.epsilon == 0.01
    assert check.verdict.preserving and not check.perturbed.preserving and check.perturbed.leak_mass > 0


def _sweep(correlations=(0.0, 0.5, 1.0)) -> study.MutualInformationSweep:
    return study.mutual_information_sweep(correlations, 200, 4, np.random.default_rng(2),
                                          reference=get_process("mess3_x_mess3"))


def test_mutual_information_sweep_rows_and_reference() -> None:
    sweep = _sweep()
    assert set(sweep.table.process) == set(study.MI_FAMILIES)
    assert len(sweep.table) == len(study.MI_FAMILIES) * 3 * 5
    np.testing.assert_allclose(sweep.reference, 0.0, atol=1e-12)  # a product process: no correlation
    assert sweep.final["correlation c"].tolist() == [0.0, 0.5, 1.0]
    assert (sweep.final.process == study.MI_REPORTED[0]).all() and (sweep.final.position == 4).all()
    by_c = sweep.by_correlation
    assert by_c.iloc[0] < 1e-9 < by_c.iloc[1] < by_c.iloc[2], "MI must rise with the sector-prior correlation"
    assert sweep.monotone
    # the same generator, in the same order, reproduces the reported value by hand
    rng = np.random.default_rng(2)
    for c in (0.0, 0.5, 1.0):
        sfp = semi_factored_process([pp_z1r(), pp_z1r()], c)
        sfp.beliefs(sfp.sample(200, 4, rng))
    for c in (0.0, 0.5):
        sfp = semi_factored_process([pp_mess3(), pp_mess3()], c)
        sfp.beliefs(sfp.sample(200, 4, rng))
    sfp = semi_factored_process([pp_mess3(), pp_mess3()], 1.0)
    assert mutual_information(sfp.beliefs(sfp.sample(200, 4, rng)), sfp)[:, -1].mean() == pytest.approx(by_c.iloc[2])


def test_monotone_is_false_when_mi_does_not_rise() -> None:
    sweep = _sweep((0.5, 0.0))
    assert not sweep.monotone


def test_result_metrics_are_what_metrics_json_holds(tmp_path) -> None:
    ce = study.optimal_ce_table(("z1r", "z1r_x_z1r"), 4)
    assert list(ce.index) == [1, 2, 3, 4] and ce.index.name == "position"
    np.testing.assert_allclose(ce["z1r_x_z1r"], 2 * ce["z1r"])  # a product's CE is the sum of its factors'
    sweep = _sweep()
    result = study.SFPDefinitionResult(4, ce, study.partition_check(get_process("pp_z1r_x_pp_z1r"), 0.01), sweep)
    metrics = result.metrics()
    assert set(metrics) == {"context_length", "optimal_ce", "optimal_ce_by_position", "partition_preserving",
                            "mutual_information"}
    assert metrics["optimal_ce"]["z1r"] == pytest.approx(ce["z1r"].mean())
    assert metrics["optimal_ce_by_position"]["z1r"] == ce["z1r"].tolist()
    assert metrics["partition_preserving"]["pp_z1r_x_pp_z1r"] is True
    assert metrics["partition_preserving"]["perturbed"] is False
    mi = metrics["mutual_information"]
    assert (mi["process"], mi["position"], mi["n_sequences"], mi["monotone"]) == ("pp_mess3_x_pp_mess3", 4, 200, True)
    assert [r["correlation"] for r in mi["by_correlation"]] == [0.0, 0.5, 1.0]
    assert [r["mi"] for r in mi["by_correlation"]] == sweep.by_correlation.tolist()
    write_metrics(metrics, tmp_path)  # every value is JSON-writable


def test_mutual_information_figure_has_labelled_axes() -> None:
    import matplotlib.pyplot as plt

    sweep = _sweep()
    fig = plot_mutual_information(sweep.table, sweep.reference, reference_label="factored")
    assert [ax.get_title() for ax in fig.axes] == list(study.MI_FAMILIES)
    assert all("I(A;B)" in ax.get_ylabel() and "position" in ax.get_xlabel() for ax in fig.axes)
    plt.close("all")
    assert isinstance(study.optimal_ce_table(study.CE_PROCESSES, 2), pd.DataFrame)
