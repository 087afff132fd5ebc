"""persona_wm.analysis.geometry and persona_wm.llm.personas on synthetic data with known answers (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import kstest

from persona_wm.analysis import geometry
from persona_wm.llm import divergence
from persona_wm.llm.personas import (
    ANCHOR,
    FINE_CLUSTERS,
    PERSONAS,
    PROMPTS,
    PersonaError,
    check_personas,
    same_cluster_matrices,
    strata,
    system_prompt,
)

CORE = [name for name in PERSONAS if name != ANCHOR]


def _random_logprobs(shape, seed=0, temperature=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=gen) * temperature, dim=-1)


def _symmetric(values: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n))
    m[np.triu_indices(n, 1)] = values
    return m + m.T


# ------------------------------------------------------------------------------------ JS


def test_js_matches_scipy_and_pairwise_matches_elementwise():
    lp = _random_logprobs((4, 3, 5000))
    js = divergence.js_divergence(lp[0], lp[1]).numpy()
    p, q = lp[0].double().exp().numpy(), lp[1].double().exp().numpy()
    reference = np.array([jensenshannon(p[t], q[t]) ** 2 for t in range(3)])  # scipy returns sqrt(JS), base e
    np.testing.assert_allclose(js, reference, atol=1e-6, err_msg="JS differs from scipy's jensenshannon**2")
    pair = divergence.pairwise_js(lp, chunk=1024)
    assert pair.shape == (4, 4, 3)
    np.testing.assert_allclose(pair[0, 1].numpy(), js, atol=1e-9)
    np.testing.assert_allclose(pair.numpy(), pair.transpose(0, 1).numpy())
    assert torch.all(pair[range(4), range(4)] == 0)
    assert float(pair.max()) <= math.log(2) + 1e-9


def test_js_of_identical_distributions_is_zero_and_mask_zeroes_positions():
    lp = _random_logprobs((2, 4, 300), seed=1)
    assert float(divergence.js_divergence(lp[0], lp[0]).abs().max()) < 1e-7
    pair = divergence.pairwise_js(lp, mask=torch.tensor([True, False, True, False]))
    assert float(pair[..., 1].abs().max()) == 0.0 and float(pair[0, 1, 0]) > 0


def test_pairwise_js_in_one_vocabulary_chunk_equals_the_chunked_cpu_sums():
    """A GPU runs pairwise_js one position at a time over the whole vocabulary (chunk = V): that order of the sums
    gives the chunked CPU result to float64 rounding; the result comes back on the CPU."""
    lp = _random_logprobs((5, 6, 700), seed=2)
    mask = torch.tensor([True, True, False, True, True, False])
    chunked = divergence.pairwise_js(lp, mask, chunk=128)
    whole = divergence.pairwise_js(lp, mask, chunk=700)
    assert whole.device.type == "cpu" and whole.dtype == torch.float64
    np.testing.assert_allclose(whole.numpy(), chunked.numpy(), rtol=1e-9, atol=1e-12)


def test_js_disjoint_supports_is_ln2():
    logp = torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).clamp_min(1e-45))
    assert abs(float(divergence.js_divergence(logp[0], logp[1])) - math.log(2)) < 1e-6


# ------------------------------------------------------------------------------------ RSA and Mantel


def test_mantel_identical_matrices_give_the_smallest_p():
    rng = np.random.default_rng(0)
    a = _symmetric(rng.random(28), 8)
    res = geometry.mantel(a, a, n_permutations=2000, seed=0)
    assert res["rho"] == pytest.approx(1.0)
    assert res["p"] <= 2 / 2001, res


def test_mantel_unrelated_matrices_give_roughly_uniform_p():
    rng = np.random.default_rng(1)
    ps = [geometry.mantel(_symmetric(rng.random(21), 7), _symmetric(rng.random(21), 7), n_permutations=199,
                          seed=k)["p"] for k in range(60)]
    assert kstest(ps, "uniform").pvalue > 0.01, f"p-values not uniform: mean {np.mean(ps):.2f}"


def test_stratified_mantel_enumerates_seed_clusters_exactly():
    check = check_personas(CORE)
    labels = strata(check)
    rng = np.random.default_rng(2)
    a = _symmetric(rng.random(171), 19)
    res = geometry.mantel(a, a, n_permutations=10_000, strata=labels)
    assert res["exact"] and res["n_permutations"] == 576  # 4! * 3! * 2! * 2!
    assert res["p"] == pytest.approx(1 / 576)  # only the identity reaches rho = 1


def test_mantel_bad_shapes_raise():
    with pytest.raises(ValueError, match="square"):
        geometry.mantel(np.zeros((3, 3)), np.zeros((4, 4)))


def test_cluster_partial_removes_a_shared_cluster_effect():
    names = CORE
    same_fine, same_macro = same_cluster_matrices(names)
    rng = np.random.default_rng(3)
    n = len(names)
    shared = 2.0 * (1.0 - same_fine) + (1.0 - same_macro)
    a = shared + 0.05 * _symmetric(rng.normal(size=n * (n - 1) // 2), n)
    b = shared + 0.05 * _symmetric(rng.normal(size=n * (n - 1) // 2), n)
    assert geometry.rsa(a, b) > 0.5  # the cluster indicators alone correlate them
    assert abs(geometry.cluster_partial_rho(a, b, same_fine, same_macro)) < 0.2


def test_radial_residual_removes_pure_outlierness():
    rng = np.random.default_rng(4)
    n = 12
    m = rng.random(n) * 3
    radial = m[:, None] + m[None, :]
    a = radial + 0.01 * _symmetric(rng.normal(size=n * (n - 1) // 2), n)
    b = radial + 0.01 * _symmetric(rng.normal(size=n * (n - 1) // 2), n)
    res = geometry.radial_residual_rho(a, b)
    assert geometry.rsa(a, b) > 0.95 and res["r2_a"] > 0.95
    assert abs(res["rho"]) < 0.4


def test_jackknife_and_matched_layers():
    rng = np.random.default_rng(5)
    a = _symmetric(rng.random(15), 6)
    jack = geometry.jackknife_rho(a, a)
    assert jack.shape == (6,) and np.allclose(jack, 1.0)
    assert [geometry.matched_layer(L, 28, 30) for L in (10, 15, 20, 25)] == [11, 16, 21, 27]


def test_cosine_distance_matrix_and_cluster_order():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    d = geometry.cosine_distance_matrix(x)
    np.testing.assert_allclose(d, [[0, 0, 1], [0, 0, 1], [1, 1, 0]], atol=1e-12)
    order = geometry.cluster_order(d)
    assert sorted(order.tolist()) == [0, 1, 2] and abs(int(np.flatnonzero(order == 0)[0]) - int(np.flatnonzero(order == 1)[0])) == 1


# ------------------------------------------------------------------------------------ personas


def test_persona_rig_is_seed_001s():
    assert len(PERSONAS) == 20 and list(PERSONAS)[-1] == ANCHOR and system_prompt(ANCHOR) == ""
    assert len(PROMPTS) == 20 and len(set(PROMPTS)) == 20
    same_fine, _ = same_cluster_matrices(CORE)
    assert int(np.triu(same_fine, 1).sum()) == 11  # seed 001: 11 within-fine-cluster pairs of 171
    assert sum(len(v) for v in FINE_CLUSTERS.values()) == 11


def test_unknown_or_repeated_persona_raises_one_clear_error():
    with pytest.raises(PersonaError, match="unknown persona 'astronaut'"):
        check_personas(["poet", "astronaut"])
    with pytest.raises(PersonaError, match="'poet' is listed more than once"):
        check_personas(["poet", "poet"])
