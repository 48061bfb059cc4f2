"""The LoRA update merged into the dequantized NF4 weight (``dispatch.MERGE_LORA``) against the previous default
path (LoRA term written over y / dX, big GEMM accumulating into it), on the GPU:

1. ``nf4_merge`` tile configs against the plain dequantize kernel (CUDA-graph replay, 8 weight copies);
2. per-kernel device time (profiler, 20 eager calls) of the QLoRA layer's forward and forward + backward, merge on
   and off, against dense bf16, at several M; outputs and gradients of the two paths compared.

    python experiments/probe/merge_ab.py --out bench/results/merge-ab-h100.txt [--m 256 2048 8192]
"""
import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import SHAPES, Table, kernel_times, time_us  # noqa: E402

from lowrank_kernels import QLoraLinear, dispatch  # noqa: E402
from lowrank_kernels.dispatch import _nf4_state  # noqa: E402
from lowrank_kernels.kernels.nf4_merge import nf4_merge  # noqa: E402

TILES = [(32, 256, 4), (16, 256, 4), (64, 128, 4), (32, 128, 4), (64, 256, 8), (16, 512, 4), (32, 512, 8)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fwd_bwd(layer, x, g):
    x.grad = None
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    layer(x).backward(g)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--tiles-only", action="store_true", help="section 1 only")
    args = ap.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    table.add(f"# experiments/probe/merge_ab.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; r=16, bf16 x, fp32 adapters")
    table.add("## 1. nf4_merge tiles (block_n, block_k, warps) against nf4 dequantize, µs (graph replay, 8 copies)")
    for K, N in SHAPES:
        lins = [torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
        layers = [QLoraLinear.from_linear(lin, r=16, lora_alpha=32) for lin in lins]
        states = [_nf4_state(layer.weight) for layer in layers]
        A = torch.randn(16, K, device="cuda") / 64
        B = torch.randn(N, 16, device="cuda") * 0.02
        t_deq, _ = time_us([lambda w=layer.weight: w.dequantize(torch.bfloat16) for layer in layers])
        row = [f"dequant {t_deq:.1f}"]
        for bn, bk, nw in TILES:
            t, _ = time_us([lambda s=s: nf4_merge(s, A, B, 2.0, torch.bfloat16, block_n=bn, block_k=bk, num_warps=nw)
                            for s in states])
            row.append(f"{bn}x{bk}/{nw} {t:.1f}")
        table.add(f"{K}->{N}: " + ", ".join(row))
        del lins, layers, states
    if args.tiles_only:
        return
    table.add("## 2. layer kernel time (µs per call): dense | merge off | merge on; relative difference of the outputs")
    table.add(f"{'shape':12} {'M':>5} {'dense f':>8} {'off f':>8} {'on f':>8} {'on/off':>6} {'on/dense':>8} "
              f"{'dense fb':>9} {'off fb':>9} {'on fb':>9} {'on/off':>6} {'on/dense':>8}  on vs off: y, dx, dA, dB")
    for K, N in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
        layer = QLoraLinear.from_linear(lin, r=16, lora_alpha=32)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        for M in args.m:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            res = {}
            for merge in (False, True):
                dispatch.MERGE_LORA = merge
                fwd_bwd(layer, x, g)
                y = layer(x).detach()
                res[merge] = (y, x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone(),
                              sum(kernel_times(lambda: layer(x), calls=20).values()),
                              sum(kernel_times(lambda: fwd_bwd(layer, x, g), calls=20).values()))
            dispatch.MERGE_LORA = True
            d_f = sum(kernel_times(lambda: lin(x), calls=20).values())

            def dense_fb():
                x.grad = None
                lin(x).backward(g)
            d_fb = sum(kernel_times(dense_fb, calls=20).values())
            off, on = res[False], res[True]
            diffs = ", ".join(f"{rel(a, b):.1e}" for a, b in zip(on[:4], off[:4]))
            table.add(f"{K}->{N:<6} {M:>5} {d_f:8.1f} {off[4]:8.1f} {on[4]:8.1f} {on[4] / off[4]:6.3f} "
                      f"{on[4] / d_f:8.3f} {d_fb:9.1f} {off[5]:9.1f} {on[5]:9.1f} {on[5] / off[5]:6.3f} "
                      f"{on[5] / d_fb:8.3f}  {diffs}")


if __name__ == "__main__":
    main()
