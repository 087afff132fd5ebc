"""The disk cache of model outputs: keyed by the weights' identity, the kind's version and the exact inputs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch  # noqa: E402

from persona_wm.llm.base import CACHE_VERSION, KIND_VERSIONS, LLM

__all__ = ["device_key", "cache_path", "cached"]


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


def cache_path(llm: LLM, kind: str, key: Mapping[str, Any]) -> Path:
    """Where :func:`cached` keeps ``kind``'s value for ``key`` on ``llm`` (present or not)."""
    digest = _key_digest(kind, {"model_sha256": llm.sha256, **device_key(llm), **key})
    return llm.cache_dir / kind / f"{digest[:32]}.pt"


def cached(llm: LLM, kind: str, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return ``compute()``'s dict of tensors/lists, stored once under ``.cache/llm/<kind>/``.

    The key always includes the model's sha256, the kind's version (:data:`KIND_VERSIONS`, else
    :data:`CACHE_VERSION`) and, off CPU, the device
    type (:func:`device_key`); callers add the exact token ids and settings. Tensors are stored on CPU. A hit is loaded with ``torch.load(weights_only=True)`` and is
    bit-identical to what was computed; the write is atomic (temp file + rename).
    """
    path = cache_path(llm, kind, key)
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
