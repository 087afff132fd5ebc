"""Study 04's persona-engineering grid outside the notebook: every (configuration, seed) as a Dask task, on one
machine or a cluster. The command line is :mod:`persona_wm.io.sweep` (``python -m persona_wm.io.sweep``), which
validates the params file and calls :func:`run_sweep`.

Every (configuration, seed) is an independent train -> fine-tune -> measure job. With ``trainer: stacked``
in the params, the driver first trains every model N at a time (:func:`persona_wm.toy.em.pretrain`, on
``device``; on a background thread while the cluster starts), and the jobs only load and measure them.
By default the jobs run on a Dask ``LocalCluster`` of :func:`default_workers` processes (one per CPU this
process may use) with one thread each (on a GPU machine they share the GPU: tiny models are launch-bound,
one process cannot fill it). A ``scheduler`` address sends them to a running Dask scheduler instead
(``dask scheduler``, then ``dask worker tcp://host:8786 --nthreads 1`` on each machine). Such workers need
this package importable, the same model cache directory, and
``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`` in their Dask config (or
``--no-nanny``): the nanny's default makes each job about twice as costly (see :data:`NANNY_ENVIRON`).

:func:`run_sweep` writes the grid rows (sorted by axis, process, seed, whatever order the jobs finish in), the
per-configuration summary, the Pareto analysis and the wall time to one JSON file: by default the scratch file
:func:`scratch_path` (``.cache/sweep/04_persona_engineering/grid_<params>.json``); the committed dense grid,
``outputs/04_persona_engineering_full/grid_full.json`` (:data:`persona_wm.studies.persona_engineering.DENSE_GRID_PATH`),
is written only when asked for by name. The notebook does the same analysis on the CPU default grid.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import pandas as pd
import torch
from distributed import Client, Future, LocalCluster, as_completed
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.core.files import REPO_ROOT, atomic_write_text
from persona_wm.core.threads import limit_threads, usable_cores
from persona_wm.core.values import undefined_as_none
from persona_wm.toy import train
from persona_wm.toy.em import EMRecipe, pretrain
from persona_wm.toy.engineering import engineering_row, engineering_summary, sweep_jobs

__all__ = ["STUDY", "Job", "PARTIAL_EVERY", "NANNY_ENVIRON", "default_workers", "scratch_path", "run_job",
           "InBackground", "run_jobs", "run_sweep"]

STUDY = "04_persona_engineering"


Job = tuple[str, str, int]  # (axis, process name, seed), as persona_wm.toy.engineering.sweep_jobs gives them
#: Completed jobs between two partial writes of the output file (partial results survive a time limit).
PARTIAL_EVERY = 20
#: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap
#: threshold: every large numpy array of a job is then a fresh mmap. Measured on 10 warm default-grid
#: jobs here: 8x the page faults and 4-5x the system time (CPU per job about 1.9x). None unsets it.
NANNY_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def run_job(job: Job, recipe: EMRecipe, n_contexts: int, analysis_seed: int, device: str = "cpu",
            cache_dir: str | None = None) -> dict:
    """One grid row, computed where the scheduler puts it (a Dask worker, or this process).

    Caps this process's thread pools to 1 (N single-thread workers fill N cores; more threads per
    worker only oversubscribe them) and trains on ``device``. A failing point returns a row with an
    ``error`` instead of raising, so one bad configuration does not lose the whole grid.
    """
    axis, name, seed = job
    limit_threads(1)
    previous_cache = train.CACHE_DIR
    if cache_dir:
        train.CACHE_DIR = Path(cache_dir)
    try:
        _use_device(device)
        return engineering_row(axis, name, seed, recipe, n_contexts, analysis_seed)
    except Exception as error:  # noqa: BLE001 -- any failure of one point is reported in the output's "failed" list
        return {"axis": axis, "process": name, "seed": seed, "error": f"{type(error).__name__}: {error}"}
    finally:
        train.CACHE_DIR = previous_cache  # a long-lived worker of a shared cluster keeps its own default


def _use_device(device: str) -> None:
    """Make :func:`persona_wm.toy.train.default_device` (what the EM experiment trains on) give ``device``.

    ``cpu`` hides the GPUs from this process while CUDA is still uninitialised (a LocalCluster's
    workers get that from their environment at start); ``cuda:N`` selects GPU N. Raises when the
    process cannot honour the request, rather than silently training elsewhere.
    """
    kind, _, index = device.partition(":")
    if kind == "cpu" and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif kind == "cuda" and index:
        torch.cuda.set_device(int(index))
    actual = train.default_device()
    if actual != kind:
        raise RuntimeError(f"--device {device} asked, but this worker would train on {actual}")


class InBackground:
    """``fn(*args, **kwargs)`` started at once on a daemon thread (an interrupted driver does not wait for it).

    :meth:`result` waits for it and returns ``(seconds it ran, its value)``, or raises what it raised.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._outcome: tuple[float, Any, BaseException | None] | None = None

        def target() -> None:
            began = time.perf_counter()
            try:
                value, error = fn(*args, **kwargs), None
            except BaseException as err:  # noqa: BLE001 -- handed to the caller by result()
                value, error = None, err
            self._outcome = (time.perf_counter() - began, value, error)

        self._thread = threading.Thread(target=target, name=f"background-{getattr(fn, '__name__', 'task')}",
                                        daemon=True)
        self._thread.start()

    def result(self) -> tuple[float, Any]:
        self._thread.join()
        assert self._outcome is not None
        seconds, value, error = self._outcome
        if error is not None:
            raise error
        return seconds, value


