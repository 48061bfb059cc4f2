"""Decode-size (M = 1, 4, 16) QLoRA forward on the GPU: our NF4 GEMV kernel over a grid of launch configs against
dense bf16, bitsandbytes' ``matmul_4bit`` and our existing fused GEMM (``lora_matmul(..., nf4=...)``).

For each Llama-3-8B shape (in -> out; W is [out, in]), bf16, r = 16, no bias, every provider is timed as the median
of CUDA-graph replays (``triton.testing.do_bench_cudagraph``; ``do_bench`` where graphs are unavailable or capture
fails, marked ``*``) of 8 layer calls on 8 different weight copies (so weights are not served from the 50 MB L2),
divided by 8. Each nf4_gemv config is first checked against dequantize + fp32 matmul (rel. error <= 1e-2) and is
timed only if it passes; a config that fails to compile or is wrong is reported and skipped.

Columns: µs per layer; GB/s = (packed nibbles + scale bytes + x + y) / time, the bytes a decode layer must move
(dense: the bf16 weight instead); %copy = GB/s against a measured device-to-device copy; the speed-up over
``bnb.matmul_4bit`` (base GEMM only, no LoRA, as DESIGN.md §5 measured it) and over dense bf16 ``x @ W.t()``.
``bnb+lora`` adds the two small LoRA matmuls the way peft runs them. The nf4_gemv rows include LoRA, with fp32
adapters as peft keeps them (read and rounded in the kernels); ``qlora_linear`` is the whole dispatched call under
``torch.no_grad()``. At M = 1 the grid also runs the CUDA-core variant (``/fma``).

    python experiments/bench_gemv.py --out bench/results/gemv-h100.txt [--grid small|full] [--m 1 4 16]

Budget: about 30 kernel compilations plus ~300 timings (~0.1 s each); meant to take under 3 minutes on an H100.
"""
import argparse
import datetime
import itertools
import math
import sys
import time
import traceback

import torch
import triton

from lowrank_kernels import NF4Weight, qlora_linear
from lowrank_kernels.dispatch import _nf4_state
from lowrank_kernels.kernels.nf4_gemv import _tma_ok, default_config, nf4_gemv

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features K, out_features N)
R = 16
COPIES = 8
# (block_n, block_k, num_warps, num_stages): the default first, then variants chosen from the compiled sm_90 loop
# (registers without spills, SASS instructions per weight element ~5.0-6.4).
GRID = {
    "none": [],
    "small": [(64, 256, 4, 1), (64, 256, 4, 2), (128, 256, 8, 1), (128, 128, 4, 1), (64, 128, 4, 1),
              (32, 256, 2, 1)],
    "full": [(64, 256, 4, 1), (64, 256, 4, 2), (128, 256, 8, 1), (128, 128, 4, 1), (64, 128, 4, 1),
             (32, 256, 2, 1), (32, 128, 2, 1), (128, 128, 8, 1), (128, 256, 8, 2)],
    "fma": [(128, 128, 4, 1), (64, 256, 4, 1), (128, 256, 8, 1), (256, 128, 8, 1), (64, 128, 2, 1),
            (32, 256, 2, 1), (256, 256, 8, 1)],
    "regs": [(64, 256, 4, 1), (128, 256, 8, 1), (128, 128, 4, 1)],
    "fma-regs": [(128, 256, 8, 1), (64, 256, 4, 1), (128, 128, 4, 1), (256, 256, 8, 1), (64, 512, 4, 1)],
    # more programs per SM: 4-8 packed words per thread per step (72-111 registers on sm_90 instead of 168-180)
    "occ": [(64, 256, 4, 1), (64, 128, 4, 1), (32, 128, 2, 1), (16, 128, 1, 1), (64, 128, 8, 1)],
    "fma-occ": [(128, 256, 8, 1), (32, 128, 2, 1), (16, 128, 1, 1), (16, 256, 2, 1), (8, 256, 1, 1),
                (64, 128, 4, 1), (32, 256, 4, 1), (64, 256, 8, 1), (128, 128, 8, 1)],
    "fma-deep": [(128, 256, 8, 1), (128, 256, 8, 2), (128, 256, 8, 3), (128, 512, 8, 1), (64, 512, 4, 1),
                 (256, 256, 8, 2), (64, 256, 4, 2), (32, 512, 2, 1)],
    # TMA word tiles (--tma-stages): the same configs plain and through a shared-memory ring
    "tma": [(128, 128, 4, 1), (64, 256, 4, 1), (128, 256, 8, 1)],
    "fma-tma": [(128, 256, 8, 1), (64, 256, 4, 1), (256, 256, 8, 1)],
    # the joined tile (--join) at M > 1
    "join": [(128, 128, 4, 1), (64, 256, 4, 1), (128, 256, 8, 1), (256, 256, 8, 1)],
}
SPLITS = [1, 2, 4, 6, 8]


