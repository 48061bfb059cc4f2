"""Why a QLoRA layer's ``.backward()`` costs the host more than its kernels' launches: fwd + bwd of one 4096 x 4096
layer at M = 128 (host-bound), through the autograd Function, against the same work without autograd and against
autograd Functions whose backward launches nothing (CUDA only).

    python experiments/host_backward_probe.py [--m 128] [--trace]

``--trace`` prints one fwd + bwd's host events in time order (torch.profiler), with the thread of each.
"""
import argparse
import time

import torch

from lowrank_kernels import dispatch, qlora_linear
from lowrank_kernels.autograd import LoraLinearFunction
from lowrank_kernels.nf4 import NF4Weight

from host_timing import host_us as _host_us


def host_us(fn):
    return _host_us(fn)[0]


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Canned(torch.autograd.Function):
    """Our Function's signature, backward returns precomputed gradients (no launches)."""
    grads = None

    @staticmethod
    def forward(ctx, x, A, B, bias, w, s, p, seed, backend, config):
        ctx.save_for_backward(x, A, B)
        return x.new_empty((x.shape[0], w.shape[0]))

    @staticmethod
    def backward(ctx, g):
        x, A, B = ctx.saved_tensors
        return Canned.grads + (None,) * 7


class Probe(torch.autograd.Function):
    """Backward runs ``Probe.ops`` (a function of nothing), then returns ``g``: one op's cost on the autograd
    engine's device thread."""
    ops = None

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        Probe.ops()
        return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args()
    m = a.m
    w = NF4Weight.quantize(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    A = torch.randn(16, 4096, device="cuda", requires_grad=True)
    B = torch.randn(4096, 16, device="cuda", requires_grad=True)
    Ab16 = A.detach().bfloat16().requires_grad_()
    Bb16 = B.detach().bfloat16().requires_grad_()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    xd = x.detach()
    Ab, Bb = A.detach().bfloat16(), B.detach().bfloat16()
    S = xd @ Ab.t()
    Canned.grads = (torch.randn_like(xd), torch.randn_like(A), torch.randn_like(B))

    def direct():
        dispatch.lora_linear_forward(xd, w, Ab, Bb, 2.0)
        dispatch.lora_linear_backward(g, xd, w, Ab, Bb, 2.0, S, needs=(True, True, True, False, False),
                                      adapter_dtypes=(torch.float32, torch.float32))

    def fn_backward():
        LoraLinearFunction.apply(x, A, B, None, w, 2.0, 0.0, 0, None, None).backward(g)

    def fn_grad():
        y = LoraLinearFunction.apply(x, A, B, None, w, 2.0, 0.0, 0, None, None)
        torch.autograd.grad(y, (x, A, B), g)

    def fn_bf16_adapters():
        LoraLinearFunction.apply(x, Ab16, Bb16, None, w, 2.0, 0.0, 0, None, None).backward(g)

    def fn_x_only():
        LoraLinearFunction.apply(x, A.detach(), B.detach(), None, w, 2.0, 0.0, 0, None, None).backward(g)

    def canned():
        Canned.apply(x, A, B, None, w, 2.0, 0.0, 0, None, None).backward(g)

    def identity():
        Identity.apply(x).backward(g)

    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    rows = [
        ("dispatch fwd + bwd, no autograd", direct),
        ("Function fwd + y.backward(g)", fn_backward),
        ("Function fwd + autograd.grad", fn_grad),
        ("Function fwd + backward, bf16 adapters", fn_bf16_adapters),
        ("Function fwd + backward, x only", fn_x_only),
        ("canned Function (no launches) fwd + bwd", canned),
        ("identity Function fwd + bwd", identity),
        ("nn.Linear fwd + bwd", lambda: lin(x).backward(g)),
        ("qlora_linear fwd + bwd", lambda: qlora_linear(x, w, A, B, 2.0).backward(g)),
    ]
    lin_w = lin.weight.detach()
    ops = [
        ("nf4 dequantize", lambda: dispatch.nf4_dequantize(w, torch.bfloat16)),
        ("mm [m,16] @ [16,4096]", lambda: S @ Ab),
        ("mm [m,4096] @ [4096,4096]", lambda: xd @ lin_w.t()),
        ("addmm alpha, beta=0", lambda: torch.addmm(dispatch._unused_input(xd), S, Bb.t(), beta=0, alpha=2.0)),
        ("fp32 -> bf16 .to", lambda: A.detach().to(torch.bfloat16)),
        ("torch.empty", lambda: torch.empty((m, 4096), device="cuda", dtype=torch.bfloat16)),
        ("dispatch backward", lambda: dispatch.lora_linear_backward(
            g, xd, w, Ab, Bb, 2.0, S, needs=(True, True, True, False, False),
            adapter_dtypes=(torch.float32, torch.float32))),
    ]

    def probe(op):
        def run():
            Probe.ops = op
            Probe.apply(x).backward(g)
        return run

    def times(op, k=10):
        def run():
            for _ in range(k):
                op()
        return run

    base = host_us(probe(lambda: None))
    for name, op in ops:
        main_us = host_us(times(op)) / 10
        worker_us = (host_us(probe(times(op))) - base) / 10
        rows.append((f"  {name}: main thread / engine thread", None, main_us, worker_us))
    print(f"# experiments/host_backward_probe.py on {torch.cuda.get_device_name()}  {time.strftime('%Y-%m-%d')}  "
          f"torch {torch.__version__}; 4096 x 4096, M = {m}, r = 16, fp32 adapters unless said")
    for name, fn, *measured in rows:
        if fn is None:
            print(f"{name:60} {measured[0]:7.1f} / {measured[1]:7.1f} us host per op")
        else:
            print(f"{name:60} {host_us(fn):7.1f} us host per call")
    # timestamps of one fwd + bwd: where does the time between the calls go?
    marks = {}
    inner = LoraLinearFunction.backward

    def timed_backward(ctx, g):
        marks["bwd_in"] = time.perf_counter()
        out = inner(ctx, g)
        marks["bwd_out"] = time.perf_counter()
        return out

    LoraLinearFunction.backward = staticmethod(timed_backward)
    spans = {k: 0.0 for k in ("forward", "until backward starts", "our backward", "after our backward")}
    n = 200
    for i in range(n + 20):
        t0 = time.perf_counter()
        y = LoraLinearFunction.apply(x, A, B, None, w, 2.0, 0.0, 0, None, None)
        t1 = time.perf_counter()
        y.backward(g)
        t2 = time.perf_counter()
        if i >= 20:
            spans["forward"] += t1 - t0
            spans["until backward starts"] += marks["bwd_in"] - t1
            spans["our backward"] += marks["bwd_out"] - marks["bwd_in"]
            spans["after our backward"] += t2 - marks["bwd_out"]
    LoraLinearFunction.backward = staticmethod(inner)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    spans["GPU still busy after the loop"] = (time.perf_counter() - t3)
    for k, v in spans.items():
        print(f"  fwd + bwd span: {k:36} {v / n * 1e6:7.1f} us")
    if a.trace:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(5):
            fn_backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn_backward()
            torch.cuda.synchronize()
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        t0 = events[0].time_range.start
        for e in events:
            if e.cpu_parent is None:  # top-level events only
                print(f"{e.time_range.start - t0:9.1f} us  +{e.cpu_time_total:7.1f}  tid {e.thread % 1000:4d}  "
                      f"{e.name}")


if __name__ == "__main__":
    main()
