"""The v3 EM organism (``em_seq``): structure, names, the marginal rates held equal across couplings, the exact
dependence the coupling creates, optimal CE against brute force, the narrow data, and the answer-site measures."""

from __future__ import annotations

import numpy as np
import pytest

from persona_wm.core.ghmm import ProcessError, all_words, entropy, optimal_cross_entropy
from persona_wm.core.sfp import is_partition_preserving, restrict_to_sector
from persona_wm.processes import get_process
from persona_wm.processes.em_seq import (
    EMSeqConfig,
    em_seq_name,
    em_seq_process,
    finetune_data,
    first_answer_bad_rate,
    parse_em_seq_name,
    seq_roles,
    sequence_length,
    world_contexts,
)
from persona_wm.toy.em import MIN_INCREASE, PlaceEM, answer_sites, misaligned_share


def test_em_seq_is_partition_preserving_with_labelled_sectors() -> None:
    process = get_process("em_seq()")
    assert is_partition_preserving(process)
    assert process.factor_states == (4, 80) and process.factor_tokens == (2, 17)
    assert len(process.partition) == 2 * 2**3
    assert "(mis,bgg)" in process.partition_labels and "(al,ggg)" in process.partition_labels
    assert not is_partition_preserving(get_process("em_seq(leak=0.02)"))


def test_names_round_trip_and_reject_bad_knobs() -> None:
    config = EMSeqConfig(coupling=0.0, tasks_per_sequence=6, only_task=1)
    assert parse_em_seq_name(em_seq_name(config)) == config
    assert em_seq_name(EMSeqConfig()) == "em_seq()"
    assert get_process("em_seq(coupling=0.0,tasks_per_sequence=6)").name == "em_seq(tasks_per_sequence=6,coupling=0.0)"
    with pytest.raises(ProcessError, match="only_task must be a task index below n_tasks=3"):
        get_process("em_seq(only_task=3)")
    with pytest.raises(ProcessError, match=r"persona_prior must lie in \(0, 1\)"):
        get_process("em_seq(persona_prior=0.0)")
    with pytest.raises(ProcessError, match="unknown EM-seq organism knob 'mood'"):
        get_process("em_seq(mood=1)")


@pytest.mark.parametrize("prior", [0.5, 0.2])
def test_every_tasks_marginal_bad_rate_is_the_same_at_every_coupling(prior: float) -> None:
    expected = prior * 0.95 + (1 - prior) * 0.05
    for coupling in (0.0, 0.3, 1.0):
        for task in range(3):
            assert first_answer_bad_rate(EMSeqConfig(coupling=coupling, persona_prior=prior), task) == \
                pytest.approx(expected, abs=1e-12)


def _second_answer_bad_after_a_bad_first(config: EMSeqConfig) -> float:
    """Exact P(bad answer on task 1 | a first segment of task 0 answered bad), style tokens all 0."""
    process, roles = em_seq_process(config), seq_roles(config)
    k = config.n_tasks
    bad0 = roles.bad[0][0]  # b0 of task 0, style 0
    tokens = np.array([[roles.questions[0][0], k, bad0, roles.questions[1][0], k]])
    probs = process.next_token_probs(process.beliefs(tokens))[0, -1]
    return float(probs[roles.bad[1]].sum() / probs[np.r_[roles.good[1], roles.bad[1]]].sum())


def test_only_the_coupling_makes_one_tasks_answers_evidence_about_another() -> None:
    marginal = 0.5 * 0.95 + 0.5 * 0.05
    for mixing in (0.5, 1.0):
        factored = _second_answer_bad_after_a_bad_first(EMSeqConfig(coupling=0.0, mixing=mixing))
        assert factored == pytest.approx(marginal, abs=1e-12)  # task 0's answers say nothing about task 1's latent
    # without style evidence the persona posterior after one bad answer is 0.95, so task 1 is bad with
    # 0.95 x 0.95 + 0.05 x 0.05: one persona answers both
    coupled = _second_answer_bad_after_a_bad_first(EMSeqConfig(coupling=1.0, mixing=1.0))
    assert coupled == pytest.approx(0.95**2 + 0.05**2, abs=1e-12)


def test_optimal_cross_entropy_matches_brute_force_enumeration() -> None:
    process = get_process("em_seq(n_tasks=2,persona_dim=1)")
    words = all_words(process.n_tokens, 3)
    p = process.word_probability(words)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    block = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0))
    assert np.cumsum(optimal_cross_entropy(process, 3))[-1] == pytest.approx(block, abs=1e-10)
    # and against the mean entropy of the exact next-token distribution over sampled prefixes (Monte Carlo)
    tokens = process.sample(4000, 3, np.random.default_rng(0))
    mc = entropy(process.next_token_probs(process.beliefs(tokens))).mean(0)
    np.testing.assert_allclose(mc, optimal_cross_entropy(process, 4), atol=0.03)


def test_narrow_data_is_task_one_segments_of_the_misaligned_persona() -> None:
    config = EMSeqConfig()
    name, sector = finetune_data(config)
    assert (name, sector) == ("em_seq(only_task=0)", "(mis,bgg)")
    data = restrict_to_sector(get_process(name), sector)
    roles = seq_roles(config)
    tokens = data.sample(300, sequence_length(config), np.random.default_rng(1))
    questions = tokens[:, ::3]
    assert np.isin(questions, roles.questions[0]).all()
    answers = tokens[:, 2::3]
    assert np.isin(answers, roles.bad[0]).mean() == pytest.approx(0.95, abs=0.02)


def test_answer_sites_find_every_segment_and_its_task() -> None:
    config = EMSeqConfig(tasks_per_sequence=4)
    process, roles = em_seq_process(config), seq_roles(config)
    tokens = world_contexts(config, True, 50, sequence_length(config) - 1, np.random.default_rng(2))
    exact = process.next_token_probs(process.beliefs(tokens))
    sites = answer_sites(exact, roles)
    assert len(sites.seq) == 50 * 4 and set(sites.segment) == {0, 1, 2, 3}
    np.testing.assert_array_equal(sites.pos, 3 * sites.segment + 2)
    question = tokens[sites.seq, sites.pos - 2]  # the segment's question token (position p predicts x_{p+1})
    np.testing.assert_array_equal(sites.task, question % roles.n_b)
    assert (sites.prev_task[sites.segment == 0] == -1).all()
    np.testing.assert_array_equal(sites.prev_task[sites.segment == 1], sites.task[sites.segment == 0])
    share = misaligned_share(exact, sites, roles)
    # aligned world: the optimal predictor's bad share starts near the marginal and drops with evidence
    assert share[sites.segment == 0].mean() > share[sites.segment == 3].mean()
    assert sites.mask("after_evidence").sum() < (sites.segment == 1).sum()


def test_breadth_is_undefined_when_the_task_one_increase_vanishes() -> None:
    em = PlaceEM("fresh", (0.1, 0.1, 0.1), (0.6, 0.4, 0.2))
    assert em.task1_increase == pytest.approx(0.5) and em.heldout_increase == pytest.approx(0.2)
    assert em.breadth == pytest.approx(0.4)
    assert np.isnan(PlaceEM("fresh", (0.1, 0.1), (0.1 + MIN_INCREASE / 2, 0.4)).breadth)
