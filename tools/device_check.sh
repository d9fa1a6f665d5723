#!/usr/bin/env bash
# The one prepared GPU check (issue 12): installs what is missing, runs tests/gpu, then the paper benchmarks and
# (issue 22) TensorRT fp16 engines of D0 / ESeg-Lite-S against PyTorch (tools/device_check_tensorrt.py; TensorRT
# must be installed there: its wheels are too large to carry), and writes device_check.json + device_check.log into
# $OUT (or --out DIR, else ./device_check_out). Ends within 8 minutes: every step has its own timeout inside one
# budget, and this script stops the driver at 470 s.
#
#   bash tools/device_check.sh                 # on the GPU machine
#   bash tools/device_check.sh --dry-run       # the same steps on the CPU at tiny sizes (or DRY_RUN=1), ~1-2 min;
#                                              # onnxruntime stands in for TensorRT (the JSON says so)
#   python tools/device_check.py --fetch-wheels .whl   # beforehand, where PyPI is reachable: the device's wheels
#
# The interpreter: $PYTHON, else this checkout's .venv, else python3 (on the GPU machine the one that holds its
# CUDA build of PyTorch), the first that imports torch; with none, `make install` creates .venv (needs PyPI).
set -uo pipefail
cd "$(dirname "$0")/.."

VERSION='import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'

pick_python() {  # prints "<python> <its version line>" for the first candidate that imports torch
    local py version
    for py in "${PYTHON:-}" .venv/bin/python python3 python; do
        if [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 && version=$("$py" -c "$VERSION" 2>/dev/null); then
            echo "$py ($version)"
            return 0
        fi
    done
    return 1
}

if ! FOUND=$(pick_python); then
    echo "device_check: no Python with torch found; trying 'make install' (needs PyPI)" >&2
    timeout 300 make install >&2 && FOUND=".venv/bin/python (new .venv)" || { echo "device_check: no usable Python" >&2; exit 2; }
fi
PY=${FOUND%% (*}
echo "device_check: $FOUND"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout --signal=TERM --kill-after=5 470 "$PY" tools/device_check.py "$@"
