"""Launcher of the CUDA C++ merge kernel ``csrc/nf4_merge.cu``: the NF4 weight dequantized with the LoRA update
merged in, on tensor cores, for bf16 / fp16 output:

    W' [N, K] = round(deq(W) + scaling * round(B) @ round(A))      (the contract of :mod:`.nf4_merge`)

:func:`supported` says whether a call fits the kernel; :func:`lowrank_kernels.kernels.nf4_merge.nf4_merge` keeps
the Triton kernel otherwise.
"""
import ctypes
import functools

import torch

from lowrank_kernels import cuda_ext

STRIP = 64  # W columns per warp step: K must be a multiple of it
MAX_R = 32  # two rank chunks of 16 (r = 64 would keep 64 more fragment registers per thread: the Triton kernel)
WARPS = 4  # a block: 4 warps on adjacent 64-column strips (fastest of 2, 4, 8: bench/results/merge-cuda-h100.txt)
_DTYPES = {torch.float16: 1, torch.bfloat16: 2}
_ARGTYPES = ((ctypes.c_void_p,) * 6 + (ctypes.c_int,) * 2 + (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
             + (ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p) + (ctypes.c_int,) * 5
             + (ctypes.c_void_p,))


@functools.lru_cache(maxsize=None)
def _entry(device_index: int):
    return cuda_ext.function("nf4_merge", "lk_nf4_merge", _ARGTYPES, device_index)


def _index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def supported(nf4: dict, R: int, dtype: torch.dtype) -> bool:
    """True when :func:`merge` can run: bf16 / fp16 output, ``K % 64 == 0``, ``blocksize >= 64``,
    ``1 <= R <= 32``, a contiguous 4-byte aligned packed weight on a CUDA device of compute capability >= 8,
    and the library built."""
    packed = nf4["packed"]
    N, K = nf4["shape"]
    return (dtype in _DTYPES and K % STRIP == 0 and nf4["blocksize"] >= 64 and 1 <= R <= MAX_R
            and packed.is_cuda and packed.is_contiguous() and packed.data_ptr() % 4 == 0
            and _entry(_index(packed.device)) is not None)


def merge(nf4: dict, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype,
          warps: int = WARPS) -> torch.Tensor:
    """``W' [N, K]`` in ``dtype``; ``lora_A [r, K]`` and ``lora_B [N, r]`` any float dtype and strides (rounded
    to ``dtype`` here; lora_B is copied to a contiguous ``[N, 16 * cdiv(r, 16)]`` tensor, zero-padded, unless it
    already is one). ``warps``: warps per thread block, 1 to 8. The caller checked :func:`supported`."""
    if isinstance(warps, bool) or not isinstance(warps, int) or not 1 <= warps <= 8:
        raise ValueError(f"nf4_merge: warps must be an int in [1, 8], got {warps!r}")
    N, K = nf4["shape"]
    R = lora_A.shape[0]
    packed = nf4["packed"]
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    r_pad = -(-R // 16) * 16
    if r_pad != R or not B.is_contiguous() or B.data_ptr() % 8 != 0:
        B = torch.nn.functional.pad(B, (0, r_pad - R)).contiguous()
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    if N == 0 or K == 0:
        return out
    nested = nf4.get("absmax2") is not None
    fn = _entry(_index(packed.device))
    err = fn(packed.data_ptr(), nf4["absmax"].data_ptr(), nf4["absmax2"].data_ptr() if nested else None,
             nf4["code2"].data_ptr() if nested else None, nf4["offset"].data_ptr() if nested else None,
             nf4["code"].data_ptr(), nf4["blocksize"].bit_length() - 1,
             nf4["nested_blocksize"].bit_length() - 1 if nested else -1,
             A.data_ptr(), A.stride(0), A.stride(1), B.data_ptr(), R, float(scaling), out.data_ptr(), _DTYPES[dtype],
             N, K, warps, _index(packed.device),
             torch.cuda.current_stream(packed.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"nf4_merge: CUDA kernel launch failed with cudaError {err}")
    return out
