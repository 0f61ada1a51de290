#!/usr/bin/env bash
# The GPU check (issue 13), one prepared run for a lent GPU machine: installs what that machine lacks from wheels
# carried in .whl/ (grain, tensorflow-datasets, array-record, ml-collections and their small dependencies; see
# docs/research_log.md entry 18 for the list that worked), checks cuDNN attention against XLA's, and runs the
# training-step and sampling benchmarks, writing everything under $OUT (default out/gpu_bench). Each part has its
# own time limit, so one slow part cannot lose the others' results.
#
#   bash launch/gpu_bench.sh                    the whole check (about 6 minutes on an H200)
#   PARTS="attention step" bash launch/gpu_bench.sh
#
# On this CPU it runs as a smoke test with small sizes: SMOKE=1 bash launch/gpu_bench.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-out/gpu_bench}"
PARTS="${PARTS:-attention step sampling}"
SMOKE="${SMOKE:-0}"
mkdir -p "$OUT"
log() { echo "[gpu_bench $(date +%H:%M:%S)] $*" | tee -a "$OUT/main.log"; }

if [[ -d .whl ]] && ! python3 -c "import grain, tensorflow_datasets, ml_collections" 2>/dev/null; then
  log "installing the carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$OUT/main.log"

run() {  # run NAME SECONDS COMMAND...: one part, its log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  log "$name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  log "$name: exit $? ($(grep -c . "$OUT/$name.log") log lines)"
}

if [[ "$SMOKE" == "1" ]]; then
  STEP_CONFIGS="tiny"; STEP_ARGS=(--quick --config.model.dit.depth=1); SAMPLING_ARGS=(--quick)
else
  # tiny at its own batch; small and base at batch 8 (base is Wan2.1-1.3B shaped: its MFU is the headline).
  STEP_CONFIGS="tiny,small"; STEP_ARGS=(--repeats 5); SAMPLING_ARGS=(--repeats 3)
fi
for part in $PARTS; do
  case "$part" in
    attention) run attention 120 python3 -m ap_jax bench attention --json "$OUT/attention.json" ;;
    step)
      run step 240 python3 -m ap_jax bench step --configs "$STEP_CONFIGS" "${STEP_ARGS[@]}" --json "$OUT/step.json"
      [[ "$SMOKE" == "1" ]] || run step_base 240 python3 -m ap_jax bench step --configs base \
        --config.data.global_batch_size=8 --repeats 3 --json "$OUT/step_base.json" ;;
    sampling) run sampling 240 python3 -m ap_jax bench sampling "${SAMPLING_ARGS[@]}" --json "$OUT/sampling.json" ;;
    *) log "unknown part $part (expected attention, step, sampling)" ;;
  esac
done
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
