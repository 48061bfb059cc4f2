#!/usr/bin/env bash
# The GPU steps still unrun, one device call each (each fits the 10-minute limit of a call); carry .whl/ (the
# bitsandbytes and liger-kernel wheels) and, for "ab", .ab_base/ (see scripts/gpu_ab.sh):
#   bash scripts/gpu_pending.sh tests-a     tests/test_[a-l]*.py on CUDA (compile / CUDA graphs, DoRA, FSDP2, fuzz...)
#   bash scripts/gpu_pending.sh tests-b     tests/test_[m-z]*.py (the CUDA kernels, peft, training stack)
#   bash scripts/gpu_pending.sh train-1     the training step at batch 1: 3 providers x eager / compiled
#   bash scripts/gpu_pending.sh train-4     the same at batch 4
#   bash scripts/gpu_pending.sh liger       both batches with Liger-Kernel's Llama kernels on every provider
#   bash scripts/gpu_pending.sh dora        the DoRA / QDoRA layer benchmark
#   bash scripts/gpu_pending.sh mixed       the mixed-adapter batch benchmark (8 adapters, M = 16 / 64)
#   bash scripts/gpu_pending.sh ab          the A/B of the layer benchmarks against .ab_base (2 rounds)
# Logs and results under $OUT (or ./gpu_out).
set -uo pipefail
part=${1:?usage: bash scripts/gpu_pending.sh tests-a|tests-b|train-1|train-4|liger|dora|mixed|ab}
lora_step='train_step and not adalora'
case "$part" in
  tests-a) bash scripts/gpu_check.sh tests tests/test_[a-l]*.py ;;
  tests-b) bash scripts/gpu_check.sh tests tests/test_[m-z]*.py ;;
  train-1) bash scripts/gpu_check.sh bench bench/test_train_step.py -k "$lora_step and batch1" ;;
  train-4) bash scripts/gpu_check.sh bench bench/test_train_step.py -k "$lora_step and batch4" ;;
  liger) bash scripts/gpu_check.sh bench bench/test_train_step.py -k "$lora_step and not compiled" --bench-liger ;;
  dora) bash scripts/gpu_check.sh bench bench/test_dora.py ;;
  mixed) bash scripts/gpu_check.sh bench bench/test_mixed.py ;;
  ab) python3 -m pip install -q --no-index --no-deps --target /tmp/lk-site .whl/*.whl
      SITE=/tmp/lk-site bash scripts/gpu_ab.sh .ab_base 2 ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
