"""Device time per kernel of one QLoRA layer's forward and forward + backward at large M, against the dense bf16
layer (``x @ W.t()``, backward dX only), from the PyTorch profiler: where the time above dense goes.

    python scripts/profile_layer_gpu.py --out bench/results/profile-layer-gpu-h100.txt [--m 8192]

The layer is ``QLoraLinear.from_linear`` of a bf16 ``nn.Linear`` (Llama-3-8B shapes, r = 16, fp32 adapters as peft
keeps them, B random so that nothing is zero), bf16 x that requires grad; kernels are summed over 20 calls (no
graph: launch gaps are not counted, only kernel time; ``x.grad`` is reset before each backward, so no gradient
accumulation kernel is counted).
"""
import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.shapes import HEADLINE, shape  # noqa: E402
from lowrank_kernels import QLoraLinear  # noqa: E402

SHAPES = [shape(model, layer) for model, layer in HEADLINE]  # (in_features K, out_features N)


class Table:
    """Prints each line and, with ``out_path``, rewrites the file as it goes (a crash keeps what was measured)."""

    def __init__(self, out_path):
        self.lines, self.out_path = [], out_path

    def add(self, line):
        print(line, flush=True)
        self.lines.append(line)
        if self.out_path:
            with open(self.out_path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def kernel_times(fn, calls=50):
    """``{kernel name: device µs per call}`` of ``fn`` from the profiler (no graph: launch gaps excluded)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0:  # summed: distinct kernels may share the shortened name
            out[e.key[:56]] = out.get(e.key[:56], 0.0) + us / calls
    return out


def fwd_bwd(module, x, g):
    x.grad = None
    module(x).backward(g)


def breakdown(table, name, fn):
    parts = kernel_times(fn, calls=20)
    total = sum(parts.values())
    table.add(f"  {name}: {total:8.1f} µs of kernels")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        table.add(f"    {v:8.1f}  {100 * v / total:5.1f}%  {k}")
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, default=8192)
    args = ap.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    table.add(f"# scripts/profile_layer_gpu.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}; M={args.m}, r=16, bf16, µs per call")
    summary = []
    for K, N in SHAPES:
        table.add(f"{K}->{N}")
        linear = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
        layer = QLoraLinear.from_linear(linear, r=16, lora_alpha=32)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        x = torch.randn(args.m, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(args.m, N, device="cuda", dtype=torch.bfloat16)
        d_f = breakdown(table, "dense forward", lambda: linear(x))
        d_fb = breakdown(table, "dense forward + backward (dX)", lambda: fwd_bwd(linear, x, g))
        o_f = breakdown(table, "ours forward", lambda: layer(x))
        o_fb = breakdown(table, "ours forward + backward", lambda: fwd_bwd(layer, x, g))
        summary.append((f"{K}->{N}", d_f, o_f, d_fb, o_fb))
    table.add("")
    table.add(f"{'shape':12} {'dense fwd':>9} {'ours fwd':>9} {'ratio':>6} {'dense f+b':>9} {'ours f+b':>9} "
              f"{'ratio':>6}")
    for s, d_f, o_f, d_fb, o_fb in summary:
        table.add(f"{s:12} {d_f:9.1f} {o_f:9.1f} {o_f / d_f:6.2f} {d_fb:9.1f} {o_fb:9.1f} {o_fb / d_fb:6.2f}")


if __name__ == "__main__":
    main()
