"""A/B of where the Triton decode kernel computes its partial S (``nf4_gemv(..., s_ahead=)``): after the weight tile in
the first row programs (False, the previous default) or in r programs of its own ahead of the row programs (True).
Both must give bit-identical outputs (same per-rank loop); timings as in ``scripts/bench_gemv.py`` (CUDA-graph replay
of 8 calls on 8 weight copies, µs per layer call, bf16, r = 16, fp32 adapters; the Triton kernels' defaults, TMA
included, since a graph is being captured).

    python scripts/probe/s_ahead.py --out bench/results/gemv-s-ahead-h100.txt [--m 1 4 16 32 64]
"""
import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import SHAPES, Table, time_us  # noqa: E402

from lowrank_kernels import NF4Weight  # noqa: E402
from lowrank_kernels.dispatch import _nf4_state  # noqa: E402
from lowrank_kernels.kernels.nf4_gemv import nf4_gemv  # noqa: E402

R = 16


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    args = ap.parse_args()
    table = Table(args.out)
    table.add(f"# scripts/probe/s_ahead.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; µs per layer call (graph replay, 8 weight copies)")
    table.add(f"{'shape K->N':13} {'M':>2} {'dense':>7} {'after':>7} {'ahead':>7} {'after/ahead':>11} {'cuda':>7}  "
              f"bit-identical")
    for K, N in SHAPES:
        W = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        states = [_nf4_state(NF4Weight.quantize(w, blocksize=64, double_quant=True)) for w in W]
        for M in args.m:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            A = torch.randn(R, K, device="cuda") / K**0.5
            B = torch.randn(N, R, device="cuda") * 0.02
            same = all(torch.equal(a, b) for a, b in zip(nf4_gemv(x, states[0], A, B, 2.0, cuda=False, s_ahead=False),
                                                         nf4_gemv(x, states[0], A, B, 2.0, cuda=False, s_ahead=True)))
            t_dense, _ = time_us([lambda w=w: x @ w.t() for w in W])
            t_after, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=False, s_ahead=False) for s in states])
            t_ahead, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=False, s_ahead=True) for s in states])
            t_cuda = float("nan")
            if M <= 16:
                t_cuda, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=True) for s in states])
            table.add(f"{K}->{N:<7} {M:>2} {t_dense:7.1f} {t_after:7.1f} {t_ahead:7.1f} {t_after / t_ahead:11.2f} "
                      f"{t_cuda:7.1f}  {same}")
        del W, states
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
