"""Large-M (training) sweep on the GPU: which GEMM should carry the QLoRA layer at M = 8192?

For each Llama-3-8B shape (bf16, r = 16) times, with triton.testing.do_bench medians:
  * cuBLAS ``x @ W.t()`` (the dense forward floor) and ``dY @ W`` (dense dX);
  * our NF4 dequantization (the scratch path's extra pass);
  * our Triton LoRA GEMM on a dense (scratch) W, forward and dX, over a few tile configs;
  * the fused NF4 Triton GEMM (dequantization in the main loop), over a few tile configs;
  * the default qlora forward+backward and dense forward+backward(dX).
``--part fused`` times only the fused NF4 GEMM (forward and dX) against cuBLAS. ``--part branch`` sweeps the
one-launch LoRA branch (forward and dX) against cuBLAS's two products.
``--part breakdown`` instead times each pass of the QLoRA forward+backward (cuBLAS vs our Triton kernels for the
skinny LoRA products, the addmm passes over Y and dX). Prints one table; ``--out FILE`` also writes it.
Run: ``python experiments/sweep_large_m.py [--part gemm|breakdown] --out sweep.txt``.
"""
import argparse

import torch
import triton

from bench.shapes import HEADLINE, shape
from lowrank_kernels import NF4Weight, qlora_linear
from lowrank_kernels.dispatch import _nf4_state
from lowrank_kernels.kernels.lora_matmul import lora_matmul

R = 16
DENSE_CONFIGS = [  # BLOCK_M (x rows), BLOCK_N (W rows), BLOCK_K, GROUP_M, warps, stages
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4),
]
NF4_CONFIGS = [(128, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 3),
               (128, 64, 64, 8, 4, 3)]


def cfg(c):
    bm, bn, bk, g, w, s = c
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, SPLIT_K=1, num_warps=w, num_stages=s)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3  # µs


def report(lines, rows, K, N, base, flops):
    for name, t, err in rows:
        extra = f"{t / base:.3f} | {flops / t / 1e6:.0f}" if err is None else f"failed: {err}"
        lines.append(f"{K}→{N} | {name} | {t:.1f} | {extra}")
    print("\n".join(lines[-len(rows):]), flush=True)


def fused(row, x, dy, A, B, S, dS, Wd, nf4):
    """The fused NF4 GEMM (dequantization in the main loop), forward and dX, over the NF4 tile configs, each
    checked against the dense-weight product first (rows marked WRONG otherwise)."""
    state = _nf4_state(nf4)
    y_ref = (x @ Wd.t() + (S * 2.0) @ B.t()).float()
    dx_ref = (dy @ Wd + dS @ A).float()
    for c in NF4_CONFIGS:
        err = (lora_matmul(x, S * 2.0, B.t(), nf4=state, config=cfg(c)).float() - y_ref).norm() / y_ref.norm()
        row(f"triton fused-nf4 fwd {c}{'' if err < 1e-2 else ' WRONG'}",
            lambda c=c: lora_matmul(x, S * 2.0, B.t(), nf4=state, config=cfg(c)))
    for c in NF4_CONFIGS:
        err = (lora_matmul(dy, dS, A, nf4=state, trans_w=True, config=cfg(c)).float() - dx_ref).norm() / dx_ref.norm()
        row(f"triton fused-nf4 dX {c}{'' if err < 1e-2 else ' WRONG'}",
            lambda c=c: lora_matmul(dy, dS, A, nf4=state, trans_w=True, config=cfg(c)))


def breakdown(row, x, dy, A, B, S, dS, Wd, nf4):
    """Each pass of the default QLoRA forward + backward, cuBLAS and Triton variants of the skinny ones."""
    from lowrank_kernels.kernels.lowrank_proj import lowrank_project, lowrank_reduce

    y = x @ Wd.t()
    dx = dy @ Wd
    keep = torch.rand_like(x) > 0.1
    row("S = x@A.t()  cublas", lambda: x @ A.t())
    row("S            triton", lambda: lowrank_project(x, A))
    row("S dropout    triton", lambda: lowrank_project(x, A, keep=keep, keep_scale=1 / 0.9))
    row("dS = dY@B    cublas", lambda: dy @ B)
    row("dS           triton", lambda: lowrank_project(dy, B.t()))
    row("dA = dS.T@x  cublas", lambda: dS.t() @ x)
    row("dA           triton", lambda: lowrank_reduce(dS, x))
    row("dB = dY.T@S  cublas", lambda: dy.t() @ S)
    row("dB           triton", lambda: lowrank_reduce(S, dy))
    row("y.addmm_(S, B.t())", lambda: y.addmm_(S, B.t()))
    row("dx.addmm_(dS, A)", lambda: dx.addmm_(dS, A))
    row("dy.sum(0) (bias)", lambda: dy.sum(0, dtype=torch.float32))
    xg = x.clone().requires_grad_()
    Ag, Bg = A.float().requires_grad_(), B.float().requires_grad_()
    row("default qlora fwd", lambda: qlora_linear(x, nf4, A, B, 2.0))
    row("default qlora fwd+bwd", lambda: qlora_linear(xg, nf4, Ag, Bg, 2.0).backward(dy))
    row("default qlora fwd+bwd p=0.1", lambda: qlora_linear(xg, nf4, Ag, Bg, 2.0, dropout=0.1).backward(dy))
    row("dense fwd+bwd(dX)", lambda: (xg @ Wd.t()).backward(dy))


