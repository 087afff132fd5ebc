"""Malformed process definitions raise the library's own :class:`ProcessError`, naming field and value.

Issue 16: string or ragged matrices, ``em(n_tasks=1.5)`` and ``em(n_tasks=True)`` used to surface raw
numpy / TypeErrors, ``optimal_cross_entropy(p, 0)`` returned a value, and a generalized HMM returned
tiny negative word probabilities. Each row of the table is (id, call, pattern the message must match).
"""

from __future__ import annotations

import numpy as np
import pytest

from persona_wm.core.ghmm import GHMM, ProcessError, all_words, block_entropies, mixed_states, optimal_cross_entropy
from persona_wm.core.sfp import correlated_sector_prior, leaky
from persona_wm.processes import get_process, mess3, z1r
from persona_wm.processes.em import EMConfig, em_process

Z1R = z1r()
UNIFORM3 = [1 / 3, 1 / 3, 1 / 3]


def _z1r_list() -> list:
    return Z1R.transfer.tolist()


def _ragged() -> list:
    transfer = _z1r_list()
    transfer[1][2] = [0.5, 0.0]  # one row one entry short
    return transfer


def _string_entry() -> list:
    transfer = _z1r_list()
    transfer[0][0][1] = "1.0"  # a number written as a string is not a number
    return transfer


def _with(value, token=0, row=0, col=0) -> np.ndarray:
    transfer = Z1R.transfer.copy()
    transfer[token, row, col] = value
    return transfer


def _negative_ghmm() -> GHMM:
    """One state, T(0) = 1.5 and T(1) = -0.5: T|1>> = |1>>, but Pr(1) = -0.5 — not a process."""
    return GHMM([[[1.5]], [[-0.5]]], [1.0], hmm=False, name="negative")


