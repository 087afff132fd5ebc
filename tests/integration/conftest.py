"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama saved to a temporary directory and loaded by path, as a params file would name it
    (tests/integration/test_llm_models.py builds it; no model file is downloaded or converted)."""
    from persona_wm.llm import model as L
    from tests.integration.test_llm_models import _save_model

    directory = _save_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    return L.load_llm(model=str(directory), device="cpu", root=tmp_path_factory.mktemp("cache"))
