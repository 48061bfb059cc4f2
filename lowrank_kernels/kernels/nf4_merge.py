"""Triton kernel: an NF4 weight dequantized with the LoRA update merged in, one rounding.

    W' [N, K] = round(deq(W) + scaling * round(B) @ round(A))      B = lora_B [N, r], A = lora_A [r, K]

``deq(W)`` is bit-identical to ``NF4Weight.dequantize(dtype)`` (the shared ``nf4_tile.nf4_tile``), ``round``
rounds to ``dtype`` (the adapters as every other kernel here reads them), the rank-``r`` product accumulates in
fp32 (one ``tl.dot`` per tile, ``r`` padded to a power of two >= 16), and the sum is rounded once to ``dtype``.

Without LoRA dropout a QLoRA layer is ``y = x @ W'.T + bias`` and ``dX = dY @ W'``: the temporary bf16 copy of W
that dequantize + cuBLAS writes anyway carries the LoRA term, so neither product needs a pass over an ``[M, N]``
LoRA term (see ``dispatch.lora_linear_forward``).

A program dequantizes a ``[BLOCK_N, BLOCK_K]`` tile; ``K`` need not be a multiple of anything (``nf4_tile``'s
generic path runs where rows do not start on whole 32-bit words and scale blocks). Where it applies (bf16 / fp16,
``K % 64 == 0``, blocksize >= 64, r <= 32) :func:`nf4_merge` runs the CUDA C++ kernel of ``csrc/nf4_merge_mma.cu``
instead (:mod:`.nf4_merge_mma`, same contract, faster: ``docs/performance.md``); ``policy.merge_on_cuda_kernel``
decides.
"""
import torch
import triton
import triton.language as tl

from lowrank_kernels import policy
from lowrank_kernels.kernels import nf4_merge_mma
from lowrank_kernels.kernels.dot import dot as _dot
from lowrank_kernels.kernels.launch import INTERPRET, MAX_ELEMENTS, cdiv, launch, next_pow2
from lowrank_kernels.kernels.nf4_tile import nf4_tile, nf4_tile_args
from lowrank_kernels.kernels.rounding import round_fp32_to


@triton.jit
def nf4_merge_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                     a_ptr, b_ptr, out_ptr, N, K, R, scaling,
                     stride_ar, stride_ak, stride_bn, stride_br,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     ALIGNED: tl.constexpr, SHFL: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``out[n, k] = round(deq(W)[n, k] + scaling * sum_r round(B[n, r]) * round(A[r, k]))`` over one tile."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    offs_n64 = offs_n.to(tl.int64)
    w = nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, offs_n, n_ok, k0, K,
                  dtype, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, ALIGNED, SHFL)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    b = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    delta = _dot(round_fp32_to(b.to(tl.float32), dtype), round_fp32_to(a.to(tl.float32), dtype),
                 tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
    merged = round_fp32_to(w.to(tl.float32) + scaling * delta, dtype)
    tl.store(out_ptr + offs_n64[:, None] * K + offs_k[None, :], merged, mask=n_ok[:, None] & k_ok[None, :])


BLOCK_N, BLOCK_K, NUM_WARPS = 32, 128, 4  # fastest of 7 tiles on the H100 (docs/perf-log.md)


def nf4_merge(nf4, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype, *,
              cuda: bool | None = None, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
              num_warps: int = NUM_WARPS) -> torch.Tensor:
    """``W' [N, K]`` in ``dtype`` (bf16, fp16 or fp32; module docstring). ``nf4``: the ``NF4Weight`` ``W``;
    ``lora_A [r, K]``, ``lora_B [N, r]`` in any float dtype and strides, on W's device (inputs validated by the
    caller). fp32 takes the rank-r product with IEEE fp32 dots.

    ``cuda``: the tensor-core kernel (:mod:`.nf4_merge_mma`) by default (``None``) wherever it is supported;
    ``False`` forces this Triton kernel (``block_n``, ``block_k``, ``num_warps``: its tile), ``True`` the CUDA
    kernel (an error where it is not supported); ``policy.merge_on_cuda_kernel`` decides."""
    N, K = nf4.shape
    R = lora_A.shape[0]
    if policy.merge_on_cuda_kernel(nf4, R, dtype, cuda):
        return nf4_merge_mma.merge(nf4, lora_A, lora_B, scaling, dtype)
    if N * K > MAX_ELEMENTS:
        raise ValueError(f"weight: {N * K} elements, over the int32-indexed kernel limit {MAX_ELEMENTS}")
    out = nf4.packed.new_empty((N, K), dtype=dtype)
    if N == 0 or K == 0:
        return out
    pointers, meta = nf4_tile_args(nf4, K)
    args = (*pointers, lora_A, lora_B, out, N, K, R, float(scaling),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            meta["BLOCKSIZE"], meta["NESTED"], meta["NESTED_BLOCKSIZE"], meta["ALIGNED"], not INTERPRET,
            max(16, next_pow2(R)), block_n, block_k, INTERPRET and dtype == torch.bfloat16,
            "ieee" if dtype == torch.float32 else "tf32")
    launch(nf4_merge_kernel, (cdiv(N, block_n), cdiv(K, block_k)), args, num_warps=num_warps,
           enable_fp_fusion=False)
    return out
