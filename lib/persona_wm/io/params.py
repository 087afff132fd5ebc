"""Paths of studies and parameter validation, shared by the runner and the notebooks.

Why one module: the runner must reject a bad ``params/<study>/<name>.yaml`` *before* it spends
minutes executing a notebook, and it can only do that if it knows each notebook's parameters.
The notebook's ``parameters`` cell is the single source of truth for them (names, annotated
types, smoke defaults, and value rules written as trailing comments such as ``# >= 1`` -- the
grammar is documented above :func:`parse_rule_comment`), so :func:`parameter_schema` reads that
cell instead of keeping a second copy of the schema somewhere that could drift.

Outputs (figures, ``metrics.json``) are written by :mod:`persona_wm.io.outputs`.
"""

from __future__ import annotations

import ast
import io
import math
import operator
import os
import re
import tokenize
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.ghmm import ProcessError
from persona_wm.processes import get_process

#: Injected by the runner, never read from a params file.
OUTPUT_DIR_PARAM = "output_dir"
#: A params file is a page of YAML; anything larger is a mistake (or an attack on the parser).
MAX_PARAMS_BYTES = 1_000_000

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


# --------------------------------------------------------------------------------------------
# Paths


def notebook_path(study: str, root: Path = REPO_ROOT) -> Path:
    """The jupytext ``.py`` source of a study: the file we read, since it is what gets reviewed."""
    return Path(root) / "notebooks" / f"{study}.py"


def params_path(study: str, name: str, root: Path = REPO_ROOT) -> Path:
    """Where the parameter set ``name`` (e.g. ``smoke``, ``default``) of a study lives.

    ``name`` is a file name inside ``params/<study>/`` (``smoke`` or ``smoke.yaml``), never a path:
    a separator, ``..``, an absolute path, or a link that resolves outside that folder raises
    ParamsError, so ``--params`` cannot run a study with a file nobody reviewed next to it.
    """
    folder = Path(root) / "params" / study
    stem = name.removesuffix(".yaml")
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    refused = (
        not stem.strip()
        or any(sep in name for sep in separators)
        or ".." in name
        or "\0" in name
        or Path(name).is_absolute()
    )
    path = folder / f"{stem}.yaml"
    if not refused:
        try:
            path.resolve().relative_to(folder.resolve())
        except (ValueError, OSError, RuntimeError):
            refused = True
    if refused:
        raise ParamsError(
            f"{display_path(folder, root)}/: --params {name!r} is not a name inside that folder (give a file name "
            f"such as 'default'; path separators, '..' and absolute paths are refused; "
            f"available: {', '.join(_available_params(folder)) or 'none'})"
        )
    return path


def _available_params(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())


def display_path(path: Path, root: Path) -> str:
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


