"""dS = s * dY @ B and dB = s * dY.T @ S from one pass over dY (kernels.lowrank_proj.lowrank_dual) against the two
cuBLAS products the merged backward runs (dispatch._mm, dispatch._mm_fp32), M = 8192, r = 16, bf16 dY, fp32 dB:
µs (CUDA-graph replay) per tile config, and the largest relative difference of the outputs. GPU machine.

    python experiments/probe/dual_ab.py [--out FILE]
"""
import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import SHAPES, Table, time_us  # noqa: E402

from lowrank_kernels.dispatch import _mm, _mm_fp32  # noqa: E402
from lowrank_kernels.kernels.lowrank_proj import lowrank_dual  # noqa: E402

CONFIGS = [(32, 256, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 256, 8, 3), (32, 512, 8, 2), (16, 256, 4, 3),
           (64, 512, 8, 2), (128, 256, 8, 2), (64, 256, 8, 4), (64, 256, 4, 3), (32, 512, 16, 2)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, default=8192)
    args = ap.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    table.add(f"# experiments/probe/dual_ab.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; M={args.m}, r=16; µs (graph replay)")
    M = args.m
    for K, N in SHAPES:
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        B = (torch.randn(N, 16, device="cuda") * 0.02).bfloat16()
        S = torch.randn(M, 16, device="cuda", dtype=torch.bfloat16)
        ref_ds, ref_db = _mm(dy, B, 2.0), _mm_fp32(dy.t(), S, 2.0)
        t_ref, _ = time_us([lambda: (_mm(dy, B, 2.0), _mm_fp32(dy.t(), S, 2.0))])
        t_ds, _ = time_us([lambda: _mm(dy, B, 2.0)])
        t_db, _ = time_us([lambda: _mm_fp32(dy.t(), S, 2.0)])
        row = [f"cuBLAS dS+dB {t_ref:.1f} (dS {t_ds:.1f}, dB {t_db:.1f})"]
        for bm, bn, nw, ns in CONFIGS:
            try:
                ds, db = lowrank_dual(dy, B, S, 2.0, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
                t, _ = time_us([lambda: lowrank_dual(dy, B, S, 2.0, block_m=bm, block_n=bn, num_warps=nw,
                                                     num_stages=ns)])
                row.append(f"{bm}x{bn}/{nw}/{ns} {t:.1f} (diff {rel(ds, ref_ds):.1e}, {rel(db, ref_db):.1e})")
            except Exception as e:  # a config that does not compile (shared memory): say so, go on
                row.append(f"{bm}x{bn}/{nw}/{ns} failed: {type(e).__name__}")
        table.add(f"{K}->{N}: " + "; ".join(row))


if __name__ == "__main__":
    main()
