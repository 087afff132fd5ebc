"""The process-name grammar: parse ``family(key=literal,...)_x_...`` and print canonical names (stdlib only).

::

    name := term ("_x_" term)*
    term := family | family "(" [key "=" literal ("," key "=" literal)*] ")"

``family`` is a Python identifier, ``literal`` a Python literal (number, bool, None, string, tuple,
list) read with :func:`ast.literal_eval`. Names are split on ``_x_`` and knobs on ``,`` only outside
brackets and quotes, so a knob may hold another process's name: ``leaky(process='z1r_x_z1r',epsilon=0.1)``.
Spaces around knobs and values are allowed when parsing and never printed.

Canonical form (:func:`format_term`): the bare ``family`` when every knob has its default, else
``family(k=v,...)`` with only the knobs that differ from their default, in the order given (the
builder's signature order), values printed by :func:`format_literal` (``repr``, tuples without spaces).

What a family *is* (its knobs, defaults and types) lives in :mod:`persona_wm.core.registry`; this
module is the pure syntax, so :mod:`persona_wm.core.sfp` can print the names of the processes it wraps
without importing the registry (which imports ``sfp.product``).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from persona_wm.core.ghmm import ProcessError

__all__ = ["PRODUCT_SEPARATOR", "Term", "split_terms", "parse_term", "parse_name", "format_literal", "format_term",
           "valid_family_name"]

#: Joins factor names in a product process name: ``mess3_x_mess3``.
PRODUCT_SEPARATOR = "_x_"

_OPEN, _CLOSE = "([{", ")]}"


@dataclass(frozen=True)
class Term:
    """One factor of a name: its family, its knobs in the order written (values already read), its text."""

    family: str
    knobs: tuple[tuple[str, Any], ...]
    text: str


def _scan(text: str, where: str):
    """Yield (index, char, depth) for every character outside quotes; check brackets and quotes balance."""
    stack: list[tuple[str, int]] = []
    quote, start, i = None, 0, 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 2
                continue
            if char == quote:
                quote = None
        elif char in "'\"":
            quote, start = char, i
        elif char in _OPEN:
            stack.append((char, i))
            yield i, char, len(stack) - 1
        elif char in _CLOSE:
            if not stack:
                raise ProcessError(f"unbalanced parentheses in {where!r}: {char!r} at position {i} "
                                   "has no opening bracket")
            opener, at = stack.pop()
            if _OPEN.index(opener) != _CLOSE.index(char):
                raise ProcessError(f"unbalanced parentheses in {where!r}: {opener!r} at position {at} is closed by "
                                   f"{char!r} at position {i}")
            yield i, char, len(stack)
        else:
            yield i, char, len(stack)
        i += 1
    if quote:
        raise ProcessError(f"unclosed quote in {where!r}: {quote} at position {start} is never closed")
    if stack:
        opener, at = stack[-1]
        raise ProcessError(f"unbalanced parentheses in {where!r}: {opener!r} at position {at} is never closed")


def _split(text: str, separator: str, where: str) -> list[str]:
    """``text`` split on ``separator`` at depth 0 and outside quotes."""
    cuts, skip_to = [], -1
    for i, _, depth in _scan(text, where):
        if i >= skip_to and depth == 0 and text.startswith(separator, i):
            cuts.append(i)
            skip_to = i + len(separator)
    bounds = [0, *(c for cut in cuts for c in (cut, cut + len(separator))), len(text)]
    return [text[bounds[k]:bounds[k + 1]] for k in range(0, len(bounds), 2)]


def split_terms(name: str) -> list[str]:
    """The factors of a product name, split on ``_x_`` outside brackets and quotes; an empty factor is an error."""
    if not isinstance(name, str) or not name.strip():
        raise ProcessError(f"process name must be a non-empty string, got {name!r}")
    terms = _split(name, PRODUCT_SEPARATOR, name)
    for k, term in enumerate(terms):
        if not term.strip():
            where = ("before the first" if k == 0 else "after the last" if k == len(terms) - 1 else "between two")
            raise ProcessError(f"empty factor in process name {name!r}: nothing {where} {PRODUCT_SEPARATOR!r}")
    return [t.strip() for t in terms]


def parse_term(text: str, name: str | None = None, title: str | None = None) -> Term:
    """One term ``family`` or ``family(k=v,...)``: the family and its knobs, values read as Python literals.

    Checks syntax only (an identifier family, ``key=literal`` items, each key once); whether the family
    and its knobs exist is the registry's business. ``name`` is the whole name, for messages.
    """
    text = text.strip()
    where = repr(text) if name is None or name.strip() == text else f"{text!r} (in {name!r})"
    positions = list(_scan(text, text))  # brackets and quotes balance
    family, paren, _ = text.partition("(")
    family = family.strip()
    owner = title or family
    if not family.isidentifier():
        raise ProcessError(f"process family {family!r} in {where} is not a name (letters, digits and _)")
    if not paren:
        return Term(family, (), text)
    open_at = text.index("(")
    close_at = next(i for i, char, depth in positions if i > open_at and char == ")" and depth == 0)
    if close_at != len(text) - 1:
        raise ProcessError(f"unexpected text {text[close_at + 1:]!r} after the closing ')' of {where}")
    body = text[open_at + 1:close_at]
    if not body.strip():
        return Term(family, (), text)
    knobs: dict[str, Any] = {}
    for item in _split(body, ",", text):
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key.isidentifier():
            raise ProcessError(f"{owner} argument {item.strip()!r} in {where} is not key=value "
                               f"(every knob is written with its name, e.g. {family}(x=0.1))")
        if key in knobs:
            raise ProcessError(f"{owner} knob {key!r} is given twice in {where}")
        try:
            knobs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ProcessError(f"{owner} knob {key!r} in {where} has an unreadable value {value!r} "
                               "(a Python literal: number, True/False, None, 'string', tuple)") from None
    return Term(family, tuple(knobs.items()), text)


def parse_name(name: str) -> list[Term]:
    """Every term of ``name`` (see the module docstring)."""
    return [parse_term(term, name) for term in split_terms(name)]


def format_literal(value: Any) -> str:
    """``repr`` of a knob value with no spaces: tuples and lists print as ``(a,b)``, ``(a,)``, ``[a,b]``.

    numpy scalars print as the Python number they hold (``0.25``, not ``np.float64(0.25)``).
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, tuple):
        items = [format_literal(v) for v in value]
        return "(" + ",".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ",".join(format_literal(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        raise ProcessError(f"a process name cannot hold the non-finite number {value!r}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise ProcessError(f"a process name can hold numbers, bools, None, strings and tuples, not {value!r} "
                       f"({type(value).__name__})")


#: Marks a knob without a default in :func:`format_term` (always printed).
_REQUIRED = object()


def _differs(value: Any, default: Any) -> bool:
    if default is _REQUIRED:
        return True
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # e.g. an array compared with a tuple
        return True


def format_term(family: str, knobs: Mapping[str, Any] | Iterable[tuple[str, Any]],
                defaults: Mapping[str, Any] | None = None, bare_default: bool = True) -> str:
    """Canonical ``family(k=v,...)``: knobs in the order given, those equal to their default left out.

    A knob missing from ``defaults`` has none and is always printed. With every knob at its default
    the name is the bare ``family`` (``family()`` when ``bare_default`` is False: the EM organism keeps
    ``em()``, the name its cached models were trained under).
    """
    items = knobs.items() if isinstance(knobs, Mapping) else knobs
    defaults = defaults or {}
    shown = [f"{key}={format_literal(value)}" for key, value in items
             if _differs(value, defaults.get(key, _REQUIRED))]
    if not shown and bare_default:
        return family
    return f"{family}({','.join(shown)})"


def valid_family_name(name: str) -> bool:
    """A family name is an identifier that cannot be confused with the ``_x_`` separator."""
    return isinstance(name, str) and name.isidentifier() and PRODUCT_SEPARATOR not in f"_{name}_"
