#!/usr/bin/env bash
# GPU evidence in one go (sized for under 8 minutes on an H100/H200): the GPU tests, then the
# full-Scout int4 benchmark with a 4-layer full-width transformers comparison.
# Results go under $OUT (default gpu_results/); paste bench_scout.txt into docs/benchmarks.md with the card.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
timeout 150 python -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.txt"
timeout 300 python -m minillama4.bench scout --int4 --which all --device cuda --json "$OUT/bench_scout.json" 2>&1 | tee "$OUT/bench_scout.txt"
echo "done: $OUT"
