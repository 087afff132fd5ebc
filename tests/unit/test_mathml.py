"""report.html math: TeX -> MathML at export, no CDN script, code spans and prices untouched."""

from __future__ import annotations

import nbformat
import pytest
from nbconvert import HTMLExporter

from persona_wm.io.mathml import MathMLPreprocessor, markdown_with_mathml, strip_mathjax


def test_inline_and_display_math_become_mathml() -> None:
    out = markdown_with_mathml(r"belief $\eta(\emptyset)$ and $$T=\sum_x T(x)$$ end")
    assert out.count("<math") == 2 and 'display="block"' in out and 'display="inline"' in out
    assert "$" not in out and out.startswith("belief ") and out.endswith(" end")


@pytest.mark.parametrize("text", ["costs $5 and $6", "a lone $ sign", "`$x$` in code", "```\n$y$\n```", r"\$escaped$"])
def test_text_that_is_not_math_is_left_alone(text: str) -> None:
    assert markdown_with_mathml(text) == text


def test_unreadable_tex_is_kept_as_code_and_counted() -> None:
    failures: list[str] = []
    out = markdown_with_mathml(r"bad $\begin{nosuchenv}x$", failures)
    assert failures == [r"\begin{nosuchenv}x"] and "<code>$\\begin{nosuchenv}x$</code>" in out


def test_exported_page_has_mathml_and_no_cdn() -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(r"The SFP $A\otimes B$.")])
    exporter = HTMLExporter()
    exporter.register_preprocessor(MathMLPreprocessor(), enabled=True)
    page = strip_mathjax(exporter.from_notebook_node(nb)[0])
    assert "<math" in page and "mathjax" not in page.lower() and "<script src=" not in page
