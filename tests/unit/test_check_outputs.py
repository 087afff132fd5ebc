"""persona_wm.io.check_outputs: rule order, tolerances, key paths, tolerances.yaml, and the CLI on --metrics.

Everything here is fast (no study runs) except the one test marked slow, which re-runs study 01
with its default params (~2 min) and is deselected unless ``pytest -m slow`` is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from persona_wm.io import check_outputs as co
from persona_wm.io.check_outputs import MISSING, Mismatch, Rule, compare_metrics
from persona_wm.io.params import REPO_ROOT
from persona_wm.io.runner import discover_studies

CATCH_ALL = Rule(keys="*", rel=0.05, abs=1e-3)


def keys_of(mismatches: list[Mismatch]) -> list[str]:
    return [m.key for m in mismatches]


# ---------------------------------------------------------------------------------------------
# Rules and tolerances


def test_first_matching_rule_applies() -> None:
    rules = [Rule("steering.*.ratio", rel=1.0), Rule("steering.*", rel=0.0, abs=0.0), CATCH_ALL]
    old = {"steering": {"a": {"ratio": 1.0, "kl": 1.0}}, "other": 1.0}
    new = {"steering": {"a": {"ratio": 1.9, "kl": 1.0001}}, "other": 1.0001}
    # ratio: loose first rule; kl: exact second rule, although the catch-all would accept it
    assert keys_of(compare_metrics(new, old, rules)) == ["steering.a.kl"]
    assert co.rule_for("steering.a.ratio", rules).keys == "steering.*.ratio"
    assert co.rule_for("steering.a.b.c.ratio", rules).keys == "steering.*.ratio"  # * crosses dots
    assert co.rule_for("x", rules) is CATCH_ALL
    # the same rules in the other order: the broad one shadows the specific one
    assert keys_of(compare_metrics(new, old, [rules[1], rules[0], CATCH_ALL])) == ["steering.a.ratio", "steering.a.kl"]


@pytest.mark.parametrize(
    ("old", "new", "rule", "ok"),
    [
        (100.0, 105.0, Rule("*", rel=0.05), True),
        (100.0, 94.9, Rule("*", rel=0.05), False),
        (100.0, 105.1, Rule("*", rel=0.05), False),
        (0.0, 1e-3, Rule("*", abs=1e-3), True),
        (0.0, -1.1e-3, Rule("*", abs=1e-3), False),
        (1e-15, 4e-4, CATCH_ALL, True),  # a tiny KL: the abs term, not rel, decides
        (10.0, 10.501, CATCH_ALL, True),  # abs + rel * |old| = 0.501
        (10.0, 10.502, CATCH_ALL, False),
        (-2.0, -2.09, Rule("*", rel=0.05), True),  # relative to |old|
        (-2.0, -2.11, Rule("*", rel=0.05), False),
        (3, 3.0, Rule("*"), True),  # int and float compare as numbers
        (3, 4, Rule("*", rel=0.5), True),
        (1.0, 1.0 + 1e-12, Rule("*"), False),  # no rule, no slack
    ],
)
def test_rel_and_abs(old: float, new: float, rule: Rule, ok: bool) -> None:
    assert rule.accepts(new, old) is ok
    assert (compare_metrics({"x": new}, {"x": old}, [rule]) == []) is ok


def test_tolerance_is_relative_to_the_committed_value() -> None:
    """abs + rel * |old|, not math.isclose's max(|a|, |b|): the committed value is the reference."""
    rule = Rule("*", rel=0.5)
    assert not rule.accepts(1.6, 1.0)  # 0.6 > 0.5 * 1.0 (isclose would accept: 0.6 <= 0.5 * 1.6)
    assert rule.accepts(1.0, 1.6)  # 0.6 <= 0.5 * 1.6


def test_nan_and_inf() -> None:
    nan, inf = float("nan"), float("inf")
    assert compare_metrics({"x": nan}, {"x": nan}, [CATCH_ALL]) == []
    assert keys_of(compare_metrics({"x": 1.0}, {"x": nan}, [CATCH_ALL])) == ["x"]
    assert keys_of(compare_metrics({"x": nan}, {"x": 1.0}, [CATCH_ALL])) == ["x"]
    assert compare_metrics({"x": inf}, {"x": inf}, [CATCH_ALL]) == []
    assert keys_of(compare_metrics({"x": -inf}, {"x": inf}, [CATCH_ALL])) == ["x"]
    assert keys_of(compare_metrics({"x": 1e308}, {"x": inf}, [Rule("*", rel=10.0)])) == ["x"]


def test_non_numeric_leaves_must_be_equal_whatever_the_rule() -> None:
    loose = [Rule("*", rel=10.0, abs=10.0)]
    old = {"s": "em()", "b": True, "n": None, "e": {}, "l": []}
    assert compare_metrics(dict(old), old, loose) == []
    changed = {"s": "em(mixing=0.2)", "b": False, "n": 0.0, "e": [], "l": {}}
    assert keys_of(compare_metrics(changed, old, loose)) == ["s", "b", "n", "e", "l"]
    # a bool is not the number 1, even under a loose rule
    assert keys_of(compare_metrics({"b": 1}, {"b": True}, loose)) == ["b"]
    assert keys_of(compare_metrics({"b": True}, {"b": 1}, loose)) == ["b"]


