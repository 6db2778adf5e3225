#!/usr/bin/env bash
# The prepared GPU check of issue 23: environment, GPU tests, partition proof, drift profile, serving
# comparison and roofline, each under its own time budget, in under 9 minutes on one H100/H200. The report
# (OUTDIR/report.json and report.md) is rewritten after every part, so a kill keeps what was measured.
#
#   scripts/gpu_check.sh OUTDIR [--dry-run] [--budget-s 540] [--parts abcdef] [--wheels DIR]
#
# --dry-run: CPU, tiny random model, tiny grids; the GPU-only parts report "skipped: no GPU" (CI runs this).
# --wheels DIR: install the wheels scripts/gpu_wheels.sh downloaded (pydantic and its dependencies, which the
#   device image lacks) into a private directory first, without network.
# Exit: 0 all parts ok/skipped/truncated, 1 a part failed or timed out, 2 a Python package is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
args=()
wheels=""
while (($#)); do
    case "$1" in
        --wheels) wheels="${2:?--wheels needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [[ -n "$wheels" ]]; then
    site="${TMPDIR:-/tmp}/drift-gpucheck-site"
    PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/agent:$root${PYTHONPATH:+:$PYTHONPATH}"
# No network on the device, none needed here: never let transformers try the Hub.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$python" -m drift_agent.gpucheck "${args[@]}"
