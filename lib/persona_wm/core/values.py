"""Value conventions every layer shares (numpy only).

A study's result dataclass builds its ``metrics()`` dict below ``io`` (the studies layer cannot import
``persona_wm.io``), so the rule for legitimately undefined numbers lives here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["undefined_as_none"]


def undefined_as_none(value: Any) -> Any:
    """Recursively replace non-finite floats (an undefined ratio, a CI from too few points) by None.

    ``persona_wm.io.outputs.write_metrics`` refuses NaN on purpose, so that an accidental NaN cannot
    slip into a result; a study calls this only on values it knows may legitimately be undefined, and
    they are then written as JSON null. Mappings become dicts and tuples lists; other values pass through.
    """
    if isinstance(value, Mapping):
        return {k: undefined_as_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [undefined_as_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value
