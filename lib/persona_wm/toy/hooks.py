"""Hook names and the one batched forward pass every toy-model analysis runs.

Every toy study feeds contexts ``[B, L]`` (process tokens) to a HookedTransformer as ``[BOS, x_1, ...,
x_L]`` (BOS = ``n_tokens``, see :mod:`persona_wm.toy.train`), in batches, and reads back the next-token
distribution, the residual stream at some hooks, or both, sometimes with a hook that patches the
residual stream on the way. :func:`batched_forward` is that loop, written once; :func:`hook_name` is the
one place a hook-point string is spelled.

Numerics: logits are converted to float64 *before* the softmax (or log-softmax) and activations to
float64 as they leave the model; with ``final_only`` the final position is sliced first. Results do not
depend on anything but the batch size (which fixes how contexts are grouped into forward passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["hook_name", "residual_hooks", "final_hook", "model_inputs", "Patch", "add_at_final_position",
           "Forward", "batched_forward", "OUTPUTS"]

#: ``patch(rows, device)`` -> TransformerLens forward hooks ``[(hook name, fn), ...]`` for the batch ``rows``.
Patch = Callable[[slice, torch.device], list[tuple[str, Callable]]]
OUTPUTS = ("probs", "log_probs", None)


def hook_name(layer: int, site: str = "resid_post") -> str:
    """The TransformerLens name of hook point ``site`` in block ``layer``, e.g. ``blocks.1.hook_resid_post``."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"hook_name: layer must be a non-negative int, got {layer!r}")
    if not site or "." in site:
        raise ValueError(f"hook_name: site must be a hook suffix such as 'resid_post', got {site!r}")
    return f"blocks.{int(layer)}.hook_{site}"


def residual_hooks(model) -> list[str]:
    """Every residual-stream hook point in order: resid_pre of block 0, then each block's resid_post."""
    return [hook_name(0, "resid_pre")] + [hook_name(layer) for layer in range(model.cfg.n_layers)]


def final_hook(model) -> str:
    """The final layer's residual stream (the steering site of appendix A)."""
    return hook_name(model.cfg.n_layers - 1)


def model_inputs(tokens: np.ndarray, n_tokens: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[B, L]`` process tokens -> ``[B, L + 1]`` model input with BOS (= n_tokens) prepended."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=device)
    bos = torch.full((tokens.shape[0], 1), n_tokens, dtype=torch.long, device=device)
    return torch.cat([bos, tokens], dim=1)


def add_at_final_position(hook: str, vectors: np.ndarray) -> Patch:
    """A patch that adds ``vectors[i]`` (float32) to the residual at ``hook``, final position, of context i."""
    name = hook

    def patch(rows: slice, device: torch.device) -> list[tuple[str, Callable]]:
        add = torch.as_tensor(vectors[rows], dtype=torch.float32, device=device)

        def hook_fn(resid, hook=None):
            resid[:, -1, :] = resid[:, -1, :] + add
            return resid

        return [(name, hook_fn)]

    return patch


@dataclass(frozen=True)
class Forward:
    """What :func:`batched_forward` read back (float64 numpy arrays).

    ``probs``: next-token probabilities ``[B, L + 1, X]`` (``[B, X]`` with ``final_only``), or their logs
    when the forward was asked for ``"log_probs"``, or None. ``residuals``: hook name -> activations
    ``[B, L + 1, d]`` (``[B, d]`` with ``final_only``); position 0 is BOS.
    """

    probs: np.ndarray | None
    residuals: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def batched_forward(model, tokens: np.ndarray, n_tokens: int, *, batch: int = 2048, cache: Sequence[str] = (),
                    patch: Patch | None = None, output: str | None = "probs", final_only: bool = False) -> Forward:
    """Run ``model`` over contexts ``tokens [B, L]`` in batches of ``batch`` rows.

    ``cache``: hook names whose activations to return; ``patch``: forward hooks for each batch (see
    :data:`Patch`; with both, the cache sees the patched values of a hook point the patch writes);
    ``output``: ``"probs"``, ``"log_probs"`` or None (residuals only); ``final_only``: keep the final
    position only (the belief after the whole context).
    """
    if output not in OUTPUTS:
        raise ValueError(f"batched_forward: output must be one of {OUTPUTS}, got {output!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batched_forward: batch must be a positive int, got {batch!r}")
    names = list(dict.fromkeys(cache))  # each hook once, in the order given
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise ValueError(f"batched_forward: no hook point {unknown[0]!r} in the model; residual hooks: "
                         f"{residual_hooks(model)}")
    wanted = set(names)
    device = next(model.parameters()).device
    outputs: list[np.ndarray] = []
    acts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(tokens), batch):
        rows = slice(start, start + batch)
        inputs = model_inputs(tokens[rows], n_tokens, device)
        hooks = patch(rows, device) if patch is not None else []
        with model.hooks(fwd_hooks=hooks) if hooks else nullcontext():
            if names:
                logits, cached = model.run_with_cache(inputs, names_filter=lambda n: n in wanted)
            else:
                logits, cached = model(inputs), {}
        for name in names:
            act = cached[name][:, -1] if final_only else cached[name]
            acts[name].append(act.double().cpu().numpy())
        if output is not None:
            logits = logits[:, -1] if final_only else logits
            normalise = torch.softmax if output == "probs" else torch.log_softmax
            outputs.append(normalise(logits.double(), dim=-1).cpu().numpy())
    return Forward(np.concatenate(outputs) if output is not None else None,
                   {name: np.concatenate(chunks) for name, chunks in acts.items()})
