#!/usr/bin/env bash
# Download exactly the wheels scripts/gpu_check.sh needs on the GPU device machine and that its image lacks.
#
#   scripts/gpu_wheels.sh DIR [--python 3.12]
#
# The device image (PyTorch 2.11 / CUDA 13, Python 3.12) has torch, transformers, tokenizers, numpy, scipy,
# triton, cuda-bindings, pyyaml, rich, sortedcontainers, tqdm and pytest, but no pydantic and no network. The
# check imports drift's engine, whose config is a pydantic model, and deliberately nothing of the HTTP side
# (fastapi, starlette, uvicorn), gguf or kopf; so the wheels are pydantic and its dependencies:
#   pydantic, pydantic-core (compiled: built for --python), annotated-types, typing-inspection,
#   typing-extensions (the image has one; carried so pydantic gets a new enough one).
# Versions are those of this checkout's environment when installed here, else the pins below (one known-good
# set; pydantic pins pydantic-core exactly). pyyaml and sortedcontainers are added only with --with-base, for a
# machine whose image lacks them.
#
# On the device (no network), from the repository root, with DIR carried along:
#   scripts/gpu_check.sh OUTDIR --wheels DIR
# which runs, before the check:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/drift-gpucheck-site DIR/*.whl
#   export PYTHONPATH=/tmp/drift-gpucheck-site:$PYTHONPATH
set -euo pipefail
dir="${1:?usage: scripts/gpu_wheels.sh DIR [--python 3.12] [--with-base]}"
shift
pyver=3.12
base=0
while (($#)); do
    case "$1" in
        --python) pyver="${2:?--python needs a version, e.g. 3.12}"; shift 2 ;;
        --with-base) base=1; shift ;;
        *) echo "gpu_wheels: unknown option $1" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-python3}"
# name==version: the installed version here if any, else the pin.
pin() {
    local v
    v="$("$python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true)"
    echo "$1==${v:-$2}"
}
pkgs=(
    "$(pin pydantic 2.14.4)"
    "$(pin pydantic-core 2.50.5)"
    "$(pin annotated-types 0.7.0)"
    "$(pin typing-inspection 0.4.5)"
    "$(pin typing-extensions 4.16.0)"
)
if ((base)); then
    pkgs+=("$(pin pyyaml 6.0.3)" "$(pin sortedcontainers 2.4.0)")
fi
mkdir -p "$dir"
echo "gpu_wheels: ${pkgs[*]} for CPython $pyver, manylinux x86_64 -> $dir"
"$python" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${pkgs[@]}"
ls -1 "$dir"
