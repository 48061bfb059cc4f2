"""The clock pytest-benchmark reads: CUDA events on the GPU, ``time.perf_counter`` without one.

Each call synchronizes, records an event and returns seconds since the first event, so the span between two
calls is GPU time of the work enqueued between them (never unsynchronized wall clock).
"""
import time

import torch

_origin = None


def device_clock() -> float:
    global _origin
    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _origin is None:
        _origin = event
    return _origin.elapsed_time(event) / 1e3
