"""The CUDA C++ tensor-core decode kernel (``csrc/nf4_mma_gemv.cu``, ``nf4_gemv(..., cuda=True)``) on the GPU:
correctness against an fp64 reference on ragged cases, then CUDA-graph timings against the Triton kernels of the
same call (``cuda=False``), dense bf16 and bitsandbytes' ``matmul_4bit``, for the Llama-3-8B shapes.

Timing as in ``experiments/bench_gemv.py`` (graph replay of 8 calls on 8 weight copies, µs per call; bf16, r = 16,
fp32 adapters, no bias). Every nf4_gemv row is the whole two-launch layer call (LoRA included).

    python experiments/bench_gemv_cuda.py --out bench/results/gemv-mma-h100.txt [--m 1 4 16 64] [--splits 1 2 4 8]

``--ab REV[:MAX_M] ...`` also times the kernel source of each git revision (or ``.cu`` file) ``REV`` (built with
nvcc into a temporary directory, same entry point) at the default launch, for M up to ``MAX_M`` (default 16): an
A/B of kernel changes in one run.
"""
import argparse
import contextlib
import ctypes
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv import SHAPES, Table, copy_bandwidth, kernel_times, nf4_bytes, time_us  # noqa: E402

from lowrank_kernels import NF4Weight  # noqa: E402
from lowrank_kernels.kernels import nf4_gemv_cuda  # noqa: E402
from lowrank_kernels.dispatch import _nf4_state  # noqa: E402
from lowrank_kernels.kernels.nf4_gemv import nf4_gemv  # noqa: E402

R = 16


def check(table, max_m, label="cuda"):
    """fp64 reference vs cuda=True (and vs cuda=False) on ragged cases with M <= max_m; returns the worst error /
    tolerance."""
    g = torch.Generator(device="cuda").manual_seed(1)
    worst = 0.0
    cases = [(1, 300, 512, 64, True, torch.bfloat16, torch.float32, True),
             (3, 77, 768, 64, True, torch.float16, torch.float32, False),
             (8, 129, 1024, 128, True, torch.bfloat16, torch.bfloat16, True),
             (13, 1000, 256, 64, False, torch.bfloat16, torch.float32, False),
             (16, 511, 2304, 256, True, torch.float16, torch.float16, True),
             (11, 130, 1280, 1024, False, torch.float16, torch.float32, False),
             (24, 200, 1024, 64, True, torch.bfloat16, torch.float32, True),
             (40, 520, 1536, 128, False, torch.float16, torch.float32, False),
             (64, 301, 2048, 64, True, torch.bfloat16, torch.bfloat16, True),
             (1, 4096, 4096, 64, True, torch.bfloat16, torch.float32, False)]
    for M, N, K, bs, dq, dtype, adt, bias in cases:
        if M > max_m:
            continue
        W = torch.randn(N, K, device="cuda", generator=g) * 0.05
        w = NF4Weight.quantize(W.to(dtype), blocksize=bs, double_quant=dq)
        st = _nf4_state(w)
        x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        A = (torch.randn(R, K, device="cuda", generator=g) / K**0.5).to(adt)
        B = (torch.randn(N, R, device="cuda", generator=g) * 0.1).to(adt)
        b = (torch.randn(N, device="cuda", generator=g) * 0.1).to(dtype) if bias else None
        wd = w.dequantize(torch.float32).double()
        S_ref = x.double() @ A.to(dtype).double().t()
        ref = x.double() @ wd.t() + (S_ref * 2.0) @ B.to(dtype).double().t() + (b.double() if bias else 0)
        for split in (None, 1, 3):
            y, S = nf4_gemv(x, st, A, B, 2.0, b, cuda=True, split_k=split)
            yt, _ = nf4_gemv(x, st, A, B, 2.0, b, cuda=False)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            err_t = ((yt.double() - ref).norm() / ref.norm()).item()
            err_s = ((S.double() - S_ref).norm() / S_ref.norm()).item()
            tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
            worst = max(worst, err / tol, err_s / tol)
            table.add(f"# check M={M} N={N} K={K} bs={bs} dq={dq} {str(dtype)[6:]} A {str(adt)[6:]} bias={bias} "
                      f"split={split}: rel err {label} {err:.2e} (triton {err_t:.2e}), S {err_s:.2e}, tol {tol:.0e}")
    table.add(f"# correctness: worst error / tolerance = {worst:.3f}")
    return worst


def build_revision(rev):
    """The ctypes entry point of ``csrc/nf4_mma_gemv.cu`` as of git revision ``rev`` (or of the file ``rev``)."""
    if os.path.isfile(rev):
        with open(rev) as f:
            src = f.read()
    else:
        src = subprocess.run(["git", "show", f"{rev}:csrc/nf4_mma_gemv.cu"], capture_output=True, text=True,
                             check=True).stdout
    cap = torch.cuda.get_device_capability()
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "k.cu"), "w") as f:
        f.write(src)
    arch = f"{cap[0]}{cap[1]}"
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                    f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", os.path.join(tmp, "k.so"),
                    os.path.join(tmp, "k.cu")], check=True)
    fn = ctypes.CDLL(os.path.join(tmp, "k.so")).lk_nf4_mma_gemv
    fn.argtypes, fn.restype = nf4_gemv_cuda._ARGTYPES, ctypes.c_int
    return fn