def skinny(row, x, dy, A, B, S, dS, Wd, nf4):
    """Launch configurations of the skinny kernels (block_m, block_k, warps, stages) against cuBLAS."""
    from lowrank_kernels.kernels.lowrank_proj import lowrank_project, lowrank_reduce

    row("S  cublas", lambda: x @ A.t())
    row("dS cublas", lambda: dy @ B)
    for c in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 128, 8, 4), (32, 256, 4, 3), (64, 256, 8, 3),
              (128, 64, 4, 4), (128, 128, 8, 3)]:
        kw = dict(zip(("block_m", "block_k", "num_warps", "num_stages"), c))
        row(f"S  triton {c}", lambda kw=kw: lowrank_project(x, A, **kw))
        row(f"dS triton {c}", lambda kw=kw: lowrank_project(dy, B.t(), **kw))
    row("dA cublas", lambda: dS.t() @ x)
    row("dB cublas", lambda: dy.t() @ S)
    for c in [(64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3), (128, 256, 8, 3), (256, 64, 8, 3),
              (32, 256, 4, 4)]:
        kw = dict(zip(("block_m", "block_k", "num_warps", "num_stages"), c))
        row(f"dA triton {c}", lambda kw=kw: lowrank_reduce(dS, x, **kw))
        row(f"dB triton {c}", lambda kw=kw: lowrank_reduce(S, dy, **kw))


def branch(row, x, dy, A, B, S, dS, Wd, nf4):
    """The LoRA branch in one launch (``lowrank_project(..., expand=)``: S and the LoRA term, fp32 adapters) over
    launch configurations (block_m, block_k, block_n, warps, stages), against cuBLAS's two products."""
    from lowrank_kernels.kernels.lowrank_proj import lowrank_project

    A32, B32 = A.float(), B.float()
    row("fwd branch cublas (S; s*S@B.T)", lambda: torch.addmm(S, x @ A.t(), B.t(), beta=0, alpha=2.0))
    row("dX branch cublas (dS; dS@A)", lambda: (torch.addmm(dS, dy, B, beta=0, alpha=2.0)) @ A)
    for c in [None, (16, 128, 128, 4, 4), (32, 128, 128, 4, 4), (32, 128, 256, 8, 3), (64, 128, 128, 4, 3),
              (64, 128, 256, 8, 3), (16, 256, 256, 4, 3), (32, 64, 128, 4, 4), (128, 64, 128, 8, 3)]:
        kw = {} if c is None else dict(zip(("block_m", "block_k", "block_n", "num_warps", "num_stages"), c))
        row(f"fwd branch triton {c or 'default'}", lambda kw=kw: lowrank_project(x, A32, expand=B32, alpha_y=2.0,
                                                                                  **kw))
        row(f"dX branch triton {c or 'default'}", lambda kw=kw: lowrank_project(dy, B32.t(), alpha=2.0,
                                                                                 expand=A32.t(), **kw))


