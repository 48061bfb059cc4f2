"""Large-M forward probe (#4's memory target): the NF4 weight dequantized in row chunks into small temporaries, one
LoRA-term product and one cuBLAS GEMM per chunk, on one stream or alternating between two (so that one chunk's
GEMM tail overlaps the next chunk's dequantization and GEMM), against the current default path and dense bf16.

bench/results/chunked-large-m-h100.txt measured the one-stream version 1.0-1.5x slower than the current path (its
GEMMs lose efficiency as they shrink); this asks whether two streams win that back. Row chunks of W are contiguous
in the NF4 stream, so each chunk is dequantized from slices of the packed bytes and scales by the library's kernel.

    python experiments/probe/chunked_streams.py --out bench/results/chunked-streams-h100.txt
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from bench.shapes import HEADLINE, shape  # noqa: E402
from bench.timing import hold_gpu  # noqa: E402
from lowrank_kernels import NF4Weight  # noqa: E402
from lowrank_kernels.dispatch import _nf4_state, lora_linear_forward  # noqa: E402
from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize  # noqa: E402

R, M, CALLS = 16, 8192, 10


def device_us(fn):
    """Device µs per call: CALLS calls replayed from a CUDA graph behind a spin kernel, median of 15 rounds."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
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
    """Peak memory of one eager call beyond what was allocated before it, MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def row_chunk(st, n0, n1, dtype):
    """deq(W)[n0:n1] from slices of the NF4 state (rows are contiguous in the stream; the chunk must start on a
    second-level scale block)."""
    N, K = st["shape"]
    bs, nbs = st["blocksize"], st.get("nested_blocksize", 256)
    b0, b1 = n0 * K // bs, n1 * K // bs
    nested = st.get("absmax2") is not None
    assert (n0 * K) % bs == 0 and (not nested or b0 % nbs == 0)
    return nf4_dequantize(st["packed"].view(-1)[n0 * K // 2:n1 * K // 2], st["absmax"][b0:b1], st["code"],
                          (n1 - n0, K), bs, dtype, st["absmax2"][b0 // nbs:-(-b1 // nbs)] if nested else None,
                          st.get("code2"), st.get("offset"), nbs)


def fwd_chunked(x, st, A, B, s, nc, streams):
    N, K = st["shape"]
    y = x.new_empty((M, N))
    S = x @ A.t()
    cur = torch.cuda.current_stream()
    for t in streams:
        t.wait_stream(cur)
    for i, n0 in enumerate(range(0, N, nc)):
        n1 = min(N, n0 + nc)
        with torch.cuda.stream(streams[i % len(streams)]):
            w = row_chunk(st, n0, n1, x.dtype)
            yc = y[:, n0:n1]
            torch.addmm(yc, S, B[n0:n1].t(), beta=0, alpha=s, out=yc)  # beta=0: yc is not read
            yc.addmm_(x, w.t())
            del w  # freed on this stream: the stream's next chunk reuses the memory
    for t in streams:
        cur.wait_stream(t)
    return y, S


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"# experiments/probe/chunked_streams.py: {torch.cuda.get_device_name()} torch {torch.__version__} M={M} "
             f"r={R} bf16; device µs per call (graph replay), peak MiB beyond inputs and weights (one eager call)",
             "shape | variant | µs | x dense | x current | peak MiB"]
    streams2 = [torch.cuda.Stream(), torch.cuda.Stream()]
    for model, layer in HEADLINE:
        K, N = shape(model, layer)
        torch.manual_seed(0)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        nf4 = NF4Weight.quantize(W)
        st = _nf4_state(nf4)
        Wd = nf4.dequantize(torch.bfloat16)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) * 0.01
        B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16) * 0.01
        s = 2.0
        ref = lora_linear_forward(x, nf4, A, B, s)[0].float()
        rows = []

        def row(name, fn, check=True):
            if check:
                err = ((fn()[0].float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (name, err)
            rows.append((name, device_us(fn), peak_mib(fn)))
            print(K, N, *rows[-1], flush=True)

        row("dense x@W.t()", lambda: x @ Wd.t(), check=False)
        row("current", lambda: lora_linear_forward(x, nf4, A, B, s))
        for parts in (2, 4, 8):
            nc = N // parts
            row(f"chunked nc={nc} 1 stream", lambda nc=nc: fwd_chunked(x, st, A, B, s, nc, streams2[:1]))
            row(f"chunked nc={nc} 2 streams", lambda nc=nc: fwd_chunked(x, st, A, B, s, nc, streams2))
        dense, current = rows[0][1], rows[1][1]
        for name, t, mem in rows:
            lines.append(f"{K}->{N} | {name} | {t:.1f} | {t / dense:.3f} | {t / current:.3f} | {mem:.1f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
