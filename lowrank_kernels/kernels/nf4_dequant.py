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

from lowrank_kernels.kernels.launch import INTERPRET, MAX_ELEMENTS, cdiv, launch
from lowrank_kernels.kernels.nf4_code import nf4_word_values
from lowrank_kernels.kernels.nf4_tile import nf4_block_scale, nf4_word_ptrs
from lowrank_kernels.kernels.rounding import round_fp32_to


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
    read once; the output is written once): that brought it to the time of a plain copy of the same bytes
    (``docs/perf-log.md``)."""
    WPB: tl.constexpr = BLOCKSIZE // 8
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    word = rows[:, None] * WPB + tl.arange(0, WPB)[None, :]
    ok = word < n_words
    am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, rows * WPB < n_words, NESTED,
                         NESTED_BLOCKSIZE)[:, None]
    w = tl.load(nf4_word_ptrs(packed_ptr, word), mask=ok, other=0, eviction_policy="evict_first")
    v = nf4_word_values(w, am, code_ptr, dtype, SHFL)
    elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, tl.reshape(v, (ROWS, BLOCKSIZE)), mask=elem < n_words * 8, cache_modifier=".cs")


ELEMENTS_PER_PROGRAM = 2048  # best of the sweeps on the H100 (docs/perf-log.md)
NUM_WARPS = {"words": 4, "bytes": 2}
KERNELS = ("auto", "words", "bytes")
TUNE_KEYS = ("kernel", "elements_per_program", "num_warps")


def nf4_dequantize(nf4, out_dtype, *, tune=None):
    """The ``NF4Weight`` ``nf4`` dequantized into a new ``out_dtype`` tensor of ``nf4.shape`` (inputs validated).

    The word kernel runs wherever it applies (``n % 8 == 0``, contiguous 4-byte aligned ``packed``), else the byte
    kernel. ``tune`` (maintainers and tests): ``kernel`` (``"words"``, ``"bytes"`` or ``"auto"``),
    ``elements_per_program``, ``num_warps`` (default per kernel: ``NUM_WARPS``). This runs once or twice per layer
    per training step, so it does no more host work than it must (each torch call costs several µs of host time).
    """
    packed, shape, blocksize = nf4.packed, nf4.shape, nf4.blocksize
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise ValueError(f"nf4_dequantize: n={n} elements exceeds the int32-indexed kernel limit {MAX_ELEMENTS}")
    tune = tune or {}
    if tune:
        unknown = set(tune) - set(TUNE_KEYS)
        if unknown:
            raise ValueError(f"tune: unknown keys {sorted(unknown)}; expected a subset of {TUNE_KEYS}")
    kernel = tune.get("kernel", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"nf4_dequantize: kernel must be one of {KERNELS}, got {kernel!r}")
    words_ok = n % 8 == 0 and packed.is_contiguous() and packed.data_ptr() % 4 == 0
    if kernel == "words" and not words_ok:
        raise ValueError(f"nf4_dequantize: kernel='words' needs n % 8 == 0 (n={n}) and a contiguous, 4-byte "
                         "aligned packed tensor")
    words = words_ok and kernel != "bytes"
    out = packed.new_empty(shape, dtype=out_dtype)
    rows = max(1, tune.get("elements_per_program", ELEMENTS_PER_PROGRAM) // blocksize)
    grid = (cdiv(cdiv(n, blocksize), rows),)
    nested, code = nf4.nested, nf4.code
    # offset: the 0-dim fp32 tensor itself (a pointer to its one element)
    args = (packed, nf4.absmax, nf4.absmax2 if nested else nf4.absmax, nf4.code2 if nested else code,
            nf4.offset if nested else code, code, out)
    warps = tune.get("num_warps") or NUM_WARPS["words" if words else "bytes"]
    nested_blocksize = nf4.nested_blocksize if nested else 1
    if words:
        launch(nf4_dequant_words_kernel, grid, args + (n // 8, blocksize, nested, nested_blocksize, rows,
                                                       not INTERPRET), num_warps=warps, enable_fp_fusion=False)
    else:
        launch(nf4_dequant_kernel, grid, args + (n, blocksize, nested, nested_blocksize, rows),
               num_warps=warps, enable_fp_fusion=False)
    return out
