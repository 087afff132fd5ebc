"""README tables that quote metrics.json are printed by scripts, and the README must hold their output verbatim."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["scripts/readme_05b.py"])
def test_readme_holds_the_table_its_script_prints(script):
    main = runpy.run_path(str(ROOT / script))["main"]
    assert main(["--check"]) == 0, f"README.md is out of date: run python {script} and paste its table"


def test_the_check_fails_on_a_stale_readme(tmp_path, monkeypatch):
    ns = runpy.run_path(str(ROOT / "scripts/readme_05b.py"))
    table = ns["table"]()
    assert table.startswith(ns["BEGIN"]) and table.endswith(ns["END"]) and "| measure |" in table
    # One digit changed anywhere in the table must fail the check.
    stale = table.replace("%", "0%", 1)
    fake = tmp_path / "README.md"
    fake.write_text(stale)
    main = ns["main"]
    monkeypatch.setitem(main.__globals__, "ROOT", tmp_path)
    assert main(["--check"]) == 1