@contextlib.contextmanager
def entry(fn):
    """nf4_gemv(cuda=True) runs ``fn`` (a ctypes entry point) inside the block."""
    saved = nf4_gemv_cuda._entry
    nf4_gemv_cuda._entry = lambda index: fn
    try:
        yield
    finally:
        nf4_gemv_cuda._entry = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--warps", type=int, nargs="+", default=[8])
    ap.add_argument("--kernels", action="store_true", help="profiler device time per kernel of the cuda call")
    ap.add_argument("--ab", nargs="+", default=[], help="REV[:MAX_M]: git revisions or .cu files timed too")
    args = ap.parse_args()
    ab = []
    for spec in args.ab:
        rev, _, max_m = spec.partition(":")
        ab.append((rev, int(max_m or 16), build_revision(rev)))
    t0 = time.time()
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        bnb_version = bnb.__version__
    except Exception as e:
        bnb, bnb_version = None, f"unavailable ({type(e).__name__})"
    table = Table(args.out)
    bw = copy_bandwidth()
    table.add(f"# experiments/bench_gemv_cuda.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}  bitsandbytes {bnb_version}; device copy "
              f"{bw / 1e9:.0f} GB/s; bf16, r={R}, fp32 adapters, CUDA-graph replay medians over 8 weight copies")
    worst = check(table, nf4_gemv_cuda.MAX_M)
    for rev, max_m, fn in ab:
        with entry(fn):
            worst = max(worst, check(table, max_m, rev))
    if worst > 1:
        table.add("# WRONG RESULTS: timings skipped")
        sys.exit(1)
    table.add(f"{'shape K->N':13} {'M':>2}  {'provider':30} {'µs':>8} {'GB/s':>7} {'%copy':>6} {'vs bnb':>7} "
              f"{'vs dense':>8} {'vs triton':>9}")
    summary = []
    for K, N in SHAPES:
        shape = f"{K}->{N}"
        W = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        ours = [NF4Weight.quantize(w, blocksize=64, double_quant=True) for w in W]
        states = [_nf4_state(w) for w in ours]
        bnb_w = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in W] \
            if bnb else []
        for M in args.m:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            A = torch.randn(R, K, device="cuda") / K**0.5
            B = torch.randn(N, R, device="cuda") * 0.02
            rows = []
            t_dense, _ = time_us([lambda w=w: x @ w.t() for w in W])
            rows.append(("dense bf16", t_dense, N * K * 2 + M * K * 2 + M * N * 2))
            t_bnb = None
            if bnb_w:
                t_bnb, _ = time_us([lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in bnb_w])
                rows.append(("bnb matmul_4bit (no LoRA)", t_bnb, nf4_bytes(ours[0], M, K, N)))
            t_tri, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=False) for s in states])
            rows.append(("triton nf4_gemv (default)", t_tri, nf4_bytes(ours[0], M, K, N)))
            t_def, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=True) for s in states])
            rows.append(("cuda (default launch)", t_def, nf4_bytes(ours[0], M, K, N)))
            best = ("cuda (default launch)", t_def)
            for rev, max_m, fn in ab:
                if M <= max_m:
                    with entry(fn):
                        t_ab, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=True) for s in states])
                    rows.append((f"cuda@{rev} (default launch)", t_ab, nf4_bytes(ours[0], M, K, N)))
            for warps in args.warps:
                for split in args.splits:
                    if split > K // 256:
                        continue
                    t, _ = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, cuda=True, cuda_warps=warps, split_k=split)
                                    for s in states])
                    name = f"cuda warps={warps} split={split}"
                    rows.append((name, t, nf4_bytes(ours[0], M, K, N)))
                    if t < best[1]:
                        best = (name, t)
            for name, t, nb in rows:
                gbs = nb / (t * 1e-6) / 1e9
                vb = f"{t_bnb / t:7.2f}" if t_bnb else f"{'-':>7}"
                table.add(f"{shape:13} {M:>2}  {name:30} {t:8.1f} {gbs:7.0f} {100 * gbs * 1e9 / bw:6.0f} {vb} "
                          f"{t_dense / t:8.2f} {t_tri / t:9.2f}")
            if args.kernels:
                st0 = states[0]
                parts = kernel_times(lambda: nf4_gemv(x, st0, A, B, 2.0, cuda=True))
                table.add(f"# {shape} M={M} kernels (profiler µs/call): " +
                          ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
            summary.append((shape, M, t_dense, t_bnb, t_tri, t_def, best, nf4_bytes(ours[0], M, K, N)))
        del W, ours, states, bnb_w
        torch.cuda.empty_cache()
    table.add("")
    table.add(f"{'shape K->N':13} {'M':>2} {'dense':>7} {'bnb':>7} {'triton':>7} {'cuda':>7} {'%copy':>6} "
              f"{'cuda/dense':>10} {'bnb/cuda':>8}  best config")
    for shape, M, td, tb, tt, tc, best, nb in summary:
        pc = 100 * nb / (tc * 1e-6) / bw
        bb = f"{tb / tc:8.2f}" if tb else f"{'-':>8}"
        table.add(f"{shape:13} {M:>2} {td:7.1f} {tb or math.nan:7.1f} {tt:7.1f} {tc:7.1f} {pc:6.0f} {tc / td:10.2f} "
                  f"{bb}  {best[0]} {best[1]:.1f}")
    table.add(f"# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
