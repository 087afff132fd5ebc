#!/usr/bin/env bash
# Run the toy studies (01-04), make bench or a sweep on the GPU machine reached through the device tool's `run`.
#
# The GPU image has torch, pandas, scipy, seaborn, statsmodels, accelerate, einops, jaxtyping, pyarrow, ... but not
# TransformerLens, the Jupyter stack, pingouin, hmmlearn, dask or latex2mathml; it has no internet. They travel as
# python 3.12 wheels in .whl_toy/ (~13 MB, git-ignored), built once on the workstation:
#   bash scripts/device_toy.sh prepare            (the list is scripts/device_toy_wheels.txt)
# then one call, carry [".whl_toy"]:
#   bash scripts/device_toy.sh run CMD...   e.g.
#   bash scripts/device_toy.sh run python3 -m persona_wm.io.runner --study 02_steering_specificity --device cuda
set -euo pipefail
source "$(dirname "$0")/device_env.sh"

case "${1:-}" in
    prepare) rm -rf .whl_toy && device_download scripts/device_toy_wheels.txt .whl_toy && du -sh .whl_toy ;;
    run) shift; (( $# )) || { echo "usage: bash scripts/device_toy.sh run CMD..." >&2; exit 1; }
         compgen -G '.whl_toy/*.whl' >/dev/null || { echo "no .whl_toy/*.whl: call with carry [\".whl_toy\"]" >&2; exit 1; }
         device_setup .whl_toy/*.whl
         "$@" ;;
    *) echo "usage: bash scripts/device_toy.sh prepare | run CMD..." >&2; exit 1 ;;
esac
