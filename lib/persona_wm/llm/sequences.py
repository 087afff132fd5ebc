"""Chat prompts and scored sequences (prompt ids + the span a measure scores)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch  # noqa: E402

from persona_wm.llm.base import LLM, LLMError, first_line

__all__ = ["PLAIN_TEMPLATE", "with_plain_template", "chat_prompt_ids", "encode", "Scored", "scored_sequence", "right_pad", "scored_index",
           "scored_tokens"]


# --------------------------------------------------------------------------------------------
# Chat prompts and scored sequences


def chat_prompt_ids(llm: LLM, system: str, user: str) -> list[int]:
    """Token ids of a chat prompt (system + user turn) up to the start of the assistant's turn.

    Rendered by the tokenizer's own chat template (for SmolLM2, ChatML up to and including
    ``<|im_start|>assistant\\n``). ``system`` is always given (``""`` = a literal empty system turn):
    without a system message SmolLM2's template inserts its default one, which would make "no
    persona" a persona. A tokenizer without a chat template (a base model such as the Gemma-3-270M
    GGUF) raises LLMError rather than falling back to a made-up plain format: the persona studies
    compare system prompts, and a format the model was never trained on would measure the format.
    """
    if not getattr(llm.tokenizer, "chat_template", None):
        raise LLMError(f"{llm.name}: the tokenizer has no chat template (none in {llm.snapshot}); persona prompts need "
                       "one: use an instruct/chat model, or add chat_template.jinja to the model directory")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:
        raise LLMError(f"{llm.name}: its chat template cannot render a system + user prompt: "
                       f"{type(err).__name__}: {first_line(err)}") from None
    return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])


#: A plain-text transcript for base models (no chat template): the system text (if any) as a preamble, then
#: "User: ..." and "Assistant:" lines. Chosen explicitly (study 05a's ``prompt_format: plain``), never a fallback.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if m['content'] %}{{ m['content'] }}\n\n{% endif %}"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def with_plain_template(llm: LLM) -> LLM:
    """A copy of ``llm`` whose tokenizer renders :data:`PLAIN_TEMPLATE` (the original tokenizer is untouched).

    For a base model, which was never trained on a chat format: persona prompts become a plain preamble. Cache
    keys hold the exact token ids, so entries of the two formats never mix.
    """
    tokenizer = copy.copy(llm.tokenizer)
    tokenizer.chat_template = PLAIN_TEMPLATE
    return dataclasses.replace(llm, tokenizer=tokenizer)


def encode(llm: LLM, text: str) -> list[int]:
    """Plain token ids of a text fragment (no special tokens)."""
    return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Scored:
    """A token sequence whose last ``len(ids) - start`` tokens are scored.

    The next-token distributions that predict the scored tokens sit at positions
    ``start - 1 .. len(ids) - 2``; those are the "scored positions" for log-probs *and*
    activations, so representation and behaviour are read at exactly the same places.
    """

    ids: tuple[int, ...]
    start: int

    def __post_init__(self) -> None:
        if not 1 <= self.start < len(self.ids):
            raise LLMError(f"scored span must start inside the sequence (start={self.start}, length={len(self.ids)})")

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.start


def scored_sequence(prompt_ids: Sequence[int], scored_ids: Sequence[int], max_scored: int | None = None) -> Scored:
    """Prompt followed by the tokens to score (truncated to ``max_scored``)."""
    scored = list(scored_ids)[: max_scored if max_scored is not None else None]
    if not scored:
        raise LLMError("nothing to score: the response is empty")
    return Scored(tuple(int(t) for t in prompt_ids) + tuple(int(t) for t in scored), len(prompt_ids))


def right_pad(seqs: Sequence[Scored], pad_id: int) -> torch.Tensor:
    n = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
    return ids


def scored_index(seqs: Sequence[Scored], max_scored: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index [B, T] of scored positions (clamped where padded) and their validity mask."""
    counts = [s.n_scored if max_scored is None else min(s.n_scored, max_scored) for s in seqs]
    t = max(counts)
    offsets = torch.arange(t)
    starts = torch.tensor([s.start - 1 for s in seqs])
    mask = offsets[None, :] < torch.tensor(counts)[:, None]
    index = torch.where(mask, starts[:, None] + offsets[None, :], starts[:, None])
    return index, mask


def scored_tokens(seqs: Sequence[Scored], t: int) -> torch.Tensor:
    """[B, t] the tokens each scored position predicts (the first ``t`` of each sequence's scored span; 0 where
    padded), aligned with :func:`scored_index`."""
    out = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = min(s.n_scored, t)
        out[i, :n] = torch.tensor(s.ids[s.start: s.start + n])
    return out
