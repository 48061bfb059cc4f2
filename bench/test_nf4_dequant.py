"""NF4 double-dequantization: ours vs ``bitsandbytes.functional.dequantize_4bit`` (and the torch reference).

bytes moved = packed nibbles + first-level uint8 scales + second-level fp32 scales + the output written.
Inputs rotate over enough weights to overflow L2, so the numbers are DRAM numbers.
"""
import collections
import itertools

import pytest
import torch

from bench.conftest import HAS_CUDA
from lowrank_kernels import NF4Weight

DEVICE = "cuda" if HAS_CUDA else "cpu"
L2_FLUSH_BYTES = 256 * 2**20


def weights(shape, dtype):
    in_f, out_f = shape
    w = NF4Weight.quantize(torch.randn(out_f, in_f, device=DEVICE, dtype=dtype) * 0.02)
    copies = max(1, min(16, L2_FLUSH_BYTES // w.nbytes())) if HAS_CUDA else 1
    return [w] + [w.to(DEVICE) for _ in range(copies - 1)] if copies > 1 else [w]


def moved_bytes(w, dtype):
    return w.nbytes() + w.numel() * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("provider", ["lowrank_kernels", "bitsandbytes", "python_ref", "copy (same bytes)"])
def test_nf4_dequantize(run, shape, dtype, provider):
    ws = weights(shape, dtype)
    info = dict(shape=list(shape), dtype=str(dtype), bytes=moved_bytes(ws[0], dtype))
    cycle = itertools.cycle(ws)
    # Outputs stay alive for the 10 calls a CUDA graph captures, so each call writes fresh memory, as the copy
    # does: a freed output's memory is reused by the next call, whose writes then partly land in lines still in
    # L2 (on the H100 that made our 4096x4096 dequant look 10 % faster than DRAM allows).
    outputs = collections.deque(maxlen=len(ws))
    if provider == "copy (same bytes)":
        # The ceiling at this size: an SM elementwise kernel (torch.neg) reading and writing bytes / 2 each,
        # replayed like ours (a plain copy_ in a CUDA graph becomes a slower copy-engine node), buffers rotated.
        n = info["bytes"] // 4  # bf16 elements read (= written)
        pairs = itertools.cycle([(torch.randn(n, device=DEVICE, dtype=dtype), torch.empty(n, device=DEVICE,
                                                                                          dtype=dtype))
                                 for _ in range(len(ws))])

        def copy():
            src, dst = next(pairs)
            return torch.neg(src, out=dst)
        run(copy, provider, **info)
    elif provider == "lowrank_kernels":
        run(lambda: outputs.append(next(cycle).dequantize(dtype)), provider, **info)
    elif provider == "python_ref":
        # the reference syncs with the host (repeat_interleave, table uploads): not capturable in a CUDA graph
        run(lambda: next(cycle).dequantize(dtype, backend="torch"), provider, eager=True, **info)
    else:
        F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
        states = itertools.cycle([w.to_bnb() for w in ws])
        run(lambda: outputs.append(F.dequantize_4bit(*next(states))), provider, **info)


@pytest.mark.parametrize("provider", ["torch.copy_"])
def test_device_copy(run, provider):
    """The bandwidth ceiling on this device, measured in the same run: a large device-to-device copy.

    Timed eagerly: a copy captured in a CUDA graph becomes a copy-engine node, slower than the SM copy kernels
    (seen on the H100: 2.43 vs 3.0 TB/s)."""
    n = (1 << 30) if HAS_CUDA else (1 << 24)
    src = torch.randn(n // 4, device=DEVICE)
    dst = torch.empty_like(src)
    run(lambda: dst.copy_(src), provider, eager=True, bytes=2 * n, group="device_copy")
