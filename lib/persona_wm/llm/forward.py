"""Hooked forwards: the decoder stack, restarting a pass at a layer, residual capture, scored log-probs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch  # noqa: E402
import torch.nn as nn

from persona_wm.llm.base import LLM, LLMError
from persona_wm.llm.sequences import Scored, right_pad, scored_index, scored_tokens

__all__ = ["ForwardResult", "TokenScores", "decoder", "only_blocks", "unembed", "capture_residuals", "forward",
           "forward_from", "forward_tokens", "forward_from_tokens"]


# --------------------------------------------------------------------------------------------
# Hooked forwards


@dataclass
class ForwardResult:
    """Residual streams of the requested layers and log-probs at the scored positions.

    ``resid[l]``: [B, N, d] over the padded sequence; ``logprobs``: [B, T, V] (float32; rows past
    a sequence's own scored span are copies of its first scored position, masked out by ``mask``).
    """

    resid: dict[int, torch.Tensor]
    logprobs: torch.Tensor | None
    mask: torch.Tensor

    def scored_mean(self, layer: int, seqs: Sequence[Scored]) -> torch.Tensor:
        """[B, d] mean residual of one layer over each sequence's scored positions."""
        index, mask = scored_index(seqs)
        gathered = torch.take_along_dim(self.resid[layer], index[..., None], dim=1)
        weights = mask.to(gathered.dtype)[..., None]
        return (gathered * weights).sum(1) / weights.sum(1)


@dataclass
class TokenScores:
    """At the scored positions ([B, T] each, on CPU): the log-prob of the token that follows, whether it was the
    model's top (argmax) choice, and which positions are real (``mask``; padded ones hold token 0's values)."""

    logprob: torch.Tensor
    greedy: torch.Tensor
    mask: torch.Tensor


def decoder(model: Any) -> Any:
    """The decoder stack of a causal LM: the module that holds the blocks in ``.layers``.

    ``model.model`` for Llama, Qwen2, Gemma3 (text), Mistral, ...; ``model.get_decoder()`` or
    ``model.model.language_model`` for wrappers. Calling it with ``inputs_embeds`` runs the
    blocks and the final norm (the embedding, and Gemma's embedding scale, happen before:
    ``get_input_embeddings()``). Architectures without such a stack (GPT-2's ``transformer.h``)
    raise LLMError.
    """

    candidates = []
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates += [inner, getattr(inner, "language_model", None)]
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):
            candidates.append(get_decoder())
    for candidate in candidates:
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList) and len(candidate.layers):
            return candidate
    raise LLMError(f"{type(model).__name__}: no decoder stack with a `.layers` list of blocks (model.model.layers or "
                   "get_decoder().layers); persona_wm.llm.model reads and restarts the residual stream there (Llama, Qwen2, "
                   "Gemma3, Mistral and the like have one)")


@contextlib.contextmanager
def only_blocks(model: Any, start: int, stop: int | None = None) -> Iterator[Any]:
    """Temporarily keep decoder blocks ``start:stop`` only; yields the decoder stack.

    Models with per-layer attention types (Gemma3's sliding/full layers, Qwen2's optional sliding
    window) pick each block's mask and rotary table by its index in ``config.layer_types``, so
    that list is sliced the same way; otherwise a restarted block would get another block's mask.
    """

    inner = decoder(model)
    full = inner.layers
    config = inner.config
    types = getattr(config, "layer_types", None)
    inner.layers = nn.ModuleList(list(full)[start:stop])
    if types is not None:
        config.layer_types = list(types)[start:stop]
    try:
        yield inner
    finally:
        inner.layers = full
        if types is not None:
            config.layer_types = types


