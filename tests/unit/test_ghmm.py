"""Property tests of the GHMM core against brute-force enumeration (ARENA-style reference checks)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from persona_wm.core.ghmm import (
    GHMM,
    ProcessError,
    all_words,
    block_entropies,
    marginals,
    mixed_states,
    optimal_cross_entropy,
    stationary_distribution,
)
from persona_wm.processes import get_process, mess3, pp_z1r, product, z1r

SMALL = ["z1r", "mess3", "pp_z1r", "pp_mess3", "z1r_x_z1r", "pp_z1r_x_pp_z1r", "z1r_x_mess3"]


def brute_force_joint(process: GHMM, word: np.ndarray) -> np.ndarray:
    """Pr(w, s_L = s) by summing over every hidden-state path (exponential, reference only)."""
    out = np.zeros(process.n_states)
    for path in itertools.product(range(process.n_states), repeat=len(word) + 1):
        weight = process.initial[path[0]]
        for t, x in enumerate(word):
            weight *= process.transfer[x, path[t], path[t + 1]]
        out[path[-1]] += weight
    return out


@pytest.mark.parametrize("name", ["z1r", "mess3", "pp_z1r", "z1r_x_z1r"])
def test_beliefs_match_brute_force_enumeration(name: str) -> None:
    process = get_process(name)
    words = all_words(process.n_tokens, 3)
    probs = process.word_probability(words)
    possible = words[probs > 0]
    beliefs = process.beliefs(possible)
    for word, belief in zip(possible, beliefs):
        joint = brute_force_joint(process, word)
        np.testing.assert_allclose(belief[-1], joint / joint.sum(), atol=1e-12, err_msg=f"{name} word {word}")
        np.testing.assert_allclose(process.word_probability(word[None])[0], joint.sum(), atol=1e-14)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("length", [1, 2, 5])
def test_word_probabilities_sum_to_one(name: str, length: int) -> None:
    process = get_process(name)
    if process.n_tokens**length > 200_000:
        pytest.skip("too many words")
    total = process.word_probability(all_words(process.n_tokens, length)).sum()
    assert total == pytest.approx(1.0, abs=1e-12)


def test_belief_rows_are_distributions_and_next_token_probs_normalised() -> None:
    process = get_process("mess3_x_mess3")
    seqs = process.sample(64, 10, np.random.default_rng(0))
    beliefs = process.beliefs(seqs)
    np.testing.assert_allclose(beliefs.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(process.next_token_probs(beliefs).sum(-1), 1.0, atol=1e-12)


def test_impossible_sequences_are_reported() -> None:
    process = z1r()
    impossible = np.array([[1, 1, 1]])  # Z1R never emits three ones in a row
    assert process.word_probability(impossible)[0] == 0.0
    with pytest.raises(ProcessError, match="probability zero at token"):
        process.beliefs(impossible)
    assert np.isnan(process.beliefs(impossible, allow_impossible=True)[0, -1]).all()


def test_sampling_matches_exact_distribution() -> None:
    process = get_process("pp_z1r_x_mess3")
    seqs = process.sample(40_000, 3, np.random.default_rng(1))
    assert process.word_probability(seqs).min() > 0, "sampled an impossible word"
    counts = np.bincount(np.ravel_multi_index(seqs.T, (process.n_tokens,) * 3), minlength=process.n_tokens**3)
    exact = process.word_probability(all_words(process.n_tokens, 3))
    from scipy.stats import chisquare

    mask = exact > 0
    assert counts[~mask].sum() == 0
    assert chisquare(counts[mask], exact[mask] * counts.sum()).pvalue > 1e-4


def test_sampling_is_seeded() -> None:
    process = mess3()
    a = process.sample(10, 10, np.random.default_rng(5))
    b = process.sample(10, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_z1r_cross_entropy_closed_form() -> None:
    ce = optimal_cross_entropy(z1r(), 10)
    # position 1: Pr(0) = 1/3 + 1/6 = 1/2; from position 4 on the phase is known except on SR steps
    assert ce[0] == pytest.approx(np.log(2))
    np.testing.assert_allclose(ce[3:], np.log(2) / 3, atol=1e-12)
    np.testing.assert_allclose(block_entropies(z1r(), 10), np.cumsum(ce))


def test_mess3_first_position_is_uniform() -> None:
    assert optimal_cross_entropy(mess3(), 1)[0] == pytest.approx(np.log(3))


@pytest.mark.parametrize("name", ["z1r_x_z1r", "pp_z1r_x_pp_z1r", "z1r_x_mess3"])
def test_product_cross_entropy_is_additive_and_matches_enumeration(name: str) -> None:
    process = get_process(name)
    additive = optimal_cross_entropy(process, 6)
    enumerated = optimal_cross_entropy(replace(process, factors=None), 6)
    np.testing.assert_allclose(additive, enumerated, atol=1e-10)


def test_cross_entropy_matches_monte_carlo_log_loss() -> None:
    process = get_process("pp_z1r_x_mess3")
    seqs = process.sample(20_000, 6, np.random.default_rng(2))
    mc = -process.log_likelihood(seqs)
    exact = optimal_cross_entropy(process, 6)
    stderr = mc.std(axis=0) / np.sqrt(len(mc))
    assert np.all(np.abs(mc.mean(axis=0) - exact) < 5 * stderr + 1e-9)


def test_mixed_states_merge_and_cap() -> None:
    levels = mixed_states(z1r(), 8)
    assert len(levels[-1][0]) <= 4  # Z1R synchronises: only a handful of beliefs at any depth
    for _beliefs, probs in levels:
        assert probs.sum() == pytest.approx(1.0)
    with pytest.raises(ProcessError, match="max_states"):
        mixed_states(mess3(), 8, max_states=100)


def test_marginals_of_a_product_prior() -> None:
    process = get_process("z1r_x_pp_z1r")
    a, b = marginals(process.initial, process.factor_states)
    np.testing.assert_allclose(a, z1r().initial)
    np.testing.assert_allclose(b, pp_z1r().initial)
    with pytest.raises(ProcessError, match="expected prod"):
        marginals(np.ones(5), (2, 3))


def test_stationary_vector_refuses_degenerate_eigenvalue() -> None:
    with pytest.raises(ProcessError, match="multiplicity 3"):
        stationary_distribution(product(z1r(), z1r()).net)
    np.testing.assert_allclose(stationary_distribution(mess3().net), np.full(3, 1 / 3))


def test_named_processes_match_their_definitions() -> None:
    t = mess3().transfer
    x, a = 0.15, 0.6
    b, y = (1 - a) / 2, 1 - 2 * x
    np.testing.assert_allclose(t[0, 0], [a * y, b * x, b * x])
    np.testing.assert_allclose(t[1, 2], [b * x, a * x, b * y])
    eq8 = pp_z1r().transfer
    np.testing.assert_array_equal(eq8[0], [[1, 0, 0], [0, 0, 0], [0, 0.5, 0]])
    np.testing.assert_array_equal(eq8[1], [[0, 0, 0], [0, 0, 1], [0, 0.5, 0]])
    np.testing.assert_allclose(pp_z1r().initial, [0.5, 0.25, 0.25])
    joint = get_process("z1r_x_mess3")
    # joint token v = v1 * |V2| + v2 and joint state s = s1 * |S2| + s2
    np.testing.assert_allclose(joint.transfer[1 * 3 + 2], np.kron(z1r().transfer[1], mess3().transfer[2]))
    np.testing.assert_allclose(joint.initial, np.kron(z1r().initial, mess3().initial))


# ------------------------------------------------------------------ malformed input
def _ok_transfer() -> np.ndarray:
    return z1r().transfer.copy()


@pytest.mark.parametrize(
    "transfer, initial, message",
    [
        (np.ones((2, 3)), np.full(3, 1 / 3), "shape \\[tokens, states, states\\]"),
        (_ok_transfer(), np.full(4, 1 / 4), "must both have shape"),
        (_ok_transfer() * 0.9, np.full(3, 1 / 3), "not stochastic"),
        (np.where(np.arange(3) == 0, -0.1, 0)[None, None, :] + _ok_transfer(), np.full(3, 1 / 3), "non-negative"),
        (_ok_transfer(), np.array([0.5, 0.5, 0.5]), "not normalised"),
        (_ok_transfer() * np.nan, np.full(3, 1 / 3), "NaN"),
    ],
)
def test_malformed_processes_are_rejected(transfer, initial, message) -> None:
    with pytest.raises(ProcessError, match=message):
        GHMM(transfer, initial, name="bad")


def test_bad_metadata_and_tokens_are_rejected() -> None:
    with pytest.raises(ProcessError, match="cover each of the 3 states"):
        GHMM(_ok_transfer(), np.full(3, 1 / 3), partition=((0,), (1,)))
    with pytest.raises(ProcessError, match="factor_states"):
        GHMM(_ok_transfer(), np.full(3, 1 / 3), factor_states=(2, 2))
    with pytest.raises(ProcessError, match="token ids must lie in"):
        z1r().beliefs(np.array([[0, 2]]))
    with pytest.raises(ProcessError, match="integer array"):
        z1r().beliefs(np.array([[0.0, 1.0]]))


def test_unknown_process_names_are_rejected() -> None:
    with pytest.raises(ProcessError, match="unknown process 'mess4'.*known processes: mess3"):
        get_process("mess3_x_mess4")
    with pytest.raises(ProcessError, match="non-empty string"):
        get_process("")
    with pytest.raises(ProcessError, match="0 < x < 0.5"):
        mess3(x=0.7)


@pytest.mark.parametrize("name", ["em_seq()", "em_seq(tasks_per_sequence=6,coupling=0.5)", "em()"])
def test_sparse_sampler_gives_the_dense_samplers_tokens(name: str) -> None:
    """Large sparse HMMs are sampled with T(x) as sparse matrices in chunks of rows; the tokens are those of the
    dense row-by-row path for the same uniforms (2,500 rows: across chunk boundaries, with a partial last chunk)."""
    process = get_process(name)
    assert process._sparse_transposed is not None  # the sparse path is the one taken by default
    uniforms = np.random.default_rng(5).random((3 * 6, 2_500))
    tokens = process.sample_from_uniforms(uniforms)
    np.testing.assert_array_equal(tokens, process.sample_from_uniforms(uniforms, sparse=True))
    dense = replace(process)  # a fresh object, its sparse cache switched off
    dense.__dict__["_sparse_transposed"] = None
    np.testing.assert_array_equal(tokens, dense.sample_from_uniforms(uniforms))
    np.testing.assert_array_equal(tokens, process.sample_from_uniforms(uniforms, sparse=False))
    assert np.isfinite(process.log_likelihood(tokens)).all()  # every sampled sequence is possible
    assert process.sample_from_uniforms(uniforms[:, :0]).shape == (0, 3 * 6)


def test_small_or_dense_processes_keep_the_dense_sampler() -> None:
    assert get_process("mess3")._sparse_transposed is None
    with pytest.raises(ValueError, match="sparse=True"):
        get_process("mess3").sample_from_uniforms(np.zeros((2, 3)), sparse=True)
