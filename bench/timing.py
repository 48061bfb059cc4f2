"""The clock pytest-benchmark reads: CUDA events on the GPU, ``time.perf_counter`` without one.

pytest-benchmark takes ``end - start`` of two readings around the timed calls. On the GPU a reading is a
``Stamp``, a CUDA event recorded on the current stream (no host synchronization); subtracting two stamps waits
for the later one and gives the seconds between them on the GPU's clock. ``hold_gpu`` enqueues a spin kernel of
about ``HOLD_US`` µs: called before the start reading (the ``run`` fixture does, for CUDA-graph timing), it keeps
the GPU busy while the host records the start event and enqueues the work, so the span is the device time of
that work and not the host's launch latency, which an idle GPU would count (nvbench's "blocking kernel" does the
same). Without it the span also includes whatever time the host takes to enqueue the work (eager timing).
"""
import time

import torch

HOLD_US = 500


class Stamp:
    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: "Stamp") -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3


def device_clock():
    return Stamp() if torch.cuda.is_available() else time.perf_counter()


_cycles_per_us = None


def hold_gpu():
    """Enqueue ~``HOLD_US`` µs of spinning on the current stream (nothing without CUDA)."""
    global _cycles_per_us
    if not torch.cuda.is_available():
        return
    if _cycles_per_us is None:  # the SM clock: time a known spin once
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        end.synchronize()
        _cycles_per_us = 1_000_000 / (start.elapsed_time(end) * 1e3)
    torch.cuda._sleep(int(HOLD_US * _cycles_per_us))
