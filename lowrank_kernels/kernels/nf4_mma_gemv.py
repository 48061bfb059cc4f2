"""Launcher of the CUDA C++ decode kernel ``csrc/nf4_mma_gemv.cu``: the first of the two launches of
:func:`lowrank_kernels.kernels.nf4_gemv.nf4_gemv` on tensor cores, for ``M <= 16`` bf16 / fp16 activation rows:

    ws [split, M, N] = x [M, K-slice] @ deq(W [N, K-slice]).T,   ws_s [split, M, r] = x @ round(A [r, K-slice]).T

(fp32 partial sums per K slice; the Triton finish kernel sums them in a fixed order and adds the LoRA term and the
bias). The dequantized weight is ``code * absmax`` with the NF4 code rounded to ``x.dtype`` (see the source).

:func:`supported` says whether a call fits the kernel; the dispatcher keeps the Triton kernel otherwise.
"""
import ctypes
import functools

import torch

from lowrank_kernels import cuda_ext

GROUP_K = 256  # K per pipeline stage of the kernel: K and every K slice are multiples of it
WARPS = (1, 2, 4, 8)  # warps per thread block (16 W rows each)
MAX_M = 16
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ARGTYPES = ((ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int) + (ctypes.c_void_p,) * 6
             + (ctypes.c_int,) * 2 + (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
             + (ctypes.c_void_p,) * 2 + (ctypes.c_int,) * 7 + (ctypes.c_void_p,))


@functools.lru_cache(maxsize=None)
def _entry(device_index: int):
    return cuda_ext.function("nf4_mma_gemv", "lk_nf4_mma_gemv", _ARGTYPES, device_index)


def available(device) -> bool:
    """The kernel is built (or buildable) for ``device``: a CUDA device of compute capability >= 8 and ``nvcc``."""
    return device.type == "cuda" and _entry(device.index if device.index is not None else
                                            torch.cuda.current_device()) is not None


def supported(x, nf4) -> bool:
    """True when :func:`partials` can run this call: x bf16 / fp16 ``[M <= 16, K]`` with unit stride along K and
    16-byte aligned rows, ``K % 256 == 0``, ``blocksize >= 64``, a contiguous 8-byte aligned packed weight and
    16-byte aligned contiguous scales (the kernel reads them in vectors), and the library built."""
    M, K = x.shape
    packed, absmax = nf4["packed"], nf4["absmax"]
    return (x.dtype in (torch.bfloat16, torch.float16) and 1 <= M <= MAX_M and K % GROUP_K == 0
            and x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (M == 1 or x.stride(0) * 2 % 16 == 0)
            and nf4["blocksize"] >= 64 and packed.is_contiguous() and packed.data_ptr() % 8 == 0
            and absmax.is_contiguous() and absmax.data_ptr() % 16 == 0 and available(x.device))


def default_launch(M: int, N: int, K: int, num_sms: int) -> tuple:
    """``(warps, n_split)``: 8 warps (128 rows) per block; K split into as many slices as keep the grid within
    two blocks per SM (two fit), from ``bench/results/gemv-mma-h100.txt``."""
    warps = 8
    row_blocks = -(-N // (16 * warps))
    split = max(1, min(K // GROUP_K, 2 * num_sms // row_blocks))
    return warps, split


def partials(x, nf4, lora_A, ws, ws_s, k_per_split: int, n_split: int, warps: int):
    """Fill ``ws [n_split, M, N]`` and ``ws_s [n_split, M, r]`` (fp32, contiguous) with the partial sums of the K
    slices ``[i * k_per_split, (i + 1) * k_per_split)`` (``k_per_split % 256 == 0``). The caller checked
    :func:`supported`; ``lora_A [r, K]`` may have any float dtype and strides."""
    M, K = x.shape
    N = nf4["shape"][0]
    R = lora_A.shape[0]
    nested = nf4.get("absmax2") is not None
    dev = x.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    fn = _entry(index)
    err = fn(x.data_ptr(), _DTYPES[x.dtype], x.stride(0), M, nf4["packed"].data_ptr(), nf4["absmax"].data_ptr(),
             nf4["absmax2"].data_ptr() if nested else None, nf4["code2"].data_ptr() if nested else None,
             nf4["offset"].data_ptr() if nested else None, nf4["code"].data_ptr(),
             nf4["blocksize"].bit_length() - 1, nf4["nested_blocksize"].bit_length() - 1 if nested else -1,
             lora_A.data_ptr(), _DTYPES[lora_A.dtype], lora_A.stride(0), lora_A.stride(1),
             ws.data_ptr(), ws_s.data_ptr(), N, K, R, k_per_split, n_split, warps, index,
             torch.cuda.current_stream(dev).cuda_stream)
    if err != 0:
        raise RuntimeError(f"nf4_mma_gemv: kernel launch failed with cudaError {err}")
