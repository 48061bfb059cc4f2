"""Where QDoRA's fwd+bwd spends the time QLoRA's does not (bench/test_dora.py: on the H100, 4096->4096 took 0.35 ms
more than QLoRA at M = 4096 and at M = 8192 alike, about 0.2 ms beyond what the scale passes move; the wide shapes
showed no such fixed excess). For each shape and provider (QLoRA, QDoRA) at M: the synchronized wall time per
fwd+bwd (eager, as the bench times it: a new weight norm each call), the host's time to issue it, the GPU's kernel
time per call (profiler), each kernel's share, and the host calls that can stall the GPU (synchronizations,
device-to-host copies, cudaMalloc / cudaFree).

    PYTHONPATH=. python experiments/profile_dora_layer.py [--m 4096] [--shapes 4096x4096,4096x14336]

On the CPU it runs the torch path at M = 64 (a smoke run: no kernel times).
"""
import argparse
import time

import torch
from torch.autograd.graph import increment_version

from lowrank_kernels import NF4Weight, qlora_linear
from lowrank_kernels.dora import dora_linear

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
STALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMalloc",
          "cudaFree", "aten::item", "aten::_local_scalar_dense")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def make(shape, M):
    in_f, out_f = shape
    W = torch.randn(out_f, in_f, device=DEV, dtype=DTYPE) * 0.02
    nf4 = NF4Weight.quantize(W)
    x = torch.randn(M, in_f, device=DEV, dtype=DTYPE, requires_grad=True)
    A = (torch.randn(16, in_f, device=DEV) * 0.02).requires_grad_()
    B = (torch.randn(out_f, 16, device=DEV) * 0.02).requires_grad_()
    m = W.float().norm(dim=1).requires_grad_()
    dy = torch.randn(M, out_f, device=DEV, dtype=DTYPE)
    calls = {
        "qlora": (lambda: qlora_linear(x, nf4, A, B, 2.0), (x, A, B)),
        "qdora": (lambda: (increment_version(A), dora_linear(x, nf4, A, B, m, 2.0))[1], (x, A, B, m)),
    }
    return {name: (lambda f=f, i=i: torch.autograd.grad(f(), i, dy)) for name, (f, i) in calls.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=4096 if CUDA else 64)
    ap.add_argument("--shapes", default="4096x4096,4096x14336" if CUDA else "64x96")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    for text in a.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        for name, step in make(shape, a.m).items():
            for _ in range(3):
                step()
            sync()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                step()
            issued = (time.perf_counter() - t0) / a.iters * 1e3  # host time to issue a call's launches
            sync()
            wall = (time.perf_counter() - t0) / a.iters * 1e3
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
            with profile(activities=activities) as prof:
                for _ in range(5):
                    step()
                sync()
            events = prof.events()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = sum(e.time_range.elapsed_us() for e in kernels) / 5 / 1e3
            stalls = {}
            for e in events:
                if any(e.name.startswith(s) for s in STALLS):
                    stalls[e.name] = stalls.get(e.name, 0) + 1
            print(f"== {text} M={a.m} {name}: wall {wall:.3f} ms/call, host issue {issued:.3f} ms/call, GPU kernels {gpu:.3f} ms/call, "
                  f"stall-prone host calls per 5 calls: {stalls or 'none'}")
            per_kernel = {}
            for e in kernels:
                per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.time_range.elapsed_us() / 5
            for k, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]:
                print(f"     {us:9.1f} us  {k[:100]}")


if __name__ == "__main__":
    main()
