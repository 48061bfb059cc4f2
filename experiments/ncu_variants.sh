#!/usr/bin/env bash
# Nsight Compute on the NF4 GEMV kernel for a few launch configs (GPU machine; writes $OUT/ncu-*.txt and prints the
# headline metrics). Edit SPECS: "M K N config" with config as experiments/ncu_gemv.py --config takes it (empty: default).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
SECTIONS="--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats
          --section LaunchStats --section MemoryWorkloadAnalysis"
SPECS=("64 4096 4096 block_n=128,block_k=256,num_warps=8,num_stages=3,split_k=4,tma=1,join=1"
       "1 4096 14336 block_n=256,block_k=256,num_warps=8,num_stages=3,split_k=2,tma=1,fma=1"
       "1 4096 14336 block_n=128,block_k=256,num_warps=8,num_stages=1,split_k=8,tma=0,fma=1")
for spec in "${SPECS[@]}"; do
  read -r m k n cfg <<< "$spec"
  log="$OUT/ncu-m$m-$k-$n-$(echo "$cfg" | md5sum | cut -c1-6).txt"
  $NCU --clock-control none $SECTIONS -k regex:nf4_gemv_kernel -s 2 -c 1 \
    python3 experiments/ncu_gemv.py --m "$m" --k "$k" --n "$n" --config "${cfg:-}" > "$log" 2>&1
  echo "== M=$m $k->$n ${cfg:-default}"
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Active Warps|Issued Warp Per|Eligible Warps" "$log"
done
