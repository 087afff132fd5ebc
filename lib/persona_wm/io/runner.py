"""Run study notebooks with papermill into ``outputs/<study>/`` (``outputs/<study>_<params>/`` for any params file but
default); refresh nbval baselines.

Usage::

    python -m persona_wm.io.runner [--study S ...] [--params NAME] [--threads N] [--output-root DIR] [--jobs N]
    python -m persona_wm.io.runner --baseline [--study S ...]

``--jobs N`` runs up to N studies at once (each notebook in its own kernel): on a machine with spare
cores or a GPU that one study's small models cannot fill, the wall time of several studies falls to
about that of the longest one. Each study runs as it would alone (checked on this repo's CPU: studies 01-04 at
``--jobs 2`` gave the serial run's metrics.json but for 04's recorded training time).

Why a runner rather than ``papermill`` on the command line: papermill cannot read our jupytext
``.py`` sources, does not validate parameters before spending an hour on a run, and writes
straight into its output path, so a failed run would clobber the last good report. Here every
params file is validated first (types and the value rules of each notebook's parameters cell),
each study runs in a temp dir, and only a complete result (notebook, HTML, figures, metrics) is
swapped into ``outputs/<study>`` with one atomic exchange: at every instant ``outputs/<study>``
is either the previous complete result or the new one. Temp dirs of killed runs are removed by
the next run; Ctrl-C ends with one line on stderr and exit code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import errno
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

from persona_wm.core.files import atomic_write_text
from persona_wm.io.mathml import MathMLPreprocessor, strip_mathjax
from persona_wm.io.params import (
    OUTPUT_DIR_PARAM,
    REPO_ROOT,
    ParamsError,
    display_path,
    load_params,
    notebook_path,
    parameter_schema,
)

KERNEL_NAME = "python3"
#: A cell whose source holds this marker keeps its outputs in the baseline (nbval --nbval-lax).
CHECK_OUTPUT_MARKER = "# NBVAL_CHECK_OUTPUT"
#: Studies must never reach the network: models and data come from local caches.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
THREADS_PARAM = "torch_threads"
#: Read by persona_wm.toy.train.default_device in the kernel; set by --device (make reports DEVICE=cuda).
DEVICE_ENV = "PERSONA_WM_DEVICE"
#: A file that receives the kernel's stderr as it runs (its progress bars, one per long step, with their elapsed
#: times), appended to; unset (the default), that stream only leaves the report (see :func:`stderr_to_terminal`).
#: For long unattended runs, e.g. on a GPU host with a wall-clock limit, where an interrupted run writes no report.
KERNEL_LOG_ENV = "PERSONA_WM_KERNEL_LOG"
DEVICE_PARAM = "device"  # the LLM studies' parameter that --device sets
DEVICES = ("cpu", "cuda", "auto")
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED_EXIT = 130
#: ``.tmp-<study>-<pid>-<random>`` (a run in progress) and ``.old-<study>-<pid>-<random>`` (the
#: previous outputs during the fallback swap): the pid says whether the owner still runs.
TEMP_DIR_PATTERN = re.compile(r"\.(?:tmp|old)-(?P<study>.+)-(?P<pid>\d+)-[^-]+")


class StudyError(RuntimeError):
    """A study failed to run; the message is the one line the user needs."""


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C during a study; ``written`` is True when it came during the final swap, which completed."""

    def __init__(self, written: bool = False) -> None:
        super().__init__()
        self.written = written


# --------------------------------------------------------------------------------------------
# Studies and the kernel environment


def discover_studies(root: Path = REPO_ROOT) -> list[str]:
    """Every ``notebooks/*.py`` is a study; sorted so ``01_`` runs before ``02_``."""
    sources = (Path(root) / "notebooks").glob("*.py")
    return sorted(p.stem for p in sources if not p.stem.startswith(("_", ".")))


def resolve_studies(requested: Sequence[str] | None, root: Path = REPO_ROOT) -> list[str]:
    """Accept ``01_x``, ``notebooks/01_x.py`` or ``01_x.ipynb`` (tab completion gives paths)."""
    available = discover_studies(root)
    if not requested:
        return available
    studies = [Path(s).stem if s.endswith((".py", ".ipynb")) else s for s in requested]
    unknown = [s for s in studies if s not in available]
    if unknown:
        raise StudyError(f"unknown study '{unknown[0]}' (available: {', '.join(available) or 'none'})")
    return list(dict.fromkeys(studies))


