"""Triton kernels: the skinny products of a LoRA layer, one pass over the big operand each.

    project   out [M, r] = alpha * a_d [M, K] @ P.T          P [r, K]  (S = Xd @ A.T,  dS = s * dY @ B)
      + expand  y [M, N] = alpha_y * out @ E.T (+ bias)        E [N, r]  (s * S @ B.T + b,  dS @ A)
    reduce    out [r, K] = alpha * L.T [r, M] @ a_d [M, K]   L [M, r]  (dA = dS.T @ Xd,  dB.T = s * S.T @ dY)
    dual      dS [M, r] = alpha * dY @ B,  dB [N, r] = alpha * dY.T @ S     (both from one pass over dY [M, N])

``project`` with ``expand`` is the whole LoRA branch of a layer's forward (or of its dX) in one launch, reading
the adapters in their own dtype (peft keeps them in fp32) and rounding them to ``a``'s as they are read: what
the torch path does in five torch calls (two casts, two products, a transpose), each several µs of host time.

``a_d`` is ``a`` after the LoRA dropout when a ``keep`` mask is given: ``a_d = round(a * keep_scale) * keep``
(``keep`` bool, same shape as ``a``), so neither the mask nor ``Xd`` is ever materialized. ``r`` is tiny (the
LoRA rank), so both are memory-bound: time is the bytes of ``a`` (and ``keep``) read once.

``project`` gives every program ``BLOCK_M`` rows and loops over K (fp32 ``[BLOCK_M, R_PAD]`` accumulator).
``reduce`` reduces over M, which is long: a grid of K tiles times ``SPLIT_M`` slices of M, each slice writing
fp32 partial sums that a second pass adds in a fixed order (deterministic), scales and rounds. ``dual`` reads
each ``[BLOCK_M, BLOCK_N]`` tile of ``dY`` once for both of a layer's backward products over it: a grid of column
bands of ``BLOCK_N`` times slices of M; each program writes ``dS`` partial sums over its band (per row block) and
``dB`` partial sums over its slice, and the same fixed-order second pass adds each set.
Operands of ``tl.dot`` are fp32-upcast under the interpreter for bf16 (its bf16 dot is wrong). fp32 inputs
use full-precision FMA dots (``"ieee"``), or TF32 where torch allows it for fp32 matmuls; the kernels are
memory-bound either way.
"""

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.dot import dot
from lowrank_kernels.kernels.launch import INTERPRET, cdiv, launch, next_pow2, num_sms
from lowrank_kernels.kernels.rounding import round_fp32_to


