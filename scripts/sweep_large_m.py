"""Large-M (training) sweep on the GPU: which GEMM should carry the QLoRA layer at M = 8192?

For each Llama-3-8B shape (bf16, r = 16) times, with triton.testing.do_bench medians:
  * cuBLAS ``x @ W.t()`` (the dense forward floor) and ``dY @ W`` (dense dX);
  * our NF4 dequantization (the scratch path's extra pass);
  * our Triton LoRA GEMM on a dense (scratch) W, forward and dX, over a few tile configs;
  * the fused NF4 Triton GEMM (dequantization in the main loop), over a few tile configs;
  * the default qlora forward+backward and dense forward+backward(dX).
``--part breakdown`` instead times each pass of the QLoRA forward+backward (cuBLAS vs our Triton kernels for the
skinny LoRA products, the addmm passes over Y and dX). Prints one table; ``--out FILE`` also writes it.
Run: ``python scripts/sweep_large_m.py [--part gemm|breakdown] --out sweep.txt``.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--part", choices=["gemm", "breakdown"], default="gemm")
    ap.add_argument("--out")
    args = ap.parse_args()
    M = args.M
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

        def row(name, fn, ref=None):
            try:
                t = bench(fn)
            except Exception as e:  # a config that does not fit (shared memory, registers)
                rows.append((name, float("nan"), type(e).__name__))
                return None
            rows.append((name, t, None))
            return t

        base = row("cublas x@W.t()", lambda: x @ Wd.t())
        row("cublas dY@W", lambda: dy @ Wd)
        row("nf4 dequantize (bf16)", lambda: nf4.dequantize(torch.bfloat16))
        if args.part == "breakdown":
            breakdown(row, x, dy, A, B, S, dS, Wd, nf4)
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
