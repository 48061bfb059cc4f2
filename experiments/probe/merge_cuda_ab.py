"""The CUDA merge kernel (``csrc/nf4_merge.cu``) against the Triton one and a plain dequantization, on the GPU:

1. kernel time (CUDA-graph replay, 8 weight copies) of dequantize, the Triton merge and the CUDA merge at several
   block widths (warps), r = 16, 32 (and 64: Triton only); the largest difference between the two
   merges in units of the last place;
2. per-kernel device time (profiler, 20 eager calls) of the QLoRA layer at M rows, inference forward and training
   forward + backward: dense | merge off | Triton merge | CUDA merge;
3. what a GEMM costs when its weight carries r extra rows or columns (``[W'; A]`` / ``[W' | sB]``, the LoRA
   projections S and dS as extra output columns of the main GEMMs) against the plain GEMM plus cuBLAS S / dS.

    python experiments/probe/merge_cuda_ab.py --out bench/results/merge-cuda-h100.txt [--m 2048 4096 8192]
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import SHAPES, Table, kernel_times, time_us  # noqa: E402

from lowrank_kernels import QLoraLinear, dispatch  # noqa: E402
from lowrank_kernels.dispatch import _nf4_state  # noqa: E402
from lowrank_kernels.kernels import nf4_merge_cuda  # noqa: E402
from lowrank_kernels.kernels.nf4_merge import nf4_merge  # noqa: E402


def ulps(a, b):
    """Largest |a - b| in bf16 units of the last place at b's magnitude."""
    a, b = a.double(), b.double()
    ulp = torch.ldexp(torch.ones_like(b), torch.frexp(b.abs().clamp_min(1e-30))[1] - 8)
    return ((a - b).abs() / ulp).max().item()


def section1(table):
    table.add("## 1. merge kernels, µs (graph replay, 8 copies); CUDA vs Triton: max difference in ulps")
    for K, N in SHAPES:
        lins = [torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
        layers = [QLoraLinear.from_linear(lin, r=16, lora_alpha=32) for lin in lins]
        states = [_nf4_state(layer.weight) for layer in layers]
        row = []
        t, _ = time_us([lambda w=layer.weight: w.dequantize(torch.bfloat16) for layer in layers])
        row.append(f"dequant {t:.1f}")
        for r in (16, 32, 64):
            A = (torch.randn(r, K, device="cuda") / 64).bfloat16()
            B = (torch.randn(N, r, device="cuda") * 0.02).bfloat16()
            t, _ = time_us([lambda s=s: nf4_merge(s, A, B, 2.0, torch.bfloat16, cuda=False) for s in states])
            row.append(f"r{r} triton {t:.1f}")
            if r > nf4_merge_cuda.MAX_R:
                continue
            for warps in (2, 4, 8) if r == 16 else (8,):
                t, _ = time_us([lambda s=s: nf4_merge_cuda.merge(s, A, B, 2.0, torch.bfloat16, warps=warps)
                                for s in states])
                row.append(f"cuda/{warps} {t:.1f}")
            d = ulps(nf4_merge_cuda.merge(states[0], A, B, 2.0, torch.bfloat16),
                     nf4_merge(states[0], A, B, 2.0, torch.bfloat16, cuda=False))
            row.append(f"diff {d:.2f} ulp")
        table.add(f"{K}->{N}: " + ", ".join(row))
        del lins, layers, states


def section2(table, ms):
    table.add("## 2. layer kernel time (µs per call, profiler): inference forward and training fwd+bwd; "
              "ratios to dense")
    table.add(f"{'shape':12} {'M':>5} {'mode':>4} {'dense':>8} {'off':>8} {'triton':>8} {'cuda':>8}  "
              f"{'off/d':>6} {'tri/d':>6} {'cuda/d':>6}")
    supported = nf4_merge_cuda.supported
    for K, N in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
        layer = QLoraLinear.from_linear(lin, r=16, lora_alpha=32)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

            def fwd():
                with torch.no_grad():
                    layer(x)

            def fb():
                x.grad = None
                layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
                layer(x).backward(g)

            def dense_f():
                with torch.no_grad():
                    lin(x)

            def dense_fb():
                x.grad = None
                lin(x).backward(g)
            for mode, fn, dfn in (("f", fwd, dense_f), ("fb", fb, dense_fb)):
                res = [sum(kernel_times(dfn, calls=20).values())]
                for merge, cuda in ((False, False), (True, False), (True, True)):
                    dispatch.MERGE_LORA = merge
                    old_min = dispatch.MERGE_MIN_M
                    dispatch.MERGE_MIN_M = min(old_min, M)
                    nf4_merge_cuda.supported = supported if cuda else (lambda *a: False)
                    res.append(sum(kernel_times(fn, calls=20).values()))
                    dispatch.MERGE_LORA, dispatch.MERGE_MIN_M = True, old_min
                    nf4_merge_cuda.supported = supported
                d = res[0]
                table.add(f"{K}->{N:<6} {M:>5} {mode:>4} " + " ".join(f"{v:8.1f}" for v in res) + "  "
                          + " ".join(f"{v / d:6.3f}" for v in res[1:]))


def section3(table, M=8192, r=16):
    table.add(f"## 3. GEMMs with r = {r} extra weight rows / columns, M = {M}, µs (graph replay)")
    for K, N in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16)
        B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        buf = torch.randn(N + r, K + r, device="cuda", dtype=torch.bfloat16) * 0.02
        fw = buf[:, :K]  # [W'; A]: [N + r, K] with row stride K + r
        bw = buf[:N, :]  # [W' | sB]: [N, K + r]
        cells = {
            "fwd x@W.T": lambda: F.linear(x, W),
            "S x@A.T": lambda: F.linear(x, A),
            "fwd x@[W;A].T": lambda: F.linear(x, fw),
            "dX dY@W": lambda: torch.mm(dy, W),
            "dS dY@B": lambda: torch.mm(dy, B),
            "dX dY@[W|B]": lambda: torch.mm(dy, bw),
        }
        table.add(f"{K}->{N}: " + ", ".join(f"{name} {time_us([fn])[0]:.1f}" for name, fn in cells.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--sections", default="123")
    args = ap.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    table.add(f"# experiments/probe/merge_cuda_ab.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; bf16")
    if "1" in args.sections:
        section1(table)
    if "2" in args.sections:
        section2(table, args.m)
    if "3" in args.sections:
        section3(table)


if __name__ == "__main__":
    main()