MALFORMED = [
    # ---- transfer matrices / initial vector / |1>> of a GHMM
    ("transfer-string", lambda: GHMM("z1r", UNIFORM3, name="bad"), r"transfer matrices must contain real numbers, got strings: 'z1r'"),
    ("transfer-string-entry", lambda: GHMM(_string_entry(), UNIFORM3, name="bad"), r"transfer matrices must contain real numbers, got strings"),
    ("transfer-ragged", lambda: GHMM(_ragged(), UNIFORM3, name="bad"), r"transfer matrices must be a rectangular array.*ragged"),
    ("transfer-none", lambda: GHMM(None, UNIFORM3, name="bad"), r"transfer matrices must have shape \[tokens, states, states\], got \(\)"),
    ("transfer-complex", lambda: GHMM(Z1R.transfer + 1j, UNIFORM3, name="bad"), r"transfer matrices must contain real numbers, got complex"),
    ("transfer-bool", lambda: GHMM(Z1R.transfer > 0, UNIFORM3, name="bad"), r"transfer matrices must contain real numbers, got booleans"),
    ("transfer-2d", lambda: GHMM(np.eye(3), UNIFORM3, name="bad"), r"shape \[tokens, states, states\], got \(3, 3\)"),
    ("transfer-not-square", lambda: GHMM(np.ones((2, 3, 2)), UNIFORM3, name="bad"), r"got \(2, 3, 2\)"),
    ("transfer-no-tokens", lambda: GHMM(np.ones((0, 3, 3)), UNIFORM3, name="bad"), r"got \(0, 3, 3\)"),
    ("transfer-nan", lambda: GHMM(_with(np.nan, 1, 2, 0), UNIFORM3, name="bad"), r"transfer matrices must be finite, but entry \(1, 2, 0\) is nan"),
    ("transfer-inf", lambda: GHMM(_with(np.inf), UNIFORM3, name="bad"), r"transfer matrices must be finite, but entry \(0, 0, 0\) is inf"),
    ("transfer-negative-hmm", lambda: GHMM(_with(-0.1, 1, 2, 2), UNIFORM3, name="bad"), r"non-negative transfer matrices, but T\(1\)\[2,2\] = -0.1"),
    ("transfer-row-sum", lambda: GHMM(_with(0.4, 1, 2, 0), UNIFORM3, name="bad"), r"not stochastic.*state 2 has \(T\|1>>\)\[2\] = 0.9"),
    ("initial-string", lambda: GHMM(Z1R.transfer, "uniform", name="bad"), r"initial vector must contain real numbers, got strings: 'uniform'"),
    ("initial-ragged", lambda: GHMM(Z1R.transfer, [[0.5], [0.25, 0.25]], name="bad"), r"initial vector must be a rectangular array"),
    ("initial-wrong-length", lambda: GHMM(Z1R.transfer, [0.5, 0.5], name="bad"), r"initial vector \(2,\).*must both have shape \(3,\)"),
    ("initial-nan", lambda: GHMM(Z1R.transfer, [np.nan, 0.5, 0.5], name="bad"), r"initial vector must be finite, but entry \(0,\) is nan"),
    ("initial-negative-hmm", lambda: GHMM(Z1R.transfer, [1.5, -0.25, -0.25], name="bad"), r"non-negative initial vector, but initial\[1\] = -0.25"),
    ("initial-not-normalised", lambda: GHMM(Z1R.transfer, [0.5, 0.5, 0.5], name="bad"), r"<<eta\|1>> = 1.5, expected 1"),
    ("right-string", lambda: GHMM(Z1R.transfer, UNIFORM3, right="ones", hmm=False, name="bad"), r"\|1>> \(right\) must contain real numbers"),
    ("right-inf", lambda: GHMM(Z1R.transfer, UNIFORM3, right=[1, 1, np.inf], hmm=False, name="bad"), r"\|1>> \(right\) must be finite, but entry \(2,\) is inf"),
    ("hmm-flag-string", lambda: GHMM(Z1R.transfer, UNIFORM3, hmm="yes", name="bad"), r"hmm must be True or False, got 'yes'"),
    ("tol-nan", lambda: GHMM(Z1R.transfer, UNIFORM3, tol=float("nan"), name="bad"), r"tol must be a finite number in \(0, inf\], got nan"),
    ("name-not-string", lambda: GHMM(Z1R.transfer, UNIFORM3, name=3), r"process name must be a string, got 3"),
    ("partition-strings", lambda: GHMM(Z1R.transfer, UNIFORM3, partition=(("a",), (1, 2)), name="bad"), r"partition must be sectors of integer state indices"),
    ("factor-states-float", lambda: GHMM(Z1R.transfer, UNIFORM3, factor_states=(1.5, 2), name="bad"), r"factor_states must be integers >= 1, got \(1.5, 2\)"),
    # ---- the EM organism's knobs, through its name and directly
    ("em-n_tasks-float", lambda: get_process("em(n_tasks=1.5)"), r"^'em\(n_tasks=1.5\)': EM-SFP: n_tasks must be an integer, got 1.5 \(float\)$"),
    ("em-n_tasks-bool", lambda: get_process("em(n_tasks=True)"), r"n_tasks must be an integer, got True \(bool\)"),
    ("em-n_tasks-integral-float", lambda: get_process("em(n_tasks=2.0)"), r"n_tasks must be an integer, got 2.0 \(float\)"),
    ("em-n_tasks-zero", lambda: get_process("em(n_tasks=0)"), r"n_tasks must be an integer >= 1, got 0"),
    ("em-n_personas-one", lambda: get_process("em(n_personas=1)"), r"n_personas must be an integer >= 2, got 1"),
    ("em-persona_dim-string", lambda: get_process("em(persona_dim='2')"), r"persona_dim must be an integer, got '2' \(str\)"),
    ("em-persona_dim-negative", lambda: EMConfig(persona_dim=-1), r"persona_dim must be an integer >= 1, got -1"),
    ("em-mixing-bool", lambda: get_process("em(mixing=True)"), r"mixing must be a finite number, got True \(bool\)"),
    ("em-mixing-string", lambda: get_process("em(mixing='high')"), r"mixing must be a finite number, got 'high' \(str\)"),
    ("em-mixing-range", lambda: get_process("em(mixing=1.5)"), r"mixing must lie in \[0, 1\], got 1.5"),
    ("em-leak-negative", lambda: get_process("em(leak=-0.1)"), r"leak must lie in \[0, 1\], got -0.1"),
    ("em-coupling-nan", lambda: EMConfig(coupling=float("nan")), r"coupling must be a finite number, got nan"),
    ("em-difficulty-range", lambda: get_process("em(difficulty=0.5)"), r"difficulty must lie in \[0, 0.5\), got 0.5"),
    ("em-shared_answers-int", lambda: get_process("em(shared_answers=1)"), r"shared_answers must be True or False, got 1 \(int\)"),
    ("em-huge", lambda: get_process("em(n_tasks=1000)"), r"n_tasks=1000 give .* transfer entries, more than"),
    ("em-knob-twice", lambda: get_process("em(mixing=0.1,mixing=0.2)"), r"knob 'mixing' is given twice"),
    ("em-unreadable-value", lambda: get_process("em(mixing=float('nan'))"), r"knob 'mixing' .* unreadable value"),
    ("em-unknown-knob", lambda: get_process("em(mood=1)"), r"unknown EM-SFP knob 'mood'"),
    ("em-direct-float", lambda: em_process(EMConfig(n_tasks=1.5)), r"n_tasks must be an integer >= 1, got 1.5"),
    # ---- other builders' parameters
    ("mess3-string", lambda: mess3("0.1", 0.6), r"mess3: x must be a finite number, got '0.1' \(str\)"),
    ("mess3-range", lambda: mess3(0.7, 0.6), r"0 < x < 0.5"),
    ("sector-correlation-string", lambda: correlated_sector_prior(2, 2, "high"), r"sector correlation must be a finite number in \[0, 1\], got 'high'"),
    ("leak-epsilon-range", lambda: leaky(Z1R, 1.5), r"leak epsilon must be a finite number in \[0, 1\], got 1.5"),
    # ---- requests on a process
    ("cross-entropy-zero", lambda: optimal_cross_entropy(Z1R, 0), r"optimal_cross_entropy: length must be an integer >= 1, got 0"),
    ("cross-entropy-negative", lambda: optimal_cross_entropy(Z1R, -3), r"length must be an integer >= 1, got -3"),
    ("cross-entropy-float", lambda: optimal_cross_entropy(Z1R, 2.5), r"length must be an integer >= 1, got 2.5 \(float\)"),
    ("cross-entropy-bool", lambda: optimal_cross_entropy(Z1R, True), r"length must be an integer >= 1, got True \(bool\)"),
    ("cross-entropy-product-zero", lambda: optimal_cross_entropy(get_process("z1r_x_mess3"), 0), r"'z1r_x_mess3': optimal_cross_entropy: length"),
    ("block-entropies-zero", lambda: block_entropies(Z1R, 0), r"block_entropies: length must be an integer >= 1, got 0"),
    ("mixed-states-negative", lambda: mixed_states(Z1R, -1), r"mixed_states: depth must be an integer >= 0, got -1"),
    ("sample-float-length", lambda: Z1R.sample(2, 1.5, np.random.default_rng(0)), r"sample: length must be an integer >= 0, got 1.5"),
    ("sample-negative", lambda: Z1R.sample(-1, 3, np.random.default_rng(0)), r"sample: n_sequences must be an integer >= 0, got -1"),
    # ---- a generalized HMM that is not a valid process: negative probabilities raise
    ("ghmm-negative-word", lambda: _negative_ghmm().word_probability(np.array([[0, 1]])),
     r"'negative' is not a valid process: Pr\(x_2 = 1 \| the first 1 tokens of sequence 0\) = -0.5 < 0"),
    ("ghmm-negative-next-token", lambda: _negative_ghmm().next_token_probs(np.array([1.0])), r"not a valid process: Pr\(next token 1 .* = -0.5"),
    ("ghmm-negative-cross-entropy", lambda: optimal_cross_entropy(_negative_ghmm(), 2), r"not a valid process: Pr\(token 1 \| mixed state 0 at depth 0\) = -0.5"),
    ("ghmm-negative-sample", lambda: _negative_ghmm().sample(4, 3, np.random.default_rng(0)), r"not a valid process: .* = -0.5"),
]


