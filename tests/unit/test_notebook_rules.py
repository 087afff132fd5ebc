"""Notebooks are prose and calls: no ``def``/``class``, code cells of at most 20 lines (the parameters
cell excepted), and ``metrics.json`` written once, from a result dataclass's ``metrics()``.

Read from the jupytext ``.py`` sources (the paired ``.ipynb`` follows them), so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("[0-9]*.py"))
MAX_CELL_LINES = 20


def _code_cells(path: Path) -> list[tuple[int, list[str], str]]:
    notebook = jupytext.read(path)
    return [(i, cell.metadata.get("tags", []), cell.source) for i, cell in enumerate(notebook.cells)
            if cell.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_definitions_in_a_notebook(path: Path) -> None:
    found = [f"cell {i}: {type(node).__name__} {node.name}" for i, _, source in _code_cells(path)
             for node in ast.walk(ast.parse(source))
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert found == [], f"{path.name} defines logic; move it to persona_wm: {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_cells_are_short(path: Path) -> None:
    long = [f"cell {i}: {len(source.splitlines())} lines" for i, tags, source in _code_cells(path)
            if "parameters" not in tags and len(source.splitlines()) > MAX_CELL_LINES]
    assert long == [], f"{path.name} has code cells over {MAX_CELL_LINES} lines: {long}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_metrics_come_from_a_result_dataclass(path: Path) -> None:
    calls = [node for _, _, source in _code_cells(path) for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "write_metrics"]
    assert len(calls) == 1, f"{path.name} writes metrics.json {len(calls)} times"
    first = calls[0].args[0]
    assert isinstance(first, ast.Call) and isinstance(first.func, ast.Attribute) and first.func.attr == "metrics", (
        f"{path.name}: write_metrics(...) must be given <result>.metrics(), got {ast.unparse(first)}")
