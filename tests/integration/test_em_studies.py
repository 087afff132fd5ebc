"""Studies 03 and 04's section functions end to end on tiny models (d_model 8, a few training steps, models
cached in a temporary directory): every section runs, the result dataclasses assemble, and their metrics are
JSON-writable with the keys the reports use. The numbers of tiny models mean nothing; the real ones are the
notebooks' (checked by nbval and by the byte-identical default reruns).
"""

from __future__ import annotations

import json

import pytest

from persona_wm.analysis.stats import spearman_with_ci
from persona_wm.studies import em_reversal, persona_engineering
from persona_wm.toy import train
from persona_wm.toy.em import EMRecipe, em_experiment

TINY = {"d_model": 8, "n_layers": 1, "base_steps": 5, "base_batch": 16, "base_lr": 0.003, "ft_steps": 3,
        "ft_batch": 8, "ft_lr": 0.01, "eval_sequences": 32}
N_CONTEXTS = 24


@pytest.fixture(autouse=True)
def private_model_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setattr(train, "CACHE_DIR", tmp_path_factory.getbasetemp() / "em_studies_models")


def test_em_reversal_sections_assemble_a_writable_result() -> None:
    recipe = EMRecipe.from_params(TINY)
    first = em_experiment("em()", 0, recipe, N_CONTEXTS, 0, threads=1)
    breadth = em_reversal.em_breadth("em()", [0, 1], recipe, N_CONTEXTS, 0, 1, first=first)
    assert breadth.experiments[0] is first and len(breadth.table) == 2
    coupling = em_reversal.coupling_test("em()", [0.0, 1.0], [0, 1], recipe, N_CONTEXTS, 0, 1)
    assert len(coupling.sweep) == 8 and set(coupling.curves) == {"shared", "specific"}
    search = em_reversal.coupling_search(coupling, ["em(mixing=1.0,coupling=0.0)", "em(mixing=1.0)"], [0], recipe,
                                         N_CONTEXTS, 0, 1)
    assert search.n_configs_tried == 6 and len(search.tried) == 10
    reversal = em_reversal.reversal(breadth.experiments, [0.5, 1.0], 0.9)
    assert set(reversal.best) == {"belief_state", "belief_state_ft", "diff_in_means", "model_diff",
                                  "ablation_belief_state", "ablation_diff_in_means"}
    assert set(reversal.summary.seed) == {0, 1}
    diagnostic = em_reversal.specificity_diagnostic(coupling.sweep, n_boot=100, seed=0)
    assert diagnostic.n_configs == 4
    result = em_reversal.EMReversalResult("em()", [0, 1], breadth, coupling, search, reversal, diagnostic)
    metrics = json.loads(json.dumps(result.metrics(), allow_nan=False))
    assert metrics["coupling_test"]["n_trainings"] == 10 and metrics["diagnostic"]["n_points"] == 8
    assert metrics["reversal"]["ablation_belief_state"]["best"]["scale"] is None


def test_persona_engineering_sections_assemble_a_writable_result() -> None:
    recipe = EMRecipe.from_params(TINY)
    sweep = persona_engineering.engineering_sweep("em()", {"leak": ["em()", "em(leak=0.05)"], "mixing": ["em()"]},
                                                  [0, 1], recipe, N_CONTEXTS, 0, 1)
    assert len(sweep.grid) == 6 and sweep.points.process.tolist() == ["em()", "em(leak=0.05)"]
    assert sweep.leak_table["partition preserving"].tolist() == [True, False]
    tracking = spearman_with_ci(sweep.points.specificity_mean, sweep.points.robustness_mean, n_boot=100)
    result = persona_engineering.PersonaEngineeringResult([0, 1], sweep, tracking, 1.0)
    metrics = json.loads(json.dumps(result.metrics(), allow_nan=False))
    assert len(metrics["grid"]) == 6 and metrics["baseline"] == "em()"
    assert all(0 <= row["fidelity"] <= 1 for row in metrics["grid"])
