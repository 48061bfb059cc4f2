"""Triton kernel: NF4 dequantization with both quantization levels undone in one pass.

One program handles ``ROWS`` consecutive quantization blocks (``ROWS * BLOCKSIZE`` elements). For each block
it rebuilds the fp32 scale (``code2[q] * absmax2[b // NESTED_BLOCKSIZE] + offset``, two roundings: launch
with ``enable_fp_fusion=False``), looks up both nibbles of every byte in the 16-entry code table, multiplies
and rounds once to the output dtype. Bit-identical to ``python_ref.dequantize_nf4``.
"""
import triton
import triton.language as tl

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


ELEMENTS_PER_PROGRAM = 2048  # with 2 warps: best of the sweep in bench/results/dequant-tune-h100.txt
NUM_WARPS = 2
MAX_ELEMENTS = 2**31 - 2**13  # int32 element indices, with room for the last program's overhang


def nf4_dequantize(packed, absmax, code, n, blocksize, out_dtype, absmax2=None, code2=None, offset=None,
                   nested_blocksize=256, *, elements_per_program=ELEMENTS_PER_PROGRAM, num_warps=NUM_WARPS):
    """Dequantize ``n`` NF4 elements to a flat ``out_dtype`` tensor ``[n]`` (inputs already validated).

    ``absmax`` is fp32 scales, or, with ``absmax2``/``code2``/``offset`` given, the uint8 second-level indices.
    ``elements_per_program`` and ``num_warps`` are tuning knobs (``scripts/tune_dequant.py``).
    """
    if n > MAX_ELEMENTS:
        raise ValueError(f"nf4_dequantize: n={n} elements exceeds the int32-indexed kernel limit {MAX_ELEMENTS}")
    out = packed.new_empty(n, dtype=out_dtype)
    rows = max(1, elements_per_program // blocksize)
    nblocks = triton.cdiv(n, blocksize)
    nested = absmax2 is not None
    nf4_dequant_kernel[(triton.cdiv(nblocks, rows),)](
        packed, absmax,
        absmax2 if nested else absmax, code2 if nested else code, offset.reshape(1) if nested else code,
        code, out, n,
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize if nested else 1, ROWS=rows,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return out
