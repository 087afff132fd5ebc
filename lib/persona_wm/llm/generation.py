"""Generation: greedy or sampled decoding, batched and seeded, optionally capturing one layer's residual."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch  # noqa: E402

from persona_wm.llm.base import LLM, LLMError
from persona_wm.llm.forward import capture_residuals

__all__ = ["Decoding", "generate", "generate_batch", "hash_seed"]


# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Decoding:
    """Decoding settings: greedy (``temperature=None``) or sampled.

    A 135M model loops under plain greedy decoding, hence the repetition penalty (Hugging Face's:
    divides positive logits of every token already in the prompt or response by the penalty).
    Sampled decoding (issue 14: rates come from samples, not one greedy output) draws ``n_samples``
    completions per prompt at ``temperature`` from the full distribution (no top-k / top-p), seeded
    by ``seed``; the responses come back prompt-major (all samples of prompt 0 first).
    """

    max_new_tokens: int
    repetition_penalty: float = 1.0
    temperature: float | None = None
    n_samples: int = 1
    seed: int = 0
    batch: int = 64
    #: Set by :func:`persona_wm.llm.stacked_lora.sample_stacked`: the responses were drawn for a group of adapters
    #: in one batch (another random stream than one model's), so they are cached under this group's digest and
    #: :func:`generate` refuses to draw them again one model at a time.
    group: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LLMError(f"Decoding.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and not self.temperature > 0:
            raise LLMError(f"Decoding.temperature must be > 0 (or None for greedy), got {self.temperature}")
        if self.n_samples < 1 or (self.temperature is None and self.n_samples != 1):
            raise LLMError(f"Decoding.n_samples must be 1 for greedy decoding and >= 1 when sampling, got "
                           f"{self.n_samples}")
        if self.batch < 1:
            raise LLMError(f"Decoding.batch must be >= 1, got {self.batch}")

    @property
    def sampled(self) -> bool:
        return self.temperature is not None

    def as_dict(self) -> dict[str, Any]:
        # greedy keys stay what they always were (cache keys of committed runs); batch is not part
        # of the result for greedy decoding (one batch), but it sets the sampling streams
        group = {} if self.group is None else {"group": self.group}
        if not self.sampled:
            return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                    "do_sample": False, **group}
        return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                "do_sample": True, "temperature": self.temperature, "n_samples": self.n_samples, "seed": self.seed,
                "batch": self.batch, **group}


@torch.inference_mode()
def generate(
    llm: LLM,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    capture_layer: int | None = None,
) -> tuple[list[list[int]], torch.Tensor | None]:
    """Responses (token ids, cut after the first end-of-turn token, which is kept).

    Greedy: one response per prompt, all prompts in one batch. Sampled: ``n_samples`` per prompt,
    prompt-major, in batches of ``decoding.batch`` rows, batch ``k`` seeded with ``(seed, k)``.

    With ``capture_layer`` (greedy only), also returns [B, d]: each response's mean residual at that
    layer over the positions that predict its tokens (the last prompt token and every response token
    but the last), read from the KV-cached decoding steps themselves, so no second pass is needed.
    Runs on ``llm.device``; the means come back on CPU.
    """
    if not prompts:
        raise LLMError("generate needs at least one prompt")
    if decoding.group is not None:
        raise LLMError(f"generate: decoding group {decoding.group[:12]} was drawn for a stack of adapters at once "
                       "(persona_wm.llm.stacked_lora.sample_stacked); its cache entry is missing, so run that call "
                       "again rather than drawing another stream one model at a time")
    if decoding.sampled:
        if capture_layer is not None:
            raise LLMError("capture_layer is for greedy decoding only")
        rows = [p for p in prompts for _ in range(decoding.n_samples)]
        out: list[list[int]] = []
        for k, start in enumerate(range(0, len(rows), decoding.batch)):
            torch.manual_seed(hash_seed(decoding.seed, k))
            out += generate_batch(llm, rows[start:start + decoding.batch], decoding, None)[0]
        return out, None
    return generate_batch(llm, prompts, decoding, capture_layer)


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across runs and machines, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generate_batch(llm: LLM, prompts: Sequence[Sequence[int]], decoding: Decoding,
                    capture_layer: int | None) -> tuple[list[list[int]], torch.Tensor | None]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), llm.pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(list(p))
        attention[i, n - len(p):] = 1
    ids, attention = ids.to(llm.device), attention.to(llm.device)
    steps: dict[int, list[torch.Tensor]] = {}
    ctx = capture_residuals(llm, [capture_layer], steps, append=True) if capture_layer is not None else contextlib.nullcontext()
    sampling = ({"do_sample": True, "temperature": float(decoding.temperature), "top_k": 0, "top_p": 1.0}
                if decoding.sampled else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    with ctx:
        out = llm.model.generate(
            input_ids=ids, attention_mask=attention, num_beams=1, max_new_tokens=decoding.max_new_tokens,
            repetition_penalty=decoding.repetition_penalty, pad_token_id=llm.pad_id, eos_token_id=llm.eos_id,
            **sampling,
        )
    responses = []
    for row in out[:, n:].tolist():
        cut = row.index(llm.eos_id) + 1 if llm.eos_id in row else len(row)
        responses.append(row[:cut])
    if capture_layer is None:
        return responses, None
    calls = steps[capture_layer]
    # call 0 = prefill (last prompt position predicts response token 0); call k = response token k-1
    per_position = torch.stack([calls[0][:, -1]] + [c[:, -1] for c in calls[1:]], dim=1).cpu()  # [B, K, d]
    lengths = torch.tensor([len(r) for r in responses])
    mask = (torch.arange(per_position.shape[1])[None, :] < lengths[:, None]).to(per_position.dtype)
    means = (per_position * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return responses, means
