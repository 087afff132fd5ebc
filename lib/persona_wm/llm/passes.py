"""Persona passes (one shared response teacher-forced under many system prompts), cached generation, timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch  # noqa: E402

from persona_wm.llm.base import LLM, LLMError
from persona_wm.llm.cache import cache_path, cached
from persona_wm.llm.divergence import pairwise_js
from persona_wm.llm.forward import forward
from persona_wm.llm.generation import Decoding, generate
from persona_wm.llm.sequences import Scored, chat_prompt_ids, right_pad, scored_sequence

__all__ = ["persona_pass", "persona_logprobs", "cached_generate", "store_generated", "has_generated", "time_forward_overhead"]


# --------------------------------------------------------------------------------------------
# Persona passes: one shared response, teacher-forced under many system prompts


def persona_pass(
    llm: LLM,
    systems: Sequence[str],
    user: str,
    response: Sequence[int],
    short_tokens: int,
    anchor: int | None = None,
    anchor_layers: Sequence[int] = (),
    anchor_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher-force one response under every system prompt; read all layers in one pass (cached).

    Returns, for the P system prompts, what the studies read and nothing more (the 120 entries of a 05a
    default run take 0.16 GB; with full-vocabulary target log-probs and every layer of the anchor's
    residual, as before cache version 2, they took 0.92 GB):

    * ``means`` [P, n_layers, d]: residual mean over the scored positions (the positions that
      predict the response tokens: the assistant header's last token and every response token but
      the last), for every layer 1..n_layers;
    * ``js`` / ``js_short`` [P, P]: exact JS (nats, full vocabulary) between the personas'
      next-token distributions, averaged over all scored positions / the first ``short_tokens``;
    * with ``anchor`` given: ``anchor_ids`` and ``anchor_start`` (the anchor's sequence) and, with
      ``anchor_layers``, ``anchor_resid`` [len(anchor_layers), N, d] (``anchor_layers`` beside it): the
      anchor's residual stream at those layers over the prompt and its first ``anchor_tokens`` scored
      positions (all when None), from which steered passes restart (:func:`forward_from`).

    The genuine persona log-probs that steering is scored against are not stored (``[P, T, V]``
    floats per prompt): :func:`persona_logprobs` recomputes them bit-identically when needed.
    """

    seqs = [scored_sequence(chat_prompt_ids(llm, s, user), response) for s in systems]
    layers = list(range(1, llm.n_layers + 1))
    kept = sorted({int(layer) for layer in anchor_layers}) if anchor is not None else []
    for layer in kept:
        if not 1 <= layer <= llm.n_layers:
            raise LLMError(f"anchor layer {layer} out of range 1..{llm.n_layers}")
    key = {"ids": [list(s.ids) for s in seqs], "starts": [s.start for s in seqs], "short_tokens": short_tokens,
           "anchor": anchor, "anchor_layers": kept, "anchor_tokens": anchor_tokens if kept else None}

    def compute() -> dict[str, torch.Tensor]:
        res = forward(llm, seqs, layers=layers, logprobs_on_device=True)  # reduced to JS where they are
        means = torch.stack([res.scored_mean(layer, seqs) for layer in layers], dim=1)
        mask = res.mask[0]  # one shared response: every row has the same scored span
        by_position = pairwise_js(res.logprobs, mask)  # on the GPU when the model is there; [P, P, T] on the CPU
        t = int(mask.sum())
        out = {
            "means": means,
            "js": by_position[..., :t].mean(-1),
            "js_short": by_position[..., : min(short_tokens, t)].mean(-1),
        }
        if anchor is not None:
            seq = seqs[anchor]
            out["anchor_ids"] = torch.tensor(seq.ids)
            out["anchor_start"] = torch.tensor(seq.start)
            if kept:
                end = len(seq.ids) if anchor_tokens is None else seq.start + min(anchor_tokens, seq.n_scored)
                out["anchor_resid"] = torch.stack([res.resid[layer][anchor, :end] for layer in kept]).clone()
                out["anchor_layers"] = torch.tensor(kept)
        return out

    return cached(llm, "persona_pass", key, compute)


