"""Representational vs behavioural geometry of personas: JS divergence, RSA and its controls.

Seed 001 asks whether the cosine geometry of persona centroids predicts the Jensen-Shannon
geometry of persona-conditioned next-token distributions, and guards the answer with controls
against the obvious confounds. Each control is one function here:

* the JS matrices themselves are computed in torch by :mod:`persona_wm.llm.divergence` (this layer needs no torch);
* :func:`rsa` - Spearman rho between the upper triangles (scipy);
* :func:`mantel` - one-sided permutation test of that rho; with ``strata`` labels are permuted only
  within strata (seed 001's within-cluster null). No maintained library fits (scikit-bio's
  ``mantel`` has no stratified null and would add a heavy dependency), so it is vectorised numpy:
  Spearman is Pearson on ranks, and permuting persona labels permutes the ranked pair values, so
  every permutation costs one gather. When the stratified null has fewer distinct permutations
  than asked (4!*3!*2!*2! = 576 for seed 001's clusters), all of them are enumerated: exact p;
* :func:`cluster_partial_rho` - Spearman partial correlation given same-fine-cluster and
  same-macro-cluster indicators (pingouin.partial_corr);
* :func:`radial_residual_rho` - "outlier-ness" control: each matrix's pair values are regressed on
  the sum of the two personas' mean distance to everyone else, and the residuals are correlated;
* :func:`jackknife_rho` - leave-one-persona-out rho.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

__all__ = [
    "cosine_distance_matrix",
    "upper",
    "rsa",
    "mantel",
    "cluster_partial_rho",
    "radial_residual_rho",
    "jackknife_rho",
    "matched_layer",
    "GATES",
    "layer_statistics",
    "cluster_order",
    "decoupled_pairs",
    "relative_layers",
    "PromptGram",
    "crossed_rsa",
]


# --------------------------------------------------------------------------------------------
# Matrices and RSA


def cosine_distance_matrix(vectors: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between rows ([n, d] -> [n, n], zero diagonal)."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    d = 1.0 - x @ x.T
    np.fill_diagonal(d, 0.0)
    return d


def upper(matrix: np.ndarray) -> np.ndarray:
    """Upper triangle (k=1) as a vector, in row-major pair order."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {m.shape}")
    return m[np.triu_indices(m.shape[0], k=1)]