def test_list_elements_are_compared_one_by_one() -> None:
    old = {"a": {"b": [1.0, 2.0, 3.0]}, "angles": [[10.0, 20.0], [30.0, 40.0]]}
    new = {"a": {"b": [1.0, 2.5, 3.0]}, "angles": [[10.0, 20.0], [30.0, 45.0]]}
    mismatches = compare_metrics(new, old, [CATCH_ALL])
    assert keys_of(mismatches) == ["a.b[1]", "angles[1][1]"]
    assert (mismatches[0].old, mismatches[0].new) == (2.0, 2.5)
    # a list of dicts: one key per field
    old = {"points": [{"process": "em()", "breadth": 0.8}]}
    assert keys_of(compare_metrics({"points": [{"process": "em()", "breadth": 0.9}]}, old, [CATCH_ALL])) == [
        "points[0].breadth"
    ]


def test_missing_keys_fail_in_both_directions() -> None:
    old = {"a": 1.0, "l": [1.0, 2.0], "d": {"x": 1.0}}
    new = {"b": 1.0, "l": [1.0, 2.0, 3.0], "d": {}}
    mismatches = compare_metrics(new, old, [Rule("*", rel=10.0)])
    assert [(m.key, m.old, m.new) for m in mismatches] == [
        ("a", 1.0, MISSING),
        ("d.x", 1.0, MISSING),
        ("b", MISSING, 1.0),
        ("l[2]", MISSING, 3.0),
        ("d", MISSING, {}),
    ]
    assert "committed <missing>" in str(mismatches[2])


def test_skip_rules_ignore_the_key_and_its_presence() -> None:
    rules = [
        Rule("principal_angles_deg*", skip="not stable across machines"),
        Rule("runtime_s", skip="wall clock"),
        CATCH_ALL,
    ]
    old = {"principal_angles_deg": {"m": [[64.0, 89.6]]}, "runtime_s": 600.0, "r2": 0.99}
    new = {"principal_angles_deg": {"m": [[34.0]]}, "r2": 0.99}
    assert compare_metrics(new, old, rules) == []
    mismatches, compared, skipped = co._compare(new, old, rules)
    assert (compared, skipped) == (1, 3)  # m[0][0], m[0][1], runtime_s


def test_mismatch_is_frozen_and_prints_key_values_and_rule() -> None:
    [mismatch] = compare_metrics({"a": {"p": 0.2}}, {"a": {"p": 0.1}}, [Rule("*.p", abs=0.05), CATCH_ALL])
    assert mismatch == Mismatch("a.p", 0.1, 0.2, 'rel 0, abs 0.05 ("*.p")')
    with pytest.raises(AttributeError):
        mismatch.key = "b"  # type: ignore[misc]
    assert str(mismatch).startswith("a.p: committed 0.1, new 0.2  |diff| 0.1; tolerance rel 0, abs 0.05")


# ---------------------------------------------------------------------------------------------
# tolerances.yaml


def write_tolerances(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tolerances.yaml"
    path.write_text(text)
    return path


def test_load_tolerances_reads_rules_in_order(tmp_path: Path) -> None:
    path = write_tolerances(
        tmp_path,
        "s:\n"
        "  - {keys: 'runtime_s', skip: timing}\n"
        "  - {keys: '*.p', abs: 0.05}\n"
        "  - {keys: '*', rel: 0.05, abs: 1e-3}\n",  # 1e-3 without a dot is still a float
    )
    assert co.load_tolerances("s", path) == [
        Rule("runtime_s", skip="timing"),
        Rule("*.p", rel=0.0, abs=0.05),
        Rule("*", rel=0.05, abs=1e-3),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("s:\n  - {keys: 'a', rel: 0.1}\n", 'the last rule must be the catch-all keys: "*"'),
        ("s:\n  - {keys: 'a', skip: x, rel: 0.1}\n  - {keys: '*', rel: 0}\n", "a skip rule takes no rel/abs"),
        ("s:\n  - {keys: 'a', rel: -1}\n  - {keys: '*', rel: 0}\n", "'rel' must be a number >= 0"),
        ("s:\n  - {keys: 'a', tol: 1}\n  - {keys: '*', rel: 0}\n", "unknown field 'tol'"),
        ("s:\n  - {keys: 'a'}\n  - {keys: '*', rel: 0}\n", "give rel and/or abs, or skip"),
        ("s: []\n", "expected a non-empty list of rules"),
        ("s:\n  - {keys: '*', rel: 0}\ns:\n  - {keys: '*', rel: 0}\n", "duplicate key 's'"),
    ],
)
def test_malformed_tolerances_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(co.ToleranceError) as err:
        co.load_tolerances("s", write_tolerances(tmp_path, text))
    assert message in str(err.value)


