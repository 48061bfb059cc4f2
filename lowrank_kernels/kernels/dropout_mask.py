"""Triton kernel: the LoRA dropout keep-mask drawn on the GPU from a seed held in device memory.

``keep[i] = u(seed, i) >= p`` with ``u`` Triton's Philox uniform in ``[0, 1)`` (``tl.rand``, 64-bit counter ``i``,
the flat element index), so ``P(keep) = 1 - p``. The seed is read from a one-element int64 tensor, never from the
host: drawing it (``torch.randint`` on the CUDA generator) and this kernel are both captured by CUDA graphs and
replay with fresh values, and reading it costs no device sync. The mask is a pure function of the seed's value,
which is how the backward rebuilds the forward's mask from the seed alone. One program writes ``BLOCK``
consecutive elements.
"""
import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.launch import cdiv, launch

BLOCK = 4096


@triton.jit
def dropout_mask_kernel(seed_ptr, keep_ptr, n, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, offs)
    tl.store(keep_ptr + offs, u >= p, mask=offs < n)


def dropout_mask(seed, shape, p: float):
    """Bool ``[*shape]`` keep-mask on ``seed``'s device (``P(True) = 1 - p``); ``seed``: 0-dim int64 tensor."""
    keep = seed.new_empty(shape, dtype=torch.bool)
    n = keep.numel()
    if n:
        launch(dropout_mask_kernel, (cdiv(n, BLOCK),), (seed, keep, n, p, BLOCK), num_warps=4)
    return keep