def parameter_schema(study: str, root: Path = REPO_ROOT) -> dict[str, Parameter]:
    """Map each parameter of a study to ``Parameter(annotation, default, rules)``, read from its notebook.

    The parameters cell is parsed, never executed: it must be plain assignments of literals so
    that papermill can override every one of them and the runner can type-check the overrides.
    Value rules come from the trailing comments (see :func:`parse_rule_comment`); the cell's own
    defaults must satisfy them, so a notebook cannot ship smoke values its rules reject.
    """
    path = notebook_path(study, root)
    where = display_path(path, root)
    source = _parameters_cell_source(path, where)
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ParamsError(f"{where}: parameters cell: invalid Python: {err.msg}") from None
    comments = _trailing_comments(source)
    schema: dict[str, Parameter] = {}
    for stmt in tree.body:
        name, annotation, default = _parse_parameter(stmt, where)
        if name in schema:
            raise ParamsError(f"{where}: parameter '{name}' is assigned twice in the parameters cell")
        _check_value(default, annotation, f"{where}: parameter '{name}' default", name)
        rules: tuple[Rule, ...] = ()
        for line in dict.fromkeys((stmt.lineno, stmt.end_lineno or stmt.lineno)):
            try:
                rules += parse_rule_comment(comments.get(line, "")) or ()
            except RuleSyntaxError as err:
                raise ParamsError(f"{where}: parameter '{name}': {err}{_PROSE_HINT}") from None
        schema[name] = Parameter(annotation, default, rules)
    for name, parameter in schema.items():
        for rule in parameter.rules:
            problem = _rule_misfit(rule, parameter.annotation, schema)
            if problem:
                raise ParamsError(f"{where}: parameter '{name}': rule '{rule.text}': {problem}{_PROSE_HINT}")
    defaults = {name: parameter.default for name, parameter in schema.items()}
    _check_params_values(defaults, schema, f"{where} (parameters cell defaults)")
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
# Value rules, declared in the parameters cell as trailing comments
#
#     n_samples: int = 2                  # >= 1; <= 10_000
#     mixing: float = 0.25                # in [0, 1]
#     device: str = "cpu"                 # one of: cpu, cuda, auto
#     train_steps: dict[str, int] = {...} # keys = processes; each >= 1
#     layers: list[int] = [6, 11]         # non-empty; each >= 1; each <= 30 when model is null
#     torch_threads: int = 1              # threads
#     seed: int = 0                       # >= 0  # prose after a second '#' is ignored
#
# A trailing comment is read as rules when it starts with a rule (a comparison or one of the words
# in, one of, non-empty, len, each, keys, contains, threads); any other comment is prose. A rule
# comment must parse completely: a typo fails loudly when the schema is read, never silently.
# Clauses are separated by ';' and all must hold:
#
#     >= B, > B, <= B, < B   the number compares with B (a number such as 1e-3 or 10_000, or the
#                            name of another numeric parameter)
#     in [A, B], in (A, B]   the number lies in the interval; '(' / ')' exclude the end
#     in NAME                the value is an element of the list parameter NAME
#     one of: a, b, c        the value is one of these literals (bare words are strings)
#     non-empty              the list, dict or string has at least one item
#     len >= B (etc.)        the list, dict or string has that many items
#     contains X             the list holds the literal X
#     keys = NAME            the dict's keys are exactly the items of the list parameter NAME
#     threads                an int in 1..os.cpu_count() of the machine that runs it
#     each RULE              RULE holds for every item of a list (every value of a dict)
#     RULE when NAME is X    RULE applies only while parameter NAME equals X (null for None)
#
# Every parameter also gets two automatic rules: floats are finite (no .nan/.inf) and no list holds
# the same item twice. A None value of an optional parameter skips its rules.


class RuleSyntaxError(ValueError):
    """A rule comment in a parameters cell cannot be parsed; the message quotes the clause."""


@dataclass(frozen=True)
class _Ref:
    """A rule bound that names another parameter (e.g. ``< n_prompts``)."""

    name: str


@dataclass(frozen=True)
class Rule:
    """One ``;``-separated clause of a rule comment, e.g. ``each >= 1``."""

    text: str  # as written, quoted in error messages
    op: str  # ">=", ">", "<=", "<", "interval", "in", "one of", "non-empty", "len", "contains", "keys", "threads"
    args: tuple[Any, ...] = ()
    depth: int = 0  # number of leading `each`
    when: tuple[str, Any] | None = None


class Parameter(NamedTuple):
    """One parameter of a study: annotation, default (the smoke value) and value rules."""

    annotation: Any
    default: Any
    rules: tuple[Rule, ...] = ()


_PROSE_HINT = " (a trailing comment that starts with a rule word is read as rules; write prose after a second '#')"
_RULE_START = re.compile(r"(?:>=|<=|>|<|(?:in|one of|non-empty|len|each|keys|contains|threads)(?![\w-]))")
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NUMBER_KINDS = (int, float)
_SIZED_KINDS = (list, tuple, dict, str)
_SCALAR_KINDS = (int, float, str, bool)
_RULE_NEEDS: dict[str, tuple[tuple[type, ...], str]] = {
    ">=": (_NUMBER_KINDS, "a number"),
    ">": (_NUMBER_KINDS, "a number"),
    "<=": (_NUMBER_KINDS, "a number"),
    "<": (_NUMBER_KINDS, "a number"),
    "interval": (_NUMBER_KINDS, "a number"),
    "threads": ((int,), "an int"),
    "in": (_SCALAR_KINDS, "a single value"),
    "one of": (_SCALAR_KINDS, "a single value"),
    "non-empty": (_SIZED_KINDS, "a list, dict or string"),
    "len": (_SIZED_KINDS, "a list, dict or string"),
    "contains": ((list, tuple), "a list"),
    "keys": ((dict,), "a dict"),
}


