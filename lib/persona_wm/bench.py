"""Time study 02's training and steering evaluation on this machine (CPU) or a GPU.

    python -m persona_wm.bench [--params default] [--device cuda] [--threads 2] [--cache-dir DIR]

Prints one JSON object: seconds spent training (or loading cached models) and in each steering
evaluation of the report (all pairs x scales at the final layer, the per-layer sweep, the
partition analysis). Used for the CPU/GPU timings in the README. Reads the params YAML directly
(no notebook tooling needed), so it runs on the device machine with only torch and the carried
TransformerLens wheels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.threads import limit_threads
from persona_wm.toy.probe import residual_hooks
from persona_wm.toy.steer import partition_frame, steering_frame
from persona_wm.toy.train import TrainConfig, load_or_train

STUDY = "02_steering_specificity"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        limit_threads(args.threads)
    root = REPO_ROOT
    p = yaml.safe_load((root / "params" / STUDY / f"{args.params}.yaml").read_text())
    timings: dict[str, float] = {}

    start = time.perf_counter()
    models = {}
    for process in p["processes"]:
        for seed in p["seeds"]:
            steps = p["train_steps"][process]
            config = TrainConfig(process=process, steps=steps, batch_size=p["batch_size"][process],
                                 lr=float(p["learning_rate"][process]), seed=seed, eval_every=max(steps // 10, 1),
                                 eval_sequences=p["eval_sequences"],
                                 snapshot_steps=tuple(int(round(f * steps)) for f in p["snapshot_fractions"]))
            models[(process, seed)] = load_or_train(config, device=args.device, cache_dir=args.cache_dir,
                                                    progress=False)
    _sync(args.device)
    timings["train_or_load_s"] = time.perf_counter() - start
    timings["trained_from_scratch"] = sum(not m.from_cache for m in models.values())
    timings["ce_ratio"] = {f"{k[0]}/{k[1]}": m.final_eval["ce_ratio"] for k, m in models.items()}

    def timed(name: str, fn) -> None:
        _sync(args.device)
        t0 = time.perf_counter()
        fn()
        _sync(args.device)
        timings[name] = time.perf_counter() - t0

    n, seed = p["n_steering_sequences"], p["analysis_seed"]
    timed("steering_final_layer_s", lambda: steering_frame(models, p["scales"], n, seed, progress=False))
    hooks = residual_hooks(next(iter(models.values())).model)
    timed("steering_by_layer_s", lambda: steering_frame(models, [p["layer_scale"]], n, seed, hooks=hooks,
                                                        progress=False))
    semi = {k: v for k, v in models.items() if k[0] == "semi_factored"}
    if semi:
        timed("partition_s", lambda: partition_frame(semi, ["(1,0)", "(0,1)"], p["partition_scales"], n, seed))
    timings["steering_total_s"] = sum(v for k, v in timings.items() if k.endswith("_s") and k != "train_or_load_s")
    timings["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps(timings, indent=2))
    return timings


if __name__ == "__main__":
    main()
