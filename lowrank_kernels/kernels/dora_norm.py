"""Triton kernel: DoRA's weight norm, one pass over the base weight, ``W + s * B @ A`` never formed.

    norm[n] = sqrt(||w_n||^2 + 2 s * b_n . (A w_n^T) + s^2 * b_n G b_n^T)        G = A @ A.T  [r, r]

with ``w_n`` the rows of ``W [N, K]`` (NF4 dequantized in the kernel, bit-exactly, to fp32; or dense, any float
dtype read as fp32) and ``b_n`` those of ``B = lora_B [N, r]``; ``A = lora_A [r, K]``. That is the row norm of
``W + s * B @ A`` expanded (``python_ref.dora.weight_norm`` forms the sum instead).

A program owns ``BLOCK_N`` rows and walks K in ``BLOCK_K`` steps: each tile of W is read once (0.5 byte per
element for NF4), adds its squares to ``||w_n||^2`` and its product with the matching ``A`` columns to
``A w_n^T [BLOCK_N, r]`` (one ``tl.dot``, ``r`` padded to a power of two >= 16); at the end the program reads its
rows of ``B`` and combines, with ``G`` computed once by the caller (``r x r``). Everything is fp32: the fp32
operands of the dots take ``policy.fp32_dot_precision`` (``tf32x3`` unless torch allows TF32 for fp32 matmuls).
Rounding can leave a tiny negative sum for an (almost) zero row: it is clamped to 0 before the square root.
"""
import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.launch import INTERPRET, MAX_ELEMENTS, cdiv, launch, next_pow2
from lowrank_kernels.kernels.nf4_tile import nf4_tile, nf4_tile_args


@triton.jit
def dora_norm_kernel(w_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                     a_ptr, b_ptr, g_ptr, out_ptr, N, K, R, scaling,
                     stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                     DENSE: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                     NESTED_BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr, SHFL: tl.constexpr,
                     R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """``out[n]`` (fp32) for the ``BLOCK_N`` rows of this program (module docstring). ``DENSE``: W is the tensor
    at ``w_ptr`` (strides ``stride_wn``, ``stride_wk``), else the NF4 weight of the six pointers after it."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)  # ||w_n||^2
    wa = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)  # A w_n^T
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if DENSE:
            w = tl.load(w_ptr + offs_n64[:, None] * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        else:
            w = nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, offs_n, n_ok, k0, K,
                         tl.float32, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, ALIGNED, SHFL)
            w = tl.where(n_ok[:, None] & k_ok[None, :], w, 0.0)  # nf4_tile leaves masked elements undefined
        sumsq += tl.sum(w * w, axis=1)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # A.T tile [BLOCK_K, R_PAD]
        wa = tl.dot(w, a, wa, input_precision=INPUT_PRECISION)
    b = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_r[:, None] * R_PAD + offs_r[None, :])  # zero-padded [R_PAD, R_PAD]
    bg = tl.dot(b, g, input_precision=INPUT_PRECISION)
    norm2 = sumsq + (2.0 * scaling) * tl.sum(b * wa, axis=1) + (scaling * scaling) * tl.sum(bg * b, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt(tl.maximum(norm2, 0.0)), mask=n_ok)


BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 16, 256, 4, 3


def dora_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              input_precision: str) -> torch.Tensor:
    """``norm [N]`` fp32 (module docstring). ``weight``: an ``NF4Weight`` or a dense ``[N, K]`` tensor (bf16, fp16
    or fp32, any strides); ``lora_A [r, K]``, ``lora_B [N, r]`` bf16 / fp16 / fp32, any strides, on the weight's
    device (validated by the caller: ``policy.dora_norm_on_triton`` chose this kernel). ``input_precision``: of
    the fp32 dots (``"ieee"``, ``"tf32x3"`` or ``"tf32"``)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    dense = isinstance(weight, torch.Tensor)
    out = lora_A.new_empty((N,), dtype=torch.float32)
    if N == 0:
        return out
    R_PAD = max(16, next_pow2(R))
    A32 = lora_A.float()
    g = torch.zeros(R_PAD, R_PAD, dtype=torch.float32, device=lora_A.device)
    g[:R, :R] = A32 @ A32.T
    if dense:
        w = weight
        pointers = (w,) * 7
        meta = dict(BLOCKSIZE=64, NESTED=False, NESTED_BLOCKSIZE=1, ALIGNED=False)
        strides = (w.stride(0), w.stride(1))
    else:
        if N * K > MAX_ELEMENTS:
            raise ValueError(f"weight: {N * K} elements, over the int32-indexed kernel limit {MAX_ELEMENTS}")
        nf4_pointers, meta = nf4_tile_args(weight, K)
        w = nf4_pointers[0]
        pointers = (w, *nf4_pointers)
        strides = (0, 0)
    args = (*pointers, lora_A, lora_B, g, out, N, K, R, float(scaling), *strides,
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            dense, meta["BLOCKSIZE"], meta["NESTED"], meta["NESTED_BLOCKSIZE"], meta["ALIGNED"], not INTERPRET,
            R_PAD, BLOCK_N, BLOCK_K, "ieee" if INTERPRET else input_precision)
    launch(dora_norm_kernel, (cdiv(N, BLOCK_N),), args, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
           enable_fp_fusion=False)
    return out
