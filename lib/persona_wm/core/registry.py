"""The process registry: every process is built from one name, ``get_process("pp_z1r_x_mess3(x=0.1)")``.

A *family* is a builder function registered with :func:`family`; its keyword parameters are the
family's *knobs* and their defaults the process a bare family name means. A name is a product of
terms, ``family`` or ``family(knob=literal,...)``, joined by ``_x_`` (grammar: :mod:`persona_wm.core.names`).
:func:`get_process` parses the name, checks every knob against the builder's signature (unknown or
repeated knob, unreadable literal, value of the wrong type for its annotation -> one
:class:`~persona_wm.core.ghmm.ProcessError` naming the name, the knob, the value and the rule), builds
each term, takes their Kronecker product (:func:`persona_wm.core.sfp.product`) and names the result
canonically: ``family`` when no knob differs from its default, else ``family(k=v,...)`` with only the
changed knobs, in signature order, values ``repr``'d without spaces. Every name the library prints
parses back to the same process: ``get_process(get_process(n).name).name == get_process(n).name``.

Adding a process touches one file: write a builder in a family module (``processes/classic.py``,
``processes/partitioned.py``, ``processes/em.py``) and decorate it. Knobs are keyword parameters with
defaults; the builder need not name its result (the registry does)::

    @family("coin")
    def coin(p: float = 0.5) -> GHMM:  # one state emitting token 1 with probability p
        check_number(p, "p", 0.0, 1.0, owner="coin")  # ranges are the builder's business
        return GHMM(np.array([[[1 - p]], [[p]]]), np.ones(1))

    get_process("coin")                 # the fair coin, named 'coin'
    get_process("coin(p=0.9)_x_z1r")    # a biased coin beside Z1R, named 'coin(p=0.9)_x_z1r'
    families()["coin"]                  # its knobs: (p: float = 0.5)

(A new module would also need one import line in ``processes/__init__.py``, which imports the
family modules so that they register themselves.)

Knob types come from the annotations (``int``, ``float``, ``bool``, ``str``, ``tuple[float, ...]``,
``X | None``; a knob without one takes its default's type): an ``int`` is accepted for a ``float`` knob,
never a bool for a number or a float for an ``int``, and a list is read as a tuple. Range checks stay
in the builder (``0 < x < 0.5``); the registry prefixes their message with the term.
A family whose knob is another process's name wraps that process (``leaky``, ``restricted``, ``sfp``
in :mod:`persona_wm.processes.partitioned`): the inner name is a string literal, so the
``_x_`` inside it does not split the outer name.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from persona_wm.core.ghmm import GHMM, ProcessError
from persona_wm.core.names import (
    PRODUCT_SEPARATOR,
    Term,
    format_literal,
    format_term,
    parse_term,
    split_terms,
    valid_family_name,
)
from persona_wm.core.sfp import product

__all__ = ["REGISTRY", "FamilyInfo", "ProcessName", "family", "families", "describe", "get_process", "canonical_name",
           "process_name", "process_knobs", "PRODUCT_SEPARATOR", "ProcessError"]

#: Family name -> builder. ``get_process`` looks the builder up here at every call (tests may swap one).
REGISTRY: dict[str, Callable[..., GHMM]] = {}


@dataclass(frozen=True)
class FamilyInfo:
    """How a family prints: ``title`` names it in messages, ``bare_default`` prints the default as ``family``."""

    title: str
    bare_default: bool = True


_INFO: dict[str, FamilyInfo] = {}


class ProcessName(str):
    """Annotation of a knob that holds another process's name (``leaky(process='z1r_x_z1r',epsilon=0.1)``).

    The registry checks such a name like any other and passes (and prints) its canonical form, so
    two spellings of the inner process give one outer name.
    """


def family(name: str, *, title: str | None = None, bare_default: bool = True) -> Callable:
    """Decorator: register ``builder`` as the process family ``name``; its keyword parameters are the knobs.

    ``title`` names the family in error messages (default: ``name``). ``bare_default=False`` prints the
    all-default process as ``name()`` instead of ``name`` (the EM organism's ``em()``, kept so the names
    its cached models were trained under do not move). The decorated function stays callable directly
    and names what it returns canonically, as :func:`get_process` does.
    """
    if not valid_family_name(name):
        raise ProcessError(f"process family name {name!r} must be an identifier without {PRODUCT_SEPARATOR!r} "
                           "(nor starting with 'x_' or ending with '_x')")

    def register(builder: Callable[..., GHMM]) -> Callable[..., GHMM]:
        known = REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (builder.__module__, builder.__qualname__):
            raise ProcessError(f"process family {name!r} is already registered by "
                               f"{known.__module__}.{known.__qualname__}")
        for knob in _signature(builder).parameters.values():
            if knob.kind in (knob.VAR_POSITIONAL, knob.VAR_KEYWORD, knob.POSITIONAL_ONLY):
                raise ProcessError(f"process family {name!r}: knob {knob.name!r} must be a named parameter, "
                                   f"not {knob.kind.description}")
        REGISTRY[name] = builder
        _INFO[name] = FamilyInfo(title or name, bare_default)

        @functools.wraps(builder)
        def named(*args, **kwargs) -> GHMM:
            process = builder(*args, **kwargs)
            bound = _signature(builder).bind(*args, **kwargs)
            return _renamed(process, process_name(name, **bound.arguments))

        return named

    return register


def config_family(name: str, config_type: type, build: Callable[[Any], GHMM], *, title: str | None = None,
                  bare_default: bool = True) -> Callable[..., GHMM]:
    """Register the family ``name`` whose knobs are the fields of the frozen dataclass ``config_type`` (in field
    order, with their types and defaults) and whose process is ``build(config_type(**knobs))``; returns the
    registered builder. :func:`config_name` and :func:`parse_config_name` go between such a config and its name."""
    hints = typing.get_type_hints(config_type)

    def builder(**knobs: Any) -> GHMM:
        return build(config_type(**knobs))

    builder.__signature__ = inspect.Signature(
        [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
         for f in fields(config_type)], return_annotation=GHMM)
    builder.__module__, builder.__qualname__ = build.__module__, f"{name}_family"
    builder.__name__, builder.__doc__ = builder.__qualname__, (
        f"The registry family ``{name}``: its knobs are :class:`{config_type.__name__}`'s fields.")
    return family(name, title=title, bare_default=bare_default)(builder)


def config_name(family_name: str, config: Any) -> str:
    """Canonical name of a :func:`config_family` config: the knobs that differ from the defaults, in field order."""
    return process_name(family_name, **{f.name: getattr(config, f.name) for f in fields(config)})


def parse_config_name(name: str, family_name: str, config_type: type) -> Any:
    """Inverse of :func:`config_name`: knobs checked by the registry, then by the config itself."""
    _, knobs = process_knobs(name, family_name)
    try:
        return config_type(**knobs)
    except ProcessError as error:
        raise ProcessError(f"{name!r}: {error}") from None


def families() -> dict[str, inspect.Signature]:
    """Every registered family with its signature (knobs, their types and defaults), by name."""
    return {name: _signature(REGISTRY[name]) for name in sorted(REGISTRY)}


def describe(family_name: str) -> str:
    """``family(knob: type = default, ...)``, module paths left out: ``mess3(x: float = 0.15, alpha: float = 0.6)``."""
    knobs = []
    for knob in _signature(_builder(family_name, family_name)).parameters.values():
        text = knob.name
        if knob.annotation is not knob.empty:
            annotation = inspect.formatannotation(knob.annotation)
            text += ": " + re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", annotation)
        if knob.default is not knob.empty:
            text += f" = {format_literal(knob.default)}"
        knobs.append(text)
    return f"{family_name}({', '.join(knobs)})"


def get_process(name: str) -> GHMM:
    """Build the process ``name`` (a product of terms ``family(knob=literal,...)``, see the module docstring)."""
    terms = split_terms(name)
    processes = [_build(term, name) for term in terms]
    joint = product(*processes)
    return _renamed(joint, PRODUCT_SEPARATOR.join(p.name for p in processes))


def canonical_name(name: str) -> str:
    """The canonical spelling of ``name``, knobs checked, nothing built: ``canonical_name("mess3()") == "mess3"``."""
    terms = [_parse(term, name) for term in split_terms(name)]
    return PRODUCT_SEPARATOR.join(process_name(t.family, **_checked_knobs(t, name)) for t in terms)


def process_knobs(name: str, family_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(family, knobs)`` of a one-term name, knobs checked and completed with their defaults.

    ``family_name`` requires that family (``process_knobs("em(mixing=0.8)", "em")``).
    """
    terms = split_terms(name)
    if len(terms) != 1:
        raise ProcessError(f"{name!r} is a product of {len(terms)} processes; expected one "
                           f"{family_name or 'process'} name")
    term = _parse(terms[0], name)
    if family_name is not None and term.family != family_name:
        raise ProcessError(f"{name!r} is not a name of the {_title(family_name)} family "
                           f"(expected {family_name}(key=value,...))")
    return term.family, _checked_knobs(term, name)


