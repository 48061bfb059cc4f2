"""Triton kernel: memory-bound NF4 GEMV / skinny GEMM for decode (M = 1 ... 16), LoRA and bias in the same kernel.

    y [M, N] = x [M, K] @ deq(W).T + lora_l [M, r] @ lora_r [r, N] (+ bias [N])      W [N, K] NF4

At M <= 16 the layer is one read of the 4-bit weight (4096 x 4096 with double quant: 8.4 MB of nibbles + 0.26 MB
of scales). Streaming it at ~2.5 TB/s means every H100 SM must dequantize ~20 weight elements per clock, against
an issue rate of 128 thread-instructions per clock: the kernel is designed around *instructions per weight
element* as much as around bytes. (Counts below are from the sm_90 SASS of the loop, compiled offline.)

Work decomposition
------------------
Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: program ``(i, s)`` owns rows ``[i*BLOCK_N, (i+1)*BLOCK_N)`` of W and the
``s``-th slice of K (a whole number of ``BLOCK_K`` chunks). Rows past ``N`` are clamped to ``N - 1`` (loads stay
in bounds and unmasked; those results are never stored).

Fast path (``WORDS``: ``K % blocksize == 0``, ``BLOCK_K >= 128``): each K step reads the ``[BLOCK_N, BLOCK_K // 8]``
tile of packed 32-bit words (8 nibbles each; every row a contiguous run of ``BLOCK_K // 2`` bytes; Triton lays the
load out in the wgmma operand layout, so each thread issues 8-byte loads of 2 words and a warp covers whole 32-byte
sectors; every weight byte is read once) plus its ``[BLOCK_N, max(1, BLOCK_K // blocksize)]`` first-level scales.
The next step's words, scales and x tile are loaded before the current step is computed (a register double
buffer: the HBM latency of step ``i + 1`` hides behind the arithmetic of step ``i``, without the shared-memory round
trip of ``num_stages`` pipelining, which costs 6-15 % more instructions here).

Dequantization, bit-identical to ``NF4Weight.dequantize`` / bitsandbytes' ``dequantize_4bit``:
``am = fp32(fp32(code2[q] * absmax2[b // 256]) + offset)`` (no FMA contraction: ``enable_fp_fusion=False``),
``w = round_to_dtype(fp32(code[nibble] * am))``. The 16-entry code lookup is a warp shuffle (inline PTX): lane ``l``
holds ``code[l % 16]`` and ``shfl.sync.idx`` with segment mask 16 reads lane ``(l & 16) | (b & 15)``, so a nibble
needs one shift and no mask (7 shifts + 8 shuffles per word). The alternatives, compiled for sm_90 and counted:
a global-memory gather ``tl.load(code + nibble)`` (kept as ``lookup="load"``; the interpreter, which cannot run
inline PTX, always uses it) costs ~3.5 more SASS instructions per element (64-bit address arithmetic, byte
extraction; with ``num_stages > 1`` Triton also turns it into 4-byte ``cp.async`` copies); a ``tl.where`` tree
~20 more; Triton's ``tl.gather`` on a register table lowers to 8 shuffles + selects per element. With the default
config the loop is ~5.35 SASS instructions per weight element (1 shuffle, 0.9 shift, 1 FMUL, 0.5 bf16x2 pack, the
rest x operand staging, wgmma, loads) against ~9.0 with the global gather.

The product uses tensor cores: ``tl.dot`` of each dequantized ``[BLOCK_N, BLOCK_K // 8]`` tile (the A operand,
produced directly in the wgmma register layout: no shared-memory copy of W) with ``x.T`` padded to
``M_PAD = max(8, next_pow2(M))`` columns (wgmma's n = 8; 16 costs 7 % more instructions and 40 % more registers),
accumulating ``[BLOCK_N, M_PAD]`` in fp32. The 8 nibble positions of a word are kept apart: tile ``e`` holds
elements ``k0 + 8c + e`` and is multiplied with the matching strided columns of x (the x tile is loaded contiguous
and split in registers), so W is never interleaved. At M = 1 the padding costs little; broadcast-multiply +
``tl.sum`` would instead cost ``M`` FMAs per element (already more than the whole dequantization at M = 4).

Generic path (any K: odd K, blocks straddling rows, ``BLOCK_K < 128``): a tile row's even- and odd-position
elements are read as two byte tiles starting at byte ``e0 >> 1`` and ``(e0 >> 1) + (e0 & 1)``
(``e0 = n*K + k0``), the nibble picked by the row's parity, and the scales of the (at most
``cdiv(BLOCK_K, blocksize) + 1``) blocks a tile row touches are selected per element. Correct, slower.

LoRA and bias
-------------
``lora_l @ lora_r`` (``[M, r] x [r, N]``, ``r <= 256`` in chunks of 64 ranks) is one more ``tl.dot`` into the fp32
accumulator tile: with ``SPLIT_K == 1`` in the main kernel after its K loop (one launch in all), otherwise in the
reduction pass. With ``SPLIT_K > 1`` (``PARTIAL``) every K slice stores its fp32 partial tile to a workspace
``[SPLIT_K, M, N]`` and ``nf4_gemv_reduce_kernel`` sums the slices in the fixed order 0, 1, ..., adds the LoRA term
and the bias and rounds to the output dtype: deterministic (no atomics), at the price of a second launch.

Indices: flat element indices ``n*K + k`` are int32 (``N*K`` is checked against ``MAX_ELEMENTS``); offsets into
x, y, the LoRA factors and the workspace are int64.

Interpreter (``TRITON_INTERPRET=1``): the lookup is the global gather (no inline PTX there), and bf16 dot operands
are upcast (exactly) to fp32 because its ``tl.dot`` mishandles bf16 (``DOT_FP32``). fp32 inputs use
``input_precision`` ``"tf32"`` when torch allows TF32 for fp32 matmuls, else ``"ieee"`` (exact).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.dot import dot as _dot
from lowrank_kernels.kernels.nf4_dequant import nf4_tile_even_odd
from lowrank_kernels.kernels.rounding import round_fp32_to

MAX_ELEMENTS = 2**31 - 2**16  # int32 flat element indices n*K + k (with a tile's overhang)
MAX_M = 64  # M_PAD <= 64; the design point is M <= 16
MAX_RANK_CHUNK = 64  # LoRA ranks per tl.dot
LOOKUPS = ("shfl", "load")

# NF4 code lookup by warp shuffle. Input $8: a packed word; its elements 0..7 sit in nibbles [4:8), [0:4), [12:16),
# [8:12), [20:24), [16:20), [28:32), [24:28) (element 2j is the high nibble of byte j). Input $9: the address of the
# fp32 code table; each lane loads code[lane % 16] (ptxas keeps one such load per loop iteration for all blocks).
# shfl.sync.idx with c = 0x101f (segment mask 0x10, as CUDA's __shfl_sync(..., width=16) encodes it) reads lane
# (lane & 16) | (b & 15): the bits of b above the nibble are ignored, so no masking. Outputs $0..$7: code[element
# 0..7]. All 32 lanes execute it (the kernel has no divergent control flow around it), and the result does not
# depend on which lane holds which element, so Triton may place it in any layout.
_SHFL_LOOKUP_ASM = tl.constexpr("""
{
.reg .b32 ln, tb, s;
.reg .b64 ad;
mov.u32 ln, %laneid;
and.b32 ln, ln, 15;
mul.wide.u32 ad, ln, 4;
add.s64 ad, ad, $9;
ld.global.nc.b32 tb, [ad];
shr.u32 s, $8, 4;
shfl.sync.idx.b32 $0, tb, s, 0x101f, -1;
shfl.sync.idx.b32 $1, tb, $8, 0x101f, -1;
shr.u32 s, $8, 12;
shfl.sync.idx.b32 $2, tb, s, 0x101f, -1;
shr.u32 s, $8, 8;
shfl.sync.idx.b32 $3, tb, s, 0x101f, -1;
shr.u32 s, $8, 20;
shfl.sync.idx.b32 $4, tb, s, 0x101f, -1;
shr.u32 s, $8, 16;
shfl.sync.idx.b32 $5, tb, s, 0x101f, -1;
shr.u32 s, $8, 28;
shfl.sync.idx.b32 $6, tb, s, 0x101f, -1;
shr.u32 s, $8, 24;
shfl.sync.idx.b32 $7, tb, s, 0x101f, -1;
}
""")


# ---------------------------------------------------------------------------------------------- fast path
@triton.jit
def _load_words(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, k0, K, live,
                BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr):
    """The loads of one K step: packed words ``[BLOCK_N, SPT, WPS]`` (``SPT`` scale blocks per tile row, ``WPS``
    words per block part) and the raw scales ``[BLOCK_N, SPT]`` (``q`` and ``absmax2`` when nested, else fp32
    ``absmax`` twice). ``live``: scalar, False for the prefetch past the last step (nothing is read)."""
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    SPT: tl.constexpr = BLOCK_K // SUBK
    WPS: tl.constexpr = SUBK // 8
    t = tl.arange(0, SPT)
    kw = k0 // 8 + t[:, None] * WPS + tl.arange(0, WPS)[None, :]  # [SPT, WPS] word column
    row_word = row_blk * (BLOCKSIZE // 8)  # = n*K/8, a multiple of 4 words: 16-byte aligned rows
    ptrs = packed_ptr.to(tl.pointer_type(tl.uint32)) + row_word[:, None, None] + kw[None, :, :]
    blk = row_blk[:, None] + (k0 // BLOCKSIZE + t)[None, :]
    # live & ... through tl.full: a uniform mask keeps the vector loads (and the interpreter wants tensor masks)
    w_ok = tl.full((1, SPT, WPS), 1, tl.int1) & live
    s_ok = tl.full((1, SPT), 1, tl.int1) & live
    if EVEN_K:
        w = tl.load(ptrs, mask=w_ok)
    else:
        w = tl.load(ptrs, mask=w_ok & (kw < K // 8)[None, :, :], other=0)
        s_ok = s_ok & (k0 + t * SUBK < K)[None, :]
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=s_ok, other=0)
        s2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=s_ok, other=0.0)
    else:
        q = tl.load(absmax_ptr + blk, mask=s_ok, other=0.0)
        s2 = q
    return w, q, s2


@triton.jit
def _nib_load(nibs, byte: tl.constexpr, code_ptr):
    """``code[nibble]`` for the nibble in byte ``byte`` of each word of ``nibs`` (global-memory gather)."""
    if byte == 0:
        nib = nibs & 0xFF
    elif byte == 3:
        nib = nibs >> 24
    else:
        nib = (nibs >> (8 * byte)) & 0xFF
    return tl.load(code_ptr + nib)


@triton.jit
def _deq(c, am, dtype: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr):
    return tl.reshape(round_fp32_to(c * am, dtype), (BLOCK_N, C))


@triton.jit
def _dequant_words(w, q, s2, code2_ptr, offset, code_ptr, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NESTED: tl.constexpr, SHFL: tl.constexpr):
    """The 8 ``[BLOCK_N, BLOCK_K // 8]`` tiles of one K step in ``dtype``; tile ``e`` holds elements ``k0 + 8c + e``."""
    C: tl.constexpr = BLOCK_K // 8
    if NESTED:
        am = tl.load(code2_ptr + q.to(tl.int32)) * s2 + offset  # two fp32 roundings (no FMA contraction)
    else:
        am = q
    am = am[:, :, None]
    if SHFL:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            asm=_SHFL_LOOKUP_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,l",
            args=[w, code_ptr.to(tl.int64)], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        hi = (w >> 4) & 0x0F0F0F0F  # elements 0, 2, 4, 6, one per byte
        lo = w & 0x0F0F0F0F  # elements 1, 3, 5, 7
        c0 = _nib_load(hi, 0, code_ptr)
        c1 = _nib_load(lo, 0, code_ptr)
        c2 = _nib_load(hi, 1, code_ptr)
        c3 = _nib_load(lo, 1, code_ptr)
        c4 = _nib_load(hi, 2, code_ptr)
        c5 = _nib_load(lo, 2, code_ptr)
        c6 = _nib_load(hi, 3, code_ptr)
        c7 = _nib_load(lo, 3, code_ptr)
    return (_deq(c0, am, dtype, BLOCK_N, C), _deq(c1, am, dtype, BLOCK_N, C), _deq(c2, am, dtype, BLOCK_N, C),
            _deq(c3, am, dtype, BLOCK_N, C), _deq(c4, am, dtype, BLOCK_N, C), _deq(c5, am, dtype, BLOCK_N, C),
            _deq(c6, am, dtype, BLOCK_N, C), _deq(c7, am, dtype, BLOCK_N, C))


@triton.jit
def _load_step(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, x_rows, stride_xk, m_ok, k0, k_end, K,
               BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
               EVEN_K: tl.constexpr):
    """The packed words, scales and ``[M_PAD, BLOCK_K]`` x tile of the K step at ``k0`` (nothing past ``k_end``)."""
    live = k0 < k_end
    w, q, s2 = _load_words(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, k0, K, live,
                           BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, EVEN_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x_ok = m_ok[:, None] & (tl.full((1, BLOCK_K), 1, tl.int1) & live)
    if not EVEN_K:
        x_ok = x_ok & (offs_k < K)[None, :]
    x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=x_ok, other=0.0)
    return w, q, s2, x


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _add_lora(acc, l_ptr, r_ptr, offs_m64, m_ok, offs_n64, n_ok, R, stride_lm, stride_lr, stride_rr, stride_rn,
              R_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
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
    y_ptr,  # [M, N] (not PARTIAL)
    ws_ptr,  # fp32 [n_split, M, N] (PARTIAL)
    M, N, K, R,
    stride_xm, stride_xk, stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn,
    K_PER_SPLIT,  # multiple of BLOCK_K
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    WORDS: tl.constexpr, EVEN_K: tl.constexpr, SHFL: tl.constexpr, HAS_BIAS: tl.constexpr,
    M_PAD: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PARTIAL: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``PARTIAL``: more than one K slice; store the fp32 partial tile to the workspace (LoRA and bias are added by
    the reduction pass), else finish the tile here."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1)  # clamped: in-bounds, unmasked weight loads
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    x_rows = x_ptr + offs_m64[:, None] * stride_xm  # [M_PAD, 1]

    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)  # outᵀ tile
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    if WORDS:
        C: tl.constexpr = BLOCK_K // 8
        row_blk = rows * (K // BLOCKSIZE)  # scale block of W[n, 0]
        offset = 0.0
        if NESTED:
            offset = tl.load(offset_ptr)
        # register double buffer: step k0 + BLOCK_K is loaded while step k0 is computed
        w_n, q_n, s2_n, x_n = _load_step(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, x_rows, stride_xk, m_ok,
                                         k_start, k_end, K, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, EVEN_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            w_c, q_c, s2_c, x_c = w_n, q_n, s2_n, x_n
            w_n, q_n, s2_n, x_n = _load_step(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, x_rows, stride_xk, m_ok,
                                             k0 + BLOCK_K, k_end, K, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
                                             EVEN_K)

            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant_words(w_c, q_c, s2_c, code2_ptr, offset, code_ptr, dtype,
                                                            BLOCK_N, BLOCK_K, NESTED, SHFL)
            # x columns k0 + 8c + e for e = 4i + 2j + l
            xl0, xl1 = tl.split(tl.reshape(x_c, (M_PAD, C, 2, 2, 2)))
            xj00, xj01 = tl.split(xl0)
            xj10, xj11 = tl.split(xl1)
            x0, x4 = tl.split(xj00)
            x2, x6 = tl.split(xj01)
            x1, x5 = tl.split(xj10)
            x3, x7 = tl.split(xj11)
            acc = _dot(w0, tl.trans(x0), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w1, tl.trans(x1), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w2, tl.trans(x2), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w3, tl.trans(x3), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w4, tl.trans(x4), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w5, tl.trans(x5), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w6, tl.trans(x6), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w7, tl.trans(x7), acc, DOT_FP32, INPUT_PRECISION)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        for k0 in range(k_start, k_end, BLOCK_K):
            w_ev, w_od = nf4_tile_even_odd(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                                           rows, rows >= 0, k0, K, dtype, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED,
                                           NESTED_BLOCKSIZE)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                         mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            x_ev, x_od = tl.split(tl.reshape(xt, (M_PAD, HALF, 2)))
            acc = _dot(w_ev, tl.trans(x_ev), acc, DOT_FP32, INPUT_PRECISION)
            acc = _dot(w_od, tl.trans(x_od), acc, DOT_FP32, INPUT_PRECISION)

    offs_n64 = offs_n.to(tl.int64)
    out_ok = n_ok[:, None] & m_ok[None, :]
    if not PARTIAL:
        acc = _add_lora(acc, l_ptr, r_ptr, offs_m64, m_ok, offs_n64, n_ok, R, stride_lm, stride_lr, stride_rr,
                        stride_rn, R_BLOCK, DOT_FP32, INPUT_PRECISION)
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
                    stride_rn, R_BLOCK, DOT_FP32, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_n64[:, None] * stride_yn + offs_m64[None, :] * stride_ym,
             round_fp32_to(acc, y_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------- launcher
REDUCE_BLOCK_N = 64
GENERIC_BLOCK_K = 64  # default block_k when K % blocksize != 0


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only shapes the (interpreted) grid on CPU


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands (16-bit operands ignore it): ``"tf32"`` where torch allows TF32 for
    fp32 matmuls, else ``"ieee"`` (exact; in this kernel also cheaper than ``"tf32x3"``, whose split operands
    spill registers: ~15 vs ~42 SASS instructions per weight element)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def default_config(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16, num_sms: int = 132) -> dict:
    """Launch configuration ``dict(block_n, block_k, split_k, num_warps, num_stages, lookup)`` for ``y [M, N]``.

    From the H100 sweeps in ``bench/results/gemv-h100.txt`` (M = 1, 4, 16) and ``gemv-m32-64-h100.txt``
    (M = 32, 64), Llama-3-8B shapes, bf16: for M <= 8, 128 rows x 128 K per program with split-K 8 was the
    fastest on all three shapes; for M <= 16, 64 x 256 (128 for fp32, where 256 spills) with split-K 4; above,
    128 x 128 with split-K chosen for about 256 programs (8 for N = 4096, 2 for N = 14336). Always 4 warps,
    1 stage (the kernel double-buffers in registers) and the shuffle lookup; ``split_k`` is capped at two K steps
    per slice.
    """
    if M <= 8:
        block_n, block_k, split = 128, 128, 8
    elif M <= 16:
        block_n, block_k, split = 64, 128 if dtype == torch.float32 else 256, 4
    else:
        block_n, block_k = 128, 128
        split = max(1, min(8, 256 // triton.cdiv(N, block_n)))
    split_k = max(1, min(split, triton.cdiv(K, block_k) // 2))
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=1, lookup="shfl")


def _check_pow2(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > hi or v & (v - 1):
        raise ValueError(f"nf4_gemv: {name} must be a power of two in [{lo}, {hi}], got {v!r}")


def nf4_gemv(x, nf4, lora_l, lora_r, bias=None, *, block_n=None, block_k=None, split_k=None, num_warps=None,
             num_stages=None, lookup=None, input_precision=None):
    """``y [M, N] = x @ deq(W).T + lora_l @ lora_r + bias`` in ``x.dtype`` (decode-sized ``M``; see the module doc).

    ``x [M, K]`` (bf16 / fp16 / fp32, any strides, ``M <= 64``, built for ``M <= 16``); ``nf4``: the NF4 state of
    ``W [N, K]`` as ``dispatch._nf4_state`` gives it (``packed``, ``absmax``, ``code``, ``blocksize``, ``shape``
    and, when double-quantized, ``absmax2``, ``code2``, ``offset``, ``nested_blocksize``); ``lora_l [M, r]``
    (``= s * S``) and ``lora_r [r, N]`` (``= B.T``, any strides) in ``x.dtype``; ``bias [N]`` or ``None``.

    Launch knobs (``None``: :func:`default_config`): ``block_n`` (W rows per program, power of two >= 16),
    ``block_k`` (K per step, power of two >= 32; the fast path needs >= 128 and ``K % blocksize == 0``; when
    ``K % blocksize != 0`` the default is 64),
    ``split_k`` (K slices; > 1 adds a deterministic reduction pass), ``num_warps``, ``num_stages``, ``lookup``
    (``"shfl"``: warp-shuffle code lookup, ``"load"``: global-memory gather; the interpreter always uses
    ``"load"``); ``input_precision`` of fp32 dots (``"ieee"``, ``"tf32"``, ``"tf32x3"``).
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
    if lora_l.dim() != 2 or lora_r.dim() != 2 or lora_l.shape[0] != M or tuple(lora_r.shape) != (lora_l.shape[1], N):
        raise ValueError(f"lora_l {tuple(lora_l.shape)} / lora_r {tuple(lora_r.shape)}: expected [{M}, r] and "
                         f"[r, {N}]")
    if lora_l.dtype != dtype or lora_r.dtype != dtype:
        raise TypeError(f"lora_l / lora_r: expected {dtype}, got {lora_l.dtype} / {lora_r.dtype}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != dtype):
        raise ValueError(f"bias: expected a [{N}] {dtype} tensor, got {tuple(bias.shape)} {bias.dtype}")
    R = lora_l.shape[1]

    cfg = default_config(M, N, K, dtype, _num_sms(x.device))
    if K % nf4["blocksize"] != 0:
        cfg["block_k"] = GENERIC_BLOCK_K  # generic path: larger tiles spill (its per-element scale selection)
    overrides = dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                     num_stages=num_stages, lookup=lookup)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    _check_pow2("block_n", cfg["block_n"], 16, 1024)
    _check_pow2("block_k", cfg["block_k"], 32, 4096)
    for key in ("split_k", "num_warps", "num_stages"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"nf4_gemv: {key} must be a positive int, got {cfg[key]!r}")
    if cfg["lookup"] not in LOOKUPS:
        raise ValueError(f"nf4_gemv: lookup must be one of {LOOKUPS}, got {cfg['lookup']!r}")
    precision = input_precision or default_input_precision(dtype)

    y = x.new_empty((M, N))
    if M == 0 or N == 0:
        return y

    blocksize = nf4["blocksize"]
    nested = nf4.get("absmax2") is not None
    code = nf4["code"]
    packed = nf4["packed"]
    w_args = (packed, nf4["absmax"], nf4["absmax2"] if nested else code, nf4["code2"] if nested else code,
              nf4["offset"].reshape(1) if nested else code, code)

    block_k = cfg["block_k"]
    k_iters = triton.cdiv(K, block_k)
    iters_per_split = triton.cdiv(k_iters, cfg["split_k"])
    n_split = triton.cdiv(k_iters, iters_per_split)  # no empty slices
    words = K % blocksize == 0 and block_k >= 128 and packed.data_ptr() % 4 == 0 and packed.is_contiguous()
    m_pad = max(8, triton.next_power_of_2(M))
    r_block = max(16, min(MAX_RANK_CHUNK, triton.next_power_of_2(max(R, 1))))
    interpret = _interpreting()
    dot_fp32 = interpret and dtype == torch.bfloat16
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
        WORDS=words, EVEN_K=words and K % block_k == 0, SHFL=words and cfg["lookup"] == "shfl" and not interpret,
        HAS_BIAS=has_bias, M_PAD=m_pad, R_BLOCK=r_block, BLOCK_N=cfg["block_n"], BLOCK_K=block_k, PARTIAL=n_split > 1,
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
