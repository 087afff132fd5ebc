# Sourced by scripts/offline_bundle.sh.
#
# offline_env        puts $SITE (where the bundles' wheels are installed), the package (lib/) and the checkout first
#                    on PYTHONPATH, sets the offline switches and registers a python3 kernelspec that runs this very
#                    interpreter (so papermill's kernel sees $SITE too, whatever kernelspec the image ships).
# offline_download   (machine with internet) python 3.12 x86-64 wheels of a list into a folder.
SITE_ROOT=${SITE_ROOT:-/tmp/site}

offline_env() {  # $SITE: the installed bundles' folders, ':'-separated (offline_bundle.sh run sets it)
    export PYTHONPATH="$SITE:$PWD/lib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    export JUPYTER_PLATFORM_DIRS=1   # jupyter_core 5: use platformdirs, no migration warning
    python3 -c 'import ipykernel' || { echo "ipykernel is not importable from $SITE: check the wheels" >&2; return 1; }
    local kdir=/tmp/jupyter/kernels/python3
    mkdir -p "$kdir"
    python3 - "$kdir/kernel.json" <<'PYEOF'
import json, sys
spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python", "metadata": {"debugger": False}}
with open(sys.argv[1], "w") as handle:
    json.dump(spec, handle, indent=1)
PYEOF
    # $SITE/share/jupyter holds the wheels' data files, e.g. nbconvert's HTML templates (report.html).
    local share="" s
    for s in ${SITE//:/ }; do share+=":$s/share/jupyter"; done
    export JUPYTER_PATH="/tmp/jupyter$share${JUPYTER_PATH:+:$JUPYTER_PATH}"
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.cuda.is_available())'
}

# offline_download LIST DIR: python 3.12 x86-64 wheels of LIST (name==version per line) into DIR (workstation side).
offline_download() {
    local list=$1 dir=$2 platforms=() n
    for n in 28 27 26 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    mkdir -p "$dir"
    xargs python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" < "$list"
}