def process_name(family_name: str, **knobs: Any) -> str:
    """Canonical name of ``family_name`` with ``knobs`` (checked like a parsed name): ``em(mixing=0.25)``."""
    builder = _builder(family_name, family_name)
    text = f"{family_name}(...)"
    term = Term(family_name, tuple(knobs.items()), text)
    values = _checked_knobs(term, text)
    signature = _signature(builder)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}
    return format_term(family_name, [(k, values[k]) for k in signature.parameters], defaults,
                       _INFO.get(family_name, FamilyInfo(family_name)).bare_default)


# --------------------------------------------------------------------------- internals
def _title(family_name: str) -> str:
    return _INFO[family_name].title if family_name in _INFO else family_name


def _signature(builder: Callable) -> inspect.Signature:
    try:
        return inspect.signature(builder, eval_str=True)
    except (NameError, TypeError, SyntaxError):  # an annotation that does not evaluate: keep it as text
        return inspect.signature(builder)


def _builder(family_name: str, name: str) -> Callable[..., GHMM]:
    if family_name not in REGISTRY:
        close = difflib.get_close_matches(family_name, list(REGISTRY), n=len(REGISTRY), cutoff=0.6)
        ordered = close + sorted(k for k in REGISTRY if k not in close)
        raise ProcessError(f"unknown process {family_name!r} in {name!r}; known processes: {', '.join(ordered)} "
                           f"({'closest first; ' if close else ''}parametrise as family(knob=value), "
                           f"join with {PRODUCT_SEPARATOR!r} for products)")
    return REGISTRY[family_name]


