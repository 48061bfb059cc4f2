"""Triton kernel: memory-bound NF4 GEMV / skinny GEMM for decode (M = 1 ... 16), LoRA and bias in the same kernel.

    y [M, N] = x [M, K] @ deq(W).T + lora_l [M, r] @ lora_r [r, N] (+ bias [N])      W [N, K] NF4

At M <= 16 the layer is a read of the 4-bit weight (4096 x 4096 with double quant: 8.4 MB of nibbles + 0.26 MB of
scales); the kernel is built to stream it once at HBM speed, and to keep the per-element work small enough that
instruction issue does not become the limit (at 2.5 TB/s an H100 SM must dequantize ~20 elements per clock).

Work decomposition
------------------
Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: program ``(i, s)`` owns rows ``[i*BLOCK_N, (i+1)*BLOCK_N)`` of W and the
``s``-th slice of K (a whole number of ``BLOCK_K`` chunks). Rows past ``N`` are clamped to ``N - 1`` (loads stay
unmasked and in bounds; those results are never stored). Each K step of a program:

* reads the ``[BLOCK_N, BLOCK_K // 2]`` uint8 tile of packed nibbles: every row is a contiguous run of
  ``BLOCK_K // 2`` bytes, so each thread issues 16-byte vector loads (with ``BLOCK_K = 256``, 4 warps and
  ``BLOCK_N = 32``: 4096 bytes per step, 32 bytes per thread, two ``LDG.128``); each weight byte is read once;
* reads the ``[BLOCK_N, max(1, BLOCK_K // blocksize)]`` first-level scales (uint8 when nested) and rebuilds the
  fp32 scale exactly as ``nf4_block_scale`` (``code2[q] * absmax2[b // 256] + offset``, no FMA contraction);
* dequantizes in registers: the high nibbles are the even K positions, the low nibbles the odd ones. The two
  halves are *not* interleaved back (no join / reshape of the big tile): the kernel computes
  ``acc += W_even @ x_even.T + W_odd @ x_odd.T`` with ``x`` split into its even and odd columns instead (the x
  tile ``[M_PAD, BLOCK_K]`` is tiny, loaded contiguous and split in registers);
  ``w = round_to_dtype(fp32(code[nibble] * am))``, bit-identical to ``NF4Weight.dequantize``; the 16-entry code
  lookup is a register-table ``tl.gather`` (shared memory / shuffles on the GPU, one conflict-free access per
  element) rather than a global-memory gather, which Triton's software pipeliner would otherwise turn into
  ``cp.async`` copies of 4 bytes per element;
* multiplies on tensor cores: ``tl.dot`` of the dequantized ``[BLOCK_N, BLOCK_K // 2]`` tiles (operand A, from
  registers) with ``x.T`` padded to ``M_PAD = 16`` columns, accumulating ``[BLOCK_N, M_PAD]`` in fp32. At M = 1
  the padding is free (tensor-core work is ~1 % of the issue slots); the alternative (broadcast-multiply and
  ``tl.sum``) costs ``M`` FMAs per weight element, which is already issue-bound at M = 2 and 16x too slow at M = 16.

LoRA and bias
-------------
``lora_l @ lora_r`` ([M, r] x [r, N], r <= 256, in chunks of 64 ranks) is one more ``tl.dot`` into the same fp32
accumulator tile: with ``SPLIT_K == 1`` in the main kernel after its K loop (one launch in all), otherwise in the
reduction pass. With ``SPLIT_K > 1`` each K slice stores its fp32 partial tile to a workspace ``[SPLIT_K, M, N]``
and ``nf4_gemv_reduce_kernel`` sums the slices in the fixed order 0, 1, ..., adds the LoRA term and the bias
and rounds to the output dtype: deterministic (no atomics).

Layouts outside the fast path
-----------------------------
The fast path (``ALIGNED``) needs ``K % blocksize == 0`` (so every row starts on a byte and on a scale block);
``EVEN_K`` (``K % BLOCK_K == 0``) further drops the K masks. Otherwise (odd K, blocks straddling rows) the even-
and odd-position elements of a tile row are read as two byte tiles starting at ``e0 >> 1`` and
``(e0 >> 1) + (e0 & 1)`` (``e0 = n*K + k0``) with the nibble picked by the row's parity, and the scales of the
(at most ``cdiv(BLOCK_K, blocksize) + 1``) blocks a tile row touches are selected per element: correct for any
``K`` and any blocksize, slower.

Indices: flat element indices ``n*K + k`` are int32 (``N*K`` is checked against ``MAX_ELEMENTS``); offsets into
x, y, the LoRA factors and the workspace are int64.

Interpreter (``TRITON_INTERPRET=1``): its ``tl.dot`` mishandles bf16, so bf16 operands are upcast (exactly) to
fp32 there (``DOT_FP32``). fp32 inputs use ``input_precision`` ``"tf32"`` when torch allows TF32 for fp32 matmuls,
else ``"tf32x3"`` (pass ``input_precision="ieee"`` for exact fp32 products).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.nf4_dequant import nf4_block_scale
from lowrank_kernels.kernels.rounding import round_fp32_to

MAX_ELEMENTS = 2**31 - 2**16  # int32 flat element indices n*K + k (with a tile's overhang)
MAX_M = 64  # M_PAD <= 64; the design point is M <= 16
MAX_RANK_CHUNK = 64  # LoRA ranks per tl.dot


LOOKUP = tl.constexpr(int(os.environ.get("GEMV_LOOKUP", "0")))


@triton.jit
def _code_lookup(code_tbl, code_ptr, nib, BLOCK_N: tl.constexpr):
    """``code[nib]`` for a ``[BLOCK_N, C]`` tensor of nibbles."""
    if LOOKUP == 1:
        return tl.gather(tl.broadcast_to(code_tbl[None, :], (BLOCK_N, 16)), nib, axis=1)
    elif LOOKUP == 2:
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        b3 = (nib & 8) != 0
        c0 = tl.where(b0, -0.6961928009986877, -1.0)
        c1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
        c2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
        c3 = tl.where(b0, 0.0, -0.09105003625154495)
        c4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
        c5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
        c6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
        c7 = tl.where(b0, 1.0, 0.7229568362236023)
        d0 = tl.where(b1, c1, c0)
        d1 = tl.where(b1, c3, c2)
        d2 = tl.where(b1, c5, c4)
        d3 = tl.where(b1, c7, c6)
        e0 = tl.where(b2, d1, d0)
        e1 = tl.where(b2, d3, d2)
        return tl.where(b3, e1, e0)
    else:
        return tl.load(code_ptr + nib)


@triton.jit
def _nf4_even_odd(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, code_tbl, rows, k0, K,
                  dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """``(W[rows, k0 + 2j], W[rows, k0 + 2j + 1])`` for ``j < BLOCK_K // 2``: two ``[BLOCK_N, BLOCK_K // 2]``
    tiles dequantized to ``dtype`` (0 past K). ``rows`` are valid (clamped) row indices."""
    HALF: tl.constexpr = BLOCK_K // 2
    j = tl.arange(0, HALF)
    row_elem = rows * K  # [BLOCK_N] flat index of W[n, 0] (int32; the launcher checks N*K)
    if ALIGNED:
        # K % BLOCKSIZE == 0 (so K is even): row n starts at byte n*K/2 and at block n*K/BLOCKSIZE.
        kb = k0 // 2 + j
        ptrs = packed_ptr + (row_elem // 2)[:, None] + kb[None, :]
        if EVEN_K:
            byte = tl.load(ptrs)
        else:
            byte = tl.load(ptrs, mask=(kb < K // 2)[None, :], other=0)
        byte = byte.to(tl.int32)
        if BLOCK_K <= BLOCKSIZE:  # one scale per tile row
            am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (row_elem + k0) // BLOCKSIZE,
                                 rows >= 0, NESTED, NESTED_BLOCKSIZE)
            am_b = am[:, None]
        else:  # SPT scales per tile row, each covering BLOCKSIZE // 2 consecutive bytes
            SPT: tl.constexpr = BLOCK_K // BLOCKSIZE
            t = tl.arange(0, SPT)
            blk = ((row_elem + k0) // BLOCKSIZE)[:, None] + t[None, :]
            if EVEN_K:
                s_ok = blk >= 0
            else:
                s_ok = (k0 + t * BLOCKSIZE < K)[None, :] & (rows >= 0)[:, None]
            am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, s_ok, NESTED,
                                 NESTED_BLOCKSIZE)
            am_b = tl.reshape(tl.broadcast_to(am[:, :, None], (BLOCK_N, SPT, BLOCKSIZE // 2)), (BLOCK_N, HALF))
        w_ev = round_fp32_to(_code_lookup(code_tbl, code_ptr, byte >> 4, BLOCK_N) * am_b, dtype)
        w_od = round_fp32_to(_code_lookup(code_tbl, code_ptr, byte & 0xF, BLOCK_N) * am_b, dtype)
    else:
        # Any K: a tile row may start on a low nibble (odd n*K + k0) and cross scale blocks anywhere.
        NB: tl.constexpr = (BLOCK_K + BLOCKSIZE - 1) // BLOCKSIZE + 1  # scale blocks one tile row can touch
        e0 = row_elem + k0
        p = e0 & 1
        ok_ev = (k0 + 2 * j < K)[None, :] & (rows >= 0)[:, None]
        ok_od = (k0 + 2 * j + 1 < K)[None, :] & (rows >= 0)[:, None]
        byte0 = e0 >> 1
        b_ev = tl.load(packed_ptr + byte0[:, None] + j[None, :], mask=ok_ev, other=0).to(tl.int32)
        b_od = tl.load(packed_ptr + (byte0 + p)[:, None] + j[None, :], mask=ok_od, other=0).to(tl.int32)
        nib_ev = (b_ev >> ((1 - p) * 4)[:, None]) & 0xF  # p == 0: high nibble; p == 1: low nibble
        nib_od = (b_od >> (p * 4)[:, None]) & 0xF
        first = e0 % BLOCKSIZE
        blk0 = e0 // BLOCKSIZE
        rel_ev = (first[:, None] + 2 * j[None, :]) // BLOCKSIZE
        rel_od = (first[:, None] + 2 * j[None, :] + 1) // BLOCKSIZE
        am_ev = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        am_od = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        for t in tl.static_range(NB):
            am_t = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk0 + t,
                                   t * BLOCKSIZE < first + (K - k0), NESTED, NESTED_BLOCKSIZE)
            am_ev = tl.where(rel_ev == t, am_t[:, None], am_ev)
            am_od = tl.where(rel_od == t, am_t[:, None], am_od)
        w_ev = round_fp32_to(_code_lookup(code_tbl, code_ptr, nib_ev, BLOCK_N) * am_ev, dtype)
        w_od = round_fp32_to(_code_lookup(code_tbl, code_ptr, nib_od, BLOCK_N) * am_od, dtype)
    return w_ev, w_od


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _add_lora(acc, l_ptr, r_ptr, offs_m64, m_ok, offs_n64, n_ok, R, stride_lm, stride_lr, stride_rr, stride_rn,
              BLOCK_N: tl.constexpr, M_PAD: tl.constexpr, R_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """``acc [BLOCK_N, M_PAD] += (lora_l @ lora_r)ᵀ`` tile, ``R_BLOCK`` ranks per ``tl.dot``."""
    for r0 in range(0, R, R_BLOCK):
        offs_r = r0 + tl.arange(0, R_BLOCK)
        r_ok = offs_r < R
        lt = tl.load(l_ptr + offs_m64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [M_PAD, R_BLOCK]
        rt = tl.load(r_ptr + offs_n64[:, None] * stride_rn + offs_r[None, :] * stride_rr,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, R_BLOCK]
        acc = _dot(rt, tl.trans(lt), acc, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def nf4_gemv_kernel(
    x_ptr,  # [M, K] bf16 / fp16 / fp32 (any strides)
    packed_ptr,  # uint8 [(N*K + 1) // 2]
    absmax_ptr,  # uint8 [nblocks] when NESTED, else fp32 [nblocks]
    absmax2_ptr, code2_ptr, offset_ptr,  # NESTED only (dummies otherwise)
    code_ptr,  # fp32 [16]
    l_ptr,  # [M, r] x dtype
    r_ptr,  # [r, N] x dtype (any strides)
    bias_ptr,  # [N] (HAS_BIAS only)
    y_ptr,  # [M, N] (SPLIT_K == 1)
    ws_ptr,  # fp32 [SPLIT_K, M, N] (SPLIT_K > 1)
    M, N, K, R,
    stride_xm, stride_xk, stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn,
    K_PER_SPLIT,  # multiple of BLOCK_K
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    M_PAD: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked, in-bounds weight loads
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    x_rows = x_ptr + offs_m64[:, None] * stride_xm  # [M_PAD, 1]
    code_tbl = tl.load(code_ptr + tl.arange(0, 16))

    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)  # outᵀ tile
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_ev, w_od = _nf4_even_odd(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, code_tbl, rows, k0,
                                   K, dtype, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, ALIGNED, EVEN_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = m_ok[:, None]
        else:
            x_mask = m_ok[:, None] & (offs_k < K)[None, :]
        xt = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=x_mask, other=0.0)
        x_ev, x_od = tl.split(tl.reshape(xt, (M_PAD, HALF, 2)))
        acc = _dot(w_ev, tl.trans(x_ev), acc, DOT_FP32, INPUT_PRECISION)
        acc = _dot(w_od, tl.trans(x_od), acc, DOT_FP32, INPUT_PRECISION)

    offs_n64 = offs_n.to(tl.int64)
    out_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        acc = _add_lora(acc, l_ptr, r_ptr, offs_m64, m_ok, offs_n64, n_ok, R, stride_lm, stride_lr, stride_rr,
                        stride_rn, BLOCK_N, M_PAD, R_BLOCK, DOT_FP32, INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_n64[:, None] * stride_yn + offs_m64[None, :] * stride_ym,
                 round_fp32_to(acc, y_ptr.dtype.element_ty), mask=out_ok)
    else:
        ws = ws_ptr + pid_k.to(tl.int64) * M * N + offs_m64[None, :] * N + offs_n64[:, None]
        tl.store(ws, acc, mask=out_ok)


@triton.jit
def nf4_gemv_reduce_kernel(ws_ptr, l_ptr, r_ptr, bias_ptr, y_ptr, M, N, R,
                           stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn,
                           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                           R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """``y = round(ws[0] + ws[1] + ... + ws[SPLIT_K - 1] + lora_l @ lora_r + bias)``, in that order, for a
    ``[M, BLOCK_N]`` column tile of ``y``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    offs_n64 = offs_n.to(tl.int64)
    offs_m64 = offs_m.to(tl.int64)
    out_ok = n_ok[:, None] & m_ok[None, :]
    ws = ws_ptr + offs_m64[None, :] * N + offs_n64[:, None]
    acc = tl.load(ws, mask=out_ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws + s * M * N, mask=out_ok, other=0.0)
    acc = _add_lora(acc, l_ptr, r_ptr, offs_m64, m_ok, offs_n64, n_ok, R, stride_lm, stride_lr, stride_rr,
                    stride_rn, BLOCK_N, M_PAD, R_BLOCK, DOT_FP32, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_n64[:, None] * stride_yn + offs_m64[None, :] * stride_ym,
             round_fp32_to(acc, y_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------- launcher
REDUCE_BLOCK_N = 64


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only shapes the (interpreted) grid on CPU


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands (16-bit operands ignore it): ``"tf32"`` where torch allows TF32
    for fp32 matmuls, else ``"tf32x3"`` (about fp32 accuracy, on tensor cores)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def default_config(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16, num_sms: int = 132) -> dict:
    """Launch configuration ``dict(block_n, block_k, split_k, num_warps, num_stages)`` for ``y [M, N]``.

    UNTUNED: reasoned defaults for the H100 until ``scripts/bench_gemv.py`` has been run there. The aim is a
    grid of about four resident 4-warp programs per SM (enough bytes in flight to cover HBM latency) with every
    program streaming long contiguous row segments:
    ``block_n = 32``, ``block_k = 256`` (fp32: 128), 4 warps, 3 stages, and ``split_k`` the smallest split that
    gives ``cdiv(N, block_n) * split_k >= 4 * num_sms`` programs, capped at 8 and at ``K / (2 * block_k)``.
    (4096 x 4096: 128 row blocks x split 4; 4096 -> 14336: 448 x 1; 14336 -> 4096: 128 x 4.)
    """
    block_n = 32
    block_k = 128 if dtype == torch.float32 else 256
    row_blocks = triton.cdiv(N, block_n)
    k_iters = triton.cdiv(K, block_k)
    split_k = max(1, min(triton.cdiv(4 * num_sms, row_blocks), 8, k_iters // 2))
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=3)


def _check_pow2(name, v, lo, hi):
    if not isinstance(v, int) or v < lo or v > hi or v & (v - 1):
        raise ValueError(f"nf4_gemv: {name} must be a power of two in [{lo}, {hi}], got {v!r}")


def nf4_gemv(x, nf4, lora_l, lora_r, bias=None, *, block_n=None, block_k=None, split_k=None, num_warps=None,
             num_stages=None, input_precision=None):
    """``y [M, N] = x @ deq(W).T + lora_l @ lora_r + bias`` in ``x.dtype`` (decode-sized ``M``; see the module doc).

    ``x [M, K]`` (bf16 / fp16 / fp32, any strides, ``M <= 64``, built for ``M <= 16``); ``nf4``: the NF4 state of
    ``W [N, K]`` as ``dispatch._nf4_state`` gives it (``packed``, ``absmax``, ``code``, ``blocksize``, ``shape``
    and, when double-quantized, ``absmax2``, ``code2``, ``offset``, ``nested_blocksize``); ``lora_l [M, r]``
    (``= s * S``) and ``lora_r [r, N]`` (``= B.T``, any strides) in ``x.dtype``; ``bias [N]`` or ``None``.
    Launch knobs (``None``: :func:`default_config`): ``block_n`` (W rows per program, power of two >= 16),
    ``block_k`` (K per step, power of two >= 32), ``split_k`` (K slices; > 1 adds a reduction pass),
    ``num_warps``, ``num_stages``; ``input_precision`` of fp32 dots (``"ieee"``, ``"tf32"``, ``"tf32x3"``).
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    M, K = x.shape
    dtype = x.dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {dtype}")
    if M > MAX_M:
        raise ValueError(f"x: nf4_gemv handles M <= {MAX_M} rows (decode); got M={M}")
    shape = tuple(nf4["shape"])
    if len(shape) != 2 or shape[1] != K:
        raise ValueError(f"nf4: weight shape {shape} does not fit x of shape {tuple(x.shape)} (expected [N, {K}])")
    N = shape[0]
    if N * K > MAX_ELEMENTS:
        raise ValueError(f"weight: {N * K} elements, over the int32-indexed kernel limit {MAX_ELEMENTS}")
    if lora_l.dim() != 2 or lora_r.dim() != 2 or lora_l.shape[0] != M or lora_r.shape != (lora_l.shape[1], N):
        raise ValueError(f"lora_l {tuple(lora_l.shape)} / lora_r {tuple(lora_r.shape)}: expected [{M}, r] and [r, {N}]")
    if lora_l.dtype != dtype or lora_r.dtype != dtype:
        raise TypeError(f"lora_l / lora_r: expected {dtype}, got {lora_l.dtype} / {lora_r.dtype}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != dtype):
        raise ValueError(f"bias: expected a [{N}] {dtype} tensor, got {tuple(bias.shape)} {bias.dtype}")
    R = lora_l.shape[1]

    cfg = default_config(M, N, K, dtype, _num_sms(x.device))
    for key, v in dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                       num_stages=num_stages).items():
        if v is not None:
            cfg[key] = v
    _check_pow2("block_n", cfg["block_n"], 16, 1024)
    _check_pow2("block_k", cfg["block_k"], 32, 4096)
    for key in ("split_k", "num_warps", "num_stages"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"nf4_gemv: {key} must be a positive int, got {cfg[key]!r}")
    precision = input_precision or default_input_precision(dtype)

    y = x.new_empty((M, N))
    if M == 0 or N == 0:
        return y

    blocksize = nf4["blocksize"]
    nested = nf4.get("absmax2") is not None
    code = nf4["code"]
    w_args = (nf4["packed"], nf4["absmax"], nf4["absmax2"] if nested else code, nf4["code2"] if nested else code,
              nf4["offset"].reshape(1) if nested else code, code)

    block_k = cfg["block_k"]
    k_iters = triton.cdiv(K, block_k)
    iters_per_split = triton.cdiv(k_iters, cfg["split_k"]) if k_iters else 1
    n_split = max(1, triton.cdiv(k_iters, iters_per_split))  # no empty slices
    aligned = K % blocksize == 0
    m_pad = max(16, triton.next_power_of_2(M))
    r_block = max(16, min(MAX_RANK_CHUNK, triton.next_power_of_2(max(R, 1))))
    dot_fp32 = _interpreting() and dtype == torch.bfloat16
    has_bias = bias is not None
    bias_arg = bias if has_bias else x
    ws = torch.empty((n_split, M, N), dtype=torch.float32, device=x.device) if n_split > 1 else y

    nf4_gemv_kernel[(triton.cdiv(N, cfg["block_n"]), n_split)](
        x, *w_args, lora_l, lora_r, bias_arg, y, ws,
        M, N, K, R,
        x.stride(0), x.stride(1), lora_l.stride(0), lora_l.stride(1), lora_r.stride(0), lora_r.stride(1),
        y.stride(0), y.stride(1),
        iters_per_split * block_k,
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nf4["nested_blocksize"] if nested else 1,
        ALIGNED=aligned, EVEN_K=aligned and K % block_k == 0, HAS_BIAS=has_bias,
        M_PAD=m_pad, R_BLOCK=r_block, BLOCK_N=cfg["block_n"], BLOCK_K=block_k, SPLIT_K=n_split,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
    )
    if n_split > 1:
        nf4_gemv_reduce_kernel[(triton.cdiv(N, REDUCE_BLOCK_N),)](
            ws, lora_l, lora_r, bias_arg, y, M, N, R,
            lora_l.stride(0), lora_l.stride(1), lora_r.stride(0), lora_r.stride(1), y.stride(0), y.stride(1),
            SPLIT_K=n_split, HAS_BIAS=has_bias, M_PAD=m_pad, R_BLOCK=r_block, BLOCK_N=REDUCE_BLOCK_N,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision, num_warps=4, enable_fp_fusion=False,
        )
    return y