def train(row, x, dy, A, B, S, dS, Wd, nf4, rounds=5):
    """forward + backward, the QLoRA layer (ours, peft+bnb when installed) against dense, interleaved rounds."""
    xg = x.clone().requires_grad_()
    Ag, Bg = A.float().requires_grad_(), B.float().requires_grad_()
    fns = {"ours fwd": lambda: qlora_linear(x, nf4, A, B, 2.0),
           "dense fwd": lambda: x @ Wd.t(),
           "ours fwd+bwd": lambda: qlora_linear(xg, nf4, Ag, Bg, 2.0).backward(dy),
           "ours fwd+bwd p=0.1": lambda: qlora_linear(xg, nf4, Ag, Bg, 2.0, dropout=0.1).backward(dy),
           "dense fwd+bwd(dX)": lambda: (xg @ Wd.t()).backward(dy)}
    try:
        import bitsandbytes as bnb

        packed, state = nf4.to_bnb()
        fns["peft+bnb fwd+bwd"] = lambda: (bnb.matmul_4bit(xg, packed.t(), quant_state=state)
                                           + (xg.float() @ Ag.t()) @ Bg.t() * 2.0).to(x.dtype).backward(dy)
    except ImportError:
        pass
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn))
    for name, ts in times.items():
        t = sorted(ts)[len(ts) // 2]
        row(f"{name} (median of {rounds} interleaved)", lambda t=t: t, timed=True)


def profile(row, x, dy, A, B, S, dS, Wd, nf4, iters=20):
    """Host time against device time of our forward + backward, and the top host-side costs."""
    import time

    xg = x.clone().requires_grad_()
    Ag, Bg = A.float().requires_grad_(), B.float().requires_grad_()

    def step():
        qlora_linear(xg, nf4, Ag, Bg, 2.0).backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e6
    row("host time per fwd+bwd (no sync)", lambda: host, timed=True)
    row("wall time per fwd+bwd", lambda: wall, timed=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)


def host(row, x, dy, A, B, S, dS, Wd, nf4, calls=200):
    """Host (CPU) microseconds per call of each piece, and a cProfile of forward + backward."""
    import cProfile
    import pstats
    import time

    from lowrank_kernels.kernels.lowrank_proj import lowrank_project, lowrank_reduce

    small = x[:64]
    xg = x.clone().requires_grad_()
    Ag, Bg = A.float().requires_grad_(), B.float().requires_grad_()
    pieces = {"lowrank_project (64 rows)": lambda: lowrank_project(small, A),
              "lowrank_reduce (64 rows)": lambda: lowrank_reduce(dS[:64], small),
              "nf4.dequantize": lambda: nf4.dequantize(torch.bfloat16),
              "torch mm (64 rows)": lambda: small @ A.t(),
              "A.to(bf16)": lambda: Ag.to(torch.bfloat16),
              "qlora fwd no grad (64 rows)": lambda: qlora_linear(small, nf4, A, B, 2.0),
              "qlora fwd+bwd": lambda: qlora_linear(xg, nf4, Ag, Bg, 2.0).backward(dy)}
    for name, fn in pieces.items():
        n = 20 if "bwd" in name else calls
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        row(f"host {name}", lambda t=t: t, timed=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        pieces["qlora fwd+bwd"]()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--part", choices=["gemm", "fused", "breakdown", "skinny", "branch", "train", "profile", "host"],
                    default="gemm")
    ap.add_argument("--out")
    args = ap.parse_args()
    M = args.M
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):  # about 2 s of GEMMs: clocks up before the first measurement
        warm @ warm
    torch.cuda.synchronize()
    lines = [f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} M={M} r={R}",
             "shape | variant | µs | × cuBLAS fwd | TFLOP/s"]
    for model, layer in HEADLINE:
        K, N = shape(model, layer)
        flops = 2 * M * N * K
        torch.manual_seed(0)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        nf4 = NF4Weight.quantize(W)
        Wd = nf4.dequantize(torch.bfloat16)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) * 0.02
        B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16) * 0.02
        S = x @ A.t()
        dS = dy @ B
        rows = []

        def row(name, fn, timed=False):
            try:
                t = fn() if timed else bench(fn)
            except Exception as e:  # a config that does not fit (shared memory, registers)
                rows.append((name, float("nan"), type(e).__name__))
                return None
            rows.append((name, t, None))
            return t

        base = row("cublas x@W.t()", lambda: x @ Wd.t())
        row("cublas dY@W", lambda: dy @ Wd)
        row("nf4 dequantize (bf16)", lambda: nf4.dequantize(torch.bfloat16))
        if args.part != "gemm":
            parts = {"breakdown": breakdown, "skinny": skinny, "branch": branch, "train": train, "profile": profile,
                     "host": host, "fused": fused}
            parts[args.part](row, x, dy, A, B, S, dS, Wd, nf4)
            report(lines, rows, K, N, base, flops)
            continue
        y_ref = x @ Wd.t() + (S * 2.0) @ B.t()
        for c in DENSE_CONFIGS:
            out = lora_matmul(x, S * 2.0, B.t(), weight=Wd, config=cfg(c))
            ok = torch.allclose(out.float(), y_ref.float(), atol=0.05, rtol=0.02)
            row(f"triton dense fwd {c}{'' if ok else ' WRONG'}",
                lambda c=c: lora_matmul(x, S * 2.0, B.t(), weight=Wd, config=cfg(c)))
        for c in DENSE_CONFIGS:
            row(f"triton dense dX {c}", lambda c=c: lora_matmul(dy, dS, A, weight=Wd, trans_w=True, config=cfg(c)))
        state = _nf4_state(nf4)
        for c in NF4_CONFIGS:
            row(f"triton fused-nf4 fwd {c}", lambda c=c: lora_matmul(x, S * 2.0, B.t(), nf4=state, config=cfg(c)))
        xg = x.clone().requires_grad_()
        Ag, Bg = A.float().requires_grad_(), B.float().requires_grad_()
        row("default qlora fwd", lambda: qlora_linear(x, nf4, A, B, 2.0))
        row("default qlora fwd+bwd", lambda: qlora_linear(xg, nf4, Ag, Bg, 2.0).backward(dy))
        row("dense fwd+bwd(dX)", lambda: (xg @ Wd.t()).backward(dy))
        report(lines, rows, K, N, base, flops)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