def kernel_env(threads: int | None = None, root: Path = REPO_ROOT) -> dict[str, str]:
    """Variables the kernel must see: offline hubs, this checkout's package first on PYTHONPATH, thread caps.

    The kernel starts in ``notebooks/``, so without PYTHONPATH its ``import persona_wm`` would find
    whichever tree was installed editable: a second clone would run the first clone's library.
    ``<root>/lib`` holds the package (src layout); ``<root>`` follows it for ``tests.*`` helpers.
    """
    env = dict(OFFLINE_ENV)
    first = [str(root / "lib"), str(root)]
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
    env["PYTHONPATH"] = os.pathsep.join([*first, *rest])
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


@contextlib.contextmanager
def patched_environ(env: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the kernel we are about to start (it inherits ours), then restore."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def validate_all(
    studies: Sequence[str], params_name: str, root: Path = REPO_ROOT, threads: int | None = None,
    overrides: Mapping[str, Any] | None = None, device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Load every study's params before running any, so one typo cannot waste a long batch.

    ``overrides`` (``--set KEY=VALUE``) replace a parameter's value in every study whose parameters cell
    declares it, and are validated like the file's values; a key that no requested study declares is an
    error. ``device`` (``--device``) sets the ``device`` parameter of every study that declares one (the LLM
    studies; the toy studies read ``$PERSONA_WM_DEVICE`` instead), unless ``--set device=...`` names it.
    Raises ParamsError whose message lists every invalid file (one line each).
    """
    overrides = dict(overrides or {})
    declared = {k for study in studies for k in parameter_schema(study, root)} if overrides else set()
    unknown = sorted(set(overrides) - declared)
    if unknown:
        raise ParamsError(f"--set {', '.join(unknown)}: no parameter of that name in "
                          f"{', '.join(studies)} (see their parameters cells)")
    loaded: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for study in studies:
        try:
            schema = parameter_schema(study, root) if overrides or device is not None else {}
            mine = {k: v for k, v in overrides.items() if k in schema}
            if device is not None and DEVICE_PARAM in schema:
                mine.setdefault(DEVICE_PARAM, device)
            params = load_params(study, params_name, root, mine)
            if threads is not None and THREADS_PARAM in parameter_schema(study, root):
                params[THREADS_PARAM] = threads
            loaded[study] = params
        except ParamsError as err:
            errors.append(str(err))
    if errors:
        raise ParamsError("\n".join(errors))
    return loaded


# --------------------------------------------------------------------------------------------
# One study -> outputs/<study>


def output_folder(study: str, params_name: str) -> str:
    """``outputs/<study>`` holds the default params' result; any other params file writes ``<study>_<params>``
    (where ``persona_wm.io.check_outputs`` looks for it), so a smoke run never replaces the committed results."""
    return study if params_name == "default" else f"{study}_{params_name}"


def run_study(
    study: str,
    params: Mapping[str, Any],
    root: Path = REPO_ROOT,
    threads: int | None = None,
    progress_bar: bool = True,
    out_root: Path | None = None,
    folder: str | None = None,
) -> Path:
    """Execute one study into a temp dir and swap it into ``outputs/<folder>`` (default ``<study>``); returns that dir.

    On any failure the temp dir is removed, ``outputs/<study>`` is left as it was, and a
    StudyError says what happened (for a cell error: which cell, exception and message).
    ``out_root`` replaces ``<root>/outputs`` (e.g. a scratch dir for ``persona_wm.io.check_outputs``, which
    must not touch the committed results); notebooks, params and caches still come from ``root``. A relative
    ``out_root`` means one below the current directory, made absolute here: the kernel runs in ``notebooks/``,
    where the same relative path would name another place (its metrics and figures would be written there).
    """
    outputs = Path(out_root).absolute() if out_root is not None else Path(root) / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(outputs):
        print(f"   removed {display_path(stale, root)} (left by a killed run)", file=sys.stderr)
    final = outputs / (folder or study)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{study}-{os.getpid()}-", dir=outputs))
    tmp.chmod(0o755)  # mkdtemp makes it private; it becomes outputs/<study>
    try:
        with patched_environ(kernel_env(threads, root)):
            notebook = _execute(study, params, tmp, root, progress_bar)
        notebook = stderr_to_terminal(notebook, study)
        source = display_path(notebook_path(study, root), root)
        notebook = _final_paths_in_notebook(notebook, tmp, display_path(final, root), source)
        _write_notebook(notebook, tmp / "report.ipynb")
        _export_html(notebook, tmp / "report.html")
    except BaseException as err:
        failure = _describe_failure(err, study, tmp, root)
        with _sigint_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise StudyError(failure) from err
        if isinstance(err, Exception | KeyboardInterrupt):  # Ctrl-C here, or inside the kernel
            raise StudyInterrupted() from err
        raise
    try:
        with _sigint_deferred() as interrupted:
            _swap_into_place(tmp, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StudyError(f"{study}: could not move the result into {display_path(final, root)}: {err}") from err
    if interrupted:
        raise StudyInterrupted(written=True)
    return final


def _execute(study: str, params: Mapping[str, Any], tmp: Path, root: Path, progress_bar: bool) -> Any:
    import jupytext  # heavy imports stay out of `--help` and of notebooks importing lib
    import papermill

    notebook = jupytext.read(notebook_path(study, root))
    for name in ("papermill", "papermill.translators"):  # a logger's filters do not see its children's records
        logging.getLogger(name).addFilter(_drop_parameter_inference_warnings)
    with contextlib.ExitStack() as stack:
        kernel_log = None
        if os.environ.get(KERNEL_LOG_ENV):
            kernel_log = stack.enter_context(open(os.environ[KERNEL_LOG_ENV], "a", encoding="utf-8"))
            kernel_log.write(f"===== {study} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        return papermill.execute_notebook(
            notebook,
            str(tmp / "report.ipynb"),
            parameters={**params, OUTPUT_DIR_PARAM: str(tmp)},
            cwd=str(Path(root) / "notebooks"),
            kernel_name=KERNEL_NAME,
            language="python",  # a .py without a jupytext header carries no kernelspec
            progress_bar=progress_bar,
            log_output=False,
            stderr_file=kernel_log,
            # Kernel-side log lines (TCP warning, shutdown interrupt) are noise; cell errors still
            # surface through PapermillExecutionError and the saved notebook.
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )


#: What papermill's own parameter inference logs about our parameters cells: its regex cannot read annotations such
#: as ``str | None`` ("Passed unknown parameter") nor a line with a second ``=`` such as the rule comment
#: ``# >= 0; <= 1`` ("Unable to parse line"). That inference only feeds papermill's unknown-parameter warning; our
#: schema check (``persona_wm.io.params``) has already validated every name and value before the run.
PAPERMILL_INFERENCE_NOISE = ("Passed unknown parameter", "Unable to parse line")


def _drop_parameter_inference_warnings(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(PAPERMILL_INFERENCE_NOISE)


#: A progress-bar line (tqdm): "desc:  40%|####      | 4/10 [00:01<00:02, 2.9it/s]".
_PROGRESS_LINE = re.compile(r"\d+%\||\|\s*\d+/\d+ \[|\d+/\d+ \[\d|it/s\]|s/it\]")
#: Terminal control sequences (nested tqdm bars move the cursor up with ESC [ A between their lines).
_ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def stderr_to_terminal(notebook: Any, study: str) -> Any:
    """Take every cell's stderr stream (progress bars, warnings) out of the report: a reader of report.html sees
    prose, tables and figures. Progress lines were already shown while the cell ran; anything else (a warning)
    is printed here on the terminal, once per distinct line, with its cell number."""
    seen: set[str] = set()
    for index, cell in enumerate(notebook.cells):
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                for raw in output.get("text", "").split("\n"):
                    line = _ANSI_CONTROL.sub("", raw.split("\r")[-1]).strip()
                    if line and not _PROGRESS_LINE.search(line) and line not in seen:
                        seen.add(line)
                        print(f"   {study} cell {index}: {line}", file=sys.stderr)
            else:
                kept.append(output)
        cell["outputs"] = kept
    return notebook


def _final_paths_in_notebook(notebook: Any, tmp: Path, final: str, source: str) -> Any:
    """Name the final output folder where papermill recorded the temp one.

    papermill injects ``output_dir = "<temp dir>"`` and keeps it in the notebook metadata; the saved
    report must say where its files are (``outputs/<study>``, relative to the repo root), not name
    a folder that no longer exists. papermill's ``input_path`` (a copy of the whole input notebook,
    since we pass it a notebook object) becomes the source's path, ``notebooks/<study>.py``.
    """
    temp = str(tmp)
    for cell in notebook.cells:
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source = cell.source.replace(temp, final)
    meta = notebook.get("metadata", {}).get("papermill", {})
    parameters = meta.get("parameters") or {}
    if parameters.get(OUTPUT_DIR_PARAM) == temp:
        parameters[OUTPUT_DIR_PARAM] = final
    if "input_path" in meta:
        meta["input_path"] = source
    if isinstance(meta.get("output_path"), str):
        meta["output_path"] = meta["output_path"].replace(temp, final)
    return notebook


def _write_notebook(notebook: Any, path: Path) -> None:
    import nbformat

    atomic_write_text(path, nbformat.writes(notebook) + "\n")


def _export_html(notebook: Any, path: Path) -> None:
    """report.html, readable offline: math rendered to MathML at export, no CDN script (io.mathml)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter()
    exporter.register_preprocessor(MathMLPreprocessor(), enabled=True)
    body, _ = exporter.from_notebook_node(copy.deepcopy(notebook))  # the saved report.ipynb keeps its TeX
    atomic_write_text(path, strip_mathjax(body))


