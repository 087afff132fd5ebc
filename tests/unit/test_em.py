"""Tests of the EM-SFP organism: structure, names, token roles, and the behavioural measures."""

from __future__ import annotations

import numpy as np
import pytest

from persona_wm.core.ghmm import ProcessError
from persona_wm.core.sfp import is_partition_preserving
from persona_wm.processes import get_process
from persona_wm.toy.em import EMConfig, behaviour, em_name, em_process, parse_em_name, task_contexts, token_roles


def test_em_sfp_is_partition_preserving_and_sectors_are_labelled() -> None:
    process = get_process("em()")
    assert is_partition_preserving(process)
    assert process.factor_states == (4, 24) and process.factor_tokens == (2, 9)
    assert get_process("em(shared_answers=False)").factor_tokens == (2, 17)
    assert "(mis,t0b)" in process.partition_labels and "(al,t2g)" in process.partition_labels
    leaky = get_process("em(leak=0.02)")
    assert not is_partition_preserving(leaky)


def test_names_round_trip_and_reject_bad_knobs() -> None:
    config = EMConfig(mixing=0.8, n_tasks=4)
    assert parse_em_name(em_name(config)) == config
    assert em_name(EMConfig()) == "em()"
    with pytest.raises(ProcessError, match="unknown EM-SFP knob 'mood'"):
        get_process("em(mood=1)")
    with pytest.raises(ProcessError, match="mixing must lie in"):
        get_process("em(mixing=2.0)")


@pytest.mark.parametrize("shared", [True, False])
def test_misaligned_persona_answers_bad_and_aligned_good(shared: bool) -> None:
    config = EMConfig(answer_noise=0.0, shared_answers=shared)
    process = em_process(config)
    roles = token_roles(config)
    rng = np.random.default_rng(0)
    for aligned, expect_bad in ((True, 0.0), (False, 1.0)):
        tokens = task_contexts(process, config, 1, aligned, 200, 10, rng)
        emitted = np.isin(tokens, roles.answer_bad).sum() / max(np.isin(tokens, np.concatenate(
            [roles.answer_good, roles.answer_bad])).sum(), 1)
        assert emitted == pytest.approx(expect_bad)