def unembed(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final (normed) hidden states, as the model's own forward computes them
    (``lm_head``, then Gemma's ``final_logit_softcapping`` where the config sets one)."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextlib.contextmanager
def capture_residuals(llm: LLM, layers: Sequence[int], store: dict[int, Any], append: bool = False) -> Iterator[None]:
    """Forward hooks that record the output of block l-1 (= layer l) for each requested layer
    (tensors stay on the model's device; callers move them)."""
    handles = []
    blocks = decoder(llm.model).layers
    for layer in sorted(set(layers)):
        if not 1 <= layer <= llm.n_layers:
            raise LLMError(f"layer {layer} out of range 1..{llm.n_layers}")

        def hook(_module: Any, _inputs: Any, output: Any, layer: int = layer) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if append:
                store.setdefault(layer, []).append(hidden.detach())
            else:
                store[layer] = hidden.detach()

        handles.append(blocks[layer - 1].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _logprobs_at(llm: LLM, final_hidden: torch.Tensor, seqs: Sequence[Scored], max_scored: int | None,
                 on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unembed only the scored positions (the 49k-wide unembedding is ~20% of a full forward); on CPU unless
    ``on_device`` (then where the model is)."""
    index, mask = scored_index(seqs, max_scored)
    gathered = torch.take_along_dim(final_hidden, index.to(final_hidden.device)[..., None], dim=1)
    lp = torch.log_softmax(unembed(llm.model, gathered).float(), dim=-1)
    return (lp if on_device else lp.cpu()), mask


def _token_scores_at(llm: LLM, final_hidden: torch.Tensor, seqs: Sequence[Scored], max_scored: int | None) -> TokenScores:
    """:func:`_logprobs_at` reduced where the model runs to the scored tokens' log-probs and argmax hits: only
    [B, T] values leave the device, not the [B, T, vocab] log-probs (the same operations in the same order as
    gathering on the host, so the numbers are those of the full log-probs)."""
    lp, mask = _logprobs_at(llm, final_hidden, seqs, max_scored, on_device=True)
    tokens = scored_tokens(seqs, lp.shape[1]).to(lp.device)
    token_lp = torch.take_along_dim(lp, tokens[..., None], dim=-1)[..., 0]
    return TokenScores(token_lp.cpu(), (lp.argmax(-1) == tokens).cpu(), mask)


@torch.inference_mode()
def forward_tokens(llm: LLM, seqs: Sequence[Scored], max_scored: int | None = None) -> TokenScores:
    """A teacher-forced pass scoring each sequence's own tokens (:class:`TokenScores`)."""
    if not seqs:
        raise LLMError("forward_tokens needs at least one sequence")
    return _token_scores_at(llm, _final_hidden(llm, seqs), seqs, max_scored)


def _final_hidden(llm: LLM, seqs: Sequence[Scored]) -> torch.Tensor:
    """Final (normed) hidden states of the right-padded ``seqs``, on the model's device."""
    ids = right_pad(seqs, llm.pad_id).to(llm.device)
    return decoder(llm.model)(input_ids=ids, use_cache=False).last_hidden_state


@torch.inference_mode()
def forward(
    llm: LLM,
    seqs: Sequence[Scored],
    layers: Sequence[int] = (),
    logprobs: bool = True,
    max_scored: int | None = None,
    logprobs_on_device: bool = False,
) -> ForwardResult:
    """One teacher-forced pass: every requested layer's residual at once, log-probs at scored positions.

    Runs on ``llm.device``; the residuals and log-probs come back on CPU (the log-probs stay on the model's device
    with ``logprobs_on_device``, for a caller that reduces them there).
    """
    if not seqs:
        raise LLMError("forward needs at least one sequence")
    store: dict[int, torch.Tensor] = {}
    with capture_residuals(llm, layers, store):
        hidden = _final_hidden(llm, seqs)
    if logprobs:
        lp, mask = _logprobs_at(llm, hidden, seqs, max_scored, logprobs_on_device)
    else:
        lp, mask = None, scored_index(seqs, max_scored)[1]
    return ForwardResult(resid={k: v.cpu() for k, v in store.items()}, logprobs=lp, mask=mask)


@contextlib.contextmanager
def _only_blocks(llm: LLM, start: int) -> Iterator[None]:
    """Temporarily keep decoder blocks start.. only (so the model runs from layer ``start`` on)."""
    with only_blocks(llm.model, start):
        yield


@torch.inference_mode()
def forward_from(
    llm: LLM,
    resid: torch.Tensor,
    layer: int,
    seqs: Sequence[Scored],
    add: torch.Tensor | None = None,
    max_scored: int | None = None,
    logprobs_on_device: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish a forward pass from the residual stream at ``layer``, optionally adding a vector.

    ``resid``: [B, N, d] as read by :func:`forward` at ``layer`` for the same ``seqs``; ``add``:
    [d] or [B, d], added at every position (steering). Returns (log-probs [B, T, V], mask) at the
    scored positions, on CPU, or where the model is with ``logprobs_on_device`` (``resid`` and ``add``
    may live anywhere: they are moved to ``llm.device``). Blocks before ``layer`` are not re-run, which is what makes a sweep of
    steering vectors at a late layer cheap; Hugging Face's own model code does the rest
    (rotary positions, causal mask, final norm), so the result equals a full hooked forward.
    """
    return _logprobs_at(llm, _finish_from(llm, resid, layer, add), seqs, max_scored, logprobs_on_device)


@torch.inference_mode()
def forward_from_tokens(llm: LLM, resid: torch.Tensor, layer: int, seqs: Sequence[Scored],
                        add: torch.Tensor | None = None, max_scored: int | None = None) -> TokenScores:
    """:func:`forward_from` scoring each sequence's own tokens (:class:`TokenScores`): for measures that read
    only those (mean token log-prob, greedy hits), without moving the [B, T, vocab] log-probs off the device."""
    return _token_scores_at(llm, _finish_from(llm, resid, layer, add), seqs, max_scored)


def _finish_from(llm: LLM, resid: torch.Tensor, layer: int, add: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states from the residual stream at ``layer`` (plus ``add``), on the model's device."""
    if not 0 <= layer <= llm.n_layers:
        raise LLMError(f"layer {layer} out of range 0..{llm.n_layers}")
    hidden = resid.to(llm.device)
    if add is not None:
        add = add.to(device=llm.device, dtype=resid.dtype)
        hidden = hidden + (add[:, None, :] if add.dim() == 2 else add)
    with only_blocks(llm.model, layer) as inner:
        return inner(inputs_embeds=hidden, use_cache=False).last_hidden_state
