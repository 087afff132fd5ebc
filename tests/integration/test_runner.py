"""persona_wm.io.runner against a throwaway repo layout: success, failure isolation, validation first, baselines,
the atomic swap, stale temp dirs, the kernel's PYTHONPATH and Ctrl-C.

Eight tests start a real kernel (a few seconds each); the rest never execute a notebook.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from persona_wm.io import runner
from persona_wm.io.params import REPO_ROOT

STUDY = "90_demo"
DEMO_NOTEBOOK = '''\
# %% [markdown]
# # Demo study for the runner tests
#
# The word probability is $\\Pr(w)$.

# %% tags=["parameters"]
seed: int = 0  # >= 0; <= 1000
fail: bool = False
torch_threads: int = 1
output_dir: str | None = None

# %%
import os

from persona_wm.io.params import resolve_output_dir

from persona_wm.io.outputs import write_metrics

out = resolve_output_dir(output_dir, "90_demo")
if fail:
    raise RuntimeError("deliberate failure")

# %%
import warnings

from tqdm.auto import tqdm

for _ in tqdm(range(3), desc="demo loop"):
    pass
warnings.warn("demo warning about something")

# %%
# NBVAL_CHECK_OUTPUT
env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "PYTHONPATH")}
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
    (params / "default.yaml").write_text("seed: 7\nfail: false\ntorch_threads: 1\n")
    (params / "fail.yaml").write_text("seed: 7\nfail: true\ntorch_threads: 1\n")
    shutil.copy(REPO_ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    return tmp_path


def add_study(root: Path, study: str, params_yaml: str) -> None:
    (root / "notebooks" / f"{study}.py").write_text('# %% tags=["parameters"]\nseed: int = 0\n')
    (root / "params" / study).mkdir(parents=True)
    (root / "params" / study / "default.yaml").write_text(params_yaml)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "outputs").glob(".*"))


# ---------------------------------------------------------------------------------------------
# Kernel-backed runs


def test_successful_run_writes_report_html_and_metrics(repo: Path, capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    stale = repo / "outputs" / f".tmp-{STUDY}-{dead_pid()}-abc123"  # a killed run's temp dir
    (stale / "figures").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="papermill"):
        assert runner.main(["--study", STUDY, "--params", "default", "--threads", "2"], root=repo) == 0
    # a valid params file runs without warnings: papermill's own parameter inference (which misreads rule
    # comments such as "# >= 0; <= 1000" and annotations such as "str | None") is not what checks our params
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    out = repo / "outputs" / STUDY
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.ipynb"]
    metrics = json.loads((out / "metrics.json").read_text())
    pythonpath = metrics["env"].pop("PYTHONPATH").split(os.pathsep)
    assert metrics == {
        "seed": 7,
        "torch_threads": 2,  # --threads injected because the notebook declares torch_threads
        "env": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"},
    }
    assert pythonpath[:2] == [str(repo / "lib"), str(repo)]  # the checkout's own package comes first
    html = (out / "report.html").read_text()
    assert "seed = 7" in html
    # no progress bar and no warning text in the report; the warning went to the terminal instead
    for noise in ("3/3 [", "it/s]", "100%|", "UserWarning", "TqdmWarning", "IProgress"):  # not in any cell's source
        assert noise not in html
    # readable offline: the markdown's TeX is MathML, no CDN MathJax/require.js; report.ipynb keeps the TeX
    assert "<math" in html and "mathjax" not in html.lower() and "<script src=" not in html
    assert r"$\Pr(w)$" in nbformat.read(out / "report.ipynb", as_version=4).cells[0].source
    report_nb = nbformat.read(out / "report.ipynb", as_version=4)
    injected = [c for c in report_nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert f'output_dir = "outputs/{STUDY}"' in injected[0].source
    assert report_nb.metadata.papermill.parameters.output_dir == f"outputs/{STUDY}"
    assert report_nb.metadata.papermill.input_path == f"notebooks/{STUDY}.py"
    assert report_nb.metadata.papermill.output_path == f"outputs/{STUDY}/report.ipynb"
    for text in ((out / "report.ipynb").read_text(), html):
        assert ".tmp-" not in text
    assert leftovers(repo) == []  # the stale dir is gone too
    printed = capsys.readouterr()
    assert f"== [1/1] {STUDY} (params/{STUDY}/default.yaml)" in printed.out
    assert f"wrote outputs/{STUDY} in " in printed.out
    assert f"removed outputs/{stale.name} (left by a killed run)" in printed.err
    assert "demo warning about something" in printed.err and "demo loop" not in printed.err


def test_kernel_log_receives_the_progress_bars_that_leave_the_report(repo: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PERSONA_WM_KERNEL_LOG=FILE: the kernel's stderr (progress bars with their elapsed times, warnings) is appended
    to FILE while the study runs, e.g. to learn where an interrupted GPU run spent its time; the report stays clean."""
    log = tmp_path / "kernel.log"
    log.write_text("earlier run\n")
    monkeypatch.setenv(runner.KERNEL_LOG_ENV, str(log))
    assert runner.main(["--study", STUDY, "--params", "default"], root=repo) == 0
    text = log.read_text()
    assert text.startswith("earlier run\n") and f"===== {STUDY} " in text  # appended, with the study named
    assert "demo loop" in text and "3/3 [" in text and "demo warning about something" in text
    html = (repo / "outputs" / STUDY / "report.html").read_text()
    assert "3/3 [" not in html and "it/s]" not in html  # ("demo loop" is in the cell's source)
    monkeypatch.setenv(runner.KERNEL_LOG_ENV, "")  # empty = unset: nothing more is written
    assert runner.main(["--study", STUDY, "--params", "default"], root=repo) == 0
    assert log.read_text() == text


