"""Tests of SFP construction, the partition checker and the density-matrix quantities."""

from __future__ import annotations

import numpy as np
import pytest

from persona_wm.core.ghmm import GHMM, ProcessError
from persona_wm.core.sfp import (
    correlated_sector_prior,
    density_matrix,
    factor_marginals,
    is_partition_preserving,
    leaky,
    mutual_information,
    product_of_marginals,
    sector_order,
    semi_factored_process,
    sfp_from_blocks,
)
from persona_wm.processes import get_process, mess3, pp_mess3, pp_z1r, product, z1r


def _prefix_beliefs(process: GHMM, n: int = 300, length: int = 10, seed: int = 0) -> np.ndarray:
    return process.beliefs(process.sample(n, length, np.random.default_rng(seed)))


@pytest.mark.parametrize("name", ["z1r_x_z1r", "mess3_x_mess3", "pp_z1r_x_pp_z1r", "z1r_x_mess3"])
def test_product_with_factored_prior_has_rho_ab_equal_rho_a_tensor_rho_b(name: str) -> None:
    process = get_process(name)
    beliefs = _prefix_beliefs(process)
    np.testing.assert_allclose(density_matrix(beliefs), density_matrix(product_of_marginals(beliefs, process)), atol=1e-12)
    np.testing.assert_allclose(mutual_information(beliefs, process), 0.0, atol=1e-12)


def test_correlated_sfp_is_block_diagonal_but_not_a_product() -> None:
    sfp = semi_factored_process([pp_z1r(), pp_z1r()], correlation=0.8)
    assert is_partition_preserving(sfp)
    assert sfp.factors is None
    beliefs = _prefix_beliefs(sfp)
    gap = np.abs(beliefs - product_of_marginals(beliefs, sfp)).max()
    assert gap > 0.1, "a correlated prior must make rho_AB differ from rho_A (x) rho_B"
    assert mutual_information(sfp.initial, sfp) > 0.1


def test_uncorrelated_sfp_is_exactly_the_product() -> None:
    sfp = semi_factored_process([pp_z1r(), pp_z1r()], correlation=0.0)
    reference = product(pp_z1r(), pp_z1r())
    np.testing.assert_allclose(sfp.initial, reference.initial, atol=1e-15)
    np.testing.assert_array_equal(sfp.transfer, reference.transfer)
    assert sfp.factors is not None  # exact product: additive exact quantities still apply


def test_checker_accepts_pp_z1r_squared_and_rejects_perturbed_copy() -> None:
    process = get_process("pp_z1r_x_pp_z1r")
    verdict = is_partition_preserving(process)
    assert verdict and verdict.leak_mass == 0.0
    assert len(process.partition) == 4 and process.partition_labels[0] == "(S0,S0)"
    perturbed = leaky(process, 0.05)
    bad = is_partition_preserving(perturbed)
    assert not bad
    assert 0 < bad.leak_mass <= 0.05
    assert "partition violated" in str(bad)


def test_checker_names_the_leaking_block() -> None:
    process = pp_z1r()
    transfer = process.transfer.copy()
    transfer[0, 0] = [0.9, 0.1, 0.0]  # S0 now leaks into the {S1, SR} sector on token 0
    broken = GHMM(transfer, process.initial, name="broken", partition=process.partition,
                  partition_labels=process.partition_labels)
    verdict = is_partition_preserving(broken)
    assert not verdict
    assert [(leak.token, leak.source, leak.target) for leak in verdict.leaks] == [(0, "S0", "S1SR")]
    assert verdict.leak_mass == pytest.approx(0.1)


def test_checker_rejects_bad_partitions() -> None:
    with pytest.raises(ProcessError, match="no partition"):
        is_partition_preserving(z1r())
    with pytest.raises(ProcessError, match="cover each"):
        is_partition_preserving(z1r(), partition=[[0, 1]])


