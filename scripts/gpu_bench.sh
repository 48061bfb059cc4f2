#!/usr/bin/env bash
# One part of the GPU benchmark run (a device call is limited to 10 minutes): bash scripts/gpu_bench.sh PART
# PART: forward (forward + dequant + copy ceiling), training (backward, fwd+bwd, end-to-end training step) or
# adalora (AdaLoRA layer at 100/50/25% active ranks, allocator step on 224 layers).
# Writes $OUT/bench-PART.json and the log; `python -m bench.report A.json B.json --out X.md --plots DIR` merges.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
case "$1" in
  forward) sel="bench/test_forward.py bench/test_nf4_dequant.py" ;;
  training) sel="bench/test_backward.py bench/test_train_step.py" ;;
  adalora) sel="bench/test_adalora.py" ;;
  *) echo "PART must be forward, training or adalora" >&2; exit 2 ;;
esac
(python3 -m pytest $sel -q -p no:cacheprovider --benchmark-json="$OUT/bench-$1.json" "${@:2}") 2>&1 \
  | tee "$OUT/bench-$1.log" | grep -E "^\[|passed|failed|error" | tail -60