def _trailing_comments(source: str) -> dict[int, str]:
    """Line number -> text of the comment that ends a line holding code (full-line comments are prose)."""
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and tok.line[: tok.start[1]].strip():
                comments[tok.start[0]] = tok.string
    except (tokenize.TokenError, SyntaxError):  # ast.parse accepted the cell, so this cannot happen
        pass
    return comments


def parse_rule_comment(comment: str) -> tuple[Rule, ...] | None:
    """The rules of a trailing comment, or None when the comment is prose (see the grammar above)."""
    text = comment.strip().removeprefix("#").split("#", 1)[0].strip()
    if not _RULE_START.match(text):
        return None
    clauses = [clause.strip() for clause in text.split(";")]
    return tuple(_parse_clause(clause) for clause in clauses if clause)


def _parse_clause(text: str) -> Rule:
    body, when = text, None
    if match := re.fullmatch(r"(.+?)\s+when\s+([A-Za-z_]\w*)\s+is\s+(.+)", text):
        body, when = match[1], (match[2], _word_literal(match[3]))
    depth = 0
    while match := re.fullmatch(r"each\s+(.+)", body):
        depth, body = depth + 1, match[1]
    op, args = _parse_body(body, text)
    return Rule(text, op, args, depth, when)


def _parse_body(body: str, text: str) -> tuple[str, tuple[Any, ...]]:
    if match := re.fullmatch(r"(>=|<=|>|<)\s*(\S.*)", body):
        return match[1], (_bound(match[2], text),)
    if match := re.fullmatch(r"len\s*(>=|<=|>|<)\s*(\S.*)", body):
        return "len", (match[1], _bound(match[2], text))
    if match := re.fullmatch(r"in\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])", body):
        return "interval", (_bound(match[2], text), _bound(match[3], text), match[1] == "[", match[4] == "]")
    if match := re.fullmatch(r"in\s+([A-Za-z_]\w*)", body):
        return "in", (match[1],)
    if match := re.fullmatch(r"one of:\s*(\S.*)", body):
        items = [item.strip() for item in match[1].split(",")]
        if all(items):
            return "one of", tuple(_word_literal(item) for item in items)
    if body == "non-empty":
        return "non-empty", ()
    if match := re.fullmatch(r"contains\s+(\S.*)", body):
        return "contains", (_word_literal(match[1]),)
    if match := re.fullmatch(r"keys\s*=\s*([A-Za-z_]\w*)", body):
        return "keys", (match[1],)
    if body == "threads":
        return "threads", ()
    raise RuleSyntaxError(
        f"cannot read rule '{text}' (rules: >= B, > B, <= B, < B, in [A, B], in NAME, one of: a, b, "
        "non-empty, len >= B, contains X, keys = NAME, threads, each RULE, RULE when NAME is X; "
        "';' between rules, prose after a second '#')"
    )


def _bound(text: str, clause: str) -> Any:
    text = text.strip()
    if re.fullmatch(r"[A-Za-z_]\w*", text):
        return _Ref(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, bool) or not isinstance(value, _NUMBER_KINDS) or not math.isfinite(value):
        raise RuleSyntaxError(f"rule '{clause}': bound '{text}' is neither a finite number nor a parameter name")
    return value


def _word_literal(text: str) -> Any:
    """A literal in a rule: null/None, true/false, numbers and quoted strings; a bare word is a string."""
    text = text.strip()
    special = {"null": None, "None": None, "true": True, "True": True, "false": False, "False": False}
    if text in special:
        return special[text]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (*_SCALAR_KINDS, type(None))) else text


