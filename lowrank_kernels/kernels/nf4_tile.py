"""The NF4 weight tile loader and decoder every kernel here shares (dequant, merge, decode GEMV, fused GEMM).

A weight ``W [N, K]`` is the flat NF4 stream of bitsandbytes: element ``e = n*K + k`` is nibble ``e % 2`` (high
first) of byte ``e // 2``, scaled by block ``e // BLOCKSIZE``'s fp32 scale, which double quantization stores as
``code2[q] * absmax2[b // NESTED_BLOCKSIZE] + offset`` (two fp32 roundings: launch with
``enable_fp_fusion=False``). Where tile rows start on whole 32-bit words and scale blocks (``K % BLOCKSIZE == 0``)
the nibbles are read as words of 8 elements (:func:`nf4_word_ptrs`, decoded by ``nf4_code.nf4_word_values``);
elsewhere as two byte tiles of even and odd positions (:func:`nf4_tile_even_odd`). Flat indices are int32
(``launch.MAX_ELEMENTS``).
"""
import triton
import triton.language as tl

from lowrank_kernels.kernels.nf4_code import nf4_word_values
from lowrank_kernels.kernels.rounding import round_fp32_to


@triton.jit
def nf4_word_ptrs(packed_ptr, word):
    """Pointers to the packed 32-bit words of index ``word`` (any shape; word ``w`` holds elements ``8w ... 8w + 7``
    of the stream): the one place the byte stream is read as words."""
    return packed_ptr.to(tl.pointer_type(tl.uint32)) + word


