"""Render a report's TeX math to MathML at export, so ``report.html`` reads offline.

nbconvert's HTML template loads MathJax from a CDN; offline readers then see raw ``$...$``. Here
every ``$...$`` / ``$$...$$`` span of a markdown cell (and of a ``text/markdown`` output) is
converted to MathML with ``latex2mathml`` before export, and the template's MathJax block is
removed from the page: every current browser renders MathML natively, with no script and no
network. Code spans and fenced code are left alone; a dollar that does not open a math span
(``$5``, a lone ``$``) is left as text; an expression latex2mathml cannot parse stays as TeX
source in a ``<code>`` element and is counted (``MathMLPreprocessor.failures``), never dropped.
"""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["tex_to_mathml", "markdown_with_mathml", "strip_mathjax", "MathMLPreprocessor"]

# ``` fences and `code` spans are protected from conversion.
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
# $$...$$ (display) before $...$ (inline); inline math must not start or end with a space (so "$5 and $6" is text).
_MATH = re.compile(r"\$\$(?P<display>.+?)\$\$|(?<![\\$\w])\$(?P<inline>[^\s$](?:[^$\n]*?[^\s\\$])?)\$(?![\w$])", re.S)
_MATHJAX_BLOCK = re.compile(r"\s*<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)
# Any other script the template loads from a CDN (require.js): nothing in our reports uses it, offline it only fails.
# (The template's mermaid loader stays: it fetches nothing unless a report holds a mermaid diagram; ours do not.)
_REMOTE_SCRIPT = re.compile(r'\s*<script\b[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>')


def tex_to_mathml(tex: str, display: bool = False) -> str:
    """One TeX expression as a ``<math>`` element (raises on TeX that latex2mathml cannot read)."""
    from latex2mathml.converter import convert

    return convert(tex.strip(), display="block" if display else "inline")


def markdown_with_mathml(text: str, failures: list[str] | None = None) -> str:
    """``text`` with every math span replaced by MathML; code spans untouched."""

    def replace(match: re.Match) -> str:
        display = match.group("display") is not None
        tex = match.group("display") if display else match.group("inline")
        try:
            return tex_to_mathml(tex, display)
        except Exception:  # latex2mathml raises several exception types on unsupported TeX
            if failures is not None:
                failures.append(tex)
            return f"<code>{html.escape(match.group(0))}</code>"

    parts = _CODE.split(text)
    return "".join(part if i % 2 else _MATH.sub(replace, part) for i, part in enumerate(parts))


def strip_mathjax(page: str) -> str:
    """The exported page without the template's CDN MathJax loader, its configuration and other CDN scripts."""
    return _REMOTE_SCRIPT.sub("", _MATHJAX_BLOCK.sub("", page))


class MathMLPreprocessor:
    """nbconvert preprocessor: TeX in markdown cells and ``text/markdown`` outputs -> MathML."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, notebook: Any, resources: dict) -> tuple[Any, dict]:
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                cell.source = markdown_with_mathml(cell.source, self.failures)
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "text/markdown" in data:
                    data["text/markdown"] = markdown_with_mathml(data["text/markdown"], self.failures)
        return notebook, resources