def has_cudagraph_bench():
    return hasattr(triton.testing, "do_bench_cudagraph")


def time_us(fns):
    """Median µs per call of the callables ``fns`` (one per weight copy), replayed as one CUDA graph."""
    def run():
        for f in fns:
            f()
    mark = ""
    if has_cudagraph_bench():
        try:
            ms = triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
        except Exception:  # capture failed (e.g. a provider syncs): plain do_bench
            torch.cuda.synchronize()
            ms, mark = triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median"), "*"
    else:
        ms, mark = triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median"), "*"
    return ms * 1e3 / len(fns), mark


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


def copy_bandwidth():
    n = 1 << 28
    src, dst = torch.empty(n, device="cuda", dtype=torch.uint8), torch.empty(n, device="cuda", dtype=torch.uint8)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * n / (ms * 1e-3)


def nf4_bytes(w: NF4Weight, M, K, N):
    scales = w.absmax.numel() * w.absmax.element_size()
    if w.nested:
        scales += w.absmax2.numel() * 4 + w.code2.numel() * 4
    return w.packed.numel() + scales + M * K * 2 + M * N * 2


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


class Table:
    def __init__(self, out_path):
        self.lines = []
        self.out_path = out_path

    def add(self, line):
        print(line, flush=True)
        self.lines.append(line)
        if self.out_path:  # written as it goes: a crash (e.g. an illegal address) keeps what was measured
            with open(self.out_path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--grid", choices=sorted(GRID), default="small")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--fma-grid", choices=[g for g in GRID if g.startswith("fma")], default="fma",
                    help="configs of the CUDA-core variant, run at M = 1")
    ap.add_argument("--splits", type=int, nargs="+", default=SPLITS)
    ap.add_argument("--kernels", action="store_true",
                    help="also print the profiler's device time per kernel of the default qlora_linear call")
    ap.add_argument("--maxnreg", type=int, nargs="*", default=[],
                    help="also run every grid config with these max_registers (ptxas maxnreg) values")
    ap.add_argument("--tma-stages", type=int, nargs="*", default=[],
                    help="also run every grid config with TMA word tiles (tma=True) at these pipeline depths")
    ap.add_argument("--no-x-tma", action="store_true", help="TMA configs also without x by TMA (x_tma=False)")
    ap.add_argument("--join", action="store_true",
                    help="also run every tensor-core config with the joined tile (join=True: one dot per step)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv.py needs a CUDA GPU")
    torch.manual_seed(0)
    t_start = time.time()

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        bnb_version = bnb.__version__
    except Exception as e:  # not installed, or its native library failed to load
        bnb, bnb_version = None, f"unavailable ({type(e).__name__})"

    table = Table(args.out)
    bw = copy_bandwidth()
    table.add(f"# experiments/bench_gemv.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
              f"{torch.__version__}  triton {triton.__version__}  bitsandbytes {bnb_version}")
    table.add(f"# bf16, r={R}, no bias, {COPIES} rotating weight copies, "
              f"{'CUDA-graph replay' if has_cudagraph_bench() else 'do_bench'} medians (* = do_bench); "
              f"device copy {bw / 1e9:.0f} GB/s")
    table.add("# nf4_gemv config = block_n/block_k/warps/stages/split_k[/lookup][/fma][/r<max registers>][/tma]"
              "[/join][/xptr: x not by TMA]; default_config marked (default)")
    header = f"{'shape K->N':13} {'M':>2}  {'provider / config':34} {'µs':>8} {'GB/s':>7} {'%copy':>6} {'vs bnb':>7} " \
             f"{'vs dense':>8}  note"
    table.add(header)
    summary = []

    for K, N in SHAPES:
        shape = f"{K}->{N}"
        W = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        ours = [NF4Weight.quantize(w, blocksize=64, double_quant=True) for w in W]
        states = [_nf4_state(w) for w in ours]
        w_ref = ours[0].dequantize(torch.bfloat16).float()
        bnb_w = []
        if bnb is not None:
            try:
                bnb_w = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                         for w in W]
            except Exception as e:
                table.add(f"# {shape}: bitsandbytes quantize_4bit failed: {type(e).__name__}: {e}")

        for M in args.m:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            A = torch.randn(R, K, device="cuda") / K**0.5  # fp32 adapters, as peft keeps them
            B = torch.randn(N, R, device="cuda") * 0.02
            lora_l = (x @ A.to(x.dtype).t()) * 2.0  # s * S, for the bnb + addmm baseline
            lora_r = B.to(x.dtype).t()
            ref = x.float() @ w_ref.t() + lora_l.float() @ lora_r.float()
            nbytes = nf4_bytes(ours[0], M, K, N)
            rows = []

            def row(name, t, mark, nb=nbytes, note=""):
                rows.append((name, t, mark, nb, note))

            # baselines
            t_dense, mk = time_us([lambda w=w: x @ w.t() for w in W])
            row("dense bf16 x@W.t()", t_dense, mk, nb=N * K * 2 + M * K * 2 + M * N * 2)
            t_bnb = None
            if bnb_w:
                try:
                    t_bnb, mk = time_us([lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in bnb_w])
                    row("bnb matmul_4bit (no LoRA)", t_bnb, mk)
                    t, mk = time_us([lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s).addmm_(lora_l, lora_r)
                                     for p, s in bnb_w])
                    row("bnb matmul_4bit + LoRA addmm", t, mk)
                except Exception as e:
                    row("bnb matmul_4bit", float("nan"), "", note=f"failed: {type(e).__name__}: {str(e)[:80]}")
            try:
                from lowrank_kernels.kernels.lora_matmul import lora_matmul
                y = lora_matmul(x, lora_l, lora_r, None, nf4=states[0])
                err = rel_err(y, ref)
                t, mk = time_us([lambda s=s: lora_matmul(x, lora_l, lora_r, None, nf4=s) for s in states])
                row("lora_matmul nf4 (existing fused)", t, mk, note=f"err {err:.1e}")
            except Exception as e:
                row("lora_matmul nf4 (existing fused)", float("nan"), "", note=f"failed: {type(e).__name__}")

            y = qlora_linear(x, ours[0], A, B, 2.0)
            err = rel_err(y, ref)
            with torch.no_grad():
                t, mk = time_us([lambda w=w: qlora_linear(x, w, A, B, 2.0) for w in ours])
            row("qlora_linear (full call)", t, mk, note=f"err {err:.1e}")
            if args.kernels:
                with torch.no_grad():
                    parts = kernel_times(lambda w=ours[0]: qlora_linear(x, w, A, B, 2.0))
                table.add(f"# {shape} M={M} qlora_linear kernels (profiler, µs/call): " +
                          ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))

            # nf4_gemv over the grid (the default config first, marked)
            dflt = default_config(M, N, K, torch.bfloat16, torch.cuda.get_device_properties(0).multi_processor_count,
                                  tma=_tma_ok(states[0]["packed"], K, x.device))
            dkey = (dflt["block_n"], dflt["block_k"], dflt["num_warps"], dflt["num_stages"], dflt["split_k"], "shfl",
                    dflt["fma"], dflt["max_registers"], dflt["tma"], dflt["join"], dflt["x_tma"])
            configs = [dkey, dkey[:5] + ("load",) + dkey[6:]]
            regs = [None] + args.maxnreg
            grids = [(GRID[args.grid], False)] + ([(GRID[args.fma_grid], True)] if M == 1 else [])
            for grid, fma in grids:
                joins = [False, True] if args.join and not fma else [False]
                xt = [True, False] if args.no_x_tma else [True]
                configs += [c + (s, "shfl", fma, r, False, j, True)
                            for c, s, r, j in itertools.product(grid, args.splits, regs, joins)]
                configs += [c[:3] + (ns, s, "shfl", fma, r, True, j, x)
                            for c, s, ns, j, x, r in itertools.product(grid, args.splits, args.tma_stages, joins, xt,
                                                                       regs)]
            seen = set()
            for cfg in configs:
                if cfg in seen:
                    continue
                seen.add(cfg)
                bn, bk, nw, ns, sk, lookup, fma, maxnreg, tma, join, x_tma = cfg
                name = f"nf4_gemv {bn}/{bk}/{nw}/{ns}/{sk}" + ("/load" if lookup == "load" else "") + \
                    ("/fma" if fma else "") + (f"/r{maxnreg}" if maxnreg else "") + ("/tma" if tma else "") + \
                    ("/join" if join else "") + ("/xptr" if tma and not x_tma else "")
                if cfg == dkey:
                    name += " (default)"
                knobs = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_k=sk, lookup=lookup, fma=fma,
                             max_registers=maxnreg, tma=tma, join=join, x_tma=x_tma)
                try:
                    y, _ = nf4_gemv(x, states[0], A, B, 2.0, None, **knobs)
                    torch.cuda.synchronize()
                except Exception as e:  # compile error, out of resources, ...
                    msg = str(e).strip().splitlines()[-1][:90] if str(e).strip() else ""
                    row(name, float("nan"), "", note=f"failed: {type(e).__name__}: {msg}")
                    continue
                err = rel_err(y, ref)
                if not err <= 1e-2:
                    row(name, float("nan"), "", note=f"WRONG: rel err {err:.2e}")
                    continue
                t, mk = time_us([lambda s=s: nf4_gemv(x, s, A, B, 2.0, None, **knobs) for s in states])
                row(name, t, mk, note=f"err {err:.1e}")

            for name, t, mark, nb, note in rows:
                gbs = float("nan") if math.isnan(t) else nb / (t * 1e-6) / 1e9
                vs_bnb = f"{t_bnb / t:7.2f}" if t_bnb and not math.isnan(t) else f"{'-':>7}"
                table.add(f"{shape:13} {M:>2}  {name:34} {t:8.1f}{mark:1} {gbs:7.0f} {100 * gbs * 1e9 / bw:6.0f} "
                          f"{vs_bnb} {t_dense / t:8.2f}  {note}")
            ok = [r for r in rows if r[0].startswith("nf4_gemv") and not math.isnan(r[1])]
            if ok:
                best = min(ok, key=lambda r: r[1])
                dflt_row = next((r for r in ok if r[0].endswith("(default)")), None)
                summary.append((shape, M, best, dflt_row, t_bnb, t_dense, nbytes))
        del W, ours, states, bnb_w
        torch.cuda.empty_cache()

    table.add("")
    table.add("# best nf4_gemv config per shape and M (default config in brackets)")
    table.add(f"{'shape K->N':13} {'M':>2}  {'best config':34} {'µs':>8} {'GB/s':>7} {'vs bnb':>7} {'vs dense':>8}  "
              f"[default µs]")
    for shape, M, best, dflt_row, t_bnb, t_dense, nb in summary:
        name, t = best[0], best[1]
        vs_bnb = f"{t_bnb / t:7.2f}" if t_bnb else f"{'-':>7}"
        d = f"[{dflt_row[1]:.1f}]" if dflt_row else "[failed]"
        gbs = nb / (t * 1e-6) / 1e9
        table.add(f"{shape:13} {M:>2}  {name:34} {t:8.1f} {gbs:7.0f} {vs_bnb} {t_dense / t:8.2f}  {d}")
    table.add(f"# total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
