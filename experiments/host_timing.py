"""The host-time loop the host-cost scripts share (CUDA): ``host_us(fn, iters, warmup) -> (enqueue, wall)``, in µs
per call. ``enqueue`` is the time to issue ``iters`` calls without waiting for the GPU (with tiny GPU work, what
the host spends per call); ``wall`` adds the wait for the GPU to finish them."""
import time

import torch


def host_us(fn, iters=300, warmup=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / iters * 1e6, (t2 - t0) / iters * 1e6