def _warm_up(device: str) -> str:
    """A worker's one-off costs of its first job, paid before the jobs: the lazy TransformerLens import of
    ``build_model`` (7 s on one core here; on the H200 machine the first results of 12 fresh workers came 16 s
    after the jobs were sent, the other 169 jobs then took 9 s) and starting the device. Returns its name."""
    import transformer_lens  # noqa: F401

    return _device_name(device)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def run_jobs(jobs: Sequence[Job], recipe: EMRecipe, n_contexts: int, analysis_seed: int, device: str = "cpu",
             cache_dir: str | Path | None = None, client: Client | None = None,
             partial_out: Path | None = None) -> list[dict]:
    """The rows of ``jobs`` in the order of ``jobs``, whatever order they finish in.

    ``client`` None runs them here, one after another (the sequential reference); otherwise each job
    is one Dask task. Progress is a tqdm bar plus one line per finished job; every
    :data:`PARTIAL_EVERY` jobs the rows so far are written to ``partial_out`` (marked partial).
    """
    extra = (recipe, n_contexts, analysis_seed, device, str(cache_dir) if cache_dir else None)
    rows: list[dict | None] = [None] * len(jobs)
    if client is None:
        finished: Iterator[tuple[int, dict]] = ((i, run_job(job, *extra)) for i, job in enumerate(jobs))
    else:
        futures = {client.submit(run_job, job, *extra, pure=False): i for i, job in enumerate(jobs)}
        finished = ((futures[f], _task_row(f, jobs[futures[f]])) for f in as_completed(futures))
    with tqdm(total=len(jobs), desc="sweep", unit="job") as bar:
        for done, (i, row) in enumerate(finished, 1):
            rows[i] = row
            status = row.get("error") or f"fidelity {row['fidelity']:.3f} robustness {row['robustness']:.3f}"
            bar.write(f"[{done}/{len(jobs)}] {row['axis']} {row['process']} seed {row['seed']}: {status}")
            bar.update()
            if partial_out is not None and done % PARTIAL_EVERY == 0:
                grid = [r for r in rows if r is not None]
                atomic_write_text(partial_out, json.dumps({"partial": True, "grid": grid}, default=float))
    return rows  # type: ignore[return-value]  # every slot is filled once every job has finished


def _task_row(future: Future, job: Job) -> dict:
    """A task's row, or an error row when the task itself failed (a worker died, the package is missing)."""
    if future.status == "error":
        error = future.exception()
        axis, name, seed = job
        return {"axis": axis, "process": name, "seed": seed, "error": f"{type(error).__name__}: {error}"}
    return future.result()


