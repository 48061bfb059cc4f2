"""Triton kernels: NF4 dequantization with both quantization levels undone in one pass.

A program handles ``ROWS`` consecutive quantization blocks (``ROWS * BLOCKSIZE`` elements). For each block it
rebuilds the fp32 scale (``code2[q] * absmax2[b // NESTED_BLOCKSIZE] + offset``, two roundings: launch with
``enable_fp_fusion=False``), looks up every nibble in the 16-entry code table, multiplies and rounds once to the
output dtype. Bit-identical to ``python_ref.dequantize_nf4``. ``nf4_dequant_words_kernel`` reads the nibbles as
32-bit words and is the default wherever the element count is a multiple of 8; ``nf4_dequant_kernel`` reads bytes
and takes any count.
"""
import math

import triton
import triton.language as tl

from lowrank_kernels.kernels.launch import INTERPRET, cdiv, launch
from lowrank_kernels.kernels.nf4_code import nf4_word_values
from lowrank_kernels.kernels.rounding import round_fp32_to


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
    of the NF4 weight ``W [*, K]`` dequantized to ``dtype``, for any K (0 past K and where ``row_ok`` is False).

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
def nf4_dequant_kernel(
    packed_ptr,  # uint8 [(n + 1) // 2]
    absmax_ptr,  # uint8 [nblocks] when NESTED, else fp32 [nblocks]
    absmax2_ptr,  # fp32 [ceil(nblocks / NESTED_BLOCKSIZE)] (NESTED only)
    code2_ptr,  # fp32 [256] (NESTED only)
    offset_ptr,  # fp32 [1] (NESTED only)
    code_ptr,  # fp32 [16]
    out_ptr,  # bf16 / fp16 / fp32 [n]
    n,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    nbytes = (n + 1) // 2
    nblocks = tl.cdiv(n, BLOCKSIZE)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nblocks

    am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, row_ok, NESTED, NESTED_BLOCKSIZE)

    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (packed >> 4)) * am[:, None]
    lo = tl.load(code_ptr + (packed & 0xF)) * am[:, None]
    vals = tl.reshape(tl.join(hi, lo), [ROWS, BLOCKSIZE])

    elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, round_fp32_to(vals, out_ptr.dtype.element_ty), mask=elem < n)


@triton.jit
def nf4_dequant_words_kernel(
    packed_ptr,  # uint8 [n // 2], 4-byte aligned (read as uint32 words)
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,  # as in nf4_dequant_kernel
    out_ptr,  # bf16 / fp16 / fp32 [n]
    n_words,  # n // 8 (n % 8 == 0)
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    SHFL: tl.constexpr,
):
    """Fast path (``n % 8 == 0``): the program's ``ROWS`` blocks as a ``[ROWS, BLOCKSIZE // 8]`` tile of packed
    32-bit words (8 elements each, all in one block, as every blocksize is a multiple of 8), looked up with
    ``nf4_word_values`` (warp-shuffle lookup when ``SHFL``), scaled, rounded, and stored as 8 consecutive outputs
    per word.
    Same values as ``nf4_dequant_kernel`` with a third of its SASS instructions per element (16-byte loads and
    stores, no per-element address arithmetic). Both streams are marked evict-first in L2 (the packed words are
    read once; the output is written once): on the H100 that took 4096 x 4096 from 16.7-17.3 to 16.1 µs, the time
    of a plain copy of the same bytes (``bench/results/dequant-variants-h100.txt``)."""
    WPB: tl.constexpr = BLOCKSIZE // 8
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    word = rows[:, None] * WPB + tl.arange(0, WPB)[None, :]
    ok = word < n_words
    am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, rows * WPB < n_words, NESTED,
                         NESTED_BLOCKSIZE)[:, None]
    w = tl.load(packed_ptr.to(tl.pointer_type(tl.uint32)) + word, mask=ok, other=0, eviction_policy="evict_first")
    v = nf4_word_values(w, am, code_ptr, dtype, SHFL)
    elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, tl.reshape(v, (ROWS, BLOCKSIZE)), mask=elem < n_words * 8, cache_modifier=".cs")


ELEMENTS_PER_PROGRAM = 2048  # best of the sweeps in bench/results/dequant-tune-h100.txt and
NUM_WARPS = {"words": 4, "bytes": 2}  # dequant-variants-h100.txt
MAX_ELEMENTS = 2**31 - 2**13  # int32 element indices, with room for the last program's overhang
KERNELS = ("auto", "words", "bytes")


def nf4_dequantize(packed, absmax, code, shape, blocksize, out_dtype, absmax2=None, code2=None, offset=None,
                   nested_blocksize=256, *, elements_per_program=ELEMENTS_PER_PROGRAM, num_warps=None,
                   kernel="auto"):
    """Dequantize NF4 elements to a new ``out_dtype`` tensor of ``shape`` (a tuple; ``n = prod(shape)`` elements
    in row-major order; inputs already validated).

    ``absmax`` is fp32 scales, or, with ``absmax2``/``code2``/``offset`` given, the uint8 second-level indices.
    ``kernel``: ``"words"`` (``nf4_dequant_words_kernel``; needs ``n % 8 == 0`` and a contiguous, 4-byte aligned
    ``packed``), ``"bytes"`` (``nf4_dequant_kernel``, any ``n``) or ``"auto"`` (words where it applies).
    ``elements_per_program`` and ``num_warps`` (default per kernel: ``NUM_WARPS``) are tuning knobs
    (``scripts/tune_dequant.py``). This runs once or twice per layer per training step, so it does no more host
    work than it must (each torch call costs several µs of host time).
    """
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise ValueError(f"nf4_dequantize: n={n} elements exceeds the int32-indexed kernel limit {MAX_ELEMENTS}")
    if kernel not in KERNELS:
        raise ValueError(f"nf4_dequantize: kernel must be one of {KERNELS}, got {kernel!r}")
    words_ok = n % 8 == 0 and packed.is_contiguous() and packed.data_ptr() % 4 == 0
    if kernel == "words" and not words_ok:
        raise ValueError(f"nf4_dequantize: kernel='words' needs n % 8 == 0 (n={n}) and a contiguous, 4-byte "
                         "aligned packed tensor")
    words = words_ok and kernel != "bytes"
    out = packed.new_empty(shape, dtype=out_dtype)
    rows = max(1, elements_per_program // blocksize)
    grid = (cdiv(cdiv(n, blocksize), rows),)
    nested = absmax2 is not None
    # offset: the 0-dim fp32 tensor itself (a pointer to its one element)
    args = (packed, absmax, absmax2 if nested else absmax, code2 if nested else code, offset if nested else code,
            code, out)
    warps = num_warps or NUM_WARPS["words" if words else "bytes"]
    if words:
        launch(nf4_dequant_words_kernel, grid, args + (n // 8, blocksize, nested, nested_blocksize if nested else 1,
                                                       rows, not INTERPRET), num_warps=warps, enable_fp_fusion=False)
    else:
        launch(nf4_dequant_kernel, grid, args + (n, blocksize, nested, nested_blocksize if nested else 1, rows),
               num_warps=warps, enable_fp_fusion=False)
    return out