@triton.jit
def _dropout(a, keep_ptr, offs_m, offs_k, stride_km, stride_kk, ok, keep_scale, HAS_KEEP: tl.constexpr):
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_k[None, :] * stride_kk, mask=ok, other=0)
        # round(a * keep_scale) * keep, the 0/1 mask multiplied (not selected): a NaN or inf in a dropped
        # position gives NaN, as torch's dropout (and the torch path) does
        a = (round_fp32_to(a.to(tl.float32) * keep_scale, a.dtype).to(tl.float32) * keep.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def project_kernel(a_ptr, p_ptr, keep_ptr, out_ptr, e_ptr, bias_ptr, y_ptr, M, K, R, N, alpha, keep_scale, alpha_y,
                   stride_am, stride_ak, stride_pr, stride_pk, stride_km, stride_kk, stride_om, stride_or,
                   stride_en, stride_er, stride_ym, stride_yn,
                   HAS_KEEP: tl.constexpr, EXPAND: tl.constexpr, KEEP_Y: tl.constexpr, HAS_BIAS: tl.constexpr,
                   R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``BLOCK_M * pid ..``: ``out = round(alpha * a_d @ round(P).T)`` over K; with ``EXPAND``, then
    ``y = round(alpha_y * out @ round(E).T + round(bias))`` over N, through the mask ``keep`` [M, N] when
    ``KEEP_Y`` (``round(round(y) * keep_scale) * keep``); ``HAS_KEEP``: the mask [M, K] applies to ``a``."""
    dtype: tl.constexpr = a_ptr.dtype.element_ty
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        ok = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=ok, other=0.0)
        a = _dropout(a, keep_ptr, offs_m, offs_k, stride_km, stride_kk, ok, keep_scale, HAS_KEEP)
        p = tl.load(p_ptr + offs_r[None, :] * stride_pr + offs_k[:, None] * stride_pk,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, R_PAD] = P.T tile
        acc = dot(a, round_fp32_to(p.to(tl.float32), dtype), acc, DOT_FP32, PRECISION)
    out = round_fp32_to(acc * alpha, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, out,
             mask=m_ok[:, None] & r_ok[None, :])
    if EXPAND:
        s = out.to(dtype)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            e = tl.load(e_ptr + offs_n[None, :] * stride_en + offs_r[:, None] * stride_er,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [R_PAD, BLOCK_N] = E.T tile
            y = dot(s, round_fp32_to(e.to(tl.float32), dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                    DOT_FP32, PRECISION) * alpha_y
            if HAS_BIAS:
                b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                y += round_fp32_to(b, dtype).to(tl.float32)[None, :]
            ok = m_ok[:, None] & n_ok[None, :]
            y = round_fp32_to(y, dtype)
            if KEEP_Y:
                y = _dropout(y, keep_ptr, offs_m, offs_n, stride_km, stride_kk, ok, keep_scale, True)
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y, mask=ok)


@triton.jit
def reduce_kernel(l_ptr, a_ptr, keep_ptr, ws_ptr, M, K, R, keep_scale, M_PER_SPLIT,
                  stride_lm, stride_lr, stride_am, stride_ak, stride_km, stride_kk,
                  HAS_KEEP: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """ws[split, r, k] = sum over this split's rows m of L[m, r] * a_d[m, k] (fp32)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < m_end
        ok = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=ok, other=0.0)
        a = _dropout(a, keep_ptr, offs_m, offs_k, stride_km, stride_kk, ok, keep_scale, HAS_KEEP)
        lt = tl.load(l_ptr + offs_m[None, :] * stride_lm + offs_r[:, None] * stride_lr,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # [R_PAD, BLOCK_M] = L.T tile
        acc = dot(lt, a, acc, DOT_FP32, PRECISION)
    ws = ws_ptr + split.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :]
    tl.store(ws, acc, mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def dual_kernel(dy_ptr, b_ptr, s_ptr, ws_ds_ptr, ws_db_ptr, M, N, R, M_PER_SPLIT,
                stride_ym, stride_yn, stride_bn, stride_br, stride_sm, stride_sr,
                R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    """For the band of columns ``BLOCK_N * pid(0) ..`` and this split's rows: ``ws_ds[band, m, r] = sum_n dY[m, n]
    * round(B[n, r])`` and ``ws_db[split, n, r] = sum_m dY[m, n] * round(S[m, r])`` (fp32), each dY tile read
    once."""
    dtype: tl.constexpr = dy_ptr.dtype.element_ty
    band = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = band * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    n_ok = offs_n < N
    r_ok = offs_r < R
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    b = round_fp32_to(b.to(tl.float32), dtype)  # [BLOCK_N, R_PAD]
    db = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < m_end
        y = tl.load(dy_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        sm = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        db = dot(tl.trans(y), round_fp32_to(sm.to(tl.float32), dtype), db, DOT_FP32, PRECISION)
        ds = dot(y, b, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), DOT_FP32, PRECISION)
        tl.store(ws_ds_ptr + band.to(tl.int64) * M * R + offs_m[:, None] * R + offs_r[None, :], ds,
                 mask=m_ok[:, None] & r_ok[None, :])
    tl.store(ws_db_ptr + split.to(tl.int64) * N * R + offs_n[:, None].to(tl.int64) * R + offs_r[None, :], db,
             mask=n_ok[:, None] & r_ok[None, :])


@triton.jit
def sum_splits_kernel(ws_ptr, out_ptr, total, alpha, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(ws_ptr + s * total + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, round_fp32_to(acc * alpha, out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- launchers
MAX_RANK = 256


def _keep_args(keep, a):
    if keep is None:
        return a, (0, 0)
    if keep.shape != a.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep: expected a bool mask of shape {tuple(a.shape)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    return keep.view(torch.uint8), (keep.stride(0), keep.stride(1))


def _precision(dtype, interpreting) -> str:
    if interpreting or dtype != torch.float32:
        return "ieee" if interpreting else "tf32"  # no effect on 16-bit dots
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rank_pad(R):
    if R > MAX_RANK:
        raise ValueError(f"rank {R} is above the supported maximum {MAX_RANK}")
    return max(16, next_pow2(R))


def lowrank_project(a, p, alpha=1.0, keep=None, keep_scale=1.0, out_dtype=None, *, expand=None, alpha_y=1.0,
                    bias=None, keep_y=False, block_m=None, block_k=None, block_n=None, num_warps=4, num_stages=4):
    """``alpha * a_d @ p.T``: ``a [M, K]`` (bf16 / fp16 / fp32), ``p [r, K]`` (any float dtype, rounded to
    ``a.dtype`` as it is read; any strides) -> ``[M, r]`` in ``out_dtype`` (default ``a.dtype``); ``a_d`` is
    ``a`` through the dropout mask ``keep`` (see module).

    ``expand=E [N, r]`` (any float dtype and strides): returns ``(y [M, N], out)`` with
    ``y = alpha_y * out @ E.T + bias`` (``bias [N]`` or ``None``) in ``a.dtype``, ``out`` then in ``a.dtype``; with
    ``keep_y`` the mask ``keep`` (shape ``[M, N]``) applies to ``y`` instead of ``a``.
    ``block_m``, ``block_k``, ``block_n``, ``num_warps``, ``num_stages``: tuning knobs
    (``experiments/sweep_large_m.py``)."""
    M, K = a.shape
    R = p.shape[0]
    r_pad = _rank_pad(R)
    if expand is not None:
        out_dtype = a.dtype
    out = torch.empty((M, R), dtype=out_dtype or a.dtype, device=a.device)
    N = 0 if expand is None else expand.shape[0]
    y = out if expand is None else torch.empty((M, N), dtype=a.dtype, device=a.device)
    if keep_y and expand is None:
        raise ValueError("keep_y: needs expand")
    keep_y = keep_y and keep is not None
    keep_arg, keep_strides = _keep_args(keep, y if keep_y else a)
    if M == 0:
        return out if expand is None else (y, out)
    block_m = block_m or (32 if M >= 32 * num_sms(a.device) else 16)
    block_k = block_k or (128 if r_pad <= 32 else 64)
    block_n = block_n or (128 if r_pad <= 32 else 64)
    has_bias = bias is not None
    if has_bias and not bias.is_contiguous():  # the kernel reads it as a contiguous [N] vector
        bias = bias.contiguous()
    e = p if expand is None else expand
    launch(project_kernel, (cdiv(M, block_m),),
           (a, p, keep_arg, out, e, bias if has_bias else a, y, M, K, R, N, float(alpha), float(keep_scale),
            float(alpha_y), a.stride(0), a.stride(1), p.stride(0), p.stride(1), *keep_strides, out.stride(0),
            out.stride(1), e.stride(0), e.stride(1), y.stride(0), y.stride(1),
            keep is not None and not keep_y, expand is not None, keep_y, has_bias,  # HAS_KEEP, .., HAS_BIAS
            r_pad, block_m, block_k, block_n,  # R_PAD, BLOCK_M, BLOCK_K, BLOCK_N
            INTERPRET and a.dtype == torch.bfloat16, _precision(a.dtype, INTERPRET)),  # DOT_FP32, PRECISION
           num_warps=num_warps, num_stages=num_stages)
    return out if expand is None else (y, out)


def lowrank_reduce(l, a, alpha=1.0, keep=None, keep_scale=1.0, out_dtype=torch.float32, split_m=None, *,
                   block_m=64, block_k=None, num_warps=4, num_stages=4):
    """``alpha * l.T @ a_d``: ``l [M, r]``, ``a [M, K]`` (same dtype, any strides) -> ``[r, K]`` in ``out_dtype``
    (fp32 by default: gradients are summed over all M in fp32 and rounded once). ``split_m``: slices of M
    (default: enough programs for about two waves). ``block_m``, ``block_k``, ``num_warps``, ``num_stages``:
    tuning knobs."""
    M, K = a.shape
    R = l.shape[1]
    r_pad = _rank_pad(R)
    out = torch.empty((R, K), dtype=out_dtype, device=a.device)
    if M == 0 or K == 0:
        return out.zero_()
    keep_arg, keep_strides = _keep_args(keep, a)
    block_k = block_k or (128 if r_pad <= 32 else 64)
    k_tiles = cdiv(K, block_k)
    if split_m is None:
        split_m = max(1, min(cdiv(2 * num_sms(a.device), k_tiles), cdiv(M, 4 * block_m), 64))
    m_per_split = cdiv(cdiv(M, split_m), block_m) * block_m
    split_m = cdiv(M, m_per_split)  # no empty slices
    ws = torch.empty((split_m, R, K), dtype=torch.float32, device=a.device)
    dot_fp32 = INTERPRET and a.dtype == torch.bfloat16
    launch(reduce_kernel, (k_tiles, split_m),
           (l, a, keep_arg, ws, M, K, R, float(keep_scale), m_per_split,
            l.stride(0), l.stride(1), a.stride(0), a.stride(1), *keep_strides,
            keep is not None, r_pad, block_m, block_k, dot_fp32,  # HAS_KEEP, R_PAD, BLOCK_M, BLOCK_K, DOT_FP32
            _precision(a.dtype, INTERPRET)),  # PRECISION
           num_warps=num_warps, num_stages=num_stages)
    block = 1024
    launch(sum_splits_kernel, (cdiv(R * K, block),), (ws, out, R * K, float(alpha), split_m, block), num_warps=4)
    return out


def lowrank_dual(dy, b, s, alpha=1.0, ds_dtype=None, db_dtype=torch.float32, split_m=None, *, block_m=None,
                 block_n=None, num_warps=4, num_stages=3):
    """``(dS, dB)`` = ``(alpha * dy @ b, alpha * dy.T @ s)`` from one pass over ``dy``: ``dy [M, N]`` (bf16 / fp16 /
    fp32, any strides), ``b [N, r]`` and ``s [M, r]`` (any float dtype, rounded to ``dy``'s as read) -> ``dS [M, r]``
    in ``ds_dtype`` (default ``dy.dtype``) and ``dB [N, r]`` in ``db_dtype`` (fp32 by default), each summed in fp32
    in a fixed order and rounded once. ``split_m``: slices of M (default: about two waves of programs);
    ``block_m``, ``block_n``, ``num_warps``, ``num_stages``: tuning knobs."""
    M, N = dy.shape
    R = b.shape[1]
    r_pad = _rank_pad(R)
    ds = torch.empty((M, R), dtype=ds_dtype or dy.dtype, device=dy.device)
    db = torch.empty((N, R), dtype=db_dtype, device=dy.device)
    if M == 0 or N == 0:
        return ds.zero_(), db.zero_()
    block_n = block_n or (256 if r_pad <= 32 else 128)  # 64 x 256, 4 warps: the fastest of 11 tiles at r = 16
    block_m = block_m or 64  # the fastest measured (docs/perf-log.md)
    bands = cdiv(N, block_n)
    if split_m is None:
        split_m = max(1, min(cdiv(2 * num_sms(dy.device), bands), cdiv(M, 4 * block_m), 64))
    m_per_split = cdiv(cdiv(M, split_m), block_m) * block_m
    split_m = cdiv(M, m_per_split)  # no empty slices
    ws_ds = torch.empty((bands, M, R), dtype=torch.float32, device=dy.device)
    ws_db = torch.empty((split_m, N, R), dtype=torch.float32, device=dy.device)
    dot_fp32 = INTERPRET and dy.dtype == torch.bfloat16
    launch(dual_kernel, (bands, split_m),
           (dy, b, s, ws_ds, ws_db, M, N, R, m_per_split, dy.stride(0), dy.stride(1), b.stride(0), b.stride(1),
            s.stride(0), s.stride(1), r_pad, block_m, block_n, dot_fp32, _precision(dy.dtype, INTERPRET)),
           num_warps=num_warps, num_stages=num_stages)
    block = 1024
    launch(sum_splits_kernel, (cdiv(M * R, block),), (ws_ds, ds, M * R, float(alpha), bands, block), num_warps=4)
    launch(sum_splits_kernel, (cdiv(N * R, block),), (ws_db, db, N * R, float(alpha), split_m, block), num_warps=4)
    return ds, db
