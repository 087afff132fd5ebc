"""Study outputs: figures and a canonical ``metrics.json``, written atomically.

``metrics.json`` is canonical (sorted keys, rounded floats) so that re-running a study produces
byte-identical files and clean git diffs; a ``NaN`` raises before the file is touched.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from persona_wm.core.files import atomic_write, atomic_write_text
from persona_wm.core.values import undefined_as_none  # re-exported: notebooks and io use it from here

__all__ = ["MetricsError", "save_figure", "write_metrics", "undefined_as_none", "read_metrics",
           "METRICS_SIGNIFICANT_DIGITS", "FIGURE_DPI"]

#: Significant digits kept in metrics.json: far below any effect we report, far above float noise.
METRICS_SIGNIFICANT_DIGITS = 10
FIGURE_DPI = 120


class MetricsError(ValueError):
    """A metrics value cannot be written canonically; the message names its key path."""


def save_figure(fig: Any, output_dir: str | Path, name: str) -> Path:
    """Save a matplotlib figure as ``output_dir/figures/<name>.png``, atomically.

    One dpi and ``bbox_inches='tight'`` for every study so figures look alike in reports.
    """
    stem = name.removesuffix(".png")
    if not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"figure name {name!r}: use a plain file stem such as 'belief_simplex'")
    path = Path(output_dir) / "figures" / f"{stem}.png"
    return atomic_write(
        path, lambda handle: fig.savefig(handle, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    )


def write_metrics(metrics: Mapping[str, Any], output_dir: str | Path) -> Path:
    """Write ``output_dir/metrics.json`` canonically and atomically; returns its path.

    Canonical = sorted keys, indent 2, floats rounded to 10 significant digits, numpy values
    converted: a rerun with the same seed gives the same bytes. Everything is converted before
    the file is touched, so a NaN raises and leaves the previous metrics.json intact.
    """
    text = json.dumps(_jsonable(metrics, "metrics"), sort_keys=True, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(Path(output_dir) / "metrics.json", text)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` (or the one inside a study's output directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonable(value: Any, key_path: str) -> Any:
    """Convert to plain JSON types, rounding floats; errors name the key path, e.g. metrics['r2'][3]."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, np.str_):
                key = str(key)
            if not isinstance(key, str):
                kind = type(key).__name__
                raise MetricsError(f"{key_path}: key {key!r} is a {kind}; metrics keys must be str")
            out[key] = _jsonable(item, f"{key_path}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{key_path}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _round_float(value, key_path)
    if hasattr(value, "tolist"):  # torch tensors and friends, without importing torch here
        return _jsonable(value.tolist(), key_path)
    raise MetricsError(f"{key_path}: cannot write a {type(value).__name__} to metrics.json")


def _round_float(value: float, key_path: str) -> float:
    if not math.isfinite(value):
        raise MetricsError(f"{key_path}: non-finite float {value} cannot go into metrics.json")
    return float(f"{value:.{METRICS_SIGNIFICANT_DIGITS}g}")
