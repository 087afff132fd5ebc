"""Paths, parameter validation and atomic outputs, shared by the runner and the notebooks.

Why one module: the runner must reject a bad ``params/<study>/<name>.yaml`` *before* it spends
minutes executing a notebook, and it can only do that if it knows each notebook's parameters.
The notebook's ``parameters`` cell is the single source of truth for them (names, annotated
types and smoke defaults), so :func:`parameter_schema` reads that cell instead of keeping a
second copy of the schema somewhere that could drift.

Outputs (figures, ``metrics.json``) are written atomically so that a crash or a ``NaN`` never
leaves a half-written file behind, and ``metrics.json`` is canonical (sorted keys, rounded
floats) so that re-running a study produces byte-identical files and clean git diffs.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import tempfile
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

import lib

REPO_ROOT: Path = Path(lib.__file__).resolve().parents[1]

#: Injected by the runner, never read from a params file.
OUTPUT_DIR_PARAM = "output_dir"
#: Significant digits kept in metrics.json: far below any effect we report, far above float noise.
METRICS_SIGNIFICANT_DIGITS = 10
FIGURE_DPI = 120

# Annotations in a parameters cell are evaluated with these names only: enough for the values
# YAML can express, and nothing that could run code.
_ANNOTATION_NAMES: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "None": None,
}


class ParamsError(ValueError):
    """A params file or a parameters cell is invalid; the message names the file and the field."""


class MetricsError(ValueError):
    """A metrics value cannot be written canonically; the message names its key path."""


# --------------------------------------------------------------------------------------------
# Paths


def notebook_path(study: str, root: Path = REPO_ROOT) -> Path:
    """The jupytext ``.py`` source of a study: the file we read, since it is what gets reviewed."""
    return Path(root) / "notebooks" / f"{study}.py"


def params_path(study: str, name: str, root: Path = REPO_ROOT) -> Path:
    """Where the parameter set ``name`` (e.g. ``smoke``, ``default``) of a study lives."""
    return Path(root) / "params" / study / f"{name}.yaml"


def _display(path: Path, root: Path) -> str:
    """Repo-relative path for messages: short, and the same on every machine."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def resolve_output_dir(output_dir: str | Path | None, study: str, root: Path = REPO_ROOT) -> Path:
    """Where a notebook writes: the runner's directory, or a scratch dir for interactive runs.

    A notebook opened in JupyterLab has ``output_dir = None``; writing into ``outputs/`` from
    there would overwrite the committed results with smoke-sized ones, hence the scratch dir.
    """
    path = Path(root) / ".cache" / "scratch" / study if output_dir is None else Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Parameter schema, read from the notebook's `parameters` cell


def parameter_schema(study: str, root: Path = REPO_ROOT) -> dict[str, tuple[Any, Any]]:
    """Map each parameter of a study to ``(annotation, default)``, read from its notebook.

    The parameters cell is parsed, never executed: it must be plain assignments of literals so
    that papermill can override every one of them and the runner can type-check the overrides.
    """
    path = notebook_path(study, root)
    where = _display(path, root)
    source = _parameters_cell_source(path, where)
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ParamsError(f"{where}: parameters cell: invalid Python: {err.msg}") from None
    schema: dict[str, tuple[Any, Any]] = {}
    for stmt in tree.body:
        name, annotation, default = _parse_parameter(stmt, where)
        if name in schema:
            raise ParamsError(f"{where}: parameter '{name}' is assigned twice in the parameters cell")
        _check_value(default, annotation, f"{where}: parameter '{name}' default", name)
        schema[name] = (annotation, default)
    return schema


def _parameters_cell_source(path: Path, where: str) -> str:
    """The source of the one cell tagged ``parameters`` (papermill injects right after it)."""
    import jupytext  # imported lazily: notebooks import this module and need not pay for it

    if not path.is_file():
        raise ParamsError(f"{where}: no such notebook")
    notebook = jupytext.read(path)
    cells = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParamsError(
            f"{where}: expected exactly one cell tagged 'parameters' "
            f'(# %% tags=["parameters"]), found {len(cells)}'
        )
    return cells[0].source


def _parse_parameter(stmt: ast.stmt, where: str) -> tuple[str, Any, Any]:
    """``name: T = literal`` or ``name = literal`` -> (name, annotation, default)."""
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        name = stmt.target.id
        if stmt.value is None:
            raise ParamsError(f"{where}: parameter '{name}' has no default value")
        return name, _eval_annotation(stmt.annotation, name, where), _literal(stmt.value, name, where)
    if (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
    ):
        name = stmt.targets[0].id
        default = _literal(stmt.value, name, where)
        return name, _infer_annotation(default, name, where), default
    raise ParamsError(
        f"{where}: line {stmt.lineno} of the parameters cell: only `name: type = literal` "
        "assignments are allowed there (papermill overrides them one by one)"
    )