def _swap_into_place(tmp: Path, final: Path) -> Path:
    """Replace ``final`` by ``tmp`` atomically; the previous contents are then deleted.

    No ``final`` yet: one rename. Otherwise one ``renameat2(RENAME_EXCHANGE)`` swaps the two
    directories in a single step (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), so a kill at any
    moment leaves either the old or the new ``final``. Where the exchange is unsupported (another
    OS, some network filesystems), two renames, with the old dir restored if the second fails.
    """
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return final
    if exchange_paths(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous outputs
        return final
    old = final.with_name(f".old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: errno values meaning "this kernel or filesystem cannot exchange": use the two-rename fallback.
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False (nothing done) where that is unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_stale_temps(outputs: Path) -> list[Path]:
    """Delete ``.tmp-*`` / ``.old-*`` dirs under ``outputs`` whose owner process is gone; returns them.

    A run names its temp dir after its pid, so a dir whose pid is alive (a concurrent run) is kept.
    Dirs that do not carry a pid (an older runner's) are left for ``make clean``.
    """
    removed = []
    for path in sorted(Path(outputs).glob(".*")):
        match = TEMP_DIR_PATTERN.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir() or _pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except (OverflowError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list[int]]:
    """Hold Ctrl-C during a step that must not be cut in half; the yielded list records it."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _describe_failure(err: BaseException, study: str, tmp: Path, root: Path) -> str | None:
    """One clear line (plus where to look); None for interrupts (Ctrl-C here or in the kernel)."""
    if not isinstance(err, Exception):
        return None
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError) and err.ename == "KeyboardInterrupt":
        return None
    if isinstance(err, PapermillExecutionError):
        kept = _keep_failed_notebook(tmp / "report.ipynb", study, root)
        where = f"\n  partial notebook: {kept}" if kept else ""
        return f"{study}: cell [{err.exec_count}] raised {err.ename}: {err.evalue}{where}"
    return f"{study}: {type(err).__name__}: {err}"


def _keep_failed_notebook(partial: Path, study: str, root: Path) -> str | None:
    """Copy the partial notebook to ``.cache/failed/<study>.ipynb`` so the error can be read in context."""
    if not partial.is_file():
        return None
    target = Path(root) / ".cache" / "failed" / f"{study}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(partial, target)
    try:
        return str(target.relative_to(root))
    except ValueError:
        return str(target)


# --------------------------------------------------------------------------------------------
# Baselines for nbval


def run_baseline(study: str, root: Path = REPO_ROOT) -> Path:
    """Re-execute ``notebooks/<study>.ipynb`` with its smoke defaults and store the reference outputs.

    Only cells marked ``# NBVAL_CHECK_OUTPUT`` keep outputs (the key numbers nbval compares);
    everything else is stripped, so the committed .ipynb stays small and diffs stay readable.
    """
    import nbformat
    from nbclient import NotebookClient

    source = notebook_path(study, root)
    ipynb = _jupytext_sync(source)
    notebook = nbformat.read(ipynb, as_version=4)
    with patched_environ(kernel_env(root=root)):
        NotebookClient(
            notebook,
            kernel_name=KERNEL_NAME,
            resources={"metadata": {"path": str(source.parent)}},
            record_timing=False,
            timeout=None,
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        ).execute()
    atomic_write_text(ipynb, nbformat.writes(strip_unchecked_outputs(notebook)) + "\n")
    # Inputs are unchanged; keep the .py the newer file, as after `jupytext --sync`, so that
    # JupyterLab keeps treating it as the source of truth.
    os.utime(source)
    return ipynb


def _jupytext_sync(source: Path) -> Path:
    """``jupytext --sync`` (in-process: a subprocess would pay the slow imports again)."""
    from jupytext.cli import jupytext as jupytext_cli

    try:
        jupytext_cli(["--sync", "--quiet", str(source)])
    except Exception as err:
        raise StudyError(f"jupytext --sync {source.name} failed: {err}") from err
    ipynb = source.with_suffix(".ipynb")
    if not ipynb.is_file():
        raise StudyError(f"{source.name} is not paired with {ipynb.name}; is jupytext.toml at the repo root?")
    return ipynb


def strip_unchecked_outputs(notebook: Any) -> Any:
    """Keep outputs only in ``# NBVAL_CHECK_OUTPUT`` cells; drop execution counts elsewhere.

    Checked cells keep their execution count: nbval treats a cell with outputs but no count as
    "unrun reference cell has outputs" and fails. After a fresh top-to-bottom run the counts are
    sequential, so they do not churn between baselines.
    """
    notebook.metadata.get("language_info", {}).pop("version", None)  # patch version: diff noise
    for cell in notebook.cells:
        if cell.cell_type == "code" and CHECK_OUTPUT_MARKER not in cell.source:
            cell.outputs = []
            cell.execution_count = None
    return notebook


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m persona_wm.io.runner",
        description="Run study notebooks into outputs/<study>/, or refresh the nbval baselines.",
    )
    add = parser.add_argument
    add("--study", action="extend", nargs="+", metavar="S", help="studies to run (default: all in notebooks/)")
    add("--params", default="default", metavar="NAME", help="params/<study>/NAME.yaml (default: %(default)s)")
    add("--threads", type=positive_int, metavar="N", help="OMP/MKL threads (and torch_threads, if declared)")
    add("--output-root", type=Path, metavar="DIR", help="write DIR/<study> instead of outputs/<study>")
    add("--device", choices=DEVICES, help="where toy models train and run: cpu, cuda, or auto (cuda when present; "
        "the default); exported to the kernel as " + DEVICE_ENV + " and set as the LLM studies' device "
        "parameter (unless --set device=... names it)")
    add("--set", action="append", default=[], type=_override, metavar="KEY=VALUE", dest="overrides",
        help="replace parameter KEY (YAML VALUE) in every requested study that declares it, e.g. "
             "--set trainer=sequential; validated like the params file (repeatable)")
    add("--jobs", type=positive_int, default=1, metavar="N",
        help="run up to N studies at once, each in its own kernel (default 1: one after another, stopping at the "
             "first failure); with N > 1 every study runs and each one's line comes when it is done")
    add("--baseline", action="store_true", help="refresh the nbval reference outputs in notebooks/*.ipynb")
    args = parser.parse_args(argv)
    if args.baseline and (args.params != "default" or args.threads is not None or args.output_root is not None
                          or args.overrides or args.jobs != 1):
        parser.error(
            "--baseline runs the smoke defaults of the notebook; --params/--threads/--output-root/--set/--jobs "
            "do not apply"
        )
    return args


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (KEY a parameter name), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"--set {key.strip()}: VALUE is not YAML: {err}") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None, root: Path = REPO_ROOT) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 any failure, 130 Ctrl-C).

    Every params file of every requested study is validated (types and value rules) before any
    notebook runs; a bad one stops everything with one ParamsError line and touches no output.
    """
    args = parse_args(argv)
    try:
        studies = resolve_studies(args.study, root)
        if not studies:
            raise StudyError("no studies found in notebooks/")
        if args.baseline:
            return _run_baselines(studies, root)
        params = validate_all(studies, args.params, root, args.threads, dict(args.overrides), args.device)
    except (ParamsError, StudyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return INTERRUPTED_EXIT
    if args.device is not None:
        os.environ[DEVICE_ENV] = args.device  # the kernel inherits it (persona_wm.toy.train.default_device)
    if args.jobs > 1 and len(params) > 1:
        return _run_reports_concurrently(params, args.params, root, args.threads, args.output_root, args.jobs)
    return _run_reports(params, args.params, root, args.threads, args.output_root)


def _run_reports_concurrently(
    params: Mapping[str, Mapping[str, Any]],
    params_name: str,
    root: Path,
    threads: int | None,
    out_root: Path | None,
    jobs: int,
) -> int:
    """Up to ``jobs`` studies at once, each in its own kernel; every study runs, whatever another one does.

    Studies share nothing but the model caches, whose entries are written atomically (two studies that
    need the same missing model may both train it; the entry written last stays). Each study's outcome is
    :func:`run_study`'s: swapped into place whole, or left as it was with one error line. Ctrl-C
    interrupts every running kernel, starts no further study and leaves unfinished outputs as they were.
    """
    outputs = Path(out_root) if out_root is not None else Path(root) / "outputs"
    print(f"== {len(params)} studies, {min(jobs, len(params))} at a time (params/<study>/{params_name}.yaml): "
          f"{', '.join(params)}", flush=True)
    failed: list[str] = []
    began = time.perf_counter()

    def one(study: str, values: Mapping[str, Any]) -> tuple[Path, float]:
        start = time.perf_counter()
        return run_study(study, values, root, threads, progress_bar=False, out_root=out_root,
                         folder=output_folder(study, params_name)), time.perf_counter() - start

    # the kernels inherit this process's environment: set once for all of them (run_study's own patch then
    # sets the same values, so the threads cannot restore each other's half-patched state)
    with patched_environ(kernel_env(threads, root)):
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="study")
        futures = {pool.submit(one, study, values): study for study, values in params.items()}
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                study = futures[future]
                try:
                    final, seconds = future.result()
                except StudyInterrupted:
                    failed.append(study)
                    print(f"interrupted: {study}", file=sys.stderr)
                except StudyError as err:
                    failed.append(study)
                    print(f"error: {err}", file=sys.stderr)
                    print(f"   {display_path(outputs / output_folder(study, params_name), root)} left unchanged", file=sys.stderr)
                else:
                    print(f"   [{done}/{len(params)}] wrote "
                          f"{display_path(final, root)} in {seconds:.1f} s", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)  # the running kernels got the Ctrl-C too
            print("interrupted: studies not finished left unchanged", file=sys.stderr)
            return INTERRUPTED_EXIT
        pool.shutdown()
    print(f"   {len(params) - len(failed)} of {len(params)} studies in {time.perf_counter() - began:.1f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def _run_reports(
    params: Mapping[str, Mapping[str, Any]],
    params_name: str,
    root: Path,
    threads: int | None,
    out_root: Path | None = None,
) -> int:
    """Run studies in order, stopping at the first failure (later studies may reuse its caches)."""
    outputs = Path(out_root) if out_root is not None else Path(root) / "outputs"
    for i, (study, values) in enumerate(params.items(), start=1):
        print(f"== [{i}/{len(params)}] {study} (params/{study}/{params_name}.yaml)", flush=True)
        start = time.perf_counter()
        folder = output_folder(study, params_name)
        left = display_path(outputs / folder, root)
        try:
            final = run_study(study, values, root, threads, out_root=out_root, folder=folder)
        except StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            print(f"   {left} left unchanged ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            if getattr(err, "written", False):
                print(f"interrupted: {left} written, later studies not run", file=sys.stderr)
            else:
                print(f"interrupted: {left} left unchanged", file=sys.stderr)
            return INTERRUPTED_EXIT
        print(f"   wrote {display_path(final, root)} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def _run_baselines(studies: Sequence[str], root: Path) -> int:
    for study in studies:
        print(f"== baseline {study}", flush=True)
        start = time.perf_counter()
        try:
            path = run_baseline(study, root)
        except KeyboardInterrupt:
            print(f"interrupted: notebooks/{study}.ipynb left unchanged", file=sys.stderr)
            return INTERRUPTED_EXIT
        except Exception as err:  # nbclient's CellExecutionError carries the traceback text
            print(f"error: {study}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"   wrote {path.relative_to(root)} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
