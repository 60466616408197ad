#!/usr/bin/env bash
# The GPU path, proven on a CUDA machine: the GPU-marked tests against a local broker, then the
# benchmarks whose figures go into docs/performance.md ("On a GPU"). Run from the checkout:
#
#   bash dev/gpu_check.sh            # results in gpu-check/ (JSON per benchmark, logs)
#
# Needs: a visible NVIDIA GPU, Java 17 and Maven (the broker), network to PyPI and Maven Central
# the first time (make install / kafka / minilm), torch with CUDA (PyPI's Linux build has it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PY:-$HOME/.cache/kafka-inference-worker/venv/bin/python}

make install minilm >/dev/null
"$PY" - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY
make kafka >/dev/null
export WORKER_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092

# 1. The GPU tests (they fail, not skip, without CUDA).
"$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt"

# 2. Benchmarks, each one run in one sitting so its ratios compare like with like.
bench() { "$PY" -m worker bench "$@"; }
# Heavy model on the GPU: the worker vs plain torch at the same batch and precision, dynamic
# batching vs batch size 1, fp16/bf16 vs fp32, one instance vs two.
for precision in fp32 fp16 bf16; do
  bench --suite --device cuda --precision "$precision" --requests 20000 \
    --json "$OUT/suite-$precision.json" 2>&1 | tee "$OUT/suite-$precision.txt"
done
bench --model heavy --device cuda --instances-sweep 1,2,4 --requests 20000 \
  --json "$OUT/instances.json" 2>&1 | tee "$OUT/instances.txt"
# MiniLM on the GPU against sentence-transformers on the same GPU.
bench --suite --model minilm --device cuda --precision fp16 --requests 4000 \
  --json "$OUT/minilm-fp16.json" 2>&1 | tee "$OUT/minilm-fp16.txt"
echo "gpu check done: $OUT"
