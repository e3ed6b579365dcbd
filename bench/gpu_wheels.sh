#!/usr/bin/env bash
# Download (here, with network) the pure-Python wheels of the GPU suite's log-prob baselines into .whl/
# (git-ignored). The GPU machine has no network: pass .whl to the device tool as `carry`; bench/gpu_suite.sh
# installs them with `pip install --no-index --no-deps --target <tmp>` and skips a baseline whose wheel is
# missing. --no-deps: both import only torch and triton, which the GPU machine has.
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PINS=("liger-kernel==0.8.5" "cut-cross-entropy==25.1.1")
mkdir -p .whl
$PY -m pip download --quiet --no-deps --only-binary=:all: --dest .whl "${PINS[@]}"
ls -l .whl
