"""Command line of study 04's grid sweep (:mod:`persona_wm.studies.persona_engineering_sweep`): read and validate
a params file of ``params/04_persona_engineering/``, then run its grid as Dask tasks on one machine or a cluster.

    python -m persona_wm.io.sweep [--params full] [--workers 8] [--device cuda] [--out FILE]
    python -m persona_wm.io.sweep --params full --scheduler tcp://host:8786
    python -m persona_wm.io.sweep --params default --workers 0       # in this process, one job after another
    python -m persona_wm.io.sweep --params full --out outputs/04_persona_engineering_full/grid_full.json

Params are read through :func:`persona_wm.io.params.load_params`, so a malformed file stops with one
ParamsError line before any worker starts. The output is a scratch file by default,
``.cache/sweep/04_persona_engineering/grid_<params>.json`` of the checkout (never the current folder, never a
committed file); ``--out`` names another, such as the committed dense grid the notebook reads (last example).
``--workers`` defaults to the number of CPUs this process may use (one single-thread worker each). Prints a
short summary; the driver's own docstring says how the jobs run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from persona_wm.core.files import REPO_ROOT
from persona_wm.io.params import ParamsError, load_params
from persona_wm.studies.persona_engineering_sweep import STUDY, default_workers, run_sweep, scratch_path

__all__ = ["main"]


def main(argv: list[str] | None = None, root: Path = REPO_ROOT) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="full")
    parser.add_argument("--workers", type=int, default=None,
                        help="LocalCluster worker processes, one thread each; 0 runs the jobs in this process "
                             f"(default: the CPUs this process may use, here {default_workers()})")
    parser.add_argument("--scheduler", default=None,
                        help="address of a running Dask scheduler (tcp://host:8786) instead of a LocalCluster")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--cache-dir", default=None, help="model cache (default .cache/models of the checkout)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output JSON (default: {scratch_path('<params>', Path('.'))} of the checkout)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")

    try:
        params = load_params(STUDY, args.params, root)
    except ParamsError as err:
        raise SystemExit(f"error: {err}") from None
    out = args.out if args.out is not None else scratch_path(args.params, root)
    result = run_sweep(params, args.params, out, args.workers, args.scheduler, args.device, args.cache_dir)
    print(json.dumps({k: result[k] for k in ("device", "trainer", "n_jobs", "wall_s", "train_s", "pareto_front",
                                             "improvements_over_baseline", "robustness_clear", "fidelity_clear",
                                             "failed")}, indent=1))
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
