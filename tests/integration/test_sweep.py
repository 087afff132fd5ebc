"""Study 04's grid sweep on Dask (persona_wm.studies.persona_engineering_sweep; its command line is
persona_wm.io.sweep): a 2-worker LocalCluster and an externally started scheduler (--scheduler) give exactly the
output of the same jobs run in this process one after another (same seeds, same numbers), with rows in job order
whatever order they finish in; a malformed params file stops with one ParamsError line before any cluster starts;
by default the output is a scratch file under the checkout's .cache/ and the workers are the usable cores.

Runs a tiny grid (3 configurations x 2 seeds, d_model 8, 5 base steps) from a throwaway repo holding a
copy of study 04's notebook (whose parameters cell is the schema) and tiny params files. Most of the
time is the Dask workers importing torch and transformer_lens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask
import pytest
import torch
import yaml
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.values import undefined_as_none
from persona_wm.io import sweep
from persona_wm.io.params import load_params
from persona_wm.studies import persona_engineering_sweep as driver
from persona_wm.toy.em import EMRecipe
from persona_wm.toy.engineering import sweep_jobs

STUDY = driver.STUDY
#: Overrides of the default params: small enough for seconds per job on a shared 2-core CPU. The baseline
#: sits on two axes, so one (process, seed) gives two rows, as in the real grids.
BASE = "em_seq(n_tasks=2,tasks_per_sequence=2)"
TINY = {"baseline_process": BASE,
        "sweep_processes": {"leak": [BASE, "em_seq(n_tasks=2,tasks_per_sequence=2,leak=0.05)"], "mixing": [BASE]},
        "seeds": [0, 1], "d_model": 8, "n_layers": 1, "base_steps": 5, "base_batch": 16, "ft_steps": 2,
        "ft_batch": 8, "n_contexts": 20, "torch_threads": 1}
#: Fields that may differ between otherwise identical runs: timing, and how many workers ran it.
RUN_FIELDS = {"wall_s", "train_s", "workers"}


@pytest.fixture(scope="module", autouse=True)
def _restore_process_state():
    """Running jobs in this process caps its thread pools to 1 and, for --device cpu, hides the GPUs; a nanny
    started here writes its pre-spawn variables into os.environ. Later test modules get back what they had."""
    environment, torch_threads, blas = dict(os.environ), torch.get_num_threads(), threadpool_limits(limits=None)
    yield
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(torch_threads)
    blas.restore_original_limits()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repo root with study 04's notebook and params files tiny.yaml and bad.yaml (d_model 0)."""
    root = tmp_path_factory.mktemp("repo")
    (root / "notebooks").mkdir()
    shutil.copy(REPO_ROOT / "notebooks" / f"{STUDY}.py", root / "notebooks" / f"{STUDY}.py")
    folder = root / "params" / STUDY
    folder.mkdir(parents=True)
    params = yaml.safe_load((REPO_ROOT / "params" / STUDY / "default.yaml").read_text()) | TINY
    (folder / "tiny.yaml").write_text(yaml.safe_dump(params))
    (folder / "bad.yaml").write_text(yaml.safe_dump(params | {"d_model": 0}))
    return root


def _run(repo: Path, tmp: Path, *options: str) -> dict:
    """main() on the tiny params with a fresh model cache (every model trained in this run); the file it wrote."""
    out = tmp / "grid.json"
    sweep.main(["--params", "tiny", "--device", "cpu", "--cache-dir", str(tmp / "cache"), "--out", str(out),
                *options], root=repo)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sequential(repo, tmp_path_factory) -> dict:
    """The reference: every job in this process, one after another (--workers 0)."""
    return _run(repo, tmp_path_factory.mktemp("sequential"), "--workers", "0")


@pytest.fixture(scope="module")
def external_cluster():
    """A LocalCluster started outside the sweep, as a real cluster's scheduler would be."""
    with dask.config.set(driver.NANNY_ENVIRON), LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                            dashboard_address=None) as cluster:
        yield cluster


def _without_run_fields(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in RUN_FIELDS}


def test_sequential_reference_is_a_full_grid(sequential) -> None:
    assert sequential["n_jobs"] == 6 and sequential["failed"] == [] and sequential["workers"] == 0
    assert [(r["axis"], r["process"], r["seed"]) for r in sequential["grid"]] == sorted(
        sweep_jobs(TINY["sweep_processes"], TINY["seeds"]))
    assert {p["process"] for p in sequential["points"]} == {BASE, "em_seq(n_tasks=2,tasks_per_sequence=2,leak=0.05)"}


def test_local_cluster_workers_have_one_thread_and_no_gpu_and_no_malloc_trim() -> None:
    before = dict(os.environ)
    with driver._dask_client(2, None, "cpu") as client:
        assert set(client.nthreads().values()) == {1} and len(client.nthreads()) == 2
        assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
        assert set(client.run(os.getenv, "CUDA_VISIBLE_DEVICES").values()) == {""}
        assert set(client.run(os.getenv, "OMP_NUM_THREADS").values()) == {"1"}
    assert dict(os.environ) == before