def test_stderr_leaves_the_report_and_only_real_messages_reach_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Progress bars, nested ones included (tqdm moves the cursor up with ESC [ A between them), are not printed
    again; a warning is printed once, with its cell number; stdout and results stay in the notebook."""
    nb = nbformat.v4.new_notebook()
    nested = ("outer:  50%|#####     | 1/2 [00:01<00:01,  1.0s/it]\n\x1b[A\r"
              "inner: 100%|##########| 3/3 [00:00<00:00, 9.9it/s]\x1b[A\n\x1b[A\n")
    nb.cells = [nbformat.v4.new_code_cell("run()", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text=nested + "UserWarning: something real\n"),
        nbformat.v4.new_output("stream", name="stdout", text="a result\n")]),
        nbformat.v4.new_code_cell("again()", outputs=[
            nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something real\n\x1b[A\n")])]
    out = runner.stderr_to_terminal(nb, "90_demo")
    assert [o["name"] for c in out.cells for o in c["outputs"]] == ["stdout"]
    assert capsys.readouterr().err == "   90_demo cell 0: UserWarning: something real\n"


def test_failing_notebook_leaves_previous_outputs_untouched(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    previous = repo / "outputs" / f"{STUDY}_fail"  # params/<study>/fail.yaml writes outputs/<study>_fail
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


def test_other_params_write_beside_the_default_outputs(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke (or any non-default) run never replaces the committed outputs/<study>: it writes <study>_<params>."""
    committed = repo / "outputs" / STUDY
    committed.mkdir(parents=True)
    (committed / "metrics.json").write_text('{"seed": 1}\n')
    (repo / "params" / STUDY / "smoke.yaml").write_text("seed: 3\nfail: false\ntorch_threads: 1\n")
    assert runner.main(["--study", STUDY, "--params", "smoke"], root=repo) == 0
    assert (committed / "metrics.json").read_text() == '{"seed": 1}\n'
    assert json.loads((repo / "outputs" / f"{STUDY}_smoke" / "metrics.json").read_text())["seed"] == 3
    assert f"wrote outputs/{STUDY}_smoke in " in capsys.readouterr().out
    assert runner.output_folder(STUDY, "default") == STUDY


def test_jobs_run_studies_at_once_and_a_failure_stops_only_itself(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--jobs 3: three kernels at once; each study's outputs are what it writes alone, the failing one's untouched."""
    for study, fail in (("91_demo", "false"), ("92_demo", "true")):
        (repo / "notebooks" / f"{study}.py").write_text(DEMO_NOTEBOOK.replace('"90_demo"', f'"{study}"'))
        (repo / "params" / study).mkdir()
        (repo / "params" / study / "default.yaml").write_text(f"seed: 8\nfail: {fail}\ntorch_threads: 1\n")
    previous = repo / "outputs" / "92_demo"
    previous.mkdir(parents=True)
    (previous / "metrics.json").write_text('{"seed": 1}\n')
    omp_before = os.environ.get("OMP_NUM_THREADS")
    code = runner.main(["--study", STUDY, "91_demo", "92_demo", "--params", "default", "--threads", "2", "--jobs", "3"],
                       root=repo)
    assert code == 1
    for study, seed in ((STUDY, 7), ("91_demo", 8)):
        metrics = json.loads((repo / "outputs" / study / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["torch_threads"] == 2
        assert metrics["env"]["OMP_NUM_THREADS"] == "2" and metrics["env"]["HF_HUB_OFFLINE"] == "1"
        assert metrics["env"]["PYTHONPATH"].split(os.pathsep)[:2] == [str(repo / "lib"), str(repo)]
    assert (previous / "metrics.json").read_text() == '{"seed": 1}\n'
    assert leftovers(repo) == []
    assert os.environ.get("OMP_NUM_THREADS") == omp_before  # this process's environment is restored
    printed = capsys.readouterr()
    assert "3 studies, 3 at a time" in printed.out
    assert printed.out.count("wrote outputs/") == 2 and "2 of 3 studies in " in printed.out
    assert "failed: 92_demo" in printed.out and "RuntimeError: deliberate failure" in printed.err


def test_output_root_leaves_outputs_alone(repo: Path, tmp_path_factory: pytest.TempPathFactory,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """persona_wm.io.check_outputs re-runs a study elsewhere; the committed outputs/<study> must not move."""
    previous = repo / "outputs" / STUDY
    previous.mkdir(parents=True)
    (previous / "metrics.json").write_text('{"seed": 1}\n')
    scratch = tmp_path_factory.mktemp("scratch")
    assert runner.main(["--study", STUDY, "--params", "default", "--output-root", str(scratch)], root=repo) == 0
    assert json.loads((scratch / STUDY / "metrics.json").read_text())["seed"] == 7
    assert [p.name for p in previous.iterdir()] == ["metrics.json"]
    assert (previous / "metrics.json").read_text() == '{"seed": 1}\n'
    assert [p.name for p in scratch.iterdir()] == [STUDY]  # no .tmp-* left behind
    assert f"wrote {scratch / STUDY} in " in capsys.readouterr().out


def test_a_relative_output_root_is_below_the_current_directory(repo: Path, tmp_path_factory: pytest.TempPathFactory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--output-root scratch/out from some directory: the kernel (which runs in notebooks/) writes the metrics there
    too, not below notebooks/ (where they used to land while the report went to the right place)."""
    here = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(here)
    assert runner.main(["--study", STUDY, "--params", "default", "--output-root", "scratch/out"], root=repo) == 0
    assert sorted(p.name for p in (here / "scratch" / "out" / STUDY).iterdir()) == [
        "metrics.json", "report.html", "report.ipynb"]
    assert not (repo / "notebooks" / "scratch").exists()


def test_baseline_keeps_only_checked_outputs(repo: Path) -> None:
    source = repo / "notebooks" / f"{STUDY}.py"
    before = source.read_text()
    assert runner.main(["--baseline", "--study", STUDY], root=repo) == 0
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [None, None, None, 4]  # nbval needs the count where outputs are kept
    assert [len(c.outputs) for c in code] == [0, 0, 0, 1]
    assert code[-1].outputs[0].text == "seed = 0\n"  # smoke defaults, nothing injected
    assert source.read_text() == before
    assert source.stat().st_mtime >= source.with_suffix(".ipynb").stat().st_mtime


# ---------------------------------------------------------------------------------------------
# Validation and selection, no kernel


def test_invalid_params_anywhere_stop_everything_before_running(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_study(repo, "91_other", "seed: abc\n")
    assert runner.main(["--params", "default"], root=repo) == 1
    assert not (repo / "outputs").exists()
    err = capsys.readouterr().err
    assert "params/91_other/default.yaml: field 'seed': expected int, got str ('abc')" in err


def test_unknown_study_lists_available(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--study", "99_nope"], root=repo) == 1
    assert "unknown study '99_nope' (available: 90_demo)" in capsys.readouterr().err


def test_studies_can_be_given_as_paths(repo: Path) -> None:
    add_study(repo, "91_other", "seed: 1\n")
    assert runner.discover_studies(repo) == ["90_demo", "91_other"]
    assert runner.resolve_studies(["notebooks/91_other.py", "90_demo.ipynb"], repo) == ["91_other", "90_demo"]


def test_threads_are_injected_only_where_declared(repo: Path) -> None:
    add_study(repo, "91_other", "seed: 1\n")
    params = runner.validate_all(["90_demo", "91_other"], "default", repo, threads=3)
    assert params["90_demo"]["torch_threads"] == 3
    assert "torch_threads" not in params["91_other"]


QUIET_LLM_NOTEBOOK = '''\
# %% tags=["parameters"]
model_dir: str = "none"  # non-empty
output_dir: str | None = None

# %%
import copy
import tempfile

from persona_wm.io.outputs import write_metrics
from persona_wm.io.params import resolve_output_dir
from persona_wm.llm import lora
from persona_wm.llm import model as L
import transformer_lens  # noqa: F401  the toy studies import it lazily (persona_wm.toy.train), after persona_wm

out = resolve_output_dir(output_dir, "92_quiet_llm")
llm = L.load_llm(model=model_dir, device="cpu", root=tempfile.mkdtemp())
spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj",), first_layer=0, steps=1, batch_size=1)
peft_model = lora.peft_model_for(copy.deepcopy(llm.model), spec, llm.n_layers)
write_metrics({"n_layers": llm.n_layers}, out)
'''


def test_an_llm_study_prints_no_third_party_warning(repo: Path, tiny_llama, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid run shows no warning on the terminal: importing peft, transformers or transformer_lens in a kernel without ipywidgets
    (tqdm.auto's "IProgress not found") and wrapping a model in LoRA (peft reading transformers' deprecated
    ``is_gradient_checkpointing``) each warned on every 05a/05b run."""
    (repo / "notebooks" / "92_quiet_llm.py").write_text(QUIET_LLM_NOTEBOOK)
    (repo / "params" / "92_quiet_llm").mkdir(parents=True)
    (repo / "params" / "92_quiet_llm" / "default.yaml").write_text(f"model_dir: {tiny_llama.weights}\n")
    assert runner.main(["--study", "92_quiet_llm"], root=repo) == 0
    err = capsys.readouterr().err
    assert json.loads((repo / "outputs" / "92_quiet_llm" / "metrics.json").read_text())["n_layers"] >= 1
    assert not [line for line in err.splitlines() if "Warning" in line or "warnings.warn" in line], err


def test_device_sets_the_llm_studies_device_parameter(repo: Path) -> None:
    """``--device cuda`` must reach a study that reads a ``device`` parameter (05a/05b), not only the toy studies'
    environment variable; ``--set device=...`` wins over it, and a study without the parameter is untouched."""
    (repo / "notebooks" / "91_other.py").write_text('# %% tags=["parameters"]\nseed: int = 0  # >= 0\n'
                                                    'device: str = "cpu"  # non-empty\n')
    (repo / "params" / "91_other").mkdir(parents=True)
    (repo / "params" / "91_other" / "default.yaml").write_text("seed: 1\ndevice: cpu\n")
    params = runner.validate_all(["90_demo", "91_other"], "default", repo, device="cuda")
    assert params["91_other"]["device"] == "cuda" and "device" not in params["90_demo"]
    assert runner.validate_all(["91_other"], "default", repo)["91_other"]["device"] == "cpu"
    both = runner.validate_all(["91_other"], "default", repo, overrides={"device": "cuda:1"}, device="cuda")
    assert both["91_other"]["device"] == "cuda:1"


def test_set_overrides_are_validated_and_go_only_where_declared(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "notebooks" / "91_other.py").write_text('# %% tags=["parameters"]\nseed: int = 0  # >= 0\n'
                                                    'mode: str = "a"  # one of: a, b\n')
    (repo / "params" / "91_other").mkdir(parents=True)
    (repo / "params" / "91_other" / "default.yaml").write_text("seed: 1\nmode: a\n")
    params = runner.validate_all(["90_demo", "91_other"], "default", repo, overrides={"mode": "b"})
    assert params["91_other"] == {"seed": 1, "mode": "b"} and "mode" not in params["90_demo"]
    assert runner.parse_args(["--set", "mode=b", "--set", "seed=2"]).overrides == [("mode", "b"), ("seed", 2)]
    with pytest.raises(runner.ParamsError, match="value 'c' breaks rule 'one of: a, b'"):
        runner.validate_all(["91_other"], "default", repo, overrides={"mode": "c"})
    with pytest.raises(runner.ParamsError, match="--set colour: no parameter of that name in 90_demo, 91_other"):
        runner.validate_all(["90_demo", "91_other"], "default", repo, overrides={"colour": "red"})
    assert runner.main(["--params", "default", "--set", "seed=-1"], root=repo) == 1  # nothing runs, nothing written
    assert not (repo / "outputs").exists()
    assert "with --set seed=-1: field 'seed'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.parse_args(["--set", "mode"])


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


# ---------------------------------------------------------------------------------------------
# The atomic swap and temp dirs of killed runs


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_dir(path: Path, name: str) -> Path:
    path.mkdir(parents=True)
    (path / name).write_text(name)
    return path


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.skipif(runner._renameat2() is None, reason="no renameat2 on this platform")
def test_exchange_swaps_two_directories_in_one_step(tmp_path: Path) -> None:
    a, b = make_dir(tmp_path / "a", "from_a"), make_dir(tmp_path / "b", "from_b")
    assert runner.exchange_paths(a, b) is True
    assert names(a) == ["from_b"] and names(b) == ["from_a"]
    with pytest.raises(FileNotFoundError):
        runner.exchange_paths(a, tmp_path / "missing")


@pytest.mark.skipif(runner._renameat2() is None, reason="no renameat2 on this platform")
def test_swap_uses_the_exchange_not_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final, tmp = make_dir(tmp_path / "study", "old.txt"), make_dir(tmp_path / ".tmp-study-1-x", "new.txt")

    def no_rename(*args):
        raise AssertionError("a rename would leave a moment without outputs/<study>")

    monkeypatch.setattr(runner.os, "rename", no_rename)
    assert runner._swap_into_place(tmp, final) == final
    assert names(tmp_path) == ["study"] and names(final) == ["new.txt"]


def test_swap_into_a_missing_target_is_one_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "exchange_paths", lambda a, b: pytest.fail("nothing to exchange with"))
    tmp = make_dir(tmp_path / ".tmp-study-1-x", "new.txt")
    runner._swap_into_place(tmp, tmp_path / "study")
    assert names(tmp_path) == ["study"] and names(tmp_path / "study") == ["new.txt"]


def fake_renameat2(code: int):
    def renameat2(*args) -> int:
        ctypes.set_errno(code)
        return -1

    return renameat2


@pytest.mark.parametrize("unsupported", [None, fake_renameat2(errno.EINVAL), fake_renameat2(errno.ENOSYS)],
                         ids=["no_renameat2", "filesystem_EINVAL", "kernel_ENOSYS"])
def test_swap_falls_back_to_two_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unsupported) -> None:
    monkeypatch.setattr(runner, "_renameat2", lambda: unsupported)
    final, tmp = make_dir(tmp_path / "study", "old.txt"), make_dir(tmp_path / ".tmp-study-1-x", "new.txt")
    assert runner.exchange_paths(tmp, final) is False
    assert runner._swap_into_place(tmp, final) == final
    assert names(tmp_path) == ["study"] and names(final) == ["new.txt"]


def test_exchange_reports_real_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_renameat2", lambda: fake_renameat2(errno.EACCES))
    with pytest.raises(PermissionError):
        runner.exchange_paths(tmp_path / "a", tmp_path / "b")


def test_stale_temp_dirs_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead, alive = dead_pid(), os.getppid()
    make_dir(tmp_path / f".tmp-02_x-{dead}-ab_c1", "partial.png")
    make_dir(tmp_path / f".old-02_x-{dead}-0f3a", "metrics.json")
    make_dir(tmp_path / f".tmp-02_x-{alive}-zz", "running")  # a concurrent run: kept
    make_dir(tmp_path / f".tmp-02_x-{os.getpid()}-yy", "ours")  # this process: kept
    make_dir(tmp_path / ".tmp-02_x-legacy", "no pid")  # an older runner's name: left for make clean
    make_dir(tmp_path / "02_x", "metrics.json")
    (tmp_path / f".tmp-file-{dead}-x").write_text("a file, not a run dir")
    removed = runner.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [f".old-02_x-{dead}-0f3a", f".tmp-02_x-{dead}-ab_c1"]
    assert names(tmp_path) == sorted(
        ["02_x", ".tmp-02_x-legacy", f".tmp-02_x-{alive}-zz", f".tmp-02_x-{os.getpid()}-yy", f".tmp-file-{dead}-x"]
    )


def test_failed_run_cleans_its_temp_dir_and_names_it_by_pid(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fail(study, params, tmp, root, progress_bar):
        seen.append(tmp.name)
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "_execute", fail)
    with pytest.raises(runner.StudyError, match="RuntimeError: boom"):
        runner.run_study(STUDY, {"seed": 1}, repo)
    assert runner.TEMP_DIR_PATTERN.fullmatch(seen[0])["pid"] == str(os.getpid())
    assert leftovers(repo) == []


# ---------------------------------------------------------------------------------------------
# The kernel imports the checkout's own lib


def test_kernel_env_puts_the_checkout_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", str(tmp_path)]))
    env = runner.kernel_env(2, root=tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "lib"), str(tmp_path), "/elsewhere"]
    assert env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"


WHICH_LIB_NOTEBOOK = '''\
# %% tags=["parameters"]
output_dir: str | None = None

# %%
import os

import persona_wm

with open(os.path.join(output_dir, "which.txt"), "w") as handle:
    handle.write(f"{persona_wm.CLONE} {persona_wm.__file__}")
'''


def test_each_clone_runs_its_own_lib(tmp_path: Path) -> None:
    """Two checkouts whose lib differs: each run's kernel imports its own, not the installed one."""
    for clone in ("first", "second"):
        root = tmp_path / clone
        (root / "lib" / "persona_wm").mkdir(parents=True)
        (root / "lib" / "persona_wm" / "__init__.py").write_text(f"CLONE = {clone!r}\n")
        (root / "notebooks").mkdir()
        (root / "notebooks" / "90_which.py").write_text(WHICH_LIB_NOTEBOOK)
        (root / "params" / "90_which").mkdir(parents=True)
        (root / "params" / "90_which" / "default.yaml").write_text("{}\n")
    for clone in ("first", "second"):
        root = tmp_path / clone
        assert runner.main(["--study", "90_which"], root=root) == 0
        name, path = (root / "outputs" / "90_which" / "which.txt").read_text().split(" ", 1)
        assert name == clone and Path(path) == root / "lib" / "persona_wm" / "__init__.py"


# ---------------------------------------------------------------------------------------------
# Ctrl-C


SLOW_NOTEBOOK = '''\
# %% tags=["parameters"]
output_dir: str | None = None

# %%
import os
import time

with open(os.path.join(output_dir, "started"), "w") as handle:
    handle.write(str(os.getpid()))
time.sleep(120)
'''


def test_ctrl_c_ends_with_one_line_and_exit_130(tmp_path: Path) -> None:
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "90_slow.py").write_text(SLOW_NOTEBOOK)
    (tmp_path / "params" / "90_slow").mkdir(parents=True)
    (tmp_path / "params" / "90_slow" / "default.yaml").write_text("{}\n")
    previous = make_dir(tmp_path / "outputs" / "90_slow", "metrics.json")
    code = "import sys; from pathlib import Path; from persona_wm.io import runner; sys.exit(runner.main(['--study', '90_slow'], root=Path(sys.argv[1])))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        started = []
        while not started and time.monotonic() < deadline and proc.poll() is None:
            started = list((tmp_path / "outputs").glob(".tmp-90_slow-*/started"))
            time.sleep(0.1)
        assert started, proc.communicate(timeout=10)
        time.sleep(0.2)
        kernel_pid = int(started[0].read_text())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted: outputs/90_slow left unchanged"
    assert names(previous) == ["metrics.json"] and (previous / "metrics.json").read_text() == "metrics.json"
    assert leftovers(tmp_path) == []
    for _ in range(50):  # the kernel was shut down with the run
        if not running(kernel_pid):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"kernel {kernel_pid} still running")


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child that nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        state = "R"
    return state not in ("Z", "X")
