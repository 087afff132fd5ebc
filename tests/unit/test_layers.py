"""The package's imports run one way: each subpackage imports only from the layers below it.

    core  <-  analysis  <-  processes  <-  toy, llm  <-  plots  <-  studies  <-  io  <-  bench

``analysis`` (statistics, geometry) sits low because both toy and llm studies use it and it needs
nothing of ours; ``toy`` and ``llm`` never import each other. Inside a function only optional heavy
third-party dependencies may be imported (never a module of this package), and no module imports or reads
another's private (leading-underscore) names. The import graph is read from the source with ``ast``
(relative imports resolved), so the test needs no model files and imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lib" / "persona_wm"
RANK = {"core": 0, "analysis": 1, "processes": 2, "toy": 3, "llm": 3, "plots": 4, "studies": 5, "io": 6, "bench": 7}
#: Third-party modules a function may import lazily: heavy, and not needed by most callers.
LAZY_ALLOWED = {"transformers", "peft", "transformer_lens", "safetensors", "nbconvert", "papermill", "nbclient",
                "nbformat", "jupytext", "threadpoolctl", "sklearn", "pingouin", "statsmodels", "hmmlearn", "dask",
                "distributed", "latex2mathml"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def _absolute(importer: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of ``from ... import`` (a relative import resolved against the importer's package)."""
    if node.level == 0:
        return node.module
    package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported persona_wm module or third-party top name, line, inside a function)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
                module = _absolute(importer, path, node)
                names = [module]
                if module in {"persona_wm"} | {f"persona_wm.{k}" for k in RANK}:
                    names = [f"{module}.{a.name}" for a in node.names]  # from persona_wm.toy import train
            else:
                continue
            found += [(importer, name, node.lineno, id(node) in nested) for name in names]
    return found


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for importer, imported, _, _ in _imports():
        if imported.startswith("persona_wm."):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            graph.add_edge(importer, target)
    return graph


def test_package_has_every_layer() -> None:
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(RANK) - {"bench"}


def test_no_import_cycle() -> None:
    cycles = list(nx.simple_cycles(_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_imports_run_one_way() -> None:
    wrong = []
    for importer, imported, line, _ in _imports():
        if not imported.startswith("persona_wm.") or _layer(importer) == "package":
            continue
        src, dst = _layer(importer), _layer(imported)
        if src != dst and RANK[dst] >= RANK[src]:
            wrong.append(f"{importer}:{line} imports {imported} ({src} may not import {dst})")
    assert wrong == [], "\n".join(wrong)


def test_no_function_level_import_of_our_own_or_light_modules() -> None:
    lazy = [f"{importer}:{line} imports {imported} inside a function"
            for importer, imported, line, nested in _imports()
            if nested and (imported.startswith("persona_wm") or imported.split(".")[0] not in LAZY_ALLOWED)]
    assert lazy == [], "\n".join(lazy)


#: What the low layers may not import: no torch anywhere below toy/llm, and core/processes stay numpy-only.
HEAVY = {"core": {"torch", "transformers", "pandas"}, "analysis": {"torch", "transformers"},
         "processes": {"torch", "transformers", "pandas"}}


@pytest.mark.parametrize("layer", sorted(HEAVY))
def test_low_layers_need_no_torch(layer: str) -> None:
    heavy = [f"{importer}:{line} imports {imported}" for importer, imported, line, _ in _imports()
             if _layer(importer) == layer and imported.split(".")[0] in HEAVY[layer]]
    assert heavy == [], "\n".join(heavy)


def test_relative_imports_are_resolved() -> None:
    node = ast.parse("from ..core import ghmm").body[0]
    assert _absolute("persona_wm.toy.train", PACKAGE / "toy" / "train.py", node) == "persona_wm.core"
    node = ast.parse("from . import stats").body[0]
    assert _absolute("persona_wm.analysis", PACKAGE / "analysis" / "__init__.py", node) == "persona_wm.analysis"


def _private_uses(path: Path, source: str | None = None) -> list[str]:
    """``from persona_wm.x import _name`` and ``module._name`` where ``module`` is one of ours (dunders aside), in
    the module at ``path`` (its text, or ``source`` in its place)."""
    importer, modules = _module_name(path), {_module_name(p) for p in PACKAGE.rglob("*.py")}
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or node.level):
            source = _absolute(importer, path, node)
            if not source.startswith("persona_wm"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{importer}:{node.lineno} imports {alias.name} from {source}")
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("persona_wm")})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{importer}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules() -> None:
    """A leading underscore means "this module only": another module of the package never imports or reads it."""
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(path)]
    assert found == [], "\n".join(found)


def test_private_uses_are_found() -> None:
    source = ("from persona_wm.toy import train\nfrom persona_wm.core.files import _hidden\n"
              "import persona_wm.io.runner as runner\nx = train._cache_path, runner._swap, train.__name__\n")
    found = _private_uses(PACKAGE / "studies" / "example.py", source)
    assert found == ["persona_wm.studies.example:2 imports _hidden from persona_wm.core.files",
                     "persona_wm.studies.example:4 uses persona_wm.toy.train._cache_path",
                     "persona_wm.studies.example:4 uses persona_wm.io.runner._swap"]


def test_progress_bars_are_plain_tqdm() -> None:
    """``tqdm.auto`` in a kernel without ipywidgets warns ("IProgress not found") on every study run; plain tqdm
    writes text bars to stderr, which the runner shows on the terminal and keeps out of the reports."""
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "tqdm.auto" in line]
    assert found == [], found
