#!/usr/bin/env bash
# The GPU session entry point: install the carried wheels (.whl/: bitsandbytes, liger-kernel), then
#   bash scripts/gpu_check.sh tests [PYTEST ARGS]   the test suite on CUDA (default: tests/; the CUDA C++ kernels
#                                                   built on first use); e.g. tests/test_[a-l]*.py, then the rest
#   bash scripts/gpu_check.sh bench [PYTEST ARGS]   the benchmarks (default: bench/), JSON + markdown report; e.g.
#       bench/test_train_step.py -k "lora and not adalora and batch1" [--bench-liger]   (the training step)
# Logs and results under $OUT (or ./gpu_out). scripts/gpu_bench.sh runs the benchmarks in parts, scripts/gpu_ab.sh
# compares two trees, scripts/gpu_cuda_ext_check.sh checks the CUDA extension builds in depth.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
what=${1:-tests}; shift || true
python3 -m pip install -q --no-index --no-deps --target /tmp/lk-site .whl/*.whl && export PYTHONPATH=/tmp/lk-site:$PWD
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu.txt"
case "$what" in
  tests)
    # -v: one line per test as it ends, so a run cut short by the device's time limit still says what failed
    # (split the suite with paths or -k across calls: it takes longer than one call on an H100)
    args=("$@"); if [ ${#args[@]} -eq 0 ] || [[ "${args[0]}" == -* ]]; then args=(tests "${args[@]}"); fi
    python3 -m pytest -v --tb=short -p no:cacheprovider -rfEs "${args[@]}" 2>&1 | tee "$OUT/tests.log" \
      | grep -E "FAILED|ERROR|passed|failed" | tail -40 ;;
  bench)
    stamp=$(date -u +%Y%m%d)
    args=("$@"); if [ ${#args[@]} -eq 0 ] || [[ "${args[0]}" == -* ]]; then args=(bench "${args[@]}"); fi
    python3 -m pytest -q -p no:cacheprovider --benchmark-json="$OUT/bench-$stamp.json" "${args[@]}" 2>&1 \
      | tee "$OUT/bench.log" | tail -3
    python3 -m bench.report "$OUT/bench-$stamp.json" --out "$OUT/bench-$stamp.md" && cat "$OUT/bench-$stamp.md" ;;
  *) echo "usage: bash scripts/gpu_check.sh tests|bench [pytest args]" >&2; exit 2 ;;
esac
