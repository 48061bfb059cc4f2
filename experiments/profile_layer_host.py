"""Host (Python + launch) time of one QLoRA layer's forward + backward, peft+bnb vs converted, and a cProfile of ours.

    python experiments/profile_layer_host.py [--m 128] [--iters 300]

The layer is the q_proj of a 1-layer Llama-3-8B-shaped peft QLoRA model (bench/test_train_step.py's build). At
the default M = 128 the GPU work is short, so the loop is bound by host time: µs per fwd+bwd is what the host
spends enqueueing it.
"""
import argparse
import cProfile
import pstats
import time

import torch

from bench.test_train_step import build


def host_us(layer, x, g, iters):
    for _ in range(20):
        layer(x).backward(g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        layer(x).backward(g)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / iters * 1e6, (t2 - t0) / iters * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--rows", type=int, default=35)
    a = ap.parse_args()
    net = build("llama3-8b", 1, False)
    layer = net.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, a.m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, a.m, 4096, device="cuda", dtype=torch.bfloat16)
    enq, wall = host_us(layer, x, g, a.iters)
    print(f"peft+bnb        M={a.m}: host {enq:7.1f} us / fwd+bwd, wall {wall:7.1f} us")
    from lowrank_kernels.peft import convert
    convert(net)
    layer = net.base_model.model.model.layers[0].self_attn.q_proj
    enq, wall = host_us(layer, x, g, a.iters)
    print(f"lowrank_kernels M={a.m}: host {enq:7.1f} us / fwd+bwd, wall {wall:7.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.iters):
        layer(x).backward(g)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.rows)


if __name__ == "__main__":
    main()