def test_bayes_optimal_outputs_score_zero_capability_error_and_known_misalignment() -> None:
    config = EMConfig()
    process = em_process(config)
    tokens = task_contexts(process, config, 0, True, 100, 10, np.random.default_rng(1))
    optimal = process.next_token_probs(process.beliefs(tokens))
    result = behaviour(optimal, process, tokens, token_roles(config))
    assert result["capability_kl"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < result["misaligned"] < 0.5  # aligned contexts: mostly good answers, some persona doubt early on
    assert result["answer_positions"] > 0


def test_restoration_and_best_settings_arithmetic() -> None:
    import pandas as pd

    from persona_wm.toy.em import best_settings, damage_at_restoration, restoration, summarise_reversal

    base = pd.DataFrame({"task": [0, 1, 2], "misaligned": [0.1, 0.1, 0.1], "capability_kl": [0.0, 0.0, 0.0]})
    tuned = pd.DataFrame({"task": [0, 1, 2], "misaligned": [0.9, 0.5, 0.5], "capability_kl": [0.1, 0.1, 0.1]})
    sweep = pd.DataFrame({"task": [0, 1, 2] * 2, "method": ["m"] * 6, "scale": [1.0] * 3 + [2.0] * 3,
                          "misaligned": [0.5, 0.3, 0.3, 0.1, 0.1, 0.1], "capability_kl": [0.1] * 3 + [0.3] * 3})
    restored = restoration(sweep, base, tuned)
    np.testing.assert_allclose(restored.restoration, [0.5, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(restored.capability_damage, [0, 0, 0, 0.2, 0.2, 0.2])
    summary = summarise_reversal(restored, target=0.9)
    assert summary.reaches_target.tolist() == [False, True]
    assert best_settings(summary)["m"]["scale"] == 2.0
    assert damage_at_restoration(summary, "m", 0.75) == pytest.approx(0.1)
    assert np.isnan(damage_at_restoration(summary, "m", 1.5))


def test_pareto_front_and_engineering_summary() -> None:
    import pandas as pd

    from persona_wm.toy.engineering import ENGINEERING_MEASURES, engineering_summary, pareto_front

    points = pd.DataFrame({"fidelity": [0.9, 0.8, 0.95, 0.7], "robustness": [0.2, 0.3, 0.25, 0.1]})
    assert pareto_front(points).tolist() == [False, True, True, False]
    rows = []
    for process, f, r in (("base", 0.9, 0.2), ("better", 0.95, 0.3), ("worse", 0.8, 0.1)):
        for seed, jitter in enumerate((-0.01, 0.01)):
            rows.append({"process": process, "seed": seed, **{m: 0.0 for m in ENGINEERING_MEASURES},
                         "fidelity": f + jitter, "robustness": r + jitter})
    summary, improvements = engineering_summary(pd.DataFrame(rows), "base")
    assert improvements.process.tolist() == ["better"] and bool(improvements["clear"].iloc[0])
    assert summary.set_index("process").loc["better", "pareto"]


def test_with_knobs_and_twin_table() -> None:
    import pandas as pd

    from persona_wm.toy.em import twin_table, with_knobs

    assert with_knobs("em(mixing=1.0)", coupling=0.0, shared_answers=False) == \
        "em(mixing=1.0,coupling=0.0,shared_answers=False)"
    assert with_knobs("em(coupling=0.5)", coupling=1.0) == "em()"
    frame = pd.DataFrame({"twin": ["em()"] * 4 + ["em(mixing=0.0)"] * 2, "coupling": [1.0, 1.0, 0.0, 0.0, 1.0, 0.0],
                          "breadth": [0.6, 0.8, 0.1, 0.1, 0.9, 0.9]})
    table = twin_table(frame).set_index("config")
    assert table.loc["em()", "breadth_coupled"] == pytest.approx(0.7)
    assert table.loc["em()", "meets_target"] and not table.loc["em(mixing=0.0)", "meets_target"]
    assert table.loc["em()", "n_seeds"] == 2


def test_mixing_one_makes_coupling_c_and_one_minus_c_the_same_process() -> None:
    """At mixing=1, persona_prior=0.5 the persona and task-variant latents are symmetric: c and 1-c coincide."""
    a, b = get_process("em(mixing=1.0,coupling=0.25)"), get_process("em(mixing=1.0,coupling=0.75)")
    tokens = a.sample(50, 9, np.random.default_rng(0))
    np.testing.assert_allclose(a.next_token_probs(a.beliefs(tokens)), b.next_token_probs(b.beliefs(tokens)),
                               atol=1e-12)
    c = get_process("em(coupling=0.25)")  # with style evidence (mixing 0.5) they differ
    assert not np.allclose(a.next_token_probs(a.beliefs(tokens)), c.next_token_probs(c.beliefs(tokens)))


@pytest.mark.parametrize("params_file", ["03_em_reversal/default.yaml", "03_em_reversal/smoke.yaml",
                                         "04_persona_engineering/default.yaml", "04_persona_engineering/full.yaml"])
def test_recipe_from_params_reads_every_knob_of_a_study_params_file(params_file: str) -> None:
    from pathlib import Path

    import yaml

    from persona_wm.toy.em import EMRecipe

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params" / params_file).read_text())
    recipe = EMRecipe.from_params(params)
    assert (recipe.base_steps, recipe.ft_steps, recipe.ft_lr, recipe.d_model) == (
        params["base_steps"], params["ft_steps"], params["ft_lr"], params["d_model"])
    assert recipe.eval_sequences == 512  # not a study parameter: the recipe's own default
    assert recipe.trainer == params["trainer"] == "stacked"
    base = recipe.base_config("em()", 3)
    tuned = recipe.finetune_config("em()", 3, parse_em_name("em()"))
    assert (base.steps, base.batch_size, base.lr, base.seed) == (params["base_steps"], params["base_batch"],
                                                                 params["base_lr"], 3)
    assert (tuned.steps, tuned.batch_size, tuned.lr, tuned.init_from) == (params["ft_steps"], params["ft_batch"],
                                                                          params["ft_lr"], base)


def test_recipe_from_params_names_missing_knobs_and_ignores_other_entries() -> None:
    from persona_wm.toy.em import EMRecipe

    knobs = {"d_model": 8, "n_layers": 1, "base_steps": 5, "base_batch": 4, "base_lr": 0.01, "ft_steps": 2,
             "ft_batch": 4, "ft_lr": 0.001}
    assert EMRecipe.from_params({**knobs, "n_contexts": 3, "seeds": [0]}) == EMRecipe(**knobs)
    assert EMRecipe.from_params({**knobs, "eval_sequences": 64}).eval_sequences == 64
    with pytest.raises(KeyError, match="lack the recipe knob\\(s\\) base_lr, ft_steps"):
        EMRecipe.from_params({k: v for k, v in knobs.items() if k not in ("base_lr", "ft_steps")})
    assert EMRecipe(**knobs).trainer == "sequential"
    with pytest.raises(ValueError, match="EMRecipe.trainer must be one of"):
        EMRecipe.from_params({**knobs, "trainer": "parallel"})


def test_em_configs_lists_each_base_and_its_fine_tune_once() -> None:
    from persona_wm.toy.em import EMRecipe, em_configs

    recipe = EMRecipe(d_model=8, n_layers=1, base_steps=5, base_batch=4, base_lr=0.01, ft_steps=2, ft_batch=4,
                      ft_lr=0.001)
    configs = em_configs(["em()", "em(leak=0.1)", "em()"], [0, 1, 0], recipe)
    assert len(configs) == len(set(configs)) == 8
    bases = [c for c in configs if c.init_from is None]
    assert {(c.process, c.seed) for c in bases} == {(p, s) for p in ("em()", "em(leak=0.1)") for s in (0, 1)}
    assert all(c.init_from in bases for c in configs if c.init_from is not None)


def test_mean_restoration_weights_the_two_held_out_tasks() -> None:
    import pandas as pd

    from persona_wm.toy.em import mean_restoration

    summary = pd.DataFrame({"restoration_task1": [0.3, 1.0], "restoration_heldout": [0.6, 0.1]})
    np.testing.assert_allclose(mean_restoration(summary), [0.5, 0.4])