def test_local_cluster_gives_the_sequential_output(repo, sequential, tmp_path) -> None:
    result = _run(repo, tmp_path, "--workers", "2")
    assert result["workers"] == 2
    assert _without_run_fields(result) == _without_run_fields(sequential)


def test_scheduler_address_gives_the_sequential_output(repo, sequential, external_cluster, tmp_path) -> None:
    result = _run(repo, tmp_path, "--scheduler", external_cluster.scheduler_address)
    assert result["workers"] == 2
    assert _without_run_fields(result) == _without_run_fields(sequential)


def test_rows_come_back_in_job_order(repo, external_cluster, tmp_path) -> None:
    """run_jobs returns rows in the order of its job list (forward or reversed), not in finishing order."""
    params = load_params(STUDY, "tiny", repo)
    recipe = EMRecipe.from_params(params)
    jobs = sweep_jobs(params["sweep_processes"], params["seeds"])
    here = driver.run_jobs(jobs, recipe, params["n_contexts"], params["analysis_seed"], "cpu", tmp_path / "here")
    with Client(external_cluster.scheduler_address) as client:
        forward = driver.run_jobs(jobs, recipe, params["n_contexts"], params["analysis_seed"], "cpu",
                                 tmp_path / "dask", client)
        backward = driver.run_jobs(jobs[::-1], recipe, params["n_contexts"], params["analysis_seed"], "cpu",
                                  tmp_path / "dask", client)
    assert [(r["axis"], r["process"], r["seed"]) for r in forward] == jobs
    # tiny models leave breadth undefined (NaN, which equals nothing): compare with NaN written as None
    assert undefined_as_none(forward) == undefined_as_none(here)
    assert undefined_as_none(backward) == undefined_as_none(here[::-1])


def test_malformed_params_fail_before_any_worker(repo, tmp_path, monkeypatch) -> None:
    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a malformed params file")

    monkeypatch.setattr(driver, "LocalCluster", no_cluster)
    monkeypatch.setattr(driver, "Client", no_cluster)
    monkeypatch.setattr(driver, "run_jobs", no_cluster)
    out = tmp_path / "grid.json"
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--params", "bad", "--workers", "2", "--out", str(out)], root=repo)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"params/{STUDY}/bad.yaml" in message and "d_model" in message
    assert not out.exists()


def test_in_background_returns_the_value_or_raises_the_error() -> None:
    """The driver's background training hands back what the function returned, or re-raises what it raised."""
    import threading

    seen = []
    task = driver.InBackground(lambda a, b=0: seen.append(threading.current_thread().name) or a + b, 2, b=3)
    seconds, value = task.result()
    assert value == 5 and seconds >= 0 and seen and seen[0] != threading.current_thread().name

    def fails() -> None:
        raise ValueError("no such process")

    with pytest.raises(ValueError, match="no such process"):
        driver.InBackground(fails).result()



def test_default_output_is_a_scratch_file_of_the_checkout(repo, monkeypatch, capsys) -> None:
    """Without --out the sweep writes <root>/.cache/sweep/<study>/grid_<params>.json: not the current folder, not
    a committed file; main leaves the worker count to the driver."""
    seen = {}

    def fake_run(params, params_name, out, workers, scheduler, device, cache_dir):
        seen.update(params_name=params_name, out=out, workers=workers)
        return {key: [] for key in ("pareto_front", "improvements_over_baseline", "robustness_clear",
                                    "fidelity_clear", "failed")} | {"device": "cpu", "trainer": "stacked",
                                                                     "n_jobs": 0, "wall_s": 0.0, "train_s": 0.0}

    monkeypatch.setattr(sweep, "run_sweep", fake_run)
    sweep.main(["--params", "tiny"], root=repo)
    assert seen["out"] == repo / ".cache" / "sweep" / STUDY / "grid_tiny.json" == driver.scratch_path("tiny", repo)
    assert seen["workers"] is None and str(seen["out"]) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.main(["--params", "tiny", "--workers", "-1"], root=repo)


def test_default_workers_are_the_usable_cores(repo, monkeypatch) -> None:
    """One worker per CPU this process may use (its affinity mask, not the machine's core count)."""
    if hasattr(os, "sched_getaffinity"):
        assert driver.default_workers() == len(os.sched_getaffinity(0)) >= 1
    started = []

    class Started(Exception):
        pass

    def fake_client(workers, scheduler, device):
        started.append(workers)
        raise Started

    monkeypatch.setattr(driver, "default_workers", lambda: 3)
    monkeypatch.setattr(driver, "_dask_client", fake_client)
    params = load_params(STUDY, "tiny", repo) | {"trainer": "sequential"}  # nothing trained before the cluster
    with pytest.raises(Started):
        driver.run_sweep(params, "tiny", repo / "unused.json", device="cpu")
    assert started == [3]
