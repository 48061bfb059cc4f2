"""Where a batch-1 training step's time goes: host (Python + launches) vs GPU, for peft+bnb and converted.

    python scripts/profile_train_step.py [--batch 1] [--layers 4] [--compile] [--providers peft+bnb,lowrank_kernels]

Prints, per provider: the step's wall time (synchronized), the GPU's kernel time per step (profiler, sum of
kernel durations), the host time to enqueue a step (no synchronization until the end of the 5 steps), and the
top ops by self CPU time and by self GPU time. ``--compile``: the model under ``torch.compile`` (inductor), as
bench/test_train_step.py's "compiled" mode.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.test_train_step import build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--providers", default="peft+bnb,lowrank_kernels")
    a = ap.parse_args()
    for provider in a.providers.split(","):
        profile_one(provider, a)
        torch.cuda.empty_cache()


def profile_one(provider, a):
    net = build("llama3-8b", a.layers, False)
    if provider == "lowrank_kernels":
        from lowrank_kernels.peft import convert
        convert(net)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, net.config.vocab_size, (a.batch, 2048), device="cuda")
    forward = torch.compile(net) if a.compile else net

    def step():
        forward(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if a.compile:  # graph breaks and recompiles cost host time on every step
        from torch._dynamo.utils import counters

        print(f"== {provider} compiled: {counters['stats'].get('unique_graphs', 0)} graphs, graph breaks "
              f"{dict(counters['graph_break'])}, recompiles {dict(counters['recompiles'])}")
        counters.clear()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    kernels = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"== {provider}{' compiled' if a.compile else ''}: wall {(t2 - t0) / 5 * 1e3:.2f} ms/step, host enqueue {(t1 - t0) / 5 * 1e3:.2f} "
          f"ms/step, GPU kernels {kernels / 2 / 1e3:.2f} ms/step")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
