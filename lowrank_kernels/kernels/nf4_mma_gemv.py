"""Launcher of the CUDA C++ decode kernel ``csrc/nf4_mma_gemv.cu`` (the torch operator
``torch.ops.lowrank_kernels.nf4_mma_gemv`` of ``csrc/nf4_mma_gemv_op.cpp``, built by :mod:`lowrank_kernels.cuda_ext`):
the first of the two launches of :func:`lowrank_kernels.kernels.nf4_gemv.nf4_gemv` on tensor cores, for ``M <= 16``
bf16 / fp16 activation rows:

    ws [split, M, N] = x [M, K-slice] @ deq(W [N, K-slice]).T,   ws_s [split, M, r] = x @ round(A [r, K-slice]).T

(fp32 partial sums per K slice; the Triton finish kernel sums them in a fixed order and adds the LoRA term and the
bias). The dequantized weight is ``code * absmax`` with the NF4 code rounded to ``x.dtype`` (see the source).

The operator writes the two workspaces it is given (schema ``Tensor(a!) ws, Tensor(b!) ws_s``, returns nothing);
its fake implementation (:func:`_fake`) is registered with it. :func:`supported` says whether a call fits the kernel;
the dispatcher keeps the Triton kernel otherwise. ``nf4``: an ``NF4Weight``.
"""

import torch

from lowrank_kernels import cuda_ext

GROUP_K = 256  # K per pipeline stage of the kernel: K and every K slice are multiples of it
WARPS = (1, 2, 4, 8)  # warps per thread block (16 W rows each)
MAX_M = 16
NAME = "nf4_mma_gemv"  # csrc/<NAME>.cu, csrc/<NAME>_op.cpp, torch.ops.lowrank_kernels.<NAME>


def _fake(x, packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, lora_A, ws, ws_s,
          k_per_split, warps):
    """The operator on fake / meta tensors: it only writes ``ws`` and ``ws_s`` in place."""
    return None


def op(device_index: int):
    """The operator (an ``OpOverload``) for CUDA device ``device_index``, its fake implementation registered, or
    ``None`` (:func:`cuda_ext.op`)."""
    return cuda_ext.op(NAME, device_index, _fake)


def available(device) -> bool:
    """The kernel is built (or buildable) for ``device``: a CUDA device of compute capability >= 8, with nvcc,
    ninja and a CUDA build of PyTorch (:mod:`lowrank_kernels.cuda_ext`)."""
    return device.type == "cuda" and op(cuda_ext.device_index(device)) is not None


def supported(x, nf4) -> bool:
    """True when :func:`partials` can run this call: x bf16 / fp16 ``[M <= 16, K]`` with unit stride along K and
    16-byte aligned rows, ``K % 256 == 0``, ``blocksize >= 64``, a contiguous 8-byte aligned packed weight and
    16-byte aligned contiguous scales (the kernel reads them in vectors), and the kernel built."""
    M, K = x.shape
    packed, absmax = nf4.packed, nf4.absmax
    return (x.dtype in (torch.bfloat16, torch.float16) and 1 <= M <= MAX_M and K % GROUP_K == 0
            and x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (M == 1 or x.stride(0) * 2 % 16 == 0)
            and nf4.blocksize >= 64 and packed.is_contiguous() and packed.data_ptr() % 8 == 0
            and absmax.is_contiguous() and absmax.data_ptr() % 16 == 0 and available(x.device))


def default_launch(M: int, N: int, K: int, num_sms: int) -> tuple:
    """``(warps, n_split)``: 8 warps (128 rows) per block; K split into as many slices as keep the grid within
    two blocks per SM (two fit): the fastest measured (``docs/perf-log.md``)."""
    warps = 8
    row_blocks = -(-N // (16 * warps))
    split = max(1, min(K // GROUP_K, 2 * num_sms // row_blocks))
    return warps, split


def partials(x, nf4, lora_A, ws, ws_s, k_per_split: int, n_split: int, warps: int):
    """Fill ``ws [n_split, M, N]`` and ``ws_s [n_split, M, r]`` (fp32, contiguous) with the partial sums of the K
    slices ``[i * k_per_split, (i + 1) * k_per_split)`` (``k_per_split % 256 == 0``). The caller checked
    :func:`supported`; ``lora_A [r, K]`` may have any float dtype and strides. The operator checks its inputs
    (a ``RuntimeError`` where they do not fit)."""
    if ws.shape[0] != n_split:
        raise ValueError(f"nf4_mma_gemv: ws has {ws.shape[0]} slices, n_split is {n_split}")
    nested = nf4.nested
    op(cuda_ext.device_index(x.device))(x, nf4.packed, nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset, nf4.code,
                                        nf4.blocksize, nf4.nested_blocksize if nested else 0, lora_A, ws, ws_s,
                                        k_per_split, warps)
