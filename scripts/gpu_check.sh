#!/usr/bin/env bash
# The GPU session entry point: install the carried bitsandbytes wheel, run the tests on CUDA, run the benchmarks,
# write JSON + markdown under $OUT (or ./gpu_out). Usage: bash scripts/gpu_check.sh [extra pytest bench args]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
stamp=$(date -u +%Y%m%d)
python3 -m pytest bench -q -p no:cacheprovider --benchmark-json="$OUT/bench-$stamp.json" "$@" 2>&1 \
  | tee "$OUT/bench.log" | tail -3
python3 -m bench.report "$OUT/bench-$stamp.json" --out "$OUT/bench-$stamp.md" && cat "$OUT/bench-$stamp.md"
