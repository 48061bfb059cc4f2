"""Is cuBLAS slower on the merged NF4 weight W' than on the dense W it was quantized from? x @ W.T against
x @ W'.T (and dY @ W against dY @ W'), M = 8192, bf16, alternated over rounds (CUDA-graph replay), so that clock
and temperature drift hit both alike. GPU machine.

    python experiments/probe/gemm_data_ab.py [--out FILE] [--rounds 4]
"""
import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import SHAPES, Table, time_us  # noqa: E402

from lowrank_kernels import QLoraLinear  # noqa: E402
from lowrank_kernels.dispatch import _nf4_state  # noqa: E402
from lowrank_kernels.kernels.nf4_merge import nf4_merge  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    table.add(f"# experiments/probe/gemm_data_ab.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; M=8192; µs per GEMM, rounds alternated")
    for K, N in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda")
        layer = QLoraLinear.from_linear(lin, r=16, lora_alpha=32)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        W = lin.weight.detach()
        Wq = layer.weight.dequantize(torch.bfloat16)
        Wm = nf4_merge(_nf4_state(layer.weight), layer.lora_A.weight.bfloat16(), layer.lora_B.weight.bfloat16(),
                       layer.scaling, torch.bfloat16)
        x = torch.randn(8192, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(8192, N, device="cuda", dtype=torch.bfloat16)
        res = {}
        for _ in range(args.rounds):
            for name, w in (("W", W), ("deq(W)", Wq), ("W'", Wm)):
                res.setdefault(("fwd", name), []).append(time_us([lambda w=w: x @ w.t()])[0])
                res.setdefault(("dX", name), []).append(time_us([lambda w=w: dy @ w])[0])
        for op in ("fwd", "dX"):
            base = sorted(res[(op, "W")])[len(res[(op, "W")]) // 2]
            cells = []
            for name in ("W", "deq(W)", "W'"):
                ts = sorted(res[(op, name)])
                med = ts[len(ts) // 2]
                cells.append(f"{name} {med:.1f} ({med / base:.3f}; {ts[0]:.1f}-{ts[-1]:.1f})")
            table.add(f"{K}->{N} {op}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