@pytest.mark.parametrize("call, message", [row[1:] for row in MALFORMED], ids=[row[0] for row in MALFORMED])
def test_malformed_definitions_raise_process_error(call, message) -> None:
    with pytest.raises(ProcessError, match=message):
        call()


def test_table_ids_are_unique() -> None:
    ids = [row[0] for row in MALFORMED]
    assert len(ids) == len(set(ids))


def _similar(process: GHMM, seed: int) -> GHMM:
    """The same process in another basis: T'(x) = S^-1 T(x) S, a GHMM with signed entries."""
    basis = np.random.default_rng(seed).normal(size=(process.n_states,) * 2)
    inverse = np.linalg.inv(basis)
    return GHMM(np.einsum("ab,xbc,cd->xad", inverse, process.transfer, basis), process.initial @ basis,
                right=inverse @ np.ones(process.n_states), hmm=False, name=f"{process.name}~{seed}")


@pytest.mark.parametrize("name", ["z1r", "mess3", "pp_z1r"])
@pytest.mark.parametrize("seed", range(4))
def test_valid_ghmm_round_off_is_snapped_not_raised(name: str, seed: int) -> None:
    """A similarity transform of an HMM is a valid GHMM: impossible words used to come out as -1e-17
    (and a +1e-17 prefix mass "normalised" a garbage belief); now they are exactly 0 and nothing raises."""
    process = get_process(name)
    ghmm = _similar(process, seed)
    words = all_words(process.n_tokens, 5)
    probs = ghmm.word_probability(words)
    assert probs.min() >= 0.0
    np.testing.assert_allclose(probs, process.word_probability(words), atol=1e-12)
    np.testing.assert_array_equal(probs == 0, process.word_probability(words) == 0)
    np.testing.assert_allclose(optimal_cross_entropy(ghmm, 4), optimal_cross_entropy(process, 4), atol=1e-10)
    assert ghmm.sample(8, 6, np.random.default_rng(0)).shape == (8, 6)


def test_well_formed_inputs_still_accepted() -> None:
    """The checks do not reject what the library builds: numpy ints, ints for float knobs, nested lists."""
    assert GHMM(_z1r_list(), UNIFORM3, name="from-lists").n_states == 3
    assert EMConfig(n_tasks=np.int64(2), mixing=1).n_tasks == 2
    assert optimal_cross_entropy(Z1R, np.int64(2)).shape == (2,)
    assert get_process("em(mixing=1.0,shared_answers=False)").name == "em(mixing=1.0,shared_answers=False)"