def _rule_misfit(rule: Rule, annotation: Any, schema: Mapping[str, Parameter]) -> str | None:
    """Why ``rule`` cannot apply to a parameter of this annotation (or name a real parameter), or None."""
    inner = annotation
    for _ in range(rule.depth):
        inner = _element_annotation(inner)
        if inner is None:
            return f"'each' needs a list or dict, but the parameter is {_type_name(annotation)}"
    kinds, wanted = _RULE_NEEDS[rule.op]
    if not _annotation_allows(inner, kinds):
        return f"needs {wanted}, but it applies to {_type_name(inner)}"
    refs = [arg.name for arg in rule.args if isinstance(arg, _Ref)]
    if rule.op in ("in", "keys"):
        refs.append(rule.args[0])
    if rule.when is not None:
        refs.append(rule.when[0])
    for ref in refs:
        if ref not in schema or ref == OUTPUT_DIR_PARAM:
            return f"'{ref}' is not a parameter of this notebook"
    for arg in rule.args:
        if isinstance(arg, _Ref) and not _annotation_allows(schema[arg.name].annotation, _NUMBER_KINDS):
            return f"bound '{arg.name}' is not a numeric parameter"
    if rule.op in ("in", "keys") and not _annotation_allows(schema[rule.args[0]].annotation, (list, tuple)):
        return f"'{rule.args[0]}' is not a list parameter"
    return None


def _members(annotation: Any) -> list[Any]:
    """Union members other than None (an optional parameter's rules apply to its value)."""
    if isinstance(annotation, types.UnionType):
        return [m for m in annotation.__args__ if m is not type(None)]
    return [annotation]


def _annotation_allows(annotation: Any, kinds: tuple[type, ...]) -> bool:
    for member in _members(annotation):
        if member is Any or member is object:
            return True
        origin = getattr(member, "__origin__", member)
        if isinstance(origin, type) and issubclass(origin, kinds):
            return True
    return False


