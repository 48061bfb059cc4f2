"""Launcher of the CUDA C++ merge kernel ``csrc/nf4_merge_mma.cu`` (the torch operator
``torch.ops.lowrank_kernels.nf4_merge_mma`` of ``csrc/nf4_merge_mma_op.cpp``, built by
:mod:`lowrank_kernels.cuda_ext`): the NF4 weight dequantized with the LoRA update merged in, on tensor cores, for
bf16 / fp16 output:

    W' [N, K] = round(deq(W) + scaling * round(B) @ round(A))      (the contract of :mod:`.nf4_merge`)

The operator returns ``W'`` (a new contiguous tensor in lora_A's dtype); its fake implementation (:func:`_fake`) is
registered with it. :func:`supported` says whether a call fits the kernel; :func:`lowrank_kernels.kernels.nf4_merge.
nf4_merge` keeps the Triton kernel otherwise. ``nf4``: an ``NF4Weight``.
"""

import torch

from lowrank_kernels import cuda_ext

STRIP = 64  # W columns per warp step: K must be a multiple of it
MAX_R = 32  # two rank chunks of 16 (r = 64 would keep 64 more fragment registers per thread: the Triton kernel)
WARPS = 4  # a block: 4 warps on adjacent 64-column strips (the fastest of 2, 4, 8: docs/perf-log.md)
NAME = "nf4_merge_mma"  # csrc/<NAME>.cu, csrc/<NAME>_op.cpp, torch.ops.lowrank_kernels.<NAME>
_DTYPES = (torch.float16, torch.bfloat16)


def _fake(packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, lora_A, lora_B, scaling, warps):
    """The operator on fake / meta tensors: ``W' [N, K]`` (N = lora_B's rows, K = lora_A's columns), contiguous,
    in lora_A's dtype, on its device."""
    return lora_A.new_empty((lora_B.shape[0], lora_A.shape[1]))


def op(device_index: int):
    """The operator (an ``OpOverload``) for CUDA device ``device_index``, its fake implementation registered, or
    ``None`` (:func:`cuda_ext.op`)."""
    return cuda_ext.op(NAME, device_index, _fake)


def supported(nf4, R: int, dtype: torch.dtype) -> bool:
    """True when :func:`merge` can run: bf16 / fp16 output, ``K % 64 == 0``, ``blocksize >= 64``,
    ``1 <= R <= 32``, a contiguous 4-byte aligned packed weight on a CUDA device of compute capability >= 8,
    and the kernel built."""
    packed = nf4.packed
    N, K = nf4.shape
    return (dtype in _DTYPES and K % STRIP == 0 and nf4.blocksize >= 64 and 1 <= R <= MAX_R
            and packed.is_cuda and packed.is_contiguous() and packed.data_ptr() % 4 == 0
            and op(cuda_ext.device_index(packed.device)) is not None)


def merge(nf4, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype,
          warps: int = WARPS) -> torch.Tensor:
    """``W' [N, K]`` in ``dtype``; ``lora_A [r, K]`` and ``lora_B [N, r]`` any float dtype and strides (rounded
    to ``dtype`` here; lora_B is copied to a contiguous ``[N, 16 * cdiv(r, 16)]`` tensor, zero-padded, unless it
    already is one). ``warps``: warps per thread block, 1 to 8. The caller checked :func:`supported`."""
    if isinstance(warps, bool) or not isinstance(warps, int) or not 1 <= warps <= 8:
        raise ValueError(f"nf4_merge: warps must be an int in [1, 8], got {warps!r}")
    R = lora_A.shape[0]
    packed = nf4.packed
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    r_pad = -(-R // 16) * 16
    if r_pad != R or not B.is_contiguous() or B.data_ptr() % 8 != 0:
        B = torch.nn.functional.pad(B, (0, r_pad - R)).contiguous()
    nested = nf4.nested
    return op(cuda_ext.device_index(packed.device))(
        packed, nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset,
        nf4.code, nf4.blocksize, nf4.nested_blocksize if nested else 0, A, B,
        float(scaling), warps)
