#!/usr/bin/env bash
# A/B of the QLoRA layer benchmarks between a baseline tree and this checkout, alternated on one GPU:
#   bash scripts/gpu_ab.sh BASE_DIR [ROUNDS]     (BASE_DIR: e.g. `git archive <commit> ... | tar -x -C .ab_base`)
# Runs `lowrank_kernels` and `dense` (forward, fwd+bwd-graph; M = 1, 16, 8192 on the three Llama-3-8B shapes) in
# BASE, HEAD, BASE, HEAD ... order, then scripts/ab_compare.py: each version's ratio to dense per run, head / base,
# and the spread across runs. Writes $OUT/ab-*.json, ab-*.log and ab.txt.
set -uo pipefail
BASE=$1; ROUNDS=${2:-2}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
args=(bench/test_forward.py bench/test_backward.py -q -p no:cacheprovider --bench-providers lowrank_kernels,dense
      --bench-modes forward,fwd+bwd-graph --bench-m 1,16,8192)
runs=()
for r in $(seq "$ROUNDS"); do
  for v in base head; do
    dir=$PWD; [ "$v" = base ] && dir=$BASE
    (cd "$dir" && PYTHONPATH=$dir:${SITE:-} python3 -m pytest "${args[@]}" --benchmark-json="$OUT/ab-$v-$r.json") \
      > "$OUT/ab-$v-$r.log" 2>&1 || echo "ab: $v round $r failed (see ab-$v-$r.log)"
    tail -1 "$OUT/ab-$v-$r.log"
    runs+=("$OUT/ab-$v-$r.json")
  done
done
python3 scripts/ab_compare.py "${runs[@]}" | tee "$OUT/ab.txt"
