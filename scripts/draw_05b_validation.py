"""Draw study 05b's blind labelling sets from a finished run's saved generations (no model needed).

    python scripts/draw_05b_validation.py outputs/05b_llm_finetuning [--params default] [--to DIR]

The draw is the notebook's own (``persona_wm.studies.llm_finetuning.draw_validation_sample``, same parameters), so it
equals the ``data/validation`` files a run writes; this script exists to draw from a run's saved files, e.g. when
the labelling starts before a rerun. Writes ``*_blind.jsonl`` (id, text) and ``*_key.jsonl`` to ``--to``
(default ``<run>/data/validation``).

    python scripts/draw_05b_validation.py outputs/05b_llm_finetuning --topup 40 --decoys 40 --labelled DIR

draws a second blind set from the same run (``topup_validation_sample``): completions the detector and the gate
both flag, beside as many decoys from the other strata, none already labelled in ``DIR`` (by text).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from persona_wm.io.params import load_params
from persona_wm.llm.datasets import read_jsonl
from persona_wm.studies.llm_finetuning import draw_validation_sample, topup_validation_sample

STUDY = "05b_llm_finetuning"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a 05b output folder (with data/*.jsonl)")
    parser.add_argument("--params", default="default")
    parser.add_argument("--to", type=Path, default=None)
    parser.add_argument("--topup", type=int, default=0, help="draw this many more detector+gate completions")
    parser.add_argument("--decoys", type=int, default=0, help="... beside this many from the other strata")
    parser.add_argument("--labelled", type=Path, default=None, help="the labelled draw to extend (its folder)")
    args = parser.parse_args(argv)
    p = load_params(STUDY, args.params)
    data = args.run / "data"
    frame = lambda name: pd.DataFrame(read_jsonl(data / name))  # noqa: E731
    if args.topup:
        if args.labelled is None:
            parser.error("--topup needs --labelled DIR (the draw it extends)")
        labelled = pd.DataFrame(read_jsonl(args.labelled / "marker_labels.jsonl"))
        n = topup_validation_sample(SimpleNamespace(generations=frame("em_first_generations.jsonl")),
                                    SimpleNamespace(generations=frame("coupling_generations.jsonl")), p["marker"],
                                    labelled["text"].tolist(), args.topup, args.decoys, p["seed"] + 1,
                                    args.to or data / "validation")
        print({"marker_topup": n})
        return 0
    counts = draw_validation_sample(
        SimpleNamespace(generations=frame("em_first_generations.jsonl")),
        SimpleNamespace(generations=frame("coupling_generations.jsonl")),
        SimpleNamespace(answers=frame("em_sampled_answers.jsonl")), p["marker"], p["validation_per_stratum"],
        p["validation_content_per_stratum"], p["seed"], args.to or data / "validation",
        min_marker=p["validation_min_marker"], min_content=p["validation_min_content"])
    print(counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