def _parse(text: str, name: str) -> Term:
    family_name = text.partition("(")[0].strip()
    return parse_term(text, name, _title(family_name) if family_name in _INFO else None)


def _where(term: Term, name: str) -> str:
    return repr(term.text) if term.text == name else f"{term.text!r} (in {name!r})"


def _checked_knobs(term: Term, name: str) -> dict[str, Any]:
    """Knob values of ``term`` checked against its builder's signature, with defaults filled in."""
    builder = _builder(term.family, name)
    signature = _signature(builder)
    title, where = _title(term.family), _where(term, name)
    valid = list(signature.parameters)
    values: dict[str, Any] = {}
    for key, value in term.knobs:
        if key not in signature.parameters:
            raise ProcessError(f"unknown {title} knob {key!r} in {where}; knobs: "
                               f"{', '.join(valid) if valid else f'none ({term.family} takes no knobs)'}")
        if key in values:
            raise ProcessError(f"{title} knob {key!r} is given twice in {where}")
        parameter = signature.parameters[key]
        try:
            values[key] = _conform(value, _annotation(parameter))
        except _Mismatch as mismatch:
            raise ProcessError(f"{where}: {title}: {key} must be {mismatch.rule}, got {value!r} "
                               f"({type(value).__name__})") from None
        except ProcessError as error:  # a knob that names another process, and that name is wrong
            raise ProcessError(f"{where}: {title}: {key}: {error}") from None
    missing = [k for k, p in signature.parameters.items() if k not in values and p.default is p.empty]
    if missing:
        raise ProcessError(f"{where}: {title} needs knob{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                           f"(knobs: {describe(term.family)})")
    for key, parameter in signature.parameters.items():
        values.setdefault(key, parameter.default)
    return values


def _build(text: str, name: str) -> GHMM:
    term = _parse(text, name)
    knobs = _checked_knobs(term, name)
    canonical = process_name(term.family, **knobs)
    try:
        process = REGISTRY[term.family](**knobs)
    except ProcessError as error:
        raise ProcessError(f"{_where(term, name)}: {error}") from None
    return _renamed(process, canonical)


def _renamed(process: GHMM, name: str) -> GHMM:
    return process if process.name == name else replace(process, name=name)


def _annotation(parameter: inspect.Parameter) -> Any:
    """The knob's type: its annotation, else its default's type (None and no default: anything)."""
    if parameter.annotation is not parameter.empty and not isinstance(parameter.annotation, str):
        return parameter.annotation
    if parameter.default is parameter.empty or parameter.default is None:
        return Any
    return type(parameter.default)


class _Mismatch(Exception):
    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


def _rule(annotation: Any) -> str:
    """The type rule in words, for messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return ", or ".join(_rule(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple whose items are each {_rule(args[0])}"
        return f"a tuple of {len(args)} items ({', '.join(_rule(a) for a in args)})"
    words = {type(None): "None", bool: "True or False", int: "an integer", float: "a finite number", str: "a string",
             ProcessName: "a process name (a string)"}
    return words.get(annotation, f"a {getattr(annotation, '__name__', annotation)}")


def _conform(value: Any, annotation: Any) -> Any:
    """``value`` if it fits ``annotation`` (a list becomes a tuple for a tuple knob), else raise :class:`_Mismatch`."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _conform(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch(_rule(annotation))
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch(_rule(annotation))
        if not args:
            return tuple(value)
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            raise _Mismatch(_rule(annotation))
        try:
            return tuple(_conform(v, a) for v, a in zip(value, arms))
        except _Mismatch:
            raise _Mismatch(_rule(annotation)) from None
    is_bool = isinstance(value, (bool, np.bool_))
    if annotation is ProcessName:
        if not isinstance(value, str):
            raise _Mismatch(_rule(annotation))
        return canonical_name(value)
    if annotation is type(None):
        ok = value is None
    elif annotation is bool:
        ok = is_bool
    elif annotation is int:
        ok = isinstance(value, numbers.Integral) and not is_bool
    elif annotation is float:
        ok = isinstance(value, numbers.Real) and not is_bool and math.isfinite(value)
    elif isinstance(annotation, type):
        ok = isinstance(value, annotation)
    else:  # a typing construct we do not check (Callable, Literal, ...): the builder checks it
        ok = True
    if not ok:
        raise _Mismatch(_rule(annotation))
    return value
