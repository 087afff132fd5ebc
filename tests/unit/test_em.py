"""Tests of the one-task-per-sequence EM-SFP (``em()``, studies 03/04 before the v3 organism): structure, names and
token roles; and of the reversal and engineering arithmetic shared by the v3 studies."""

from __future__ import annotations

import numpy as np
import pytest

from persona_wm.core.ghmm import ProcessError
from persona_wm.core.sfp import is_partition_preserving
from persona_wm.processes import get_process
from persona_wm.processes.em import EMConfig, em_name, em_process, parse_em_name, task_contexts, token_roles


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


def test_reversal_summary_best_settings_and_change_at_restoration() -> None:
    import pandas as pd

    from persona_wm.toy.em import best_settings, damage_at_restoration, summarise_reversal

    sweep = pd.DataFrame({"method": ["m"] * 6 + ["ablation_m"] * 3, "scale": [1.0] * 3 + [2.0] * 3 + [np.nan] * 3,
                          "task": [0, 1, 2] * 3, "misaligned": 0.0,
                          "restoration": [0.5, 0.5, 0.8, 1.0, 0.95, 1.1, 0.1, 0.2, np.nan],
                          "capability_change": [0.1] * 3 + [0.3] * 3 + [0.0] * 3})
    summary = summarise_reversal(sweep, target=0.9).set_index(["method", "scale"])
    row = summary.loc[("m", 1.0)]
    assert (row.restoration_task1, row.restoration_heldout, row.restoration_min) == pytest.approx((0.5, 0.65, 0.5))
    assert row.restoration_mean == pytest.approx(0.6) and not row.reaches_target
    assert summary.loc[("m", 2.0)].reaches_target
    # an undefined task (NaN restoration) is left out of the means, not counted as 0
    assert summary.loc[("ablation_m", np.nan)].restoration_heldout == pytest.approx(0.2)
    best = best_settings(summary.reset_index())
    assert best["m"]["scale"] == 2.0 and np.isnan(best["ablation_m"]["scale"])
    # mean restoration 0.6 at scale 1, 1.0167 at scale 2: 0.9 lies at 71% of the way, change 0.1 + 0.71 x 0.2
    assert damage_at_restoration(summary.reset_index(), "m", 0.9) == pytest.approx(0.1 + 0.2 * 0.3 / (1.0166667 - 0.6))
    assert np.isnan(damage_at_restoration(summary.reset_index(), "m", 1.5))


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
    rows += [{"process": "fidelity_only", "seed": seed, **{m: 0.0 for m in ENGINEERING_MEASURES},
              "fidelity": 0.99 + jitter, "robustness": 0.2 + 3 * jitter} for seed, jitter in enumerate((-0.01, 0.01))]
    summary, improvements = engineering_summary(pd.DataFrame(rows), "base")
    table = improvements.set_index("process")
    assert sorted(table.index) == ["better", "fidelity_only"]
    assert table.loc["better", "clear_robustness"] and table.loc["better", "clear_fidelity"]
    # a fidelity gain beyond the spread does not make a robustness improvement (the former OR rule did)
    assert table.loc["fidelity_only", "clear_fidelity"] and not table.loc["fidelity_only", "clear_robustness"]
    assert table.loc["fidelity_only", "robustness_gain"] == pytest.approx(0.0)
    assert summary.set_index("process").loc["better", "pareto"]


def test_with_knobs_replaces_knobs_of_a_v3_name() -> None:
    from persona_wm.toy.em import with_knobs

    assert with_knobs("em_seq(mixing=1.0)", coupling=0.0) == "em_seq(mixing=1.0,coupling=0.0)"
    assert with_knobs("em_seq(coupling=0.5)", coupling=1.0) == "em_seq()"


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

    from persona_wm.processes.em_seq import finetune_data, parse_em_seq_name, sequence_length
    from persona_wm.toy.em import EMRecipe

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params" / params_file).read_text())
    recipe = EMRecipe.from_params(params)
    assert (recipe.base_steps, recipe.ft_steps, recipe.ft_lr, recipe.d_model) == (
        params["base_steps"], params["ft_steps"], params["ft_lr"], params["d_model"])
    assert recipe.eval_sequences == 512  # not a study parameter: the recipe's own default
    assert recipe.trainer == params["trainer"] == "stacked"
    assert recipe.ft_step_grid == tuple(sorted(set(params.get("ft_step_grid", []) + [params["ft_steps"]])))
    name = params.get("process", params.get("baseline_process"))
    base = recipe.base_config(name, 3)
    tuned = recipe.finetune_config(name, 3)
    assert (base.steps, base.batch_size, base.lr, base.seed) == (params["base_steps"], params["base_batch"],
                                                                 params["base_lr"], 3)
    assert base.context_length == sequence_length(parse_em_seq_name(name)) - 1
    assert (tuned.steps, tuned.batch_size, tuned.lr, tuned.init_from) == (max(recipe.ft_step_grid), params["ft_batch"],
                                                                          params["ft_lr"], base)
    assert tuned.snapshot_steps == recipe.ft_step_grid and tuned.final_lr_fraction == 1.0 and tuned.warmup_steps == 0
    assert (tuned.data_process, tuned.data_sector) == finetune_data(parse_em_seq_name(name))


def test_recipe_from_params_names_missing_knobs_and_ignores_other_entries() -> None:
    from persona_wm.toy.em import EMRecipe

    knobs = {"d_model": 8, "n_layers": 1, "base_steps": 5, "base_batch": 4, "base_lr": 0.01, "ft_steps": 2,
             "ft_batch": 4, "ft_lr": 0.001}
    assert EMRecipe.from_params({**knobs, "n_contexts": 3, "seeds": [0]}) == EMRecipe(**knobs)
    assert EMRecipe.from_params({**knobs, "ft_step_grid": [4, 1]}).ft_step_grid == (1, 2, 4)  # ft_steps joins it
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
    configs = em_configs(["em_seq()", "em_seq(leak=0.1)", "em_seq()"], [0, 1, 0], recipe)
    assert len(configs) == len(set(configs)) == 8
    bases = [c for c in configs if c.init_from is None]
    assert {(c.process, c.seed) for c in bases} == {(p, s) for p in ("em_seq()", "em_seq(leak=0.1)") for s in (0, 1)}
    assert all(c.init_from in bases for c in configs if c.init_from is not None)
    with_lrs = em_configs(["em_seq()"], [0], recipe, lrs=[0.001, 0.01])
    assert [c.lr for c in with_lrs if c.init_from is not None] == [0.001, 0.01]