def persona_logprobs(llm: LLM, systems: Sequence[str], user: str, response: Sequence[int], tokens: int) -> torch.Tensor:
    """[P, T, V] float16: the next-token log-probs under every system prompt at the first ``tokens`` scored
    positions of the shared ``response`` (T = min(tokens, response length)).

    The same batch as :func:`persona_pass` (every system prompt, right-padded alike), so the values are
    bit-identical to the ones a persona pass reads; not cached (T x 49k floats per persona and prompt).
    """
    seqs = [scored_sequence(chat_prompt_ids(llm, s, user), response) for s in systems]
    return forward(llm, seqs, max_scored=tokens).logprobs[:, :tokens].to(torch.float16)


def _generate_key(prompts: Sequence[Sequence[int]], decoding: Decoding, capture_layer: int | None) -> dict[str, Any]:
    return {"prompts": [list(map(int, p)) for p in prompts], "decoding": decoding.as_dict(),
            "capture_layer": capture_layer}


def store_generated(llm: LLM, prompts: Sequence[Sequence[int]], decoding: Decoding,
                    responses: Sequence[Sequence[int]]) -> None:
    """Put responses drawn elsewhere (a stack of adapters in one batch) where :func:`cached_generate` finds them."""
    if len(responses) != len(prompts) * decoding.n_samples:
        raise LLMError(f"store_generated: {len(responses)} responses for {len(prompts)} prompts x "
                       f"{decoding.n_samples} samples")
    stored = [list(map(int, r)) for r in responses]
    cached(llm, "generate", _generate_key(prompts, decoding, None), lambda: {"responses": stored})


def has_generated(llm: LLM, prompts: Sequence[Sequence[int]], decoding: Decoding) -> bool:
    """Whether :func:`cached_generate` would find these responses on disk."""
    return cache_path(llm, "generate", _generate_key(prompts, decoding, None)).is_file()


def cached_generate(
    llm: LLM,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    capture_layer: int | None = None,
) -> tuple[list[list[int]], torch.Tensor | None]:
    """:func:`generate`, cached on disk by model hash, prompt ids, decoding settings and layer."""
    key = _generate_key(prompts, decoding, capture_layer)

    def compute() -> dict[str, Any]:
        responses, means = generate(llm, prompts, decoding, capture_layer)
        out: dict[str, Any] = {"responses": responses}
        if means is not None:
            out["means"] = means
        return out

    out = cached(llm, "generate", key, compute)
    return [list(r) for r in out["responses"]], out.get("means")


def time_forward_overhead(llm: LLM, seqs: Sequence[Scored], layers: Sequence[int], repeats: int = 3) -> dict[str, float]:
    """Median wall time of our hooked forward vs a bare transformers forward on the same batch.

    Bare = ``model(input_ids).logits.log_softmax(-1)`` (no hooks, unembedding at every position);
    ours = :func:`forward` reading every requested layer and log-probs at the scored positions (no
    cache involved); unhooked = the same :func:`forward` without hooks. ``ratio`` = ours / bare
    (the study's overhead budget), ``hook_ratio`` = ours / unhooked (the hooks alone).
    """

    ids = right_pad(seqs, llm.pad_id).to(llm.device)
    n_tokens = int(ids.numel())
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"bare": [], "hooked": [], "unhooked": []}
    runs = {
        "bare": lambda: llm.model(input_ids=ids, use_cache=False).logits.log_softmax(-1),
        "hooked": lambda: forward(llm, seqs, layers=layers),
        "unhooked": lambda: forward(llm, seqs, layers=()),
    }
    with torch.inference_mode():
        llm.model(input_ids=ids, use_cache=False)  # warm-up (allocator, thread pool)
        for _ in range(repeats):
            for name, run in runs.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
    med = {name: float(sorted(t)[len(t) // 2]) for name, t in times.items()}
    return {"bare_s": med["bare"], "hooked_s": med["hooked"], "unhooked_s": med["unhooked"],
            "ratio": med["hooked"] / med["bare"], "hook_ratio": med["hooked"] / med["unhooked"],
            "n_tokens": n_tokens}
