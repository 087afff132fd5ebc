"""Exact Jensen-Shannon divergence (nats) between next-token distributions over a full vocabulary, in torch.

* :func:`js_divergence` - elementwise JS of two log-prob tensors along the vocabulary axis;
* :func:`pairwise_js` - per-position JS between every pair of rows, chunked over the vocabulary so a
  [20, T, 49152] tensor never needs pairwise copies in memory.

Moved here from ``analysis.geometry`` (issue 27) so that the analysis layer needs no torch; the code is unchanged.
"""

from __future__ import annotations

import math

import torch

__all__ = ["js_divergence", "pairwise_js"]


_LOGP_FLOOR = -80.0  # exp(-80) = 1.8e-35: keeps 0 * log 0 out of the sums, changes JS by < 1e-29


def _probs(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, log p) in float32 with log p floored at -80 so that p > 0 everywhere."""
    logp = logp.float().clamp_min(_LOGP_FLOOR)
    return logp.exp(), logp


def _s_log_s_sum(s: torch.Tensor) -> torch.Tensor:
    """sum s log s over the last axis (s > 0), in place on ``s``'s log; float64 result."""
    out = torch.log(s)
    out.mul_(s)
    return out.sum(-1, dtype=torch.float64)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Elementwise JS(p_i || q_i) in nats along the last (vocabulary) axis of two log-prob tensors.

    Uses H(m) = -1/2 sum s log s + (log 2)/2 sum s with s = p + q = 2m, and
    JS = H(m) - (H(p) + H(q)) / 2; every sum is accumulated in float64 so differences of
    ~1e-4 nats survive entropies of a few nats. Exact over the whole vocabulary.
    """
    if logp.shape != logq.shape:
        raise ValueError(f"js_divergence: shapes differ, {tuple(logp.shape)} vs {tuple(logq.shape)}")
    total = torch.zeros(logp.shape[:-1], dtype=torch.float64, device=logp.device)  # summed where the inputs are
    for v0 in range(0, logp.shape[-1], chunk):
        p, lp = _probs(logp[..., v0:v0 + chunk])
        q, lq = _probs(logq[..., v0:v0 + chunk])
        h_p = -(p * lp).sum(-1, dtype=torch.float64)
        h_q = -(q * lq).sum(-1, dtype=torch.float64)
        mass = p.sum(-1, dtype=torch.float64) + q.sum(-1, dtype=torch.float64)
        s = p.add_(q)
        h_m = -0.5 * _s_log_s_sum(s) + 0.5 * math.log(2.0) * mass
        total += h_m - 0.5 * (h_p + h_q)
    return total.clamp_min(0.0)


def pairwise_js(logp: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
    """Per-position JS between every pair of rows: logp [n, T, V] -> [n, n, T] (float64, symmetric, on the CPU).

    Positions where ``mask`` ([T] bool) is False are skipped and returned as 0. Row entropies are
    computed once; the pair term sum (p_i + p_j) log(p_i + p_j) is computed one position and one
    vocabulary chunk at a time, so the working set (pairs x chunk floats) stays in cache - about
    3x faster on a 2-core CPU than one big broadcast. The sums run where ``logp`` is: on a GPU, one position at a
    time over the whole vocabulary, with nothing moved back until the end (a CPU accumulator made every chunk a
    device round trip, and the CPU path on the GPU host's few threads was most of 05a's time there).
    """
    device = logp.device
    n, t, v = logp.shape
    chunk = chunk if device.type == "cpu" else v
    iu, ju = torch.triu_indices(n, n, offset=1, device=device)
    p, lp = _probs(logp)
    h_rows = -(p * lp).sum(-1, dtype=torch.float64)  # [n, T]
    mass = p.sum(-1, dtype=torch.float64)  # [n, T] (1 up to float32 rounding)
    s_log_s = torch.zeros((len(iu), t), dtype=torch.float64, device=device)
    positions = range(t) if mask is None else [k for k in range(t) if bool(mask[k])]
    for k in positions:
        pk = p[:, k].contiguous()
        for v0 in range(0, v, chunk):
            block = pk[:, v0:v0 + chunk]
            s = block.index_select(0, iu)
            s.add_(block.index_select(0, ju))
            s_log_s[:, k] += _s_log_s_sum(s)
    h_mix = -0.5 * s_log_s + 0.5 * math.log(2.0) * (mass[iu] + mass[ju])
    js = (h_mix - 0.5 * (h_rows[iu] + h_rows[ju])).clamp_min(0.0)
    out = torch.zeros((n, n, t), dtype=torch.float64, device=device)
    out[iu, ju] = js
    out[ju, iu] = js
    if mask is not None:
        out = out * mask.to(device=device, dtype=torch.float64)
    return out.cpu()
