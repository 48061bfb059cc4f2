#!/usr/bin/env bash
# Nsight Compute on the merge kernels (csrc/nf4_merge.cu and the Triton one) and the plain dequantization,
# 4096 x 4096, r = 16, bf16 (GPU machine; $OUT/ncu-merge.txt).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
cat > /tmp/ncu_merge_run.py <<'PY'
import torch
from lowrank_kernels import NF4Weight
from lowrank_kernels.dispatch import _nf4_state
from lowrank_kernels.kernels.nf4_merge import nf4_merge
w = NF4Weight.quantize(torch.randn(4096, 4096, device="cuda") * 0.02)
s = _nf4_state(w)
A = (torch.randn(16, 4096, device="cuda") / 64).bfloat16()
B = (torch.randn(4096, 16, device="cuda") * 0.02).bfloat16()
for _ in range(2):
    w.dequantize(torch.bfloat16)
    nf4_merge(s, A, B, 2.0, torch.bfloat16, cuda=False)
    nf4_merge(s, A, B, 2.0, torch.bfloat16, cuda=True)
torch.cuda.synchronize()
PY
python3 /tmp/ncu_merge_run.py  # build outside ncu
SECTIONS="--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis"
$NCU --clock-control none $SECTIONS --print-details all -k regex:"nf4_dequant_words|nf4_merge" -s 3 -c 3 python3 /tmp/ncu_merge_run.py > "$OUT/ncu-merge.txt" 2>&1
grep -iE "nf4_|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occ|Issued Warp|Eligible Warps|Warp Cycles Per Issued|L2 Hit|Mem Busy|Max Bandwidth|stall" "$OUT/ncu-merge.txt" | head -90
