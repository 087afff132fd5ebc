"""Value rules declared as trailing comments in a notebook's parameters cell (persona_wm.io.params's rule grammar).

Each test writes a throwaway notebook under tmp_path; nothing here reads the real studies except
the last test, which checks that every committed params file still satisfies its notebook's rules.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from persona_wm.io import params as report
from persona_wm.io.params import ParamsError, Rule, RuleSyntaxError, parse_rule_comment

STUDY = "01_demo"
CELL = """\
n_samples: int = 2  # >= 1; <= 10_000
temperature: float = 1.0  # > 0
mixing: float = 0.25  # in [0, 1]
dropout: float = 0.5  # in [0, 1)
coupling_loss: str = "whole_response"  # one of: whole_response, marker_only
steer_scales: list[float] = [1.0, 2.0]  # non-empty; each > 0
headline_scale: float = 1.0  # in steer_scales
names: list[str] = ["a", "b"]  # len <= 3
scales: list[float] = [0.0, 1.0]  # contains 1.0
steps: dict[str, int] = {"a": 1, "b": 2}  # keys = names; each >= 1
groups: dict[str, list[int]] = {  # non-empty
    "x": [1, 2],  # a comment on an item line is prose
}  # each non-empty
n_prompts: int = 4  # >= 2
n_vector: int = 2  # >= 1; < n_prompts
max_steps: int | None = None  # >= 1
model: str | None = None
layers: list[int] = [1, 30]  # each >= 1; each <= 30 when model is null
torch_threads: int = 1  # threads
seed: int = 0  # >= 0  # prose after a second '#'
note: str = "x"  # injected by hand; None -> nothing  (prose: does not start with a rule)
output_dir: str | None = None
"""
VALID = {
    "n_samples": 2, "temperature": 1.0, "mixing": 0.25, "dropout": 0.5, "coupling_loss": "whole_response",
    "steer_scales": [1.0, 2.0], "headline_scale": 1.0, "names": ["a", "b"], "scales": [0.0, 1.0],
    "steps": {"a": 1, "b": 2}, "groups": {"x": [1, 2]}, "n_prompts": 4, "n_vector": 2, "max_steps": None,
    "model": None, "layers": [1, 30], "torch_threads": 1, "seed": 0, "note": "x",
}


def write_notebook(root: Path, cell: str = CELL) -> None:
    path = root / "notebooks" / f"{STUDY}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'# %% tags=["parameters"]\n{cell}\n# %%\nprint(1)\n')


@pytest.fixture
def schema(tmp_path: Path) -> dict[str, report.Parameter]:
    write_notebook(tmp_path)
    return report.parameter_schema(STUDY, root=tmp_path)


def error(schema: dict, **changes) -> str:
    with pytest.raises(ParamsError) as info:
        report.validate_params(VALID | changes, schema, "p.yaml")
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# The grammar


@pytest.mark.parametrize(
    ("comment", "expected"),
    [
        ("# >= 1", [(">=", (1,), 0, None)]),
        ("# >= 1; <= 10_000", [(">=", (1,), 0, None), ("<=", (10_000,), 0, None)]),
        ("#> 1e-3", [(">", (1e-3,), 0, None)]),
        ("# < -2.5", [("<", (-2.5,), 0, None)]),
        ("# in [0, 1]", [("interval", (0, 1, True, True), 0, None)]),
        ("# in (0, 1]", [("interval", (0, 1, False, True), 0, None)]),
        ("# in steer_scales", [("in", ("steer_scales",), 0, None)]),
        ("# one of: a, b, 3, null", [("one of", ("a", "b", 3, None), 0, None)]),
        ("# non-empty", [("non-empty", (), 0, None)]),
        ("# len <= 20", [("len", ("<=", 20), 0, None)]),
        ("# contains 1.0", [("contains", (1.0,), 0, None)]),
        ("# keys = processes", [("keys", ("processes",), 0, None)]),
        ("# threads", [("threads", (), 0, None)]),
        ("# each each > 0", [(">", (0,), 2, None)]),
        ("# each <= 30 when model is null", [("<=", (30,), 1, ("model", None))]),
        ("# >= 1;  # prose", [(">=", (1,), 0, None)]),
    ],
)
def test_rule_comments_parse(comment: str, expected: list) -> None:
    rules = parse_rule_comment(comment)
    assert [(r.op, r.args, r.depth, r.when) for r in rules] == expected
    assert all(isinstance(r, Rule) for r in rules)


@pytest.mark.parametrize(
    "comment",
    ["# the smoke value", "# injected by the runner; None -> scratch dir", "", "#  inside the cell",
     "# eachother", "# keyset", "# threadsafe"],
)
def test_prose_comments_are_not_rules(comment: str) -> None:
    assert parse_rule_comment(comment) is None


@pytest.mark.parametrize(
    "comment",
    ["# >", "# >= one two", "# in [0 1]", "# each", "# keys processes", "# >= 1.5.2", "# <= 1e999", "# >= 1; bogus", "# one of:", "# one of: a,, b",
     "# non-empty please", "# threads 4"],
)
def test_a_comment_that_starts_like_a_rule_must_parse(comment: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_rule_comment(comment)


def test_schema_carries_rules_from_first_and_last_line(schema: dict) -> None:
    assert schema["n_samples"][:2] == (int, 2)
    assert [r.text for r in schema["n_samples"].rules] == [">= 1", "<= 10_000"]
    assert [r.text for r in schema["groups"].rules] == ["non-empty", "each non-empty"]
    assert schema["note"].rules == () and schema["output_dir"].rules == ()
    assert [r.text for r in schema["seed"].rules] == [">= 0"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('name: str = "a"  # >= 1', "parameter 'name': rule '>= 1': needs a number, but it applies to str"),
        ("xs: list[int] = [1]  # > 0", "rule '> 0': needs a number, but it applies to list[int]"),
        ("n: int = 1  # each > 0", "rule 'each > 0': 'each' needs a list or dict"),
        ("n: int = 1  # < n_things", "rule '< n_things': 'n_things' is not a parameter of this notebook"),
        ("n: int = 1  # in seconds", "rule 'in seconds': 'seconds' is not a parameter"),
        ("d: dict[str, int] = {}  # keys = n\nn: int = 1", "'n' is not a list parameter"),
        ("n: int = 1  # >= 1 2", "rule '>= 1 2': bound '1 2' is neither a finite number nor a parameter name"),
        ("n: int = 1  # one of 1, 2", "cannot read rule 'one of 1, 2'"),
        ("n: int = 0  # >= 1", "(parameters cell defaults): field 'n': value 0 breaks rule '>= 1'"),
        ("xs: list[int] = [1, 1]", "(parameters cell defaults): field 'xs': value [1, 1] breaks rule 'no duplicates'"),
    ],
)
def test_bad_rules_fail_when_the_schema_is_read(tmp_path: Path, line: str, message: str) -> None:
    write_notebook(tmp_path, line + "\n")
    with pytest.raises(ParamsError) as info:
        report.parameter_schema(STUDY, root=tmp_path)
    assert message in str(info.value)
    assert str(info.value).startswith("notebooks/01_demo.py")


# ---------------------------------------------------------------------------------------------
# Checking values


def test_valid_values_pass_and_come_back_typed(schema: dict) -> None:
    assert report.validate_params(VALID | {"temperature": 2}, schema, "p.yaml")["temperature"] == 2.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_samples": 0}, "p.yaml: field 'n_samples': value 0 breaks rule '>= 1'"),
        ({"n_samples": 10**12}, "field 'n_samples': value 1000000000000 breaks rule '<= 10_000'"),
        ({"temperature": 0.0}, "field 'temperature': value 0.0 breaks rule '> 0'"),
        ({"mixing": 1.5}, "field 'mixing': value 1.5 breaks rule 'in [0, 1]'"),
        ({"dropout": 1.0}, "field 'dropout': value 1.0 breaks rule 'in [0, 1)'"),
        ({"coupling_loss": "marker"}, "field 'coupling_loss': value 'marker' breaks rule 'one of: whole_response, marker_only'"),
        ({"steer_scales": []}, "field 'steer_scales': value [] breaks rule 'non-empty'"),
        ({"steer_scales": [1.0, -1.0]}, "field 'steer_scales[1]': value -1.0 breaks rule 'each > 0'"),
        ({"headline_scale": 3.0}, "field 'headline_scale': value 3.0 breaks rule 'in steer_scales' (steer_scales = [1.0, 2.0])"),
        ({"names": ["a", "b", "c", "d"], "steps": dict.fromkeys("abcd", 1)}, "field 'names': length 4 breaks rule 'len <= 3'"),
        ({"scales": [0.0, 2.0]}, "field 'scales': value [0.0, 2.0] breaks rule 'contains 1.0'"),
        ({"steps": {"a": 1}}, "field 'steps': value with keys ['a'] breaks rule 'keys = names' (missing ['b'])"),
        ({"steps": {"a": 1, "b": 2, "z": 3}}, "field 'steps': value with keys ['a', 'b', 'z'] breaks rule 'keys = names' (not in names: ['z'])"),
        ({"steps": {"a": 1, "b": 0}}, "field 'steps['b']': value 0 breaks rule 'each >= 1'"),
        ({"groups": {}}, "field 'groups': value {} breaks rule 'non-empty'"),
        ({"groups": {"x": []}}, "field 'groups['x']': value [] breaks rule 'each non-empty'"),
        ({"n_vector": 4}, "field 'n_vector': value 4 breaks rule '< n_prompts' (n_prompts = 4)"),
        ({"max_steps": 0}, "field 'max_steps': value 0 breaks rule '>= 1'"),
        ({"layers": [1, 31]}, "field 'layers[1]': value 31 breaks rule 'each <= 30 when model is null'"),
        ({"layers": [0]}, "field 'layers[0]': value 0 breaks rule 'each >= 1'"),
        ({"seed": -1}, "field 'seed': value -1 breaks rule '>= 0'"),
        ({"temperature": float("nan")}, "field 'temperature': value nan breaks rule 'finite'"),
        ({"steer_scales": [1.0, float("inf")]}, "field 'steer_scales[1]': value inf breaks rule 'finite'"),
        ({"names": ["a", "a"]}, "field 'names': value ['a', 'a'] breaks rule 'no duplicates' (items 0 and 1 are both 'a')"),
        ({"groups": {"x": [2, 2]}}, "field 'groups['x']': value [2, 2] breaks rule 'no duplicates'"),
    ],
)
def test_each_rule_names_field_value_and_rule(schema: dict, changes: dict, message: str) -> None:
    assert message in error(schema, **changes)


def test_optional_none_and_false_conditions_skip_rules(schema: dict) -> None:
    params = report.validate_params(VALID | {"max_steps": None, "model": "other.gguf", "layers": [1, 64]}, schema, "p")
    assert params["layers"] == [1, 64]  # the 30-block bound holds only for the default model


def test_threads_are_bounded_by_this_machine(schema: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert report.validate_params(VALID | {"torch_threads": 4}, schema, "p.yaml")["torch_threads"] == 4
    assert "field 'torch_threads': value 5 breaks rule 'threads' (1..4 on this machine)" in error(schema, torch_threads=5)
    assert "value 0 breaks rule 'threads'" in error(schema, torch_threads=0)


def test_long_values_are_cut_in_messages(schema: dict) -> None:
    message = error(schema, steps={str(i): 1 for i in range(1000)})
    assert len(message) < 400 and "..." in message


def test_two_tuple_schemas_still_work() -> None:
    """Callers that build (annotation, default) schemas by hand get the type and automatic checks."""
    schema = {"x": (list[float], [])}
    assert report.validate_params({"x": [1, 2]}, schema, "p") == {"x": [1.0, 2.0]}
    with pytest.raises(ParamsError, match="no duplicates"):
        report.validate_params({"x": [1, 1.0]}, schema, "p")


# ---------------------------------------------------------------------------------------------
# The committed studies


def test_every_committed_params_file_satisfies_its_notebooks_rules() -> None:
    files = sorted((report.REPO_ROOT / "params").glob("*/*.yaml"))
    assert files
    for path in files:
        assert report.load_params(path.parent.name, path.stem), path
