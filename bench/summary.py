"""A short benchmark summary, the quick start's first run: ``python -m bench.summary``.

Times one QLoRA layer (NF4 base weight, LoRA r = 16, fp32 adapters as peft keeps them) at a few token counts M,
forward (inference) and forward + backward (gradients for x and both adapters), for three providers:
lowrank_kernels (``qlora_linear``), peft+bnb (``bnb.matmul_4bit`` plus peft's LoRA branch: what peft runs for a
QLoRA layer; CUDA only, where bitsandbytes imports) and dense (bf16 ``x @ W.t()``: no quantization, no LoRA, the
floor). It prints one table. The callables are the layer benchmarks' own (``bench/test_forward.py``,
``bench/test_backward.py``); the full comparison is ``pytest bench`` (docs/performance.md).

CUDA: a Llama-3-8B layer shape in bf16, each case timed as CUDA-graph replays behind a spin kernel (device time,
as ``pytest bench`` times it; ``bench/timing.py``). CPU: a tiny shape in fp32, timed eagerly on one thread; these
are timings of the reference torch path, not of the product (the kernels are for NVIDIA GPUs).
"""
import itertools
import statistics
import time

import torch

import lowrank_kernels
from bench import shapes
from bench.conftest import GRAPH_CALLS, HAS_CUDA, cuda_graph_of
from bench.layer import DTYPE, RANK, layers
from bench.progress import fmt_seconds
from bench.test_backward import Step
from bench.test_forward import provider_fn
from bench.timing import device_clock, hold_gpu

PROVIDERS = ["lowrank_kernels", "peft+bnb", "dense"]
if HAS_CUDA:
    LAYER = ("llama3-8b", "q_proj")
    CASES = [("forward", 1), ("forward", 16), ("forward", 4096), ("fwd+bwd", 4096)]
else:
    LAYER = ("tiny", "square")
    CASES = [("forward", 1), ("forward", 64), ("fwd+bwd", 64)]


def bnb_missing() -> str:
    """Why peft+bnb is not timed here ("" if it is)."""
    if not HAS_CUDA:
        return "CUDA only"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes not importable ({type(e).__name__})"
    return ""


def case_fn(provider, mode, shape, M):
    """One call of the case: cycles over enough layer copies to overflow L2 at small M (``bench.layer.layers``)."""
    if mode == "forward":
        fns = [provider_fn(provider, layer, torch.randn(M, shape[0], device=layer.dense.device, dtype=DTYPE))
               for layer in layers(shape, M)]
    else:
        steps = [Step(provider, layer, M) for layer in layers(shape, M)]
        fns = [lambda step=step: step.backward(step.forward()) for step in steps]
    cycle = itertools.cycle(fns)
    return lambda: next(cycle)()


def time_cuda(fn, rounds=20):
    """``(seconds per call, how)``: median over rounds of a CUDA-graph replay of GRAPH_CALLS calls; eager calls
    (host time included) where the step cannot be captured."""
    try:
        replay, calls, how = cuda_graph_of(fn), GRAPH_CALLS, "graph"
    except Exception:  # e.g. a host sync inside the provider's step
        torch.cuda.synchronize()
        replay, calls, how = fn, 1, "eager"
    for _ in range(3):
        replay()
    spans = []
    for _ in range(rounds):
        if how == "graph":
            hold_gpu()  # the GPU spins while the host records the start and launches the replay: device time
        start = device_clock()
        replay()
        spans.append((device_clock() - start) / calls)
    return statistics.median(spans), how


def time_cpu(fn, budget=0.5, min_rounds=5):
    fn()
    spans, spent = [], 0.0
    while len(spans) < min_rounds or spent < budget:
        start = time.perf_counter()
        fn()
        spans.append(time.perf_counter() - start)
        spent += spans[-1]
    return statistics.median(spans), "eager"


def main():
    torch.manual_seed(0)
    shape = shapes.shape(*LAYER)
    if HAS_CUDA:
        where, how = torch.cuda.get_device_name(), "CUDA-graph replay, device time per call"
    else:  # tiny shapes: one thread is as fast, and steady on a busy machine (no spinning thread pool)
        torch.set_num_threads(1)
        where, how = "CPU", "eager, one thread, median per call"
        print("No CUDA device: CPU timings are of the reference torch path, not of the product "
              "(the kernels are for NVIDIA GPUs).")
    print(f"lowrank_kernels {lowrank_kernels.__version__} on {where}, torch {torch.__version__}; QLoRA layer "
          f"{shape[0]}→{shape[1]} ({LAYER[0]} {LAYER[1]}), NF4 base + LoRA r={RANK}, "
          f"{str(DTYPE).replace('torch.', '')}; {how}", flush=True)
    skip = {"peft+bnb": bnb_missing()}
    rows, eager = [], False
    for mode, M in CASES:
        times = {}
        for provider in PROVIDERS:
            if not skip.get(provider):
                times[provider], timing = (time_cuda if HAS_CUDA else time_cpu)(case_fn(provider, mode, shape, M))
                eager |= HAS_CUDA and timing == "eager"
        rows.append((mode, M, times))

    head = (f"{'mode':8} {'M':>5} {'ours':>10} {'peft+bnb':>10} {'dense':>10} {'ours vs peft+bnb':>17} "
            f"{'ours × dense':>13}")
    print(head)
    print("-" * len(head))
    for mode, M, t in rows:
        ours, bnb, dense = (t.get(p) for p in PROVIDERS)
        cell = lambda v: fmt_seconds(v) if v is not None else "–"  # noqa: E731
        vs_bnb = f"{bnb / ours:.2f}×" if bnb is not None else "–"
        print(f"{mode:8} {M:>5} {cell(ours):>10} {cell(bnb):>10} {cell(dense):>10} {vs_bnb:>17} {ours / dense:>13.2f}")
    print("ours vs peft+bnb: how many times faster ours is (higher is better); ours × dense: our time over dense's "
          "(no quantization, no LoRA: the floor; lower is better).")
    if skip["peft+bnb"]:
        print(f"peft+bnb not timed: {skip['peft+bnb']}.")
    if eager:
        print("Some steps could not be captured in a CUDA graph and were timed eagerly (host time included).")
    print("The full comparison (more shapes, M, modes, training steps): pytest bench, see docs/performance.md.")


if __name__ == "__main__":
    main()
