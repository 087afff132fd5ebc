"""lib.runner against a throwaway repo layout: success, failure isolation, validation first, baselines.

Three tests start a real kernel (a few seconds each); the rest never execute a notebook.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from lib import runner
from lib.report import REPO_ROOT

STUDY = "90_demo"
DEMO_NOTEBOOK = '''\
# %% [markdown]
# # Demo study for the runner tests

# %% tags=["parameters"]
seed: int = 0
fail: bool = False
torch_threads: int = 1
output_dir: str | None = None

# %%
import os

from lib.report import resolve_output_dir, write_metrics

out = resolve_output_dir(output_dir, "90_demo")
if fail:
    raise RuntimeError("deliberate failure")

# %%
# NBVAL_CHECK_OUTPUT
env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")}
write_metrics({"seed": seed, "torch_threads": torch_threads, "env": env}, out)
print(f"seed = {seed}")
'''


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """tmp repo: one runnable study with `ok`/`fail` params, jupytext.toml for pairing."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / f"{STUDY}.py").write_text(DEMO_NOTEBOOK)
    params = tmp_path / "params" / STUDY
    params.mkdir(parents=True)
    (params / "ok.yaml").write_text("seed: 7\nfail: false\ntorch_threads: 1\n")
    (params / "fail.yaml").write_text("seed: 7\nfail: true\ntorch_threads: 1\n")
    shutil.copy(REPO_ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    return tmp_path


def add_study(root: Path, study: str, params_yaml: str) -> None:
    (root / "notebooks" / f"{study}.py").write_text('# %% tags=["parameters"]\nseed: int = 0\n')
    (root / "params" / study).mkdir(parents=True)
    (root / "params" / study / "ok.yaml").write_text(params_yaml)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "outputs").glob(".*"))


# ---------------------------------------------------------------------------------------------
# Kernel-backed runs


def test_successful_run_writes_report_html_and_metrics(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--study", STUDY, "--params", "ok", "--threads", "2"], root=repo) == 0
    out = repo / "outputs" / STUDY
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.ipynb"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {
        "seed": 7,
        "torch_threads": 2,  # --threads injected because the notebook declares torch_threads
        "env": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"},
    }
    assert "seed = 7" in (out / "report.html").read_text()
    assert nbformat.read(out / "report.ipynb", as_version=4).cells  # a readable notebook
    assert leftovers(repo) == []
    printed = capsys.readouterr().out
    assert f"== [1/1] {STUDY} (params/{STUDY}/ok.yaml)" in printed
    assert f"wrote outputs/{STUDY} in " in printed


def test_failing_notebook_leaves_previous_outputs_untouched(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    previous = repo / "outputs" / STUDY
    previous.mkdir(parents=True)
    (previous / "metrics.json").write_text('{"seed": 1}\n')
    assert runner.main(["--study", STUDY, "--params", "fail"], root=repo) == 1
    assert [p.name for p in previous.iterdir()] == ["metrics.json"]
    assert (previous / "metrics.json").read_text() == '{"seed": 1}\n'
    assert leftovers(repo) == []
    err = capsys.readouterr().err
    assert "RuntimeError: deliberate failure" in err
    assert f"partial notebook: .cache/failed/{STUDY}.ipynb" in err
    assert (repo / ".cache" / "failed" / f"{STUDY}.ipynb").is_file()


def test_output_root_leaves_outputs_alone(repo: Path, tmp_path_factory: pytest.TempPathFactory,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """lib.check_outputs re-runs a study elsewhere; the committed outputs/<study> must not move."""
    previous = repo / "outputs" / STUDY
    previous.mkdir(parents=True)
    (previous / "metrics.json").write_text('{"seed": 1}\n')
    scratch = tmp_path_factory.mktemp("scratch")
    assert runner.main(["--study", STUDY, "--params", "ok", "--output-root", str(scratch)], root=repo) == 0
    assert json.loads((scratch / STUDY / "metrics.json").read_text())["seed"] == 7
    assert [p.name for p in previous.iterdir()] == ["metrics.json"]
    assert (previous / "metrics.json").read_text() == '{"seed": 1}\n'
    assert [p.name for p in scratch.iterdir()] == [STUDY]  # no .tmp-* left behind
    assert f"wrote {scratch / STUDY} in " in capsys.readouterr().out


def test_baseline_keeps_only_checked_outputs(repo: Path) -> None:
    source = repo / "notebooks" / f"{STUDY}.py"
    before = source.read_text()
    assert runner.main(["--baseline", "--study", STUDY], root=repo) == 0
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [None, None, 3]  # nbval needs the count where outputs are kept
    assert [len(c.outputs) for c in code] == [0, 0, 1]
    assert code[-1].outputs[0].text == "seed = 0\n"  # smoke defaults, nothing injected
    assert source.read_text() == before
    assert source.stat().st_mtime >= source.with_suffix(".ipynb").stat().st_mtime


# ---------------------------------------------------------------------------------------------
# Validation and selection, no kernel


def test_invalid_params_anywhere_stop_everything_before_running(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_study(repo, "91_other", "seed: abc\n")
    assert runner.main(["--params", "ok"], root=repo) == 1
    assert not (repo / "outputs").exists()
    err = capsys.readouterr().err
    assert "params/91_other/ok.yaml: field 'seed': expected int, got str ('abc')" in err


def test_unknown_study_lists_available(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--study", "99_nope"], root=repo) == 1
    assert "unknown study '99_nope' (available: 90_demo)" in capsys.readouterr().err


def test_studies_can_be_given_as_paths(repo: Path) -> None:
    add_study(repo, "91_other", "seed: 1\n")
    assert runner.discover_studies(repo) == ["90_demo", "91_other"]
    assert runner.resolve_studies(["notebooks/91_other.py", "90_demo.ipynb"], repo) == ["91_other", "90_demo"]


def test_threads_are_injected_only_where_declared(repo: Path) -> None:
    add_study(repo, "91_other", "seed: 1\n")
    params = runner.validate_all(["90_demo", "91_other"], "ok", repo, threads=3)
    assert params["90_demo"]["torch_threads"] == 3
    assert "torch_threads" not in params["91_other"]


def test_baseline_refuses_params(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--baseline", "--params", "smoke"])
    assert "--baseline runs the smoke defaults" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.parse_args(["--baseline", "--output-root", "/tmp/x"])


def test_swap_replaces_old_dir_and_cleans_up(tmp_path: Path) -> None:
    final, tmp = tmp_path / "study", tmp_path / ".tmp-study-x"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    assert runner._swap_into_place(tmp, final) == final
    assert [p.name for p in tmp_path.iterdir()] == ["study"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_strip_unchecked_outputs() -> None:
    notebook = nbformat.v4.new_notebook()
    out = nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=3)
    notebook.cells = [
        nbformat.v4.new_code_cell("x = 1", execution_count=1, outputs=[out]),
        nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nx", execution_count=2, outputs=[out]),
    ]
    stripped = runner.strip_unchecked_outputs(notebook)
    assert [c.execution_count for c in stripped.cells] == [None, 2]
    assert [len(c.outputs) for c in stripped.cells] == [0, 1]


SHIPPED_PARAMS = sorted((runner.REPO_ROOT / "params").glob("*/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_PARAMS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_params_file_validates_against_its_notebook(path):
    """A params file that drifts from its notebook's parameters cell fails here, not after an hour of reports."""
    params = runner.validate_all([path.parent.name], path.stem)
    assert params[path.parent.name], f"{path} loaded no parameters"