def test_sector_order_makes_blocks_contiguous() -> None:
    process = get_process("pp_z1r_x_pp_z1r")
    order = sector_order(process)
    assert sorted(order) == list(range(9))
    reordered = process.transfer[:, order][:, :, order]
    sizes = [len(s) for s in process.partition]
    edges = np.cumsum([0] + sizes)
    for a in range(len(sizes)):
        for b in range(len(sizes)):
            if a != b:
                assert not reordered[:, edges[a]:edges[a + 1], edges[b]:edges[b + 1]].any()


@pytest.mark.parametrize("n_factors, n_sub", [(2, 2), (2, 3), (3, 2)])
def test_correlated_prior_keeps_marginals_and_mi_is_monotone(n_factors: int, n_sub: int) -> None:
    weights = np.linspace(1, 2, n_sub) / np.linspace(1, 2, n_sub).sum()
    previous = -1.0
    for c in np.linspace(0, 1, 6):
        prior = correlated_sector_prior(n_factors, n_sub, c, weights)
        assert prior.sum() == pytest.approx(1.0)
        for axis in range(n_factors):
            other = tuple(a for a in range(n_factors) if a != axis)
            np.testing.assert_allclose(prior.sum(axis=other), weights)
        mi = float(mutual_information(prior.ravel(), (n_sub,) * n_factors))
        assert mi >= previous - 1e-12
        previous = mi
    with pytest.raises(ProcessError, match=r"\[0, 1\]"):
        correlated_sector_prior(2, 2, 1.5)


def test_mutual_information_over_positions_grows_with_correlation() -> None:
    rng_seed = 3
    finals = []
    for c in [0.0, 0.5, 1.0]:
        sfp = semi_factored_process([pp_mess3(), pp_mess3()], c)
        finals.append(mutual_information(_prefix_beliefs(sfp, 2000, 10, rng_seed)[:, -1], sfp).mean())
    assert finals[0] == pytest.approx(0.0, abs=1e-12)
    assert finals[0] < finals[1] < finals[2]


def test_sfp_from_blocks_reproduces_the_kronecker_sfp() -> None:
    a = b = pp_z1r()
    subspaces = [a.partition, b.partition]
    reference = semi_factored_process([a, b], correlation=0.3)
    blocks, initials, prior = {}, {}, {}
    weights = correlated_sector_prior(2, 2, 0.3)
    for i, sa in enumerate(a.partition):
        for j, sb in enumerate(b.partition):
            blocks[(i, j)] = np.stack([
                np.kron(a.transfer[x][np.ix_(sa, sa)], b.transfer[y][np.ix_(sb, sb)]) for x in range(2) for y in range(2)
            ])
            initials[(i, j)] = np.kron(a.initial[list(sa)], b.initial[list(sb)])
            prior[(i, j)] = weights[i, j]
    built = sfp_from_blocks((3, 3), subspaces, blocks, prior, initials, factor_tokens=(2, 2))
    np.testing.assert_allclose(built.transfer, reference.transfer)
    np.testing.assert_allclose(built.initial, reference.initial)
    assert is_partition_preserving(built)


def test_sfp_from_blocks_rejects_inconsistent_input() -> None:
    subspaces = [((0,), (1,)), ((0,), (1,))]
    one = np.ones((1, 1, 1))
    with pytest.raises(ProcessError, match="no block given"):
        sfp_from_blocks((2, 2), subspaces, {(0, 0): one}, {(0, 0): 1.0}, {(0, 0): np.ones(1)})
    blocks = {s: one for s in [(0, 0), (0, 1), (1, 0), (1, 1)]}
    with pytest.raises(ProcessError, match="prior sums to"):
        sfp_from_blocks((2, 2), subspaces, blocks, {(0, 0): 0.5}, {(0, 0): np.ones(1)})


def test_semi_factored_process_needs_matching_subspace_counts() -> None:
    with pytest.raises(ProcessError, match="same number of subspaces"):
        semi_factored_process([pp_z1r(), mess3()], 0.5)
    with pytest.raises(ProcessError, match="at least two"):
        semi_factored_process([pp_z1r()], 0.5)


def test_factor_marginals_need_factors() -> None:
    with pytest.raises(ProcessError, match="at least two factors"):
        factor_marginals(np.ones(3) / 3, z1r())
