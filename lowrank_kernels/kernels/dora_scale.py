"""Triton kernels: DoRA's per-column scale of a layer output, forward and backward, one pass each.

    forward   y [M, N] = round(L * c + bias + R)                     L [M, N], c [N] (fp32 math, one rounding)
    backward  dL [M, N] = round(dY * c),  dc [N] = sum_m dY * L,  dbias [N] = sum_m dY    (dR = dY)

``L`` is the LoRA layer's product ``x @ W.T + s * (x @ A.T) @ B.T`` (with dropout, on the dropped ``x``),
``c = m / ||W + s B A||`` per output column; ``R [M, N]`` (optional) a product added unscaled (with dropout, DoRA's
``(x - Xd) @ W.T``: ``dora.dora_linear``). Written as torch ops (``(L * c).to(dtype)``: ``c`` fp32, so the product
is an fp32 ``[M, N]`` temporary; its backward another few) the scale costs several passes over ``[M, N]`` in
fp32; here the forward reads ``L`` (and ``R``) and writes ``y`` in their dtype, and the backward reads ``dY`` and
``L`` once and writes ``dL``.

A program owns a ``[BLOCK_M, BLOCK_N]`` tile of rows ``pid_m * ROWS ..`` (``ROWS = BLOCK_M * ROW_TILES``): it
walks its ``ROW_TILES`` tiles down the column band and, in the backward, writes the fp32 column sums of its rows to
``partial[pid_m, :]``; the caller adds those ``cdiv(M, ROWS)`` rows in a fixed order (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.launch import cdiv, launch
from lowrank_kernels.kernels.rounding import round_fp32_to


@triton.jit
def dora_scale_forward_kernel(l_ptr, c_ptr, bias_ptr, r_ptr, y_ptr, M, N, stride_lm, stride_ln, stride_rm, stride_rn,
                              stride_ym, stride_yn, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr):
    """``y = round(L * c + bias + R)`` over this program's rows and column band."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    c = tl.load(c_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    for t in range(ROW_TILES):
        offs_m = ((tl.program_id(0) * ROW_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = (offs_m < M)[:, None] & n_ok[None, :]
        v = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln, mask=ok, other=0.0)
        v = v.to(tl.float32) * c[None, :]
        if HAS_BIAS:
            v += b[None, :]
        if HAS_RESIDUAL:
            v += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=ok,
                         other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 round_fp32_to(v, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def dora_scale_backward_kernel(dy_ptr, l_ptr, c_ptr, dl_ptr, dc_part_ptr, db_part_ptr, M, N,
                               stride_dym, stride_dyn, stride_lm, stride_ln, stride_dlm, stride_dln,
                               NEED_DL: tl.constexpr, NEED_DC: tl.constexpr, NEED_DB: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr):
    """``dL = round(dY * c)`` and the fp32 column sums of ``dY * L`` / ``dY`` over this program's rows
    (``partial[pid_m, n]``)."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    c = tl.load(c_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    dc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(ROW_TILES):
        offs_m = ((pid_m * ROW_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = (offs_m < M)[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=ok,
                     other=0.0).to(tl.float32)
        if NEED_DL:
            tl.store(dl_ptr + offs_m[:, None] * stride_dlm + offs_n[None, :] * stride_dln,
                     round_fp32_to(dy * c[None, :], dl_ptr.dtype.element_ty), mask=ok)
        if NEED_DC:
            v = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln, mask=ok,
                        other=0.0).to(tl.float32)
            dc += tl.sum(dy * v, axis=0)
        if NEED_DB:
            db += tl.sum(dy, axis=0)
    if NEED_DC:
        tl.store(dc_part_ptr + pid_m * N + offs_n, dc, mask=n_ok)
    if NEED_DB:
        tl.store(db_part_ptr + pid_m * N + offs_n, db, mask=n_ok)


BLOCK_M, BLOCK_N, ROW_TILES, NUM_WARPS = 32, 128, 8, 4


def dora_scale_forward(L: torch.Tensor, c: torch.Tensor, bias, dtype: torch.dtype, residual=None) -> torch.Tensor:
    """``y [M, N]`` in ``dtype`` (module docstring). ``L [M, N]`` and ``residual [M, N]`` (or ``None``; any strides,
    bf16 / fp16 / fp32), ``c [N]`` and ``bias [N]`` (or ``None``) any float dtype, all on one CUDA device (or CPU
    under the interpreter)."""
    M, N = L.shape
    y = L.new_empty((M, N), dtype=dtype)
    if M == 0 or N == 0:
        return y
    has_bias, has_residual = bias is not None, residual is not None
    R = residual if has_residual else L
    args = (L, c, bias if has_bias else c, R, y, M, N, L.stride(0), L.stride(1), R.stride(0), R.stride(1),
            y.stride(0), y.stride(1), has_bias, has_residual, BLOCK_M, BLOCK_N, ROW_TILES)
    launch(dora_scale_forward_kernel, (cdiv(M, BLOCK_M * ROW_TILES), cdiv(N, BLOCK_N)), args, num_warps=NUM_WARPS)
    return y


def dora_scale_backward(dY: torch.Tensor, L: torch.Tensor, c: torch.Tensor, need_dL: bool, need_dc: bool,
                        need_db: bool):
    """``(dL [M, N] in L's dtype, dc [N] fp32, dbias [N] fp32)``, each ``None`` where not needed (module
    docstring). ``dY``, ``L`` ``[M, N]`` any strides; ``c [N]``."""
    M, N = L.shape
    dL = torch.empty_like(L, memory_format=torch.contiguous_format) if need_dL else None
    parts = cdiv(M, BLOCK_M * ROW_TILES)
    dc_part = L.new_empty((parts, N), dtype=torch.float32) if need_dc else None
    db_part = L.new_empty((parts, N), dtype=torch.float32) if need_db else None
    if M and N and (need_dL or need_dc or need_db):
        dl = dL if need_dL else L
        args = (dY, L, c, dl, dc_part if need_dc else c, db_part if need_db else c, M, N,
                dY.stride(0), dY.stride(1), L.stride(0), L.stride(1), dl.stride(0), dl.stride(1),
                need_dL, need_dc, need_db, BLOCK_M, BLOCK_N, ROW_TILES)
        launch(dora_scale_backward_kernel, (parts, cdiv(N, BLOCK_N)), args, num_warps=NUM_WARPS)
    zeros = lambda: L.new_zeros((N,), dtype=torch.float32)  # noqa: E731  (M == 0: empty sums)
    dc = (dc_part.sum(0) if M else zeros()) if need_dc else None
    db = (db_part.sum(0) if M else zeros()) if need_db else None
    return dL, dc, db
