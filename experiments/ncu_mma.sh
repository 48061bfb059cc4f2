#!/usr/bin/env bash
# Nsight Compute on the CUDA decode kernel (csrc/nf4_mma_gemv.cu) at M = 1 and 4 (GPU machine; $OUT/ncu-mma-*.txt).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
python3 experiments/ncu_gemv.py --m 4 --config cuda=1 >/dev/null 2>&1  # build the library outside ncu
SECTIONS="--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis --section SourceCounters"
for spec in "1 4096 14336 cuda=1,split_k=2" "4 4096 14336 cuda=1,split_k=2"; do
  read -r m k n cfg <<< "$spec"
  log="$OUT/ncu-mma-m$m-$k-$n.txt"
  $NCU --clock-control none $SECTIONS --print-details all -k regex:nf4_mma_gemv -s 2 -c 1 python3 experiments/ncu_gemv.py --m "$m" --k "$k" --n "$n" --config "$cfg" > "$log" 2>&1
  echo "== M=$m $k->$n $cfg"
  grep -iE "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Warp|Eligible Warps|Warp Cycles Per Issued|stall" "$log" | head -40
done
