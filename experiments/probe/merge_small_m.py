"""Merged vs unmerged NF4 path at M = 2048 / 4096 for QLoRA (r = 16) and AdaLoRA (init_r = 12, 9 active ranks)
layers: eager fwd+bwd wall time per call (host included) and profiler kernel-time sums, dispatch.MERGE_MIN_M set
to merge or not. GPU machine.

    python experiments/probe/merge_small_m.py [--out FILE]
"""
import argparse
import datetime
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import SHAPES, Table, kernel_times  # noqa: E402

from lowrank_kernels import AdaLoraLinear, QLoraLinear, dispatch  # noqa: E402


def wall_us(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    table.add(f"# experiments/probe/merge_small_m.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; bf16 x, fp32 adapters; µs per fwd+bwd")
    table.add(f"{'layer':8} {'shape':12} {'M':>5} {'wall off':>9} {'wall on':>9} {'on/off':>6} {'gpu off':>9} "
              f"{'gpu on':>9} {'on/off':>6}")
    for K, N in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
        layers = {"qlora": QLoraLinear.from_linear(lin, r=16, lora_alpha=32),
                  "adalora": AdaLoraLinear.from_linear(lin, init_r=12, lora_alpha=32, quantize=True)}
        ada = layers["adalora"]
        with torch.no_grad():
            ada.lora_E.normal_()
        mask = torch.zeros(12, dtype=torch.bool)
        mask[[0, 1, 2, 4, 5, 7, 8, 10, 11]] = True
        ada.set_rank_mask(mask)
        for name, layer in layers.items():
            for M in (2048, 4096):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

                def fb():
                    x.grad = None
                    for p in layer.parameters():
                        p.grad = None
                    layer(x).backward(g)
                res = []
                for min_m in (10**9, 0):
                    dispatch.MERGE_MIN_M = min_m
                    res.append((wall_us(fb), sum(kernel_times(fb, calls=20).values())))
                dispatch.MERGE_MIN_M = 2048
                (w0, g0), (w1, g1) = res
                table.add(f"{name:8} {K}->{N:<6} {M:>5} {w0:9.1f} {w1:9.1f} {w1 / w0:6.3f} {g0:9.1f} {g1:9.1f} "
                          f"{g1 / g0:6.3f}")


if __name__ == "__main__":
    main()
