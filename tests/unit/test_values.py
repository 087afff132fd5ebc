"""persona_wm.core.values: the undefined-number convention the study result dataclasses use."""

from __future__ import annotations

import numpy as np

from persona_wm.core.values import undefined_as_none


def test_undefined_as_none_replaces_only_non_finite_floats() -> None:
    value = {"a": float("nan"), "b": (1.0, np.float64("inf"), 2), "c": {"d": np.float32("-inf"), "e": "x"},
             "f": [np.float64(0.5), None, True]}
    assert undefined_as_none(value) == {"a": None, "b": [1.0, None, 2], "c": {"d": None, "e": "x"},
                                        "f": [0.5, None, True]}


def test_io_layer_reexports_the_one_definition() -> None:
    from persona_wm.io import outputs

    assert outputs.undefined_as_none is undefined_as_none  # one definition, no copy to drift