def _element_annotation(annotation: Any) -> Any:
    """``list[T]`` / ``tuple[T, ...]`` -> T; ``dict[K, V]`` -> V; None for anything else."""
    members = _members(annotation)
    if len(members) != 1:
        return None
    member = members[0]
    origin, args = getattr(member, "__origin__", None), getattr(member, "__args__", ())
    if origin in (list, tuple) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _check_params_values(params: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """Automatic rules (finite floats, no repeated list items), then each parameter's declared rules."""
    for key, value in params.items():
        _check_automatic(value, where, key)
    for key, value in params.items():
        entry = schema[key]
        for rule in entry[2] if len(entry) > 2 else ():
            _check_rule(rule, value, params, where, key)


def _check_automatic(value: Any, where: str, field: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{where}: field '{field}': value {value!r} breaks rule 'finite' (floats must be finite)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_automatic(item, where, f"{field}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_automatic(item, where, f"{field}[{i}]")
        first: dict[Any, int] = {}
        for i, item in enumerate(value):
            key = _hashable(item)
            if key in first:
                raise ParamsError(
                    f"{where}: field '{field}': value {_short(value)} breaks rule 'no duplicates' "
                    f"(items {first[key]} and {i} are both {_short(item)})"
                )
            first[key] = i


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("dict", tuple((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_hashable(v) for v in value))
    return (type(value).__name__, value)


def _check_rule(rule: Rule, value: Any, params: Mapping[str, Any], where: str, field: str) -> None:
    if rule.when is not None and not _same(params.get(rule.when[0]), rule.when[1]):
        return
    for label, item in _items_at_depth(value, field, rule.depth):
        if item is None:
            continue
        problem = _violation(rule, item, params)
        if problem is None:
            continue
        shown, detail = problem
        raise ParamsError(f"{where}: field '{label}': {shown} breaks rule '{rule.text}'{detail}")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _items_at_depth(value: Any, field: str, depth: int) -> Iterator[tuple[str, Any]]:
    if depth == 0:
        yield field, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _items_at_depth(item, f"{field}[{key!r}]", depth - 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _items_at_depth(item, f"{field}[{i}]", depth - 1)


def _violation(rule: Rule, value: Any, params: Mapping[str, Any]) -> tuple[str, str] | None:
    """None when ``value`` satisfies ``rule``; else (what to show as the value, extra detail)."""
    shown = f"value {_short(value)}"
    kinds, wanted = _RULE_NEEDS[rule.op]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return shown, f" (needs {wanted})"
    refs = {arg.name: params.get(arg.name) for arg in rule.args if isinstance(arg, _Ref)}
    if any(bound is None for bound in refs.values()):
        return None  # the bound is an optional parameter left unset
    detail = " (" + ", ".join(f"{name} = {_short(bound)}" for name, bound in refs.items()) + ")" if refs else ""

    def bound(arg: Any) -> Any:
        return params[arg.name] if isinstance(arg, _Ref) else arg

    if rule.op in _COMPARE:
        ok = _COMPARE[rule.op](value, bound(rule.args[0]))
    elif rule.op == "interval":
        low, high, low_closed, high_closed = rule.args
        ok = (value >= bound(low) if low_closed else value > bound(low)) and (
            value <= bound(high) if high_closed else value < bound(high)
        )
    elif rule.op == "len":
        shown = f"length {len(value)}"
        ok = _COMPARE[rule.args[0]](len(value), bound(rule.args[1]))
    elif rule.op == "non-empty":
        ok = len(value) > 0
    elif rule.op == "contains":
        ok = any(_same(item, rule.args[0]) for item in value)
    elif rule.op == "one of":
        ok = any(_same(value, allowed) for allowed in rule.args)
    elif rule.op == "in":
        container = params.get(rule.args[0])
        if container is None:
            return None
        ok = any(_same(value, item) for item in container)
        detail = f" ({rule.args[0]} = {_short(container)})"
    elif rule.op == "keys":
        expected = list(params.get(rule.args[0]) or [])
        missing = [k for k in expected if k not in value]
        extra = [k for k in value if k not in expected]
        ok = not missing and not extra
        shown = f"value with keys {_short(list(value))}"
        parts = ([f"missing {_short(missing)}"] if missing else []) + (
            [f"not in {rule.args[0]}: {_short(extra)}"] if extra else []
        )
        detail = f" ({'; '.join(parts)})"
    elif rule.op == "threads":
        cores = os.cpu_count() or 1
        ok = 1 <= value <= cores
        detail = f" (1..{cores} on this machine)"
    else:  # pragma: no cover - _parse_body produces only the ops above
        raise AssertionError(rule.op)
    return None if ok else (shown, detail)


def _short(value: Any, limit: int = 80) -> str:
    """repr, cut to ``limit`` characters: a 10^6-item list must not flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    except RecursionError:
        raise ParamsError(f"{where}: invalid YAML: nested too deeply") from None


def load_params(study: str, name: str, root: Path = REPO_ROOT,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read and validate ``params/<study>/<name>.yaml`` against the notebook's parameters cell.

    ``overrides`` replace the file's values of those parameters before validation (the runner's
    ``--set``), so they pass the same checks. Returns the values ready for papermill (ints promoted to
    float where a float is declared). Every check runs here, so a typo costs a second rather than a
    failed hour-long run.
    """
    path = params_path(study, name, root)
    where = display_path(path, root)
    if path.is_dir():
        raise ParamsError(f"{where}: is a directory, not a params file")
    if not path.is_file():
        available = _available_params(path.parent)
        raise ParamsError(f"{where}: no such params file (available: {', '.join(available) or 'none'})")
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(f"{where}: {size} bytes; a params file is at most {MAX_PARAMS_BYTES} bytes")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ParamsError(
            f"{where}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None
    raw = parse_yaml(text, where)
    if overrides:
        if isinstance(raw, dict):
            raw = {**raw, **overrides}
        where = f"{where} with --set {', '.join(f'{k}={v!r}' for k, v in overrides.items())}"
    return validate_params(raw, parameter_schema(study, root), where)


def validate_params(raw: Any, schema: Mapping[str, tuple[Any, ...]], where: str) -> dict[str, Any]:
    """Check a parsed params mapping against a schema; ``where`` names the file in errors.

    Order: the shape (mapping, unknown and missing fields), each field's type, the automatic value
    rules (finite floats, no repeated items), process names, then the declared value rules
    (:class:`Rule`). The first problem raises.
    """
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
        _check_automatic(value, where, key)
    for key, value in params.items():
        if _holds_process_names(key):
            _check_process_names(value, where, key)
    _check_params_values(params, schema, where)
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
    """The registry lookup (a seam: tests replace it with a fake registry).

    It builds the process, so a knob outside its range (``em(mixing=2.0)``) is caught here too.
    """
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
        except (ProcessError, KeyError, ValueError) as err:  # the registry's one message names the part and rule
            reason = str(err) if isinstance(err, ProcessError) else err.args[0] if err.args else type(err).__name__
            label = field if isinstance(value, str) else f"{field}[{i}]"
            raise ParamsError(f"{where}: field '{label}': invalid process name {name!r}: {reason}") from None
