"""Studies 03 and 04's section functions end to end on tiny models of the v3 organism (d_model 8, a few training
steps, models cached in a temporary directory): every section runs, the records assemble, and their metrics are
JSON-writable with the keys the reports use. The numbers of tiny models mean nothing; the real ones are the
notebooks' (checked by nbval and by the default reruns against tolerances).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from persona_wm.studies import em_reversal, persona_engineering
from persona_wm.toy import train
from persona_wm.toy.em import EMRecipe, em_experiment, patch_out_change, persona_probe

TINY = {"d_model": 8, "n_layers": 1, "base_steps": 5, "base_batch": 16, "base_lr": 0.003, "ft_steps": 3,
        "ft_step_grid": [2, 3], "ft_batch": 8, "ft_lr": 0.01, "ft_lr_grid": [0.01], "eval_sequences": 32}
N_CONTEXTS = 30


@pytest.fixture(autouse=True)
def private_model_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setattr(train, "CACHE_DIR", tmp_path_factory.getbasetemp() / "em_studies_models")


def test_em_reversal_sections_assemble_a_writable_result() -> None:
    recipe = EMRecipe.from_params(TINY)
    design = em_reversal.Design("em_seq(n_tasks=2,tasks_per_sequence=2)", (1, 2), (0.0, 1.0), (0.5,), (0, 1), recipe)
    training = em_reversal.train_all(design, 1)
    # 4 organisms x 2 seeds: a base each and one fine-tuning run (one learning rate, snapshots at 2 and 3 steps)
    assert len(training.models) == 16 and training.n_trained == 16
    experiments = em_reversal.Experiments(design, N_CONTEXTS, 0, 1, training)
    organism = em_reversal.organism(design)
    assert organism.marginal_spread < 1e-12
    headline = em_reversal.contrast(experiments)
    assert set(headline.contrasts) == {"fresh", "after_evidence"} and headline.fresh.n_seeds == 2
    sweep = em_reversal.coupling_sweep(experiments)
    assert len(sweep.table) == 4
    found = em_reversal.search(experiments, progress=False)
    assert found.n_configs_tried == 4  # tasks_per_sequence (2) x prior (1) x steps (2) x lr (1)
    mech = em_reversal.mechanism(experiments, n_random=3, n_boot=50, progress=False)
    assert set(mech.patches.direction) == {"probe_weights", "probe_pattern", "mean_change", "random_00",
                                           "random_01", "random_02"}
    rev = em_reversal.reversal(experiments, [0.5, 1.0], 0.9, n_random=3, progress=False)
    assert set(rev.random_null.scale) == {0.5, 1.0}
    diag = em_reversal.diagnostic(experiments, n_boot=50, progress=False)
    assert set(diag.correlations) == {"intended", "spillover"}
    result = em_reversal.EMReversalResult(design, organism, headline, sweep, found, mech, rev, diag)
    metrics = json.loads(json.dumps(result.metrics(), allow_nan=False))["organism_v3"]
    assert set(metrics["contrast"]) >= {"coupled", "factored", "difference", "ci_low", "ci_high", "n_seeds",
                                        "n_configs_tried", "design"}
    assert set(metrics["mechanism"]) >= {"probe_r2", "belief_shift", "belief_shift_ci", "shift_breadth_spearman",
                                         "ablation_breadth_removed_coupled", "ablation_breadth_removed_factored"}
    assert "random_null" in metrics["reversal"] and metrics["reversal"]["random_null"]["n_directions"] == 3


def test_the_patch_is_a_no_op_on_the_base_model_and_reports_the_experiments_increase() -> None:
    """The patch puts the base model's value back along a direction: applied to the base model itself it changes
    nothing, and the unpatched reference it reports is the experiment's own measure."""
    recipe = EMRecipe.from_params(TINY)
    e = em_experiment("em_seq(n_tasks=2,tasks_per_sequence=2)", 0, recipe, N_CONTEXTS, 0)
    probe = persona_probe(e)
    assert probe.pattern.shape == probe.direction.shape == (8,)
    patched = patch_out_change(e, probe.pattern, "probe_pattern")
    assert np.isclose(patched.unpatched.heldout_increase, e.measures.fresh.heldout_increase)
    # the base model patched toward itself changes nothing
    same = replace(e, tuned_model=e.base.model)
    assert np.allclose(patch_out_change(same, probe.pattern, "x").em.tuned, same.base_behaviour.shares["fresh"])


def test_persona_engineering_sections_assemble_a_writable_result() -> None:
    recipe = EMRecipe.from_params(TINY)
    sweep = persona_engineering.engineering_sweep(
        "em_seq(n_tasks=2,tasks_per_sequence=2)",
        {"leak": ["em_seq(n_tasks=2,tasks_per_sequence=2)", "em_seq(n_tasks=2,tasks_per_sequence=2,leak=0.05)"],
         "mixing": ["em_seq(n_tasks=2,tasks_per_sequence=2)"]}, [0, 1], recipe, N_CONTEXTS, 0, 1)
    assert len(sweep.grid) == 6 and len(sweep.points) == 2
    assert sweep.leak_table["partition preserving"].tolist() == [True, False]
    tracking = persona_engineering.specificity_tracking(sweep.points, n_boot=50, seed=0)
    result = persona_engineering.PersonaEngineeringResult([0, 1], sweep, tracking, 1.0)
    metrics = json.loads(json.dumps(result.metrics(), allow_nan=False))
    assert len(metrics["grid"]) == 6 and "robustness_clear" in metrics and "fidelity_clear" in metrics
    assert all(0 <= row["fidelity"] <= 1 for row in metrics["grid"])
    assert {t["axis"] for t in metrics["trends"]} <= {"leak"}