@triton.jit
def nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask,
                    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of NF4 block(s) ``blk``, both levels undone: ``code2[q] * absmax2[blk // nbs] + offset``
    (two fp32 roundings: the caller's launch sets ``enable_fp_fusion=False``)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        am = tl.load(code2_ptr + q) * scale2 + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return am


@triton.jit
def nf4_tile_even_odd(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, rows, row_ok, k0, K,
                      dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                      NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """``(W[rows, k0 + 2j], W[rows, k0 + 2j + 1])`` for ``j < BLOCK_K // 2``: two ``[BLOCK_N, BLOCK_K // 2]`` tiles
    of the NF4 weight ``W [*, K]`` dequantized to ``dtype``, for any K (undefined past K and where ``row_ok`` is False).

    A tile row may start on a low nibble (odd ``n*K + k0``) and cross scale blocks anywhere, so its even-position
    and odd-position elements are read as two sets of consecutive bytes, from byte ``e0 >> 1`` and
    ``(e0 >> 1) + (e0 & 1)`` (``e0 = n*K + k0``), taking the high or low nibble by the row's parity; the scales of
    the (at most ``cdiv(BLOCK_K, BLOCKSIZE) + 1``) blocks a tile row touches are rebuilt once per row and selected
    per element. Launch with ``enable_fp_fusion=False`` (see ``nf4_block_scale``).
    """
    HALF: tl.constexpr = BLOCK_K // 2
    NB: tl.constexpr = (BLOCK_K + BLOCKSIZE - 1) // BLOCKSIZE + 1  # scale blocks one tile row can touch
    j = tl.arange(0, HALF)
    e0 = rows * K + k0  # [BLOCK_N] flat index of W[n, k0] (int32; launchers check N*K)
    p = e0 & 1
    ok_ev = row_ok[:, None] & (k0 + 2 * j < K)[None, :]
    ok_od = row_ok[:, None] & (k0 + 2 * j + 1 < K)[None, :]
    byte0 = e0 >> 1
    b_ev = tl.load(packed_ptr + byte0[:, None] + j[None, :], mask=ok_ev, other=0).to(tl.int32)
    b_od = tl.load(packed_ptr + (byte0 + p)[:, None] + j[None, :], mask=ok_od, other=0).to(tl.int32)
    nib_ev = (b_ev >> ((1 - p) * 4)[:, None]) & 0xF  # p == 0: high nibble; p == 1: low nibble
    nib_od = (b_od >> (p * 4)[:, None]) & 0xF
    # Scales: element k0 + i of the row lies in block blk0 + (first + i) // BLOCKSIZE.
    first = e0 % BLOCKSIZE
    blk0 = e0 // BLOCKSIZE
    rel_ev = (first[:, None] + 2 * j[None, :]) // BLOCKSIZE
    rel_od = (first[:, None] + 2 * j[None, :] + 1) // BLOCKSIZE
    am_ev = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    am_od = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    for t in tl.static_range(NB):
        am_t = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk0 + t,
                               row_ok & (t * BLOCKSIZE < first + (K - k0)), NESTED, NESTED_BLOCKSIZE)
        am_ev = tl.where(rel_ev == t, am_t[:, None], am_ev)
        am_od = tl.where(rel_od == t, am_t[:, None], am_od)
    w_ev = round_fp32_to(tl.load(code_ptr + nib_ev) * am_ev, dtype)
    w_od = round_fp32_to(tl.load(code_ptr + nib_od) * am_od, dtype)
    return w_ev, w_od


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
              offs_n, n_ok, k0, K, dtype: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
              NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr, SHFL: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` tile ``W[offs_n, k0:k0+BLOCK_K]`` dequantized to ``dtype``. Masked elements (rows
    not ``n_ok``, columns past K) are undefined (a nested scale reads as ``offset`` there): callers mask the tile's
    use (a store, a zero operand) or the tile."""
    row_elem = offs_n * K  # flat index of W[n, 0]; int32 (launcher checks N*K < 2**31)
    if ALIGNED:
        SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE  # elements of one tile row per scale
        SPT: tl.constexpr = BLOCK_K // SUB  # scales per tile row
        WPS: tl.constexpr = SUB // 8  # packed words per scale
        t = tl.arange(0, SPT)
        kw = k0 // 8 + t[:, None] * WPS + tl.arange(0, WPS)[None, :]  # [SPT, WPS] word column within the row
        ptrs = nf4_word_ptrs(packed_ptr, (row_elem // 8)[:, None, None] + kw[None, :, :])
        words = tl.load(ptrs, mask=n_ok[:, None, None] & (kw < K // 8)[None, :, :], other=0)
        am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             ((row_elem + k0) // BLOCKSIZE)[:, None] + t[None, :],
                             n_ok[:, None] & (k0 + t * SUB < K)[None, :], NESTED, NESTED_BLOCKSIZE)
        # [BLOCK_N, SPT, WPS, 2, 2, 2]: element 8 (WPS s + c) + 4i + 2j + l of the tile row at [n, s, c, i, j, l]
        w = tl.reshape(nf4_word_values(words, am[:, :, None], code_ptr, dtype, SHFL), (BLOCK_N, BLOCK_K))
    else:  # any K (see nf4_tile_even_odd)
        w_ev, w_od = nf4_tile_even_odd(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, offs_n,
                                       n_ok, k0, K, dtype, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
        w = tl.reshape(tl.join(w_ev, w_od), (BLOCK_N, BLOCK_K))
    return w



def nf4_tile_args(nf4, w_cols: int):
    """``(pointers, meta)`` of an ``NF4Weight`` for :func:`nf4_tile`: the six pointer arguments (``packed, absmax,
    absmax2, code2, offset, code``; ``code`` stands in for the nested ones when there are none) and the constexprs
    ``NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, ALIGNED`` (rows of whole 32-bit words and scale blocks) for a stored
    weight of ``w_cols`` columns."""
    nested = nf4.nested
    code, packed, blocksize = nf4.code, nf4.packed, nf4.blocksize
    pointers = (packed, nf4.absmax, nf4.absmax2 if nested else code, nf4.code2 if nested else code,
                nf4.offset.reshape(1) if nested else code, code)
    aligned = w_cols % blocksize == 0 and packed.data_ptr() % 4 == 0 and packed.is_contiguous()
    return pointers, dict(NESTED=nested, BLOCKSIZE=blocksize,
                          NESTED_BLOCKSIZE=nf4.nested_blocksize if nested else 1, ALIGNED=aligned)
