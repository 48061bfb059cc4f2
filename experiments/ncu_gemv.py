"""Driver for Nsight Compute: a few decode-size ``qlora_linear`` calls (bf16, r = 16, fp32 adapters, NF4 weight
with double quant) at one Llama-3-8B shape, so that ``ncu`` can profile the NF4 GEMV launches.

    ncu --clock-control none --set full -k regex:nf4_gemv_kernel -s 2 -c 1 \\
        python3 experiments/ncu_gemv.py --k 4096 --n 14336 --m 1 [--config block_n=64,split_k=16]

``--config`` passes launch knobs to ``nf4_gemv`` (ints, or ``fma``/``tma``/``join``/``x_tma``/``cuda`` ``=0/1``,
``lookup=shfl|load``).
"""
import argparse

import torch

from lowrank_kernels import NF4Weight
from lowrank_kernels.dispatch import _nf4_state
from lowrank_kernels.kernels.nf4_gemv import nf4_gemv


BOOL_KNOBS = ("fma", "tma", "join", "x_tma", "cuda")


def parse_config(text):
    knobs = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        knobs[key] = value if key == "lookup" else (bool(int(value)) if key in BOOL_KNOBS else int(value))
    return knobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--config", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    w = NF4Weight.quantize(torch.randn(a.n, a.k, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(a.m, a.k, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, a.k, device="cuda") / a.k**0.5
    B = torch.randn(a.n, 16, device="cuda") * 0.02
    knobs = parse_config(a.config)
    for _ in range(a.calls):
        nf4_gemv(x, _nf4_state(w), A, B, 2.0, **knobs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
