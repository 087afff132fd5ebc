"""Run study 04's persona-engineering grid outside the notebook, in parallel worker processes.

    python -m persona_wm.io.sweep [--params full] [--workers 8] [--device cuda] [--out grid.json]

For the dense grid (``params/04_persona_engineering/full.yaml``) on a GPU machine (the device
tool): every (configuration, seed) is an independent train -> fine-tune -> measure job, so jobs are
spread over worker processes that share the GPU (tiny models are launch-bound, one process cannot
fill it). Reads the params YAML directly (no notebook tooling needed there), writes the grid rows,
the per-configuration summary, the Pareto analysis and the wall time to ``--out``, and prints a
short summary. The notebook does the same analysis on the CPU default grid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.threads import limit_threads
from persona_wm.io.outputs import undefined_as_none
from persona_wm.toy import train
from persona_wm.toy.em import EMRecipe
from persona_wm.toy.engineering import engineering_row, engineering_summary, sweep_jobs

STUDY = "04_persona_engineering"


def _job(args: tuple) -> dict:
    axis, name, seed, params, device, cache_dir = args

    limit_threads(1)
    if device.startswith("cuda"):
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))

    if cache_dir:
        train.CACHE_DIR = Path(cache_dir)
    recipe = EMRecipe.from_params(params)
    try:
        return engineering_row(axis, name, seed, recipe, params["n_contexts"], params["analysis_seed"])
    except Exception as error:  # one failed point must not lose the whole grid; it is reported
        return {"axis": axis, "process": name, "seed": seed, "error": f"{type(error).__name__}: {error}"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="full")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("grid.json"))
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = REPO_ROOT
    params = yaml.safe_load((root / "params" / STUDY / f"{args.params}.yaml").read_text())

    jobs = [(*job, params, device, args.cache_dir) for job in sweep_jobs(params["sweep_processes"], params["seeds"])]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # workers inherit this: N workers x all-core BLAS would oversubscribe the CPU
    start = time.perf_counter()
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, row in enumerate(pool.imap_unordered(_job, jobs), 1):
            rows.append(row)
            status = row.get("error") or f"fidelity {row['fidelity']:.3f} robustness {row['robustness']:.3f}"
            print(f"[{i}/{len(jobs)}] {row['process']} seed {row['seed']}: {status}", flush=True)
            if i % 20 == 0:  # partial results survive a time limit
                args.out.write_text(json.dumps({"partial": True, "grid": rows}, default=float))
    wall = time.perf_counter() - start
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]


    grid = pd.DataFrame(rows).sort_values(["axis", "process", "seed"]).reset_index(drop=True)
    points, improvements = engineering_summary(grid, params["baseline_process"])
    result = {"params": args.params, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "workers": args.workers, "n_jobs": len(jobs), "wall_s": wall, "grid": grid.to_dict("records"),
              "points": points.to_dict("records"), "pareto_front": points[points.pareto].process.tolist(),
              "improvements_over_baseline": improvements.process.tolist(),
              "clear_improvements": improvements[improvements["clear"]].process.tolist(), "failed": failed}
    args.out.write_text(json.dumps(undefined_as_none(result), indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("device", "n_jobs", "wall_s", "pareto_front",
                                             "improvements_over_baseline", "clear_improvements", "failed")}, indent=1))
    return result


if __name__ == "__main__":
    main()