@contextmanager
def _dask_client(workers: int, scheduler: str | None, device: str) -> Iterator[Client | None]:
    """A client of ``scheduler``, of a fresh LocalCluster of ``workers`` single-thread processes, or None (0)."""
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as err:
            raise SystemExit(f"error: cannot reach the Dask scheduler {scheduler}: {err}") from None
        with client:
            try:
                client.wait_for_workers(1, timeout="120s")
            except TimeoutError:
                raise SystemExit(f"error: no worker joined the Dask scheduler {scheduler} within 120 s") from None
            yield client
        return
    if workers == 0:
        yield None
        return
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    before = dict(os.environ)
    try:
        with dask.config.set(NANNY_ENVIRON), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                          dashboard_address=None, env=env) as cluster, \
                Client(cluster) as client:
            yield client
    finally:  # each nanny writes its pre-spawn variables (OMP_NUM_THREADS=1, ...) into this process's environment
        os.environ.clear()
        os.environ.update(before)


def default_workers() -> int:
    """One single-thread worker per CPU this process may use (its affinity mask, so ``taskset`` and cgroup
    cpusets count; :func:`persona_wm.core.threads.usable_cores`): N such workers fill N cores."""
    return usable_cores()


def scratch_path(params_name: str, root: Path = REPO_ROOT) -> Path:
    """Where a sweep writes by default: ``<root>/.cache/sweep/04_persona_engineering/grid_<params>.json``
    (ignored by git, like every ``.cache/`` file), never a committed file nor the current folder."""
    return Path(root) / ".cache" / "sweep" / STUDY / f"grid_{params_name}.json"


def run_sweep(params: dict[str, Any], params_name: str, out: Path, workers: int | None = None,
              scheduler: str | None = None, device: str | None = None, cache_dir: str | None = None) -> dict:
    """Run the grid of ``params`` (study 04's parameters, already validated) and write its summary to ``out``.

    ``workers`` LocalCluster processes (None: :func:`default_workers`; 0: every job in this process, one after
    another), or the workers of the Dask ``scheduler`` at that address; ``device`` cuda, cuda:N or cpu (None:
    cuda when available); ``cache_dir`` the model cache (None: the checkout's ``.cache/models``). Every
    :data:`PARTIAL_EVERY` jobs the rows so far are written to ``out`` (marked partial). Returns what it wrote.
    """
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    recipe = EMRecipe.from_params(params)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    jobs = sweep_jobs(params["sweep_processes"], params["seeds"])
    start = time.perf_counter()
    training = None
    if recipe.trainer == "stacked":  # every model trained here first, N at a time; the jobs then only load them
        limit_threads(params["torch_threads"])  # float results depend on the thread count: the params fix it
        # on a background thread, so that the cluster starts and its workers warm up meanwhile
        training = InBackground(pretrain, [name for _, name, _ in jobs], params["seeds"], recipe, device=device,
                                cache_dir=Path(cache_dir) if cache_dir else None)
    with _dask_client(workers, scheduler, device) as client:
        workers = len(client.nthreads()) if scheduler else workers
        # every worker does a job's one-off work (imports, the device) now, while the driver still trains
        seen = set(client.run(_warm_up, device).values()) if client is not None else set()
        names = sorted(seen) if seen and device.startswith("cuda") else [_device_name(device)]
        train_s = training.result()[0] if training is not None else 0.0  # no job starts before every model exists
        rows = run_jobs(jobs, recipe, params["n_contexts"], params["analysis_seed"], device, cache_dir,
                        client, partial_out=out)
    wall = time.perf_counter() - start
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    if not rows:
        raise SystemExit(f"error: all {len(jobs)} jobs failed; the first: {failed[0]['error']}")

    grid = pd.DataFrame(rows).sort_values(["axis", "process", "seed"]).reset_index(drop=True)
    points, improvements = engineering_summary(grid, params["baseline_process"])
    result = {"params": params_name, "device": ", ".join(names), "trainer": recipe.trainer,
              "workers": workers, "n_jobs": len(jobs), "wall_s": wall, "train_s": train_s, "grid": grid.to_dict("records"),
              "points": points.to_dict("records"), "pareto_front": points[points.pareto].process.tolist(),
              "improvements_over_baseline": improvements.process.tolist(),
              "robustness_clear": improvements[improvements.clear_robustness].process.tolist(),
              "fidelity_clear": improvements[improvements.clear_fidelity].process.tolist(), "failed": failed}
    atomic_write_text(out, json.dumps(undefined_as_none(result), indent=1, default=float))
    return result
