"""Paired (interleaved) timing of the M = 8192 layer targets: ours against dense and peft+bnb, round by round.

The layer benchmarks (``pytest bench``) time each provider's rounds back to back; on the H100 the GEMM-bound rounds
then run at clocks that drift with power and temperature (dense's own median and minimum differ by 7-13% in
bench-h100-forward.json), so a ratio of two providers' medians carries that drift. Here every round replays each
provider's CUDA graph once, in a rotated order, each from behind a spin kernel (``bench.timing.hold_gpu``), and the
ratio is taken within the round: its median and interquartile range over the rounds are the paired ratio.

Callables and graphs are the benchmarks' own (``bench/test_forward.py``, ``bench/test_backward.py``): forward =
inference (no tensor requires grad), fwd+bwd = forward + backward for x, A and B (dense: forward + dX).

    python experiments/probe/layer_ab.py --out bench/results/layer-ab-h100.txt [--rounds 40] [--m 8192]
"""
import argparse
import datetime
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.conftest import GRAPH_CALLS, cuda_graph_of  # noqa: E402
from bench.layer import layers  # noqa: E402
from bench.test_backward import Step  # noqa: E402
from bench.test_forward import provider_fn  # noqa: E402
from bench.timing import hold_gpu  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
PROVIDERS = ["lowrank_kernels", "dense", "peft+bnb"]


def graphs(mode, shape, M):
    """``{provider: replay}`` for the mode (one layer; M = 8192 overflows L2 on its own)."""
    layer = layers(shape, M)[0]
    out = {}
    for p in PROVIDERS:
        if mode == "forward":
            x = torch.randn(M, shape[0], device="cuda", dtype=torch.bfloat16)
            fn = provider_fn(p, layer, x)
        else:
            step = Step(p, layer, M)
            fn = (lambda s=step: s.backward(s.forward()))
        out[p] = cuda_graph_of(fn)
    return out


def paired(replays, rounds):
    """``{provider: [µs per call per round]}``, providers interleaved and rotated round by round."""
    names = list(replays)
    times = {p: [] for p in names}
    for r in range(rounds + 2):
        order = names[r % len(names):] + names[:r % len(names)]
        for p in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            hold_gpu()
            start.record()
            replays[p]()
            end.record()
            end.synchronize()
            if r >= 2:  # two warm-up rounds
                times[p].append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    return times


def quartiles(v):
    q = statistics.quantiles(v, n=4)
    return q[0], statistics.median(v), q[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--m", type=int, default=8192)
    args = ap.parse_args()
    lines = []

    def emit(s):
        print(s, flush=True)
        lines.append(s)

    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        sys.exit("bitsandbytes is needed (the peft+bnb provider)")
    emit(f"# experiments/probe/layer_ab.py on {torch.cuda.get_device_name()}  {datetime.date.today()}  torch "
         f"{torch.__version__}  triton {triton.__version__}  bitsandbytes {bnb_version}; M={args.m}, r=16, bf16, "
         f"fp32 adapters; {args.rounds} rounds, each replaying every provider's graph ({GRAPH_CALLS} calls) once")
    emit("# per provider: median µs per call [q1, q3]; paired ratios: median of the per-round ratios [q1, q3]; "
         "sequential: ratio of the medians")
    emit(f"{'mode':8} {'shape K->N':12} {'ours µs':>20} {'dense µs':>20} {'peft+bnb µs':>22} "
         f"{'ours/dense paired':>22} {'seq':>5} {'peft/ours paired':>21}")
    for mode in ("forward", "fwd+bwd"):
        for shape in SHAPES:
            times = paired(graphs(mode, shape, args.m), args.rounds)
            ours, dense, peft = times["lowrank_kernels"], times["dense"], times["peft+bnb"]
            r_dense = [a / b for a, b in zip(ours, dense)]
            r_peft = [b / a for a, b in zip(ours, peft)]

            def fmt(v, w):
                q1, m, q3 = quartiles(v)
                return f"{m:.1f} [{q1:.1f}, {q3:.1f}]".rjust(w)

            seq = statistics.median(ours) / statistics.median(dense)
            emit(f"{mode:8} {shape[0]}->{shape[1]:<6} {fmt(ours, 20)} {fmt(dense, 20)} {fmt(peft, 22)} "
                 f"{'%.3f [%.3f, %.3f]' % (quartiles(r_dense)[1], quartiles(r_dense)[0], quartiles(r_dense)[2]):>22} "
                 f"{seq:5.3f} "
                 f"{'%.2f [%.2f, %.2f]' % (quartiles(r_peft)[1], quartiles(r_peft)[0], quartiles(r_peft)[2]):>21}")
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
