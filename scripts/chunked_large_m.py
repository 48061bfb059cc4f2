"""Large-M experiment: dequantize the NF4 weight in chunks into a small reused scratch buffer, one cuBLAS GEMM per
chunk, instead of the whole bf16 W at once.

Question: does chunking cost GEMM efficiency, and does a scratch small enough to stay in L2 (plus the LoRA term
written per chunk, just before its GEMM reads it) win back the dequantization and LoRA-term passes? It also
bounds the transient memory (#4: peak extra over dense <= |S| + 5%).

Variants at M = 8192 (bf16, r = 16), each timed as device time (10 calls replayed from a CUDA graph behind a spin
kernel, median of 15 rounds) with its peak extra memory (one call, eager):
  forward  dense x @ W.t(); current default (S, LoRA term into Y, GEMM beta=1 on the whole dequantized W);
           chunked over W's rows (chunk rows nc; evict-first stores on or off)
  dX       dense dY @ W; current (dS @ A, then addmm_ of dY @ W); chunked over W's columns (kc)
Run: ``python scripts/chunked_large_m.py --out chunked.txt``.
"""
import argparse
import statistics

import torch

from bench.shapes import HEADLINE, shape
from bench.timing import hold_gpu
from lowrank_kernels import NF4Weight
from lowrank_kernels.dispatch import _nf4_state, lora_linear_forward
from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize

R, M, CALLS = 16, 8192, 10


def device_us(fn):
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(15):
        hold_gpu()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / CALLS)
    return statistics.median(times)


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def deq(st, dtype, block=None, out=None, stream=True):
    return nf4_dequantize(st["packed"], st["absmax"], st["code"], st["shape"], st["blocksize"], dtype,
                          st.get("absmax2"), st.get("code2"), st.get("offset"), st.get("nested_blocksize", 256),
                          block=block, out=out, stream=stream)


def fwd_chunked(x, st, A, B, s, nc, stream):
    N, K = st["shape"]
    y = x.new_empty((M, N))
    S = x @ A.t()
    scratch = x.new_empty((min(nc, N), K))
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        w = deq(st, x.dtype, (n0, n1, 0, K), scratch[: n1 - n0], stream)
        yc = y[:, n0:n1]
        torch.addmm(yc, S, B[n0:n1].t(), beta=0, alpha=s, out=yc)  # beta=0: yc is not read
        yc.addmm_(x, w.t())
    return y, S


def dx_current(dy, st, A, B, s):
    dS = (dy @ B).mul_(s)
    dx = dS @ A
    return dx.addmm_(dy, deq(st, dy.dtype))


def dx_chunked(dy, st, A, B, s, kc, stream):
    N, K = st["shape"]
    dS = (dy @ B).mul_(s)
    dx = dy.new_empty((M, K))
    scratch = dy.new_empty((N, min(kc, K)))
    for k0 in range(0, K, kc):
        k1 = min(K, k0 + kc)
        w = deq(st, dy.dtype, (0, N, k0, k1), scratch if k1 - k0 == kc else None, stream)
        dxc = dx[:, k0:k1]
        torch.mm(dS, A[:, k0:k1], out=dxc)
        dxc.addmm_(dy, w)
    return dx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    lines = [f"{dev} torch {torch.__version__} M={M} r={R} bf16; device µs per call (graph replay), peak extra MiB",
             "shape | pass | variant | µs | × dense | peak MiB"]
    for model, layer in HEADLINE:
        K, N = shape(model, layer)
        torch.manual_seed(0)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        nf4 = NF4Weight.quantize(W)
        st = _nf4_state(nf4)
        Wd = nf4.dequantize(torch.bfloat16)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) * 0.01
        B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16) * 0.01
        s = 2.0
        ref_y = lora_linear_forward(x, nf4, A, B, s)[0].float()
        ref_dx = dx_current(dy, st, A, B, s).float()
        rows = []

        def row(pass_, variant, fn, ref=None):
            out = fn()
            if ref is not None:
                got = (out[0] if isinstance(out, tuple) else out).float()
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (variant, err)
            del out
            rows.append((pass_, variant, device_us(fn), peak_mib(fn)))
            print(K, N, *rows[-1], flush=True)

        row("fwd", "dense x@W.t()", lambda: x @ Wd.t())
        row("fwd", "current", lambda: lora_linear_forward(x, nf4, A, B, s), ref_y)
        for nc in (N // 2, N // 4, N // 8, N // 16):
            for stream in (False, True):
                row("fwd", f"chunked nc={nc} {'evict-first' if stream else 'keep-L2'}",
                    lambda nc=nc, stream=stream: fwd_chunked(x, st, A, B, s, nc, stream), ref_y)
        row("dX", "dense dY@W", lambda: dy @ Wd)
        row("dX", "current", lambda: dx_current(dy, st, A, B, s), ref_dx)
        for kc in (K // 2, K // 4, K // 8, K // 16):
            for stream in (False, True):
                row("dX", f"chunked kc={kc} {'evict-first' if stream else 'keep-L2'}",
                    lambda kc=kc, stream=stream: dx_chunked(dy, st, A, B, s, kc, stream), ref_dx)
        base = {p: t for p, v, t, _ in rows if v.startswith("dense")}
        for p, v, t, mem in rows:
            lines.append(f"{K}→{N} | {p} | {v} | {t:.1f} | {t / base[p]:.3f} | {mem:.1f}")
        rows.clear()
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
