#!/usr/bin/env bash
# The CUDA merge kernel's compile-time knobs (csrc/nf4_merge.cu: LK_MERGE_*), each built and timed in its own
# process (experiments/probe/merge_cuda_ab.py section 1). GPU machine.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for v in "" "-DLK_MERGE_RESIDENT_WARPS=32" "-DLK_MERGE_STEPS=1 -DLK_MERGE_MIN_BLOCKS=3" \
         "-DLK_MERGE_STEPS=1 -DLK_MERGE_MIN_BLOCKS=3 -DLK_MERGE_RESIDENT_WARPS=24" "-DLK_MERGE_STEPS=4"; do
  echo "## variant: '$v'"
  LOWRANK_KERNELS_NVCC_FLAGS="$v" python experiments/probe/merge_cuda_ab.py --sections 1 2>&1 | grep -- "->"
done