def rsa(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho between the upper triangles of two [n, n] matrices."""
    return float(sps.spearmanr(upper(a), upper(b)).statistic)


def _ranked_square(matrix: np.ndarray) -> np.ndarray:
    """Matrix whose off-diagonal entries are the average ranks of its upper triangle (symmetric)."""
    n = matrix.shape[0]
    iu = np.triu_indices(n, k=1)
    ranks = np.zeros((n, n))
    ranks[iu] = sps.rankdata(matrix[iu])
    return ranks + ranks.T


def _permutations(n: int, strata: Sequence[int] | None, n_permutations: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Rows of label permutations; (perms, exact). Exact enumeration when the group is small."""
    groups = [np.arange(n)] if strata is None else [
        np.flatnonzero(np.asarray(strata) == s) for s in dict.fromkeys(strata)]
    n_distinct = math.prod(math.factorial(len(g)) for g in groups)
    if n_distinct <= n_permutations:
        perms = []
        for combo in itertools.product(*(itertools.permutations(g) for g in groups)):
            perm = np.arange(n)
            for g, image in zip(groups, combo):
                perm[g] = image
            perms.append(perm)
        return np.array(perms), True
    perms = np.tile(np.arange(n), (n_permutations, 1))
    for g in groups:
        if len(g) > 1:
            perms[:, g] = g[rng.permuted(np.tile(np.arange(len(g)), (n_permutations, 1)), axis=1)]
    return perms, False


def mantel(a: np.ndarray, b: np.ndarray, n_permutations: int = 10_000, seed: int = 0,
           strata: Sequence[int] | None = None, chunk: int = 20_000) -> dict[str, float]:
    """One-sided (upper-tail) Mantel test of Spearman rho between two symmetric matrices.

    Random permutations: p = (1 + #{rho_perm >= rho}) / (1 + B) (the identity counted once, as in
    seed 001). Exact enumeration (small stratified groups): p = #{rho_perm >= rho} / #perms, the
    identity being one of them. Returns rho, p, the number of permutations and whether exact.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[0]
    if a.shape != b.shape or a.shape != (n, n):
        raise ValueError(f"mantel: need two square matrices of one shape, got {a.shape} and {b.shape}")
    if strata is not None and len(strata) != n:
        raise ValueError(f"mantel: {len(strata)} strata labels for {n} items")
    rng = np.random.default_rng(seed)
    ra, rb = _ranked_square(a), _ranked_square(b)
    iu, ju = np.triu_indices(n, k=1)
    y = rb[iu, ju]
    y = (y - y.mean()) / np.linalg.norm(y - y.mean())
    x = ra[iu, ju]
    x0 = x - x.mean()
    rho = float(x0 @ y / np.linalg.norm(x0))
    perms, exact = _permutations(n, strata, n_permutations, rng)
    hits = 0
    for c0 in range(0, len(perms), chunk):
        p = perms[c0:c0 + chunk]
        xp = ra[p[:, iu], p[:, ju]]  # [B, pairs]: permuting labels permutes the ranked pair values
        xp = xp - xp.mean(1, keepdims=True)
        hits += int((xp @ y / np.linalg.norm(xp, axis=1) >= rho - 1e-12).sum())
    if exact:
        p_value = hits / len(perms)
    else:
        p_value = (1 + hits) / (1 + len(perms))
    return {"rho": rho, "p": float(p_value), "n_permutations": int(len(perms)), "exact": bool(exact)}


def cluster_partial_rho(a: np.ndarray, b: np.ndarray, same_fine: np.ndarray, same_macro: np.ndarray) -> float:
    """Spearman partial rho between two matrices given both same-cluster indicators (pingouin).

    Covariates that are constant over the pairs (e.g. no within-cluster pair survives a subset)
    are dropped, since a partial correlation on a constant is undefined.
    """
    import pingouin as pg

    frame = pd.DataFrame({"a": upper(a), "b": upper(b), "fine": upper(same_fine), "macro": upper(same_macro)})
    covar = [c for c in ("fine", "macro") if frame[c].nunique() > 1]
    if not covar:
        return rsa(a, b)
    return float(pg.partial_corr(frame, x="a", y="b", covar=covar, method="spearman")["r"].iloc[0])


def _radial_residual(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """Residuals of pair values after OLS on m_i + m_j (m = mean distance to the others), and R²."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    marginal = m.sum(1) / (n - 1)
    iu, ju = np.triu_indices(n, k=1)
    y = m[iu, ju]
    design = np.column_stack([np.ones_like(y), marginal[iu] + marginal[ju]])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    r2 = 1.0 - resid.var() / y.var() if y.var() > 0 else float("nan")
    return resid, float(r2)


def radial_residual_rho(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman rho of the radial residuals of both matrices, with each matrix's radial R²."""
    ra, r2a = _radial_residual(a)
    rb, r2b = _radial_residual(b)
    return {"rho": float(sps.spearmanr(ra, rb).statistic), "r2_a": r2a, "r2_b": r2b}


def jackknife_rho(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Leave-one-item-out Spearman rho: [n] values (item k dropped from both matrices)."""
    n = np.asarray(a).shape[0]
    keep = [np.delete(np.arange(n), k) for k in range(n)]
    return np.array([rsa(a[np.ix_(idx, idx)], b[np.ix_(idx, idx)]) for idx in keep])


def matched_layer(seed_layer: int, seed_n_layers: int, n_layers: int) -> int:
    """Layer of the same relative depth: round(seed_layer * n_layers / seed_n_layers)."""
    return int(round(seed_layer * n_layers / seed_n_layers))


# --------------------------------------------------------------------------------------------
# Everything per layer, seed 001's gates, and the pairs where the geometries disagree

#: Seed 001's six gates (all must pass at its confirmatory layer for the headline to stand).
GATES: dict[str, tuple[str, str, float]] = {
    "raw_rho": ("rho", ">", 0.5),
    "mantel": ("mantel_p", "<", 0.001),
    "cluster_partial": ("partial_rho", ">", 0.4),
    "radial_residual": ("radial_residual_rho", ">", 0.2),
    "per_prompt_median": ("per_prompt_median_rho", ">=", 0.2),
    "short_ratio": ("short_ratio", ">=", 0.3),
}


def _gate(value: float, op: str, threshold: float) -> bool:
    if value is None or not np.isfinite(value):
        return False
    return bool(value > threshold if op == ">" else value < threshold if op == "<" else value >= threshold)


def layer_statistics(
    centroids: np.ndarray,
    layers: Sequence[int],
    js: np.ndarray,
    js_short: np.ndarray,
    js_per_prompt: np.ndarray,
    strata_labels: Sequence[int],
    same_fine: np.ndarray,
    same_macro: np.ndarray,
    n_permutations: int,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[int, dict[str, np.ndarray]]]:
    """Seed 001's whole signature at every layer, on the non-anchor personas.

    ``centroids`` [P, n_layers, d] (layer l at index l-1); ``js``/``js_short`` [P, P];
    ``js_per_prompt`` [n_prompts, P, P]. Returns one row per layer (rho, rho of mean-centred
    centroids (a robustness check, not one of seed 001's statistics), Mantel p, stratified p,
    partial rho, radial residual rho and R², per-prompt rho median/min, short-window rho and ratio,
    jackknife median/min/max, cosine-distance spread, the six gates) and, per layer, the arrays
    behind the summaries (per-prompt rhos, jackknife rhos, cosine matrix).
    """

    rows, detail = [], {}
    for layer in tqdm(layers, desc="statistics by layer", leave=False):
        cos = cosine_distance_matrix(centroids[:, layer - 1])
        rho = rsa(cos, js)
        # robustness: remove the direction all personas share before taking cosines
        centred = centroids[:, layer - 1] - centroids[:, layer - 1].mean(0, keepdims=True)
        test = mantel(cos, js, n_permutations, seed=seed * 1000 + layer)
        strat = mantel(cos, js, n_permutations, seed=seed * 1000 + layer, strata=strata_labels)
        radial = radial_residual_rho(cos, js)
        per_prompt = np.array([rsa(cos, m) for m in js_per_prompt])
        rho_short = rsa(cos, js_short)
        jack = jackknife_rho(cos, js)
        row = {
            "layer": layer,
            "rho": rho,
            "centred_rho": rsa(cosine_distance_matrix(centred), js),
            "mantel_p": test["p"],
            "stratified_p": strat["p"],
            "stratified_exact": strat["exact"],
            "stratified_n_permutations": strat["n_permutations"],
            "partial_rho": cluster_partial_rho(cos, js, same_fine, same_macro),
            "radial_residual_rho": radial["rho"],
            "radial_r2_cos": radial["r2_a"],
            "radial_r2_js": radial["r2_b"],
            "per_prompt_median_rho": float(np.median(per_prompt)),
            "per_prompt_min_rho": float(per_prompt.min()),
            "short_rho": rho_short,
            "short_ratio": rho_short / rho if rho != 0 else float("nan"),
            "jackknife_median": float(np.median(jack)),
            "jackknife_min": float(jack.min()),
            "jackknife_max": float(jack.max()),
            "cos_distance_std": float(upper(cos).std()),
        }
        for gate, (column, op, threshold) in GATES.items():
            row[f"gate_{gate}"] = _gate(row[column], op, threshold)
        row["all_gates"] = all(row[f"gate_{g}"] for g in GATES)
        rows.append(row)
        detail[layer] = {"per_prompt": per_prompt, "jackknife": jack, "cos": cos}
    return pd.DataFrame(rows), detail


def cluster_order(distance: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage hierarchical clustering (seed 001's heatmap ordering)."""
    d = np.asarray(distance, dtype=np.float64)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return leaves_list(linkage(squareform(np.clip(d, 0, None), checks=False), method="average"))


def decoupled_pairs(cos: np.ndarray, js: np.ndarray, names: Sequence[str], k: int = 5) -> pd.DataFrame:
    """Pairs whose JS is largest relative to their cosine distance after the radial control.

    Score = z(JS radial residual) - z(cosine radial residual) (seed 001's Result 3 in spirit:
    behaviour much further apart than representation predicts, beyond outlier-ness).
    """
    rc, _ = _radial_residual(cos)
    rj, _ = _radial_residual(js)
    score = (rj - rj.mean()) / rj.std() - (rc - rc.mean()) / rc.std()
    iu, ju = np.triu_indices(len(names), k=1)
    cos_rank = sps.rankdata(upper(cos))
    js_rank = sps.rankdata(upper(js))
    order = np.argsort(-score)[:k]
    return pd.DataFrame({
        "pair": [f"({names[iu[i]]}, {names[ju[i]]})" for i in order],
        "decoupling (z)": score[order],
        "1 - cos": upper(cos)[order],
        "cos rank": cos_rank[order].astype(int),
        "JS (nats)": upper(js)[order],
        "JS rank": js_rank[order].astype(int),
    })


# --------------------------------------------------------------------------------------------
# Layers by relative depth


def relative_layers(fractions: Sequence[float] | None, n_layers: int) -> list[int]:
    """Layers (1-based, residual stream after l blocks) at relative depths ``fractions`` of an ``n_layers`` model.

    ``f`` -> ``max(1, round(f * n_layers))`` (Python's round: halves to even), repeats dropped, in increasing
    order; ``None`` = every layer. A fraction outside (0, 1] raises ValueError naming it.
    """
    if fractions is None:
        return list(range(1, n_layers + 1))
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"relative depth {f!r} is outside (0, 1]")
    return sorted({max(1, round(f * n_layers)) for f in fractions})


# --------------------------------------------------------------------------------------------
# Crossed (two-way) bootstrap of RSA rho: user prompts x system prompts


@dataclass(frozen=True)
class PromptGram:
    """Everything a resampled RSA rho needs from one condition, precomputed once.

    ``gram[u * U + v, l, p, q]`` = <m[u, p, l], m[v, q, l]> for per-prompt centroids ``m`` [U, P, L, d] (user
    prompt u, system prompt p, layer l), so the centroid Gram matrix of any multiset of user prompts with counts
    ``w`` is ``(w x w) . gram / |w|^2`` (one matrix-vector product) without touching the d-dimensional vectors
    again; ``js`` [U, P, P] per user prompt.
    """

    gram: np.ndarray
    js: np.ndarray

    @classmethod
    def of(cls, means: np.ndarray, js: np.ndarray) -> PromptGram:
        m = np.asarray(means, dtype=np.float64)
        n_u, n_p, n_l, _ = m.shape
        gram = np.empty((n_u, n_u, n_l, n_p, n_p))
        for k in range(n_l):
            flat = m[:, :, k].reshape(n_u * n_p, -1)
            gram[:, :, k] = (flat @ flat.T).reshape(n_u, n_p, n_u, n_p).transpose(0, 2, 1, 3)
        return cls(gram.reshape(n_u * n_u, n_l, n_p, n_p), np.asarray(js, dtype=np.float64))

    def matrices(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cosine distance [L, P, P] of the weighted-mean centroids and the weighted-mean JS [P, P]."""
        w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        g = np.tensordot(np.outer(w, w).reshape(-1), self.gram, axes=(0, 0))  # [L, P, P]
        norm = np.sqrt(np.einsum("lpp->lp", g))
        cos = 1.0 - g / (norm[:, :, None] * norm[:, None, :])
        return cos, np.tensordot(w, self.js, axes=(0, 0))


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of every row of ``x`` [L, K] with ``y`` [K] (Pearson on scipy's average ranks)."""
    rx = sps.rankdata(x, axis=-1)
    ry = sps.rankdata(y)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean()
    return (rx @ ry) / np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum())


def crossed_rsa(grams: Sequence[PromptGram], users: np.ndarray, systems: np.ndarray) -> np.ndarray:
    """RSA rho [C, L] of each condition for one draw of user prompts and system prompts (index arrays).

    The system prompts are matched across conditions (index p is persona p, its length-matched formatting
    control, its topic control), so one draw of ``systems`` applies to every condition. A system prompt drawn
    twice gives a pair of identical items; such self-pairs are left out (the usual RSA bootstrap over
    conditions), every other pair of draws counts, duplicates included.
    """
    n_u = grams[0].js.shape[0]
    counts = np.bincount(np.asarray(users, dtype=int), minlength=n_u)
    s = np.asarray(systems, dtype=int)
    a, b = np.triu_indices(len(s), k=1)
    keep = s[a] != s[b]
    i, j = s[a[keep]], s[b[keep]]
    out = []
    for g in grams:
        cos, js = g.matrices(counts)
        out.append(_spearman_rows(cos[:, i, j], js[i, j]))
    return np.stack(out)