def _literal(node: ast.expr, name: str, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ParamsError(
            f"{where}: parameter '{name}': default `{ast.unparse(node)}` is not a literal; "
            "compute derived values in a later cell"
        ) from None


def _eval_annotation(node: ast.expr, name: str, where: str) -> Any:
    try:
        code = compile(ast.Expression(node), where, "eval")
        annotation = eval(code, {"__builtins__": {}}, dict(_ANNOTATION_NAMES))  # noqa: S307
    except Exception:
        raise ParamsError(
            f"{where}: parameter '{name}': unsupported annotation `{ast.unparse(node)}` "
            f"(use {', '.join(_ANNOTATION_NAMES)}, [] generics and | unions)"
        ) from None
    return type(None) if annotation is None else annotation


def _infer_annotation(default: Any, name: str, where: str) -> Any:
    """Type of an unannotated default; containers get their element type when it is uniform."""
    if default is None:
        raise ParamsError(
            f"{where}: parameter '{name}' defaults to None; annotate it, e.g. `{name}: int | None = None`"
        )
    if isinstance(default, list) and default and len({type(v) for v in default}) == 1:
        return list[type(default[0])]
    if isinstance(default, dict) and default and len({type(v) for v in default.values()}) == 1:
        return dict[str, type(next(iter(default.values())))]
    return type(default)


# --------------------------------------------------------------------------------------------
# Loading and validating a params file


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot: ``lr: 1e-3`` would silently be the
    string "1e-3" and fail much later inside a notebook.
    """


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping_no_duplicates(loader: _ParamsLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_ParamsLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def parse_yaml(text: str, where: str) -> Any:
    """Parse params YAML; a syntax error becomes one ParamsError with the file and line."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ParamsError(f"{where}: {line}invalid YAML: {problem}") from None


def load_params(study: str, name: str, root: Path = REPO_ROOT) -> dict[str, Any]:
    """Read and validate ``params/<study>/<name>.yaml`` against the notebook's parameters cell.

    Returns the values ready for papermill (ints promoted to float where a float is declared).
    Every check runs here, so a typo costs a second rather than a failed hour-long run.
    """
    path = params_path(study, name, root)
    where = _display(path, root)
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ParamsError(f"{where}: no such params file (available: {', '.join(available) or 'none'})")
    raw = parse_yaml(path.read_text(encoding="utf-8"), where)
    return validate_params(raw, parameter_schema(study, root), where)


def validate_params(raw: Any, schema: Mapping[str, tuple[Any, Any]], where: str) -> dict[str, Any]:
    """Check a parsed params mapping against a schema; ``where`` names the file in errors."""
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ParamsError(f"{where}: top level must be a mapping of parameter names to values, got {got}")
    expected = [k for k in schema if k != OUTPUT_DIR_PARAM]
    for key in raw:
        if key == OUTPUT_DIR_PARAM:
            raise ParamsError(f"{where}: field '{key}': set by the runner, remove it from the file")
        if key not in schema:
            raise ParamsError(f"{where}: unknown field '{key}' (valid fields: {', '.join(expected)})")
    missing = [k for k in expected if k not in raw]
    if missing:
        raise ParamsError(f"{where}: missing field '{missing[0]}'" + _also(missing[1:]))
    params = {key: _check_value(raw[key], schema[key][0], where, key) for key in expected}
    for key, value in params.items():
        if _holds_process_names(key):
            _check_process_names(value, where, key)
    return params


def _also(rest: list[str]) -> str:
    return f" (also missing: {', '.join(rest)})" if rest else ""


# --------------------------------------------------------------------------------------------
# Recursive type check


def _check_value(value: Any, annotation: Any, where: str, field: str) -> Any:
    """Return ``value`` (int promoted to float where declared) or raise naming the field.

    ``bool`` is rejected where ``int`` is declared although Python calls it an int: in a params
    file ``true`` for a seed is always a typo.
    """
    if annotation is Any or annotation is object:
        return value
    if isinstance(annotation, types.UnionType):
        return _check_union(value, annotation, where, field)
    origin = getattr(annotation, "__origin__", None)
    if origin is list:
        items = _expect(value, list, annotation, where, field)
        return [_check_value(v, annotation.__args__[0], where, f"{field}[{i}]") for i, v in enumerate(items)]
    if origin is tuple:
        return _check_tuple(value, annotation, where, field)
    if origin is dict:
        return _check_dict(value, annotation, where, field)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        _fail(value, annotation, where, field)
    if annotation is type(None):
        if value is not None:
            _fail(value, annotation, where, field)
        return None
    if isinstance(annotation, type):
        _expect(value, annotation, annotation, where, field)
        return list(value) if annotation is tuple else value
    raise ParamsError(f"{where}: field '{field}': unsupported annotation {_type_name(annotation)}")


def _expect(value: Any, kind: type, annotation: Any, where: str, field: str) -> Any:
    accepted = (list, tuple) if kind is tuple else kind
    if not isinstance(value, accepted):
        _fail(value, annotation, where, field)
    return value


def _check_union(value: Any, annotation: types.UnionType, where: str, field: str) -> Any:
    """First matching member wins; a container that matched in shape reports its inner error."""
    shape_errors: list[ParamsError] = []
    for member in annotation.__args__:
        try:
            return _check_value(value, member, where, field)
        except ParamsError as err:
            outer = getattr(member, "__origin__", member)
            if isinstance(outer, type) and outer in (list, dict, tuple) and isinstance(value, outer):
                shape_errors.append(err)
    if len(shape_errors) == 1:
        raise shape_errors[0]
    _fail(value, annotation, where, field)


def _check_tuple(value: Any, annotation: Any, where: str, field: str) -> list[Any]:
    """Tuples arrive from YAML as lists and go to papermill as lists (it cannot render tuples)."""
    items = list(_expect(value, tuple, annotation, where, field))
    args = annotation.__args__
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(items)
    if len(args) != len(items):
        raise ParamsError(
            f"{where}: field '{field}': expected {_type_name(annotation)} "
            f"({len(args)} items), got {len(items)} items ({value!r})"
        )
    return [_check_value(v, t, where, f"{field}[{i}]") for i, (v, t) in enumerate(zip(items, args))]


def _check_dict(value: Any, annotation: Any, where: str, field: str) -> dict[str, Any]:
    key_type, value_type = annotation.__args__
    checked = {}
    for key, item in _expect(value, dict, annotation, where, field).items():
        _check_value(key, key_type, where, f"{field} key {key!r}")
        checked[key] = _check_value(item, value_type, where, f"{field}[{key!r}]")
    return checked


def _fail(value: Any, annotation: Any, where: str, field: str) -> None:
    raise ParamsError(
        f"{where}: field '{field}': expected {_type_name(annotation)}, "
        f"got {type(value).__name__} ({value!r})"
    )


def _type_name(annotation: Any) -> str:
    """``list[int] | None`` rather than ``<class 'list'>``: messages mirror the notebook's code."""
    if annotation is type(None) or annotation is None:
        return "None"
    if isinstance(annotation, types.UnionType):
        return " | ".join(_type_name(a) for a in annotation.__args__)
    args = getattr(annotation, "__args__", None)
    if args is not None and getattr(annotation, "__origin__", None) is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{annotation.__origin__.__name__}[{inner}]"
    return getattr(annotation, "__name__", repr(annotation))


# --------------------------------------------------------------------------------------------
# Process names


def _holds_process_names(key: str) -> bool:
    """``process``, ``*_process``, ``processes``, ``*_processes`` name registered processes."""
    return key in ("process", "processes") or key.endswith(("_process", "_processes"))


def _process_validator() -> Callable[[str], Any]:
    """The registry lookup; imported late so that lib.report works without lib.processes."""
    from lib.processes import get_process

    return get_process


def _check_process_names(value: Any, where: str, field: str) -> None:
    if isinstance(value, Mapping):  # e.g. sweep_processes: {axis: [names]}
        for key, item in value.items():
            _check_process_names(item, where, f"{field}.{key}")
        return
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    get_process = _process_validator()
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        try:
            get_process(name)
        except (KeyError, ValueError) as err:
            reason = err.args[0] if err.args else type(err).__name__
            label = field if isinstance(value, str) else f"{field}[{i}]"
            raise ParamsError(f"{where}: field '{label}': invalid process name {name!r}: {reason}") from None


# --------------------------------------------------------------------------------------------
# Atomic outputs


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through a temp file in the same directory, then ``os.replace`` it into place.

    Same directory so the rename never crosses filesystems (where it would stop being atomic);
    readers see either the old file or the complete new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; returns the path."""
    data = text.encode("utf-8")
    return _atomic_write(Path(path), lambda handle: handle.write(data))


def save_figure(fig: Any, output_dir: str | Path, name: str) -> Path:
    """Save a matplotlib figure as ``output_dir/figures/<name>.png``, atomically.

    One dpi and ``bbox_inches='tight'`` for every study so figures look alike in reports.
    """
    stem = name.removesuffix(".png")
    if not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"figure name {name!r}: use a plain file stem such as 'belief_simplex'")
    path = Path(output_dir) / "figures" / f"{stem}.png"
    return _atomic_write(
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


def undefined_as_none(value: Any) -> Any:
    """Recursively replace non-finite floats (an undefined ratio, a CI from too few points) by None.

    ``write_metrics`` refuses NaN on purpose, so that an accidental NaN cannot slip into a result;
    a study calls this only on values it knows may legitimately be undefined, and they are then
    written as JSON null.
    """
    if isinstance(value, Mapping):
        return {k: undefined_as_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [undefined_as_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


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
