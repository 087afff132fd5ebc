"""A tiny random Llama standing in for SmolLM2 in the LoRA unit tests (tests/unit/test_llm_finetune.py,
tests/unit/test_stacked_lora.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from persona_wm.llm.model import LLM


def tiny_llama(cache: Path) -> LLM:
    """Seeded: every call gives the same weights; ``cache`` is its cache folder (adapters and passes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return LLM(model=model, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=1), name="tiny",
               weights=cache / "none", sha256="0" * 64, cache_dir=cache, snapshot=cache)
