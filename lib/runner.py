"""Run study notebooks with papermill into ``outputs/<study>/``; refresh nbval baselines.

Usage::

    python -m lib.runner [--study S ...] [--params NAME] [--threads N] [--output-root DIR]
    python -m lib.runner --baseline [--study S ...]

Why a runner rather than ``papermill`` on the command line: papermill cannot read our jupytext
``.py`` sources, does not validate parameters before spending an hour on a run, and writes
straight into its output path, so a failed run would clobber the last good report. Here every
params file is validated first, each study runs in a temp dir, and only a complete result
(notebook, HTML, figures, metrics) is swapped into ``outputs/<study>``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lib.report import (
    OUTPUT_DIR_PARAM,
    REPO_ROOT,
    ParamsError,
    _display,
    atomic_write_text,
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


class StudyError(RuntimeError):
    """A study failed to run; the message is the one line the user needs."""


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


def kernel_env(threads: int | None = None) -> dict[str, str]:
    """Variables the kernel must see: offline hubs, and thread caps when asked for."""
    env = dict(OFFLINE_ENV)
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
    studies: Sequence[str], params_name: str, root: Path = REPO_ROOT, threads: int | None = None
) -> dict[str, dict[str, Any]]:
    """Load every study's params before running any, so one typo cannot waste a long batch.

    Raises ParamsError whose message lists every invalid file (one line each).
    """
    loaded: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for study in studies:
        try:
            params = load_params(study, params_name, root)
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


def run_study(
    study: str,
    params: Mapping[str, Any],
    root: Path = REPO_ROOT,
    threads: int | None = None,
    progress_bar: bool = True,
    out_root: Path | None = None,
) -> Path:
    """Execute one study into a temp dir and swap it into ``outputs/<study>``; returns that dir.

    On any failure the temp dir is removed, ``outputs/<study>`` is left as it was, and a
    StudyError says what happened (for a cell error: which cell, exception and message).
    ``out_root`` replaces ``<root>/outputs`` (e.g. a scratch dir for ``lib.check_outputs``, which
    must not touch the committed results); notebooks, params and caches still come from ``root``.
    """
    outputs = Path(out_root) if out_root is not None else Path(root) / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{study}-", dir=outputs))
    tmp.chmod(0o755)  # mkdtemp makes it private; it becomes outputs/<study>
    try:
        with patched_environ(kernel_env(threads)):
            notebook = _execute(study, params, tmp, root, progress_bar)
        _export_html(notebook, tmp / "report.html")
        return _swap_into_place(tmp, outputs / study)
    except BaseException as err:
        failure = _describe_failure(err, study, tmp, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise StudyError(failure) from err


def _execute(study: str, params: Mapping[str, Any], tmp: Path, root: Path, progress_bar: bool) -> Any:
    import jupytext  # heavy imports stay out of `--help` and of notebooks importing lib
    import papermill

    notebook = jupytext.read(notebook_path(study, root))
    logging.getLogger("papermill").addFilter(_drop_unknown_parameter_warnings)
    return papermill.execute_notebook(
        notebook,
        str(tmp / "report.ipynb"),
        parameters={**params, OUTPUT_DIR_PARAM: str(tmp)},
        cwd=str(Path(root) / "notebooks"),
        kernel_name=KERNEL_NAME,
        language="python",  # a .py without a jupytext header carries no kernelspec
        progress_bar=progress_bar,
        log_output=False,
        # Kernel-side log lines (TCP warning, shutdown interrupt) are noise; cell errors still
        # surface through PapermillExecutionError and the saved notebook.
        extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
    )


def _drop_unknown_parameter_warnings(record: logging.LogRecord) -> bool:
    """Papermill's regex cannot read annotations like ``str | None`` and warns "unknown
    parameter"; our own schema check (``lib.report``) already validated every name."""
    return not record.getMessage().startswith("Passed unknown parameter")


def _export_html(notebook: Any, path: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(notebook)
    atomic_write_text(path, body)


def _swap_into_place(tmp: Path, final: Path) -> Path:
    """Replace ``final`` by ``tmp`` with two renames; the old dir is restored if the second fails."""
    if not final.exists():
        os.rename(tmp, final)
        return final
    old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def _describe_failure(err: BaseException, study: str, tmp: Path, root: Path) -> str | None:
    """One clear line (plus where to look); None for interrupts, which propagate unchanged."""
    if not isinstance(err, Exception):
        return None
    from papermill.exceptions import PapermillExecutionError

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
    with patched_environ(kernel_env()):
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
        prog="python -m lib.runner",
        description="Run study notebooks into outputs/<study>/, or refresh the nbval baselines.",
    )
    add = parser.add_argument
    add("--study", action="extend", nargs="+", metavar="S", help="studies to run (default: all in notebooks/)")
    add("--params", default="default", metavar="NAME", help="params/<study>/NAME.yaml (default: %(default)s)")
    add("--threads", type=_positive_int, metavar="N", help="OMP/MKL threads (and torch_threads, if declared)")
    add("--output-root", type=Path, metavar="DIR", help="write DIR/<study> instead of outputs/<study>")
    add("--baseline", action="store_true", help="refresh the nbval reference outputs in notebooks/*.ipynb")
    args = parser.parse_args(argv)
    if args.baseline and (args.params != "default" or args.threads is not None or args.output_root is not None):
        parser.error(
            "--baseline runs the smoke defaults of the notebook; --params/--threads/--output-root do not apply"
        )
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None, root: Path = REPO_ROOT) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 any failure)."""
    args = parse_args(argv)
    try:
        studies = resolve_studies(args.study, root)
        if not studies:
            raise StudyError("no studies found in notebooks/")
        if args.baseline:
            return _run_baselines(studies, root)
        params = validate_all(studies, args.params, root, args.threads)
    except (ParamsError, StudyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return _run_reports(params, args.params, root, args.threads, args.output_root)


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
        try:
            final = run_study(study, values, root, threads, out_root=out_root)
        except StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            left = _display(outputs / study, root)
            print(f"   {left} left unchanged ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            return 1
        print(f"   wrote {_display(final, root)} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def _run_baselines(studies: Sequence[str], root: Path) -> int:
    for study in studies:
        print(f"== baseline {study}", flush=True)
        start = time.perf_counter()
        try:
            path = run_baseline(study, root)
        except Exception as err:  # nbclient's CellExecutionError carries the traceback text
            print(f"error: {study}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"   wrote {path.relative_to(root)} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
