"""persona_wm.core.values: the undefined-number convention the study result dataclasses use."""

from __future__ import annotations

import numpy as np

from persona_wm.core.values import undefined_as_none


def test_undefined_as_none_replaces_only_non_finite_floats() -> None:
    value = {"a": float("nan"), "b": (1.0, np.float64("inf"), 2), "c": {"d": np.float32("-inf"), "e": "x"},
             "f": [np.float64(0.5), None, True]}
    assert undefined_as_none(value) == {"a": None, "b": [1.0, None, 2], "c": {"d": None, "e": "x"},
                                        "f": [0.5, None, True]}


def test_undefined_as_none_agrees_with_the_io_layer() -> None:
    from persona_wm.io.outputs import undefined_as_none as io_version

    value = {"x": [float("nan"), 1.5, {"y": np.inf, "z": np.float64(2.0)}], "w": (np.nan, "s")}
    assert undefined_as_none(value) == io_version(value)
