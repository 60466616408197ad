#!/usr/bin/env bash
# The GPU path on a lent CUDA machine, in one command and under 8 minutes (#25):
#
#   bash dev/gpu_check.sh [--out DIR] [--pack build/gpu-pack]   # on the GPU machine
#   PYTHON=$VENV/bin/python bash dev/gpu_check.sh --dry-run --out DIR   # here, on the CPU
#
# Such a machine has python3 with torch, sentence-transformers, transformers, grpcio and
# protobuf, but no network, no Java (so no broker) and 15 minutes in all. Nothing is fetched:
# `make gpu-pack` prepares here (build/gpu-pack, about 59 MiB, never committed) the pinned
# wheels it lacks and MiniLM in fp16; carry that folder with the tree. Stages, each under its
# own `timeout` (and all within GPU_CHECK_BUDGET_S, default 450 s), a failure recorded, never
# fatal:
#   device   python, torch, CUDA, the GPU;
#   pack     check the pack's sha256s, install its wheels into a temporary site, export MiniLM
#            (dev/gpu_pack.py unpack); skipped on a dry run whose python has everything;
#   imports  the worker, its bench and the test plugins import;
#   pytest   tests/test_gpu.py (-m "gpu and not kafka": no broker), failures listed;
#   heavy    the worker's Instances + run_batches vs plain predict (1/2/4 instances,
#            fp32/fp16/bf16; int8 on the CPU only)   (worker/bench/inprocess.py);
#   minilm   MiniLM through the worker's path vs SentenceTransformer.encode, same device;
#   grpc     a worker with WORKER_KAFKA__ENABLED=false, closed loop over gRPC;
#   compile  eager vs compile = "aot" (AOTInductor) for mlp, MiniLM and heavy in fp16, through
#            the worker's path (worker/bench/compiled.py; the first compile is in the figure's
#            compile_seconds; a compile that fails is recorded and the leg measures eager).
# Results: DIR/gpu-check.jsonl (one JSON line per stage and measurement, written as they
# come) and DIR/gpu-check.log (every stage's output). DIR defaults to $OUT (the device
# tool's folder), else gpu-check/. --dry-run: the same stages on the CPU with tiny sizes (the
# GPU tests then fail without CUDA, as recorded; that does not fail the dry run).
# Exit status: 0 when every stage that should pass did.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
DIR=${OUT:-gpu-check}
PACK=$ROOT/build/gpu-pack
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) DIR=$2; shift ;;
    --pack) PACK=$(cd "$2" && pwd); shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR] [--pack DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
JSON=$DIR/gpu-check.jsonl
LOG=$DIR/gpu-check.log
: >"$JSON"
: >"$LOG"
END=$(($(date +%s) + ${GPU_CHECK_BUDGET_S:-450}))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 # the image's plugins stay out; ours are named
DRYFLAG=()
((DRY)) && DRYFLAG=(--dry-run)
FAILED=()

note() { # note KEY=VALUE...: one JSON line (numbers as numbers)
  "$PY" - "$@" >>"$JSON" <<'PY'
import json, re, sys
pairs = (a.split("=", 1) for a in sys.argv[1:])
num = re.compile(r"-?\d+(\.\d+)?")
print(json.dumps({k: (float(v) if "." in v else int(v)) if num.fullmatch(v) else v
                  for k, v in pairs}))
PY
}

stage() { # stage NAME SECONDS COMMAND...: run under timeout, log it, record how it ended
  local name=$1 limit=$2 left began rc status tenths
  shift 2
  left=$((END - $(date +%s) - 5))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    note stage="$name" status=skipped reason="out of time"
    FAILED+=("$name")
    return 1
  fi
  echo "=== $name (timeout ${limit} s): $*" >>"$LOG"
  began=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  tenths=$((($(date +%s%N) - began) / 100000000))
  note stage="$name" status=$status rc=$rc limit_s="$limit" seconds="$((tenths / 10)).$((tenths % 10))"
  return $rc
}

DEVICE=cuda
((DRY)) && DEVICE=cpu
stage device 60 "$PY" - "$JSON" "$DEVICE" <<'PY' || FAILED+=(device)
import json, platform, sys
import torch
out, device = sys.argv[1], sys.argv[2]
info = {"stage": "device-info", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
with open(out, "a") as f:
    f.write(json.dumps(info) + "\n")
print(info)
assert device == "cpu" or torch.cuda.is_available(), "no CUDA device visible to torch"
PY

NEEDED='import aiokafka, fastavro, pydantic_settings, structlog, pytest_asyncio, grpc, google.protobuf'
if ((DRY)) && "$PY" -c "$NEEDED" 2>/dev/null; then
  note stage=pack status=skipped reason="dry run: $PY has every package"
elif [ -f "$PACK/SHA256SUMS" ]; then
  stage pack 150 "$PY" dev/gpu_pack.py unpack --pack "$PACK" --site "$WORK/site" || FAILED+=(pack)
  export PYTHONPATH=$ROOT:$WORK/site
else
  note stage=pack status=failed reason="no pack at $PACK (make gpu-pack, then carry it)"
  FAILED+=(pack)
fi

stage imports 60 "$PY" -c "$NEEDED; import worker.app, worker.bench.inprocess, tests.conftest" ||
  FAILED+=(imports)

PYTEST=("$PY" -m pytest tests/test_gpu.py -m "gpu and not kafka" -q -rfE -p no:cacheprovider
  -p pytest_asyncio.plugin -p pytest_timeout)
if stage pytest 150 "${PYTEST[@]}"; then :; elif ((DRY)); then
  note stage=pytest-dry-run note="the GPU tests fail without CUDA: recorded, not a failure"
else FAILED+=(pytest); fi
grep -E '^(FAILED|ERROR) ' "$LOG" | cut -c1-300 | while read -r line; do
  note stage=pytest-failure test="$line"
done
grep -E '^[0-9]+ (passed|failed)|^(=+ )?[0-9]+ (passed|failed|error)' "$LOG" | tail -1 |
  while read -r line; do note stage=pytest-summary summary="$line"; done

BENCH=("$PY" -m worker.bench.inprocess --out "$JSON" --device "$DEVICE" "${DRYFLAG[@]}")
((DRY)) && BENCH+=(--threads 1)
stage heavy 100 "${BENCH[@]}" heavy || FAILED+=(heavy)
stage minilm 120 "${BENCH[@]}" minilm || FAILED+=(minilm)
stage grpc 60 "${BENCH[@]}" --log "$WORK/grpc-worker.log" grpc || FAILED+=(grpc)
[ -f "$WORK/grpc-worker.log" ] && { echo "=== grpc worker's log" && cat "$WORK/grpc-worker.log"; } >>"$LOG"
COMPILED=("$PY" -m worker.bench.compiled --out "$JSON" --device "$DEVICE" "${DRYFLAG[@]}")
((DRY)) && COMPILED+=(--threads 1)
stage compile 150 "${COMPILED[@]}" || FAILED+=(compile)

note stage=done failed="${FAILED[*]:-}" dry_run=$DRY
echo "gpu check done: $JSON, $LOG; failed: ${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