def test_unknown_study_in_tolerances(tmp_path: Path) -> None:
    path = write_tolerances(tmp_path, "s:\n  - {keys: '*', rel: 0}\n")
    with pytest.raises(co.ToleranceError, match="has no rules for study 'other' \\(it has: s\\)"):
        co.load_tolerances("other", path)


def test_shipped_tolerances_cover_every_study_with_a_catch_all() -> None:
    every = co.load_all_tolerances()  # validates every rule of every study
    studies = discover_studies()
    assert studies, "no notebooks/*.py found"
    for study in studies:
        assert study in every, f"lib/persona_wm/io/tolerances.yaml has no rules for {study}"
        assert every[study][-1].keys == "*"
        assert not every[study][-1].skip, f"{study}: the catch-all must compare, not skip"
    assert sorted(set(every) - set(studies)) == [], "rules for a study that has no notebook"


def _study_of(folder: str, studies: list[str]) -> str | None:
    """outputs/05b_llm_finetuning_full is a 05b result: the longest study name it starts with."""
    matches = [s for s in studies if folder == s or folder.startswith(f"{s}_")]
    return max(matches, key=len) if matches else None


#: Folders under outputs/ that are not study outputs (make bench writes outputs/bench/; no notebook, no tolerances).
NOT_STUDIES = {"bench"}
COMMITTED = sorted(p for p in (REPO_ROOT / "outputs").glob("*/metrics.json") if p.parent.name not in NOT_STUDIES)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_every_committed_metrics_passes_against_itself(path: Path) -> None:
    study = _study_of(path.parent.name, discover_studies())
    assert study is not None, f"{path.parent.name} belongs to no study in notebooks/"
    metrics = json.loads(path.read_text())
    assert compare_metrics(metrics, json.loads(path.read_text()), co.load_tolerances(study)) == []


# ---------------------------------------------------------------------------------------------
# CLI, comparing only (--metrics)

STUDY = "02_steering_specificity"
PERTURBED_KEY = "probe_r2.z1r_x_z1r.factor0"


def test_cli_identical_copy_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "metrics.json"
    copy.write_text((REPO_ROOT / "outputs" / STUDY / "metrics.json").read_text())
    assert co.main(["--study", STUDY, "--metrics", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out
    assert "keys compared, 0 outside tolerance" in out


def test_cli_perturbed_copy_fails_and_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = json.loads((REPO_ROOT / "outputs" / STUDY / "metrics.json").read_text())
    old = metrics["probe_r2"]["z1r_x_z1r"]["factor0"]
    metrics["probe_r2"]["z1r_x_z1r"]["factor0"] = old * 0.9  # 10% > rel 0.05
    metrics["principal_angles_deg"]["z1r_x_z1r"][0][0] += 30.0  # skipped: not reported
    copy = tmp_path / "metrics.json"
    copy.write_text(json.dumps(metrics))
    assert co.main(["--study", STUDY, "--metrics", str(copy)]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "MISMATCH" in line]
    assert len(lines) == 1
    assert f"{PERTURBED_KEY}: committed {old:.10g}, new {old * 0.9:.10g}" in lines[0]
    assert 'tolerance rel 0.05, abs 0.001 ("*")' in lines[0]
    assert "1 outside tolerance" in out.splitlines()[-1]


def test_cli_against_another_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"runtime_s": 1.0, "grid": [{"value": 0.5}]}')
    b.write_text('{"runtime_s": 9.0, "grid": [{"value": 0.5}]}')
    assert co.main(["--study", "04_persona_engineering", "--metrics", str(a), "--against", str(b)]) == 0
    assert "1 keys compared, 0 outside tolerance, 1 skipped" in capsys.readouterr().out


def test_cli_unknown_study_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert co.main(["--study", "99_nope", "--metrics", "whatever.json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error: unknown study '99_nope' (available: 01_sfp_definition")


def test_cli_missing_metrics_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert co.main(["--study", STUDY, "--metrics", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_other_params_need_their_committed_result(capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke rerun compared with the default result would be all noise: refused before running."""
    assert co.main(["--study", "01_sfp_definition", "--params", "smoke"]) == 2
    assert "pass --against FILE to compare a 'smoke' run" in capsys.readouterr().err


def test_nan_in_a_metrics_file_equals_nan(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text('{"x": NaN}')
    assert math.isnan(co._read(a, tmp_path, "m")["x"])
    assert co.main(["--study", STUDY, "--metrics", str(a), "--against", str(a)]) == 0


# ---------------------------------------------------------------------------------------------
# A real rerun (minutes): `pytest -m slow tests/unit/test_check_outputs.py`


@pytest.mark.slow
def test_study_01_default_rerun_matches_committed(capsys: pytest.CaptureFixture[str]) -> None:
    committed = REPO_ROOT / "outputs" / "01_sfp_definition" / "metrics.json"
    before = (committed.read_bytes(), committed.stat().st_mtime_ns)
    assert co.main(["--study", "01_sfp_definition", "--params", "default"]) == 0, capsys.readouterr().out
    assert (committed.read_bytes(), committed.stat().st_mtime_ns) == before  # outputs/ untouched
    assert "0 outside tolerance" in capsys.readouterr().out
