"""Triton kernels: memory-bound NF4 GEMV / skinny GEMM for decode (M = 1 ... 64), LoRA and bias in the same launches.

    S [M, r] = x [M, K] @ A.T,   y [M, N] = x @ deq(W).T + (s * S) @ B.T (+ bias [N])     W [N, K] NF4, A [r, K]

At decode sizes the layer is one read of the 4-bit weight (4096 x 4096 with double quant: 8.4 MB of nibbles + 0.26 MB
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
~20 more; Triton's ``tl.gather`` on a register table lowers to 8 shuffles + selects per element.

The product at ``M > 1`` uses tensor cores: ``tl.dot`` of each dequantized ``[BLOCK_N, BLOCK_K // 8]`` tile (the A
operand, produced directly in the wgmma register layout: no shared-memory copy of W) with ``x.T`` padded to
``M_PAD = max(8, next_pow2(M))`` columns (wgmma's n = 8; 16 costs 7 % more instructions and 40 % more registers),
accumulating ``[BLOCK_N, M_PAD]`` in fp32. The 8 nibble positions of a word are kept apart: tile ``e`` holds
elements ``k0 + 8c + e`` and is multiplied with the matching strided columns of x (the x tile is loaded contiguous
and split in registers), so W is never interleaved. ``scripts/sass_gemv.py`` compiles the kernel for sm_90 offline
and counts the loop: with Triton 3.6, 128 x 128 tiles, 4 warps, ~7.4 SASS instructions per weight element (1
shuffle, 1 shift, 1 FMUL, 0.5 bf16x2 pack, the rest x operand staging through shared memory, wgmma, loads),
against ~4.6 for the ``FMA`` variant below, which is what ``M = 1`` runs.

TMA ring and joined tile (Hopper: the defaults there under CUDA-graph capture, see ``_default_tma``)
---------------------------------------------------------------------------------------------------
``TMA``: the word tiles are read through a host-side tensor descriptor of the packed weight as uint32
``[N, K // 8]`` in a ``tl.range(..., num_stages=STAGES)`` loop, so Triton's pipeliner keeps ``STAGES`` tiles in
flight in shared memory (filled by the tensor memory accelerator, one instruction per tile) instead of in
registers; the x tiles come the same way where x's rows are 16-byte aligned (``X_TMA``; measured neutral).
``JOIN`` (``M > 1``): instead of 8 dots on the strided sub-tiles, the 8 nibble positions are joined back into
element order (as the dequant kernel stores them) and one ``tl.dot`` per step takes the contiguous x tile.
On the H100 (``bench/results/gemv-tma-m1-h100.txt`` and ``gemv-join-xtma-h100.txt``, best config against the
register-double-buffered default of the same run; ``gemv-tma-h100.txt`` and ``gemv-join-h100.txt`` agree):
M = 1 11.7 / 28.2 / 25.5 -> 10.8 / 24.9 / 23.7 µs (4096->4096 / 4096->14336 / 14336->4096), M = 16 16.4 / 44.5 /
43.1 -> 15.3 / 38.8 / 40.2 µs, M = 64 26.4 / 70.3 / 66.7 -> 21.4 / 50.6 / 57.0 µs; at M = 4 the joined tile
took 1.3-1.45x the previous kernel's time (``gemv-join-m4-32-h100.txt``). Nsight Compute on the M = 64 kernel
(``ncu-gemv-tma-h100.txt``): one 8-warp program per SM (255 registers), 0.33 instructions issued per cycle per
scheduler, DRAM at 14 %: latency-bound at low occupancy, as the register-double-buffered kernel was.

Generic path (any K: odd K, blocks straddling rows, ``BLOCK_K < 128``): a tile row's even- and odd-position
elements are read as two byte tiles starting at byte ``e0 >> 1`` and ``(e0 >> 1) + (e0 & 1)``
(``e0 = n*K + k0``), the nibble picked by the row's parity, and the scales of the (at most
``cdiv(BLOCK_K, blocksize) + 1``) blocks a tile row touches are selected per element. Correct, slower.

LoRA, bias and the second launch
--------------------------------
The adapters are read in their own dtype (peft keeps them in fp32) and rounded to ``x.dtype`` in the kernels, so
a decode step is exactly two launches: no casts, no separate ``S`` GEMM. Program ``(i, s)`` stores its fp32
partial tile to a workspace ``[SPLIT_K, M, N]``; the programs ``i < cdiv(r, RANKS)`` of each K slice also store
the slice's partial ``S = x @ A.T`` for ``RANKS = cdiv(r, grid_n)`` ranks each (``[SPLIT_K, M, r]``; a few KB of
``A`` per program). ``nf4_gemv_finish_kernel`` then sums both workspaces in the fixed order 0, 1, ... (no atomics:
deterministic), rounds ``S`` and ``scaling * S`` to ``x.dtype`` as the unfused path does, adds
``(s S) @ round(B).T`` with one more ``tl.dot`` per 64 ranks, adds the bias and rounds to the output dtype.

M = 1 on CUDA cores (``FMA``)
-----------------------------
At ``M = 1`` the tensor-core dot wastes 7/8 of its padded columns and, worse, needs every weight element scaled,
rounded and packed into the wgmma operand layout. The ``FMA`` variant skips all of that: per packed word it
computes ``t = sum_e code[nibble_e] * x_e`` with 8 fp32 FMAs on the looked-up codes and applies the block scale
once per word (``acc += t * am``), so the loop costs a shift, a shuffle and an FMA per element. Its result is
not the bf16-rounded dequantized weight times ``x`` but the unrounded one (closer to the fp32 product).
On the H100 the decode layer (LoRA included) went from 13.6 / 32.8 / 35.3 us (the previous tensor-core default,
``S`` computed by separate launches and not counted) to 11.3 / 27.9 / 28.9 us on 4096->4096 / 4096->14336 /
14336->4096 (``bench/results/gemv-h100.txt``): 0.92-1.01x the time of bitsandbytes' ``matmul_4bit`` without
LoRA. That is ~1.1 TB/s, about a third of copy bandwidth, and neither memory- nor issue-bound: Nsight Compute
(``bench/results/ncu-gemv-h100.txt``, 4096->14336) shows DRAM at 34 % of peak and issue slots 36 % busy, with
3.8 warps resident per scheduler and 0.84 eligible. Warps wait on the scale gather ``code2[q]`` (the FMUL that
consumes it held 15 % of the stall samples), on the shared-memory round trip that splits the x tile (STS / LDS
and their barriers, ~19 %) and on shuffle results. Gathering each step's scales at the end of the step before
(all paths) and reading the ``M = 1`` share of ``S`` in one wide chunk (see ``_lora_s_partial``) brought the
layer to 11.8 / 28.5 / 26.1 us, bit-identical (``gemv-ab-h100.txt``). Measured and not kept: smaller tiles for
more warps per SM (72-111 registers; ``gemv-occ-h100.txt``: no faster), and loading x as 8 strided tensors
straight into the word tile's layout (no x round trip, but 8 more loads per step; 33-40 % slower alone, and
``gemv-x8-variant-h100.txt`` with ``S`` fused into the main loop as well).

Indices: flat element indices ``n*K + k`` are int32 (``N*K`` is checked against ``MAX_ELEMENTS``); offsets into
x, y, the LoRA factors and the workspace are int64.

CUDA C++ first launch
---------------------
``cuda=True`` (by default at ``CUDA_MIN_M <= M <= CUDA_MAX_M`` on weights of ``>= CUDA_MIN_ELEMENTS``) replaces
``nf4_gemv_kernel`` by the tensor-core kernel of ``csrc/nf4_mma_gemv.cu`` (:mod:`.nf4_gemv_cuda`), which fills
the same two workspaces for the same finish kernel: a byte of W indexes a per-lane table of bf16 / fp16 code
pairs that are directly ``mma.m16n8k16`` operands. Measured and explained in ``bench/results/gemv-mma-h100.txt``,
``gemv-mma-experiments-h100.txt`` and ``gemv-mma-s-items-h100.txt`` (its partial S); M > 16 stays on Triton
(``gemv-mma-wide-m-experiment-h100.txt``).

Interpreter (``TRITON_INTERPRET=1``): the lookup is the global gather (no inline PTX there), and bf16 dot operands
are upcast (exactly) to fp32 because its ``tl.dot`` mishandles bf16 (``DOT_FP32``). fp32 inputs use
``input_precision`` ``"tf32"`` when torch allows TF32 for fp32 matmuls, else ``"ieee"`` (exact).
"""
import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch, sm_90+); Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: the two launches stay plainly serialized
    gdc_launch_dependents = gdc_wait = None
try:  # host-side TMA descriptors; Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: no TMA path
    TensorDescriptor = None

from lowrank_kernels.kernels import nf4_gemv_cuda
from lowrank_kernels.kernels.dot import dot as _dot
from lowrank_kernels.kernels.launch import INTERPRET, cdiv, device_of, launch, next_pow2
from lowrank_kernels.kernels.nf4_code import nf4_word_codes, nf4_word_values
from lowrank_kernels.kernels.nf4_dequant import nf4_tile_even_odd
from lowrank_kernels.kernels.rounding import round_fp32_to

MAX_ELEMENTS = 2**31 - 2**16  # int32 flat element indices n*K + k (with a tile's overhang)
MAX_M = 64  # M_PAD <= 64; the design point is M <= 16
MAX_RANK_CHUNK = 64  # LoRA ranks per tl.dot
LOOKUPS = ("shfl", "load")



# ---------------------------------------------------------------------------------------------- fast path
@triton.jit
def _load_scales(absmax_ptr, absmax2_ptr, row_blk, k0, K, live,
                 BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                 NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr):
    """The raw scales ``[BLOCK_N, SPT]`` of one K step (``SPT`` scale blocks per tile row): ``q`` and ``absmax2``
    when nested, else fp32 ``absmax`` twice. ``live``: scalar, False past the last step (nothing is read)."""
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    SPT: tl.constexpr = BLOCK_K // SUBK
    t = tl.arange(0, SPT)
    blk = row_blk[:, None] + (k0 // BLOCKSIZE + t)[None, :]
    # live & ... through tl.full: a uniform mask keeps the vector loads (and the interpreter wants tensor masks)
    s_ok = tl.full((1, SPT), 1, tl.int1) & live
    if not EVEN_K:
        s_ok = s_ok & (k0 + t * SUBK < K)[None, :]
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=s_ok, other=0)
        s2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=s_ok, other=0.0)
    else:
        q = tl.load(absmax_ptr + blk, mask=s_ok, other=0.0)
        s2 = q
    return q, s2


@triton.jit
def _load_words(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, k0, K, live,
                BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr):
    """The loads of one K step: packed words ``[BLOCK_N, SPT, WPS]`` (``WPS`` words per block part) and the raw
    scales (``_load_scales``)."""
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    SPT: tl.constexpr = BLOCK_K // SUBK
    WPS: tl.constexpr = SUBK // 8
    t = tl.arange(0, SPT)
    kw = k0 // 8 + t[:, None] * WPS + tl.arange(0, WPS)[None, :]  # [SPT, WPS] word column
    row_word = row_blk * (BLOCKSIZE // 8)  # = n*K/8, a multiple of 4 words: 16-byte aligned rows
    ptrs = packed_ptr.to(tl.pointer_type(tl.uint32)) + row_word[:, None, None] + kw[None, :, :]
    w_ok = tl.full((1, SPT, WPS), 1, tl.int1) & live
    if EVEN_K:
        w = tl.load(ptrs, mask=w_ok)
    else:
        w = tl.load(ptrs, mask=w_ok & (kw < K // 8)[None, :, :], other=0)
    q, s2 = _load_scales(absmax_ptr, absmax2_ptr, row_blk, k0, K, live, BLOCK_K, BLOCKSIZE, NESTED,
                         NESTED_BLOCKSIZE, EVEN_K)
    return w, q, s2


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
def _absmax(q, s2, code2_ptr, offset, NESTED: tl.constexpr):
    """First-level scales (fp32): ``fp32(fp32(code2[q] * absmax2) + offset)`` when nested, else ``q`` itself."""
    if NESTED:
        am = tl.load(code2_ptr + q.to(tl.int32)) * s2 + offset  # two fp32 roundings (no FMA contraction)
    else:
        am = q
    return am


@triton.jit
def _deq(c, am, dtype: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr):
    return tl.reshape(round_fp32_to(c * am, dtype), (BLOCK_N, C))


@triton.jit
def _split8(x, SHAPE0: tl.constexpr, SHAPE1: tl.constexpr):
    """The 8 strided parts of ``x`` (``SHAPE0 * SHAPE1 * 8`` elements, last axis fastest): part ``e`` holds the
    elements ``8c + e``, shaped ``[SHAPE0, SHAPE1]`` (the nibble positions of ``nf4_word_codes``)."""
    xl0, xl1 = tl.split(tl.reshape(x, (SHAPE0, SHAPE1, 2, 2, 2)))  # e = 4i + 2j + l
    xj00, xj01 = tl.split(xl0)
    xj10, xj11 = tl.split(xl1)
    x0, x4 = tl.split(xj00)
    x2, x6 = tl.split(xj01)
    x1, x5 = tl.split(xj10)
    x3, x7 = tl.split(xj11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _dot_step(acc, w, am, x, code_ptr, dtype: tl.constexpr, SHFL: tl.constexpr, M_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Tensor-core step: ``acc [BLOCK_N, M_PAD] += deq(W tile) @ x_tile.T``, the tile dequantized bit-exactly to
    ``dtype`` in registers as 8 ``[BLOCK_N, BLOCK_K // 8]`` tiles (tile ``e``: elements ``k0 + 8c + e``; ``am``:
    the fp32 scales, ``[BLOCK_N, SPT, 1]``)."""
    C: tl.constexpr = BLOCK_K // 8
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_word_codes(w, code_ptr, SHFL)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x, M_PAD, C)
    acc = _dot(_deq(c0, am, dtype, BLOCK_N, C), tl.trans(x0), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c1, am, dtype, BLOCK_N, C), tl.trans(x1), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c2, am, dtype, BLOCK_N, C), tl.trans(x2), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c3, am, dtype, BLOCK_N, C), tl.trans(x3), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c4, am, dtype, BLOCK_N, C), tl.trans(x4), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c5, am, dtype, BLOCK_N, C), tl.trans(x5), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c6, am, dtype, BLOCK_N, C), tl.trans(x6), acc, DOT_FP32, INPUT_PRECISION)
    acc = _dot(_deq(c7, am, dtype, BLOCK_N, C), tl.trans(x7), acc, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def _dot_step_joined(acc, w, am, x, code_ptr, dtype: tl.constexpr, SHFL: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Tensor-core step with one dot: the 8 nibble positions of every word are joined back into element order
    (as ``nf4_dequant_words_kernel`` stores them), so ``acc [BLOCK_N, M_PAD] += deq(W tile) [BLOCK_N, BLOCK_K]
    @ x_tile.T`` takes the contiguous x tile as it was loaded; Triton moves the joined tile into the operand
    layout (through shared memory) instead of the x tile being split 8 ways."""
    v = nf4_word_values(w, am, code_ptr, dtype, SHFL)
    return _dot(tl.reshape(v, (BLOCK_N, BLOCK_K)), tl.trans(x), acc, DOT_FP32, INPUT_PRECISION)


@triton.jit
def _fma_step(acc, w, am, x, code_ptr, SHFL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """CUDA-core step for one row of x: ``acc [BLOCK_N, SPT, WPS] += am * sum_e code[nibble_e] * x_e`` (fp32,
    explicit FMAs; ``am [BLOCK_N, SPT, 1]``), the scale applied once per word instead of once per element."""
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_word_codes(w, code_ptr, SHFL)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x.to(tl.float32), BLOCK_K // SUBK, SUBK // 8)
    t = c0 * x0[None, :, :]
    t = tl.fma(c1, x1[None, :, :], t)
    t = tl.fma(c2, x2[None, :, :], t)
    t = tl.fma(c3, x3[None, :, :], t)
    t = tl.fma(c4, x4[None, :, :], t)
    t = tl.fma(c5, x5[None, :, :], t)
    t = tl.fma(c6, x6[None, :, :], t)
    t = tl.fma(c7, x7[None, :, :], t)
    return tl.fma(t, am, acc)


@triton.jit
def _step(acc, w, am, x, code_ptr, dtype: tl.constexpr, SHFL: tl.constexpr, FMA: tl.constexpr, JOIN: tl.constexpr,
          M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
          DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One K step into ``acc``: ``_fma_step`` (``FMA``; ``acc [BLOCK_N, SPT, WPS]``, a sum per packed word),
    ``_dot_step_joined`` (``JOIN``) or ``_dot_step`` (``acc [BLOCK_N, M_PAD]``)."""
    if FMA:
        acc = _fma_step(acc, w, am, x, code_ptr, SHFL, BLOCK_K, BLOCKSIZE)
    elif JOIN:
        acc = _dot_step_joined(acc, w, am, x, code_ptr, dtype, SHFL, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION)
    else:
        acc = _dot_step(acc, w, am, x, code_ptr, dtype, SHFL, M_PAD, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def _lora_s_partial(x_rows, stride_xk, m_ok, offs_m64, a_ptr, stride_ar, stride_ak, ws_s_ptr, pid_n, pid_k,
                    M, K, R, RANKS, k_start, k_end, dtype: tl.constexpr, M_PAD: tl.constexpr,
                    S_BLOCK_K: tl.constexpr):
    """``ws_s[pid_k, m, r] = sum over this K slice of x[m, k] * round(A[r, k])`` (fp32) for the ranks
    ``r = pid_n * RANKS + j`` of this program (``A`` read in its own dtype, rounded to ``dtype``). It runs after
    the weight tile, in a few programs only; at ``M = 1`` ``S_BLOCK_K`` is wide (whole K slices) so that it costs
    one dependent load round trip instead of one per K step, which made those programs the kernel's stragglers
    (together with the scale prefetch: 11 % off the 14336->4096 layer, whose slices are 7 steps long; not
    measured apart). Wider chunks at ``M = 16`` measured slower."""
    for j in range(RANKS):
        rank = pid_n * RANKS + j
        if rank < R:
            s = tl.zeros((M_PAD,), dtype=tl.float32)
            a_row = a_ptr + rank.to(tl.int64) * stride_ar
            for k0 in range(k_start, k_end, S_BLOCK_K):
                offs_k = k0 + tl.arange(0, S_BLOCK_K)
                k_ok = offs_k < k_end
                xt = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                             other=0.0)
                a = tl.load(a_row + offs_k.to(tl.int64) * stride_ak, mask=k_ok, other=0.0).to(dtype)
                s += tl.sum(xt.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
            tl.store(ws_s_ptr + (pid_k * M + offs_m64) * R + rank, s, mask=m_ok)


@triton.jit
def nf4_gemv_kernel(
    x_ptr,  # [M, K] bf16 / fp16 / fp32 (any strides)
    packed_ptr,  # uint8 [(N*K + 1) // 2]; with TMA a tensor descriptor of it as uint32 [N, K // 8]
    absmax_ptr,  # uint8 [nblocks] when NESTED, else fp32 [nblocks]
    absmax2_ptr, code2_ptr, offset_ptr,  # NESTED only (dummies otherwise)
    code_ptr,  # fp32 [16]
    a_ptr,  # lora_A [R, K], any float dtype and strides
    ws_ptr,  # fp32 [n_split, M, N]: partial x @ deq(W).T per K slice
    ws_s_ptr,  # fp32 [n_split, M, R]: partial S = x @ A.T per K slice
    x_desc,  # X_TMA: a tensor descriptor of x, [M_PAD, BLOCK_K] tiles (else unused)
    M, N, K, R, RANKS,  # RANKS: ranks of S per program (programs pid_n < cdiv(R, RANKS) compute them)
    stride_xm, stride_xk, stride_ar, stride_ak,
    K_PER_SPLIT,  # multiple of BLOCK_K
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    WORDS: tl.constexpr, EVEN_K: tl.constexpr, SHFL: tl.constexpr, FMA: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    TMA: tl.constexpr = False, STAGES: tl.constexpr = 1, JOIN: tl.constexpr = False, X_TMA: tl.constexpr = False,
):
    """Program ``(pid_n, pid_k)``: the fp32 partial ``x @ deq(W).T`` of its rows and K slice, and (for the first
    programs of each slice) its share of the partial ``S``. ``FMA`` (``M == 1``, ``WORDS``): CUDA-core FMAs.
    ``TMA`` (``WORDS``): the word tiles come through a ``STAGES``-deep shared-memory ring filled by the tensor
    memory accelerator (Triton's pipeliner), instead of the register double buffer. ``JOIN`` (``WORDS``, not
    ``FMA``): ``_dot_step_joined`` instead of ``_dot_step``. ``X_TMA`` (``TMA``): the x tiles come by TMA too."""
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

    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    if WORDS:
        SUBK: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
        row_blk = rows * (K // BLOCKSIZE)  # scale block of W[n, 0]
        offset = 0.0
        if NESTED:
            offset = tl.load(offset_ptr)
        if FMA:
            acc = tl.zeros((BLOCK_N, BLOCK_K // SUBK, SUBK // 8), dtype=tl.float32)  # per packed word
        else:
            acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)  # outᵀ tile
        if TMA:
            SPT: tl.constexpr = BLOCK_K // SUBK
            row0 = pid_n * BLOCK_N
            for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
                w = tl.reshape(packed_ptr.load([row0, k0 // 8]), (BLOCK_N, SPT, SUBK // 8))
                q, s2 = _load_scales(absmax_ptr, absmax2_ptr, row_blk, k0, K, k0 < k_end, BLOCK_K, BLOCKSIZE,
                                     NESTED, NESTED_BLOCKSIZE, EVEN_K)
                if X_TMA:
                    x = x_desc.load([0, k0])
                else:
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    x_ok = m_ok[:, None] & (offs_k < K)[None, :]
                    x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=x_ok, other=0.0)
                am = _absmax(q, s2, code2_ptr, offset, NESTED)[:, :, None]
                acc = _step(acc, w, am, x, code_ptr, dtype, SHFL, FMA, JOIN, M_PAD, BLOCK_N, BLOCK_K, BLOCKSIZE,
                            DOT_FP32, INPUT_PRECISION)
        else:
            # register double buffer: step k0 + BLOCK_K is loaded while step k0 is computed
            w_n, q_n, s2_n, x_n = _load_step(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, x_rows, stride_xk,
                                             m_ok, k_start, k_end, K, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
                                             EVEN_K)
            # the scales of a step are gathered (code2[q]) at the end of the step before, once its q has arrived:
            # the gather's latency overlaps a whole step instead of stalling the first use
            am_n = _absmax(q_n, s2_n, code2_ptr, offset, NESTED)[:, :, None]
            for k0 in range(k_start, k_end, BLOCK_K):
                w_c, am_c, x_c = w_n, am_n, x_n
                w_n, q_n, s2_n, x_n = _load_step(packed_ptr, absmax_ptr, absmax2_ptr, row_blk, x_rows,
                                                 stride_xk, m_ok, k0 + BLOCK_K, k_end, K, BLOCK_K, BLOCKSIZE,
                                                 NESTED, NESTED_BLOCKSIZE, EVEN_K)
                acc = _step(acc, w_c, am_c, x_c, code_ptr, dtype, SHFL, FMA, JOIN, M_PAD, BLOCK_N, BLOCK_K,
                            BLOCKSIZE, DOT_FP32, INPUT_PRECISION)
                am_n = _absmax(q_n, s2_n, code2_ptr, offset, NESTED)[:, :, None]
        if FMA:
            acc = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # [BLOCK_N, 1]
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
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

    if PDL:
        gdc_launch_dependents()  # the finish kernel may launch now; it waits for this grid before reading
    ws = ws_ptr + pid_k.to(tl.int64) * M * N + offs_m64[None, :] * N + offs_n.to(tl.int64)[:, None]
    tl.store(ws, acc, mask=n_ok[:, None] & m_ok[None, :])
    _lora_s_partial(x_rows, stride_xk, m_ok, offs_m64, a_ptr, stride_ar, stride_ak, ws_s_ptr, pid_n, pid_k,
                    M, K, R, RANKS, k_start, k_end, dtype, M_PAD, 4096 if M_PAD == 1 else BLOCK_K)


@triton.jit
def nf4_gemv_finish_kernel(ws_ptr, ws_s_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, M, N, R, scaling,
                           stride_bn, stride_br, stride_bias, stride_ym, stride_yn, stride_sm, stride_sr,
                           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                           R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """For a ``[M, BLOCK_N]`` column tile of ``y``, sums taken in the fixed order 0, 1, ..., SPLIT_K - 1:
    ``S = round(ws_s[0] + ws_s[1] + ...)`` (program 0 stores it), ``y = round(ws[0] + ws[1] + ... +
    round(scaling * S) @ round(B).T + round(bias))``; everything in ``y.dtype`` with fp32 accumulation."""
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    if PDL:
        gdc_wait()  # the main kernel's workspaces are complete and visible from here on
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    offs_n64 = offs_n.to(tl.int64)
    offs_m64 = offs_m.to(tl.int64)
    out_ok = n_ok[:, None] & m_ok[None, :]
    ws = ws_ptr + offs_m64[None, :] * N + offs_n64[:, None]
    acc = tl.load(ws, mask=out_ok, other=0.0)
    for sk in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws + sk * M * N, mask=out_ok, other=0.0)
    for r0 in range(0, R, R_BLOCK):
        offs_r = r0 + tl.arange(0, R_BLOCK)
        r_ok = offs_r < R
        s_ok = m_ok[:, None] & r_ok[None, :]
        ws_s = ws_s_ptr + offs_m64[:, None] * R + offs_r[None, :]
        s = tl.load(ws_s, mask=s_ok, other=0.0)  # [M_PAD, R_BLOCK]
        for sk in tl.static_range(1, SPLIT_K):
            s += tl.load(ws_s + sk * M * R, mask=s_ok, other=0.0)
        s = round_fp32_to(s, dtype)
        if tl.program_id(0) == 0:
            tl.store(s_ptr + offs_m64[:, None] * stride_sm + offs_r[None, :] * stride_sr, s, mask=s_ok)
        lora_l = round_fp32_to(s.to(tl.float32) * scaling, dtype)
        bt = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(dtype)  # [BLOCK_N, R_BLOCK]
        acc = _dot(bt, tl.trans(lora_l), acc, DOT_FP32, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n64 * stride_bias, mask=n_ok, other=0.0).to(dtype).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_n64[:, None] * stride_yn + offs_m64[None, :] * stride_ym,
             round_fp32_to(acc, dtype), mask=out_ok)


# ---------------------------------------------------------------------------------------------- launcher
FINISH_BLOCK_N = 64
GENERIC_BLOCK_K = 64  # default block_k when K % blocksize != 0
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only shapes the (interpreted) grid on CPU


PDL_MAX_M = 16
# The CUDA C++ tensor-core kernel (csrc/nf4_mma_gemv.cu) replaces the first launch by default at 2 <= M <= 16 on
# weights of at least CUDA_MIN_ELEMENTS, where it measured 1.14-1.47x faster than the Triton kernels on the H100
# (bench/results/gemv-mma-s-items-h100.txt: 4096->14336 and 14336->4096, whole layer call). At 4096 x 4096 it
# measured 1.06-1.09x faster at M = 2 and 4 and 0.93-0.97x at M = 8 to 16, and at M = 1 it is slower on all three
# shapes but 4096->14336; there and on smaller weights it is opt-in (cuda=True).
CUDA_MIN_M, CUDA_MAX_M = 2, 16
CUDA_MIN_ELEMENTS = 2**25


@functools.lru_cache(maxsize=None)
def _pdl(device) -> bool:
    """Programmatic dependent launch of the finish kernel is possible: Hopper or newer, a Triton with grid
    dependency control, and not switched off with ``LOWRANK_KERNELS_PDL=0`` (read once per device).

    With PDL the finish kernel is launched while the main kernel's last programs store their partial sums (the
    main kernel signals ``gdc_launch_dependents`` after its K loop) and waits (``gdc_wait``) before it reads
    them, so its launch latency hides behind the main kernel's tail. Measured on the H100
    (``bench/results/gemv-pdl-h100.txt``, three on/off pairs): 4096->4096 M = 1 10.9 vs 11.9 us, M = 16
    16.5 vs 17.0 us; 14336->4096 M = 1 25.7 vs 25.9 us, M = 16 43.7 vs 44.6 us. Slower with a finish grid
    larger than one wave (4096->14336: +0.4 us at M = 1; not profiled: probably its programs, launched early,
    land on the few SMs that are free first) and at M = 64 (+1.9 us on 4096->4096), hence the conditions in
    :func:`nf4_gemv`."""
    return (device.type == "cuda" and gdc_wait is not None and os.environ.get("LOWRANK_KERNELS_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _default_tma() -> bool:
    """The TMA kernels are the default only while a CUDA graph is being captured. Their descriptors cost host time
    on every call: on the H100 (``bench/results/host-launch-cost-h100.txt``, two runs on two hosts) an eager
    4096 x 4096 decode call takes the host 156 / 302 µs with them against 120 / 217 µs without, for 0.4-3 µs less
    GPU time at M = 1. Eager decode is host-bound, so there the register-double-buffered kernel is the faster
    call; a captured graph pays the host cost once and keeps the GPU time. (A kernel first needed under capture
    is compiled there; ``test_nf4_gemv_default_under_graph_capture`` covers the warm-up-then-capture order.)"""
    return not INTERPRET and torch.cuda.is_current_stream_capturing()


def _tma_ok(packed, K, device) -> bool:
    """The word tiles can come by TMA: a Triton with host descriptors, Hopper or newer (or the interpreter), and
    16-byte aligned packed rows (``K % 32 == 0``, aligned base). The tile box must also be at most 256 x 256 words
    (``block_n <= 256``, ``block_k <= 2048``)."""
    if TensorDescriptor is None or K % 32 or packed.data_ptr() % 16 or not packed.is_contiguous():
        return False
    return INTERPRET or (device.type == "cuda" and _capability(device) >= 9)


@functools.lru_cache(maxsize=None)
def _capability(device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def default_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands (16-bit operands ignore it): ``"tf32"`` where torch allows TF32 for
    fp32 matmuls, else ``"ieee"`` (exact; in this kernel also cheaper than ``"tf32x3"``, whose split operands
    spill registers: ~15 vs ~42 SASS instructions per weight element)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def default_config(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16, num_sms: int = 132,
                   tma: bool = False) -> dict:
    """Launch configuration ``dict(block_n, block_k, split_k, num_warps, num_stages, lookup, fma, max_registers,
    tma, join, x_tma)`` for ``y [M, N]``; ``tma``: the word tiles can come by TMA (see :func:`_tma_ok`).

    With TMA (Hopper), from ``bench/results/gemv-tma-h100.txt``, ``gemv-join-h100.txt``,
    ``gemv-join-xtma-h100.txt`` and ``gemv-join-m4-32-h100.txt`` (bf16, the three Llama-3-8B shapes): a 3-stage
    TMA ring of word tiles, 256 K per step; M = 1: the CUDA-core variant, 256 rows x 8 warps x split-K 2 for
    N > 8192, else 64 rows x 4 warps x split-K 4; 8 < M <= 16: the joined-tile dot, 64 rows x 4 warps x split-K 4;
    above: the joined-tile dot, 128 rows x 8 warps, split-K 4 (2 when there are more than 64 row blocks). At
    2 <= M <= 8 the configuration without TMA below (the joined tile took 1.3-1.45x its time at M = 4).

    Without (other GPUs, unaligned rows), from ``gemv-h100.txt`` (M = 1, 4, 16) and ``gemv-m32-64-h100.txt``
    (M = 32, 64): M = 1: the CUDA-core variant with 128 rows x 256 K per program, 8 warps, split-K 8; M <= 8:
    64 x 256, 4 warps, split-K 8; M <= 16: 128 x 256, 8 warps, split-K 8; above, 128 x 128, 4 warps, with
    split-K chosen for about 256 programs (8 for N = 4096, 2 for N = 14336); 1 stage (the kernel double-buffers
    in registers).

    fp32 uses ``block_k`` 128 at M > 1 (256 spills). Always the shuffle lookup; ``split_k`` is capped at two K
    steps per slice.
    """
    join = False
    stages = 1
    tma = tma and not 2 <= M <= 8  # there the register-double-buffered 8-dot kernel measured fastest
    if tma:
        stages, block_k = 3, 256
        if M == 1:
            block_n, warps, split = (256, 8, 2) if N > 8192 else (64, 4, 4)
        elif M <= 16:
            block_n, warps, split, join = 64, 4, 4, True
        else:
            block_n, warps, join = 128, 8, True
            split = 4 if cdiv(N, block_n) <= 64 else 2
    elif M == 1:
        block_n, block_k, warps, split = 128, 256, 8, 8
    elif M <= 8:
        block_n, block_k, warps, split = 64, 256, 4, 8
    elif M <= 16:
        block_n, block_k, warps, split = 128, 256, 8, 8
    else:
        block_n, block_k, warps = 128, 128, 4
        split = max(1, min(8, 256 // cdiv(N, block_n)))
    if dtype == torch.float32 and M > 1:
        block_k = 128
    split_k = max(1, min(split, cdiv(K, block_k) // 2))
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=warps, num_stages=stages,
                lookup="shfl", fma=M == 1, max_registers=None, tma=tma, join=join, x_tma=True)


_default_config = functools.lru_cache(maxsize=1024)(default_config)


def _triton_partials(x, nf4, lora_A, cfg, tma, tma_ok, dot_fp32, precision, pdl):
    """The first launch on Triton: ``(n_split, ws [n_split, M, N], ws_s [n_split, M, r])``."""
    M, K = x.shape
    N = nf4["shape"][0]
    R = lora_A.shape[0]
    regs = cfg["max_registers"]
    blocksize = nf4["blocksize"]
    nested = nf4.get("absmax2") is not None
    code = nf4["code"]
    packed = nf4["packed"]
    w_args = (packed, nf4["absmax"], nf4["absmax2"] if nested else code, nf4["code2"] if nested else code,
              nf4["offset"] if nested else code, code)  # offset: its 0-dim tensor

    block_k = cfg["block_k"]
    k_iters = cdiv(K, block_k)
    iters_per_split = cdiv(k_iters, cfg["split_k"])
    n_split = cdiv(k_iters, iters_per_split)  # no empty slices
    words = K % blocksize == 0 and block_k >= 128 and packed.data_ptr() % 4 == 0 and packed.is_contiguous()
    use_fma = cfg["fma"] and words and M == 1
    use_tma = cfg["tma"] and words and tma_ok and cfg["block_n"] <= 256 and block_k <= 2048
    if tma and not use_tma:
        raise ValueError("nf4_gemv: tma=True needs the packed-word path (K % blocksize == 0, block_k >= 128), "
                         "K % 32 == 0, a contiguous 16-byte aligned packed tensor, block_n <= 256, block_k <= 2048, "
                         "and a Hopper GPU or the interpreter")
    if use_tma:  # the packed words as a uint32 [N, K // 8] matrix, read in [block_n, block_k // 8] tiles
        packed = TensorDescriptor(packed.view(-1).view(torch.uint32).view(N, K // 8), [N, K // 8], [K // 8, 1],
                                  [cfg["block_n"], block_k // 8])
        w_args = (packed,) + w_args[1:]
    m_pad = 1 if use_fma else max(8, next_pow2(M))
    x_tma = (use_tma and cfg["x_tma"] and x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0
             and x.data_ptr() % 16 == 0 and block_k <= 256)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [m_pad, block_k]) if x_tma else x
    grid_n = cdiv(N, cfg["block_n"])
    ws = torch.empty((n_split, M, N), dtype=torch.float32, device=x.device)
    ws_s = torch.empty((n_split, M, R), dtype=torch.float32, device=x.device)

    args = (x, *w_args, lora_A, ws, ws_s, x_desc, M, N, K, R, cdiv(R, grid_n),
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), iters_per_split * block_k,
            blocksize, nested, nf4["nested_blocksize"] if nested else 1,  # BLOCKSIZE, NESTED, NESTED_BLOCKSIZE
            words, words and K % block_k == 0, words and cfg["lookup"] == "shfl" and not INTERPRET,  # .., SHFL
            use_fma, m_pad, cfg["block_n"], block_k, dot_fp32, precision, pdl,  # FMA, .., PDL
            use_tma, cfg["num_stages"], cfg["join"], x_tma)  # TMA, STAGES, JOIN, X_TMA
    options = dict(num_warps=cfg["num_warps"], num_stages=1 if use_tma else cfg["num_stages"],
                   enable_fp_fusion=False, **({} if regs is None or INTERPRET else dict(maxnreg=regs)))
    if use_tma:  # tensor descriptors: through Triton's JIT (only while a graph is captured, by default)
        with device_of(x):
            nf4_gemv_kernel[(grid_n, n_split)](*args, **options)
    else:
        launch(nf4_gemv_kernel, (grid_n, n_split), args, **options)
    return n_split, ws, ws_s


def _use_cuda(x, nf4, N, cuda, cuda_warps, triton_knobs, input_precision) -> bool:
    """Whether the first launch is the CUDA C++ kernel (``nf4_gemv``'s ``cuda``; module constants above)."""
    if cuda is not None and not isinstance(cuda, bool):
        raise TypeError(f"nf4_gemv: cuda must be None, True or False, got {cuda!r}")
    if cuda_warps is not None:
        if cuda is not True:
            raise ValueError("nf4_gemv: cuda_warps applies to the CUDA kernel: pass cuda=True with it")
        if cuda_warps not in nf4_gemv_cuda.WARPS:
            raise ValueError(f"nf4_gemv: cuda_warps must be one of {nf4_gemv_cuda.WARPS}, got {cuda_warps!r}")
    if cuda is True and (triton_knobs or input_precision is not None):
        knobs = sorted(triton_knobs) + (["input_precision"] if input_precision is not None else [])
        raise ValueError(f"nf4_gemv: {', '.join(knobs)} apply to the Triton kernels, not with cuda=True")
    if cuda is False:
        return False
    M, K = x.shape
    if cuda is None:  # where it measured faster, and not when Triton knobs were passed
        return (CUDA_MIN_M <= M <= CUDA_MAX_M and N * K >= CUDA_MIN_ELEMENTS and not INTERPRET and x.is_cuda
                and not triton_knobs and input_precision is None and nf4_gemv_cuda.supported(x, nf4))
    if not (x.is_cuda and nf4_gemv_cuda.supported(x, nf4)):
        raise ValueError("nf4_gemv: cuda=True needs a CUDA GPU of compute capability >= 8 with nvcc, bf16 / fp16 "
                         "x with M <= 16, K % 256 == 0, unit stride along K and 16-byte aligned rows, "
                         "blocksize >= 64, and contiguous aligned packed weight and scales")
    return True


def _check_config(cfg):
    _check_pow2("block_n", cfg["block_n"], 16, 1024)
    _check_pow2("block_k", cfg["block_k"], 32, 4096)
    for key in ("split_k", "num_warps", "num_stages"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"nf4_gemv: {key} must be a positive int, got {cfg[key]!r}")
    if cfg["lookup"] not in LOOKUPS:
        raise ValueError(f"nf4_gemv: lookup must be one of {LOOKUPS}, got {cfg['lookup']!r}")
    for key in ("fma", "tma", "join", "x_tma"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"nf4_gemv: {key} must be a bool, got {cfg[key]!r}")
    regs = cfg["max_registers"]
    if regs is not None and (not isinstance(regs, int) or isinstance(regs, bool) or not 24 <= regs <= 255):
        raise ValueError(f"nf4_gemv: max_registers must be None or an int in [24, 255], got {regs!r}")


def _check_pow2(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > hi or v & (v - 1):
        raise ValueError(f"nf4_gemv: {name} must be a power of two in [{lo}, {hi}], got {v!r}")


def _check_float(name, t, shape):
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a bfloat16, float16 or float32 tensor, got {got}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {tuple(t.shape)}")


def nf4_gemv(x, nf4, lora_A, lora_B, scaling, bias=None, *, block_n=None, block_k=None, split_k=None,
             num_warps=None, num_stages=None, lookup=None, fma=None, max_registers=None, tma=None, join=None,
             x_tma=None, input_precision=None, cuda=None, cuda_warps=None):
    """``(y [M, N], S [M, r])``: ``S = x @ A.T``, ``y = x @ deq(W).T + (scaling * S) @ B.T + bias`` in
    ``x.dtype`` (decode-sized ``M``; see the module doc). Two launches, nothing else.

    ``x [M, K]`` (bf16 / fp16 / fp32, any strides, ``M <= 64``); ``nf4``: the NF4 state of ``W [N, K]`` as
    ``dispatch._nf4_state`` gives it (``packed``, ``absmax``, ``code``, ``blocksize``, ``shape`` and, when
    double-quantized, ``absmax2``, ``code2``, ``offset``, ``nested_blocksize``); ``lora_A [r, K]``,
    ``lora_B [N, r]`` and ``bias [N]`` (or ``None``) in any of bf16 / fp16 / fp32 and any strides: the kernels
    round them to ``x.dtype`` as they read them (peft's fp32 adapters need no cast launches). ``S`` and
    ``scaling * S`` are rounded to ``x.dtype``, as the unfused path computes them.

    Launch knobs (``None``: :func:`default_config`): ``block_n`` (W rows per program, power of two >= 16),
    ``block_k`` (K per step, power of two >= 32; the fast path needs >= 128 and ``K % blocksize == 0``; when
    ``K % blocksize != 0`` the default is 64), ``split_k`` (K slices, summed in a fixed order by the second
    launch: deterministic), ``num_warps``, ``num_stages``, ``lookup`` (``"shfl"``: warp-shuffle code lookup,
    ``"load"``: global-memory gather; the interpreter always uses ``"load"``), ``fma`` (``M == 1`` on the fast
    path: CUDA-core FMAs, the scale applied per packed word), ``max_registers`` (per thread, ptxas ``maxnreg``;
    ``None``: the compiler's choice), ``tma`` (word tiles through a ``num_stages``-deep shared-memory ring filled
    by TMA; ``True`` raises where that is impossible), ``join`` (``M > 1``: one dot per step on the word tile
    joined back into element order), ``x_tma`` (with ``tma``: the x tiles by TMA too, where x's rows are 16-byte
    aligned); ``input_precision`` of fp32 dots (``"ieee"``, ``"tf32"``, ``"tf32x3"``).

    ``cuda``: the first launch is the CUDA C++ tensor-core kernel of ``csrc/nf4_mma_gemv.cu``
    (:mod:`~lowrank_kernels.kernels.nf4_gemv_cuda`). ``None``: where it is supported, ``CUDA_MIN_M <= M <=
    CUDA_MAX_M`` and ``N * K >= CUDA_MIN_ELEMENTS``; ``True`` raises where it is not supported. It runs with
    ``cuda_warps`` warps per block (1, 2, 4 or 8) and ``split_k`` K slices; the Triton knobs above do not apply.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, K] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    M, K = x.shape
    dtype = x.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {dtype}")
    if M > MAX_M:
        raise ValueError(f"x: nf4_gemv handles M <= {MAX_M} rows (decode); got M={M}")
    shape = tuple(nf4["shape"])
    if len(shape) != 2 or shape[1] != K:
        raise ValueError(f"nf4: weight shape {shape} does not fit x of shape {tuple(x.shape)} (expected [N, {K}])")
    N = shape[0]
    if N * K > MAX_ELEMENTS:
        raise ValueError(f"weight: {N * K} elements, over the int32-indexed kernel limit {MAX_ELEMENTS}")
    R = lora_A.shape[0] if isinstance(lora_A, torch.Tensor) and lora_A.dim() == 2 else 0
    if R < 1:
        raise ValueError(f"lora_A: expected a 2-D [r, {K}] tensor with r >= 1, got "
                         f"{getattr(lora_A, 'shape', type(lora_A).__name__)}")
    _check_float("lora_A", lora_A, (R, K))
    _check_float("lora_B", lora_B, (N, R))
    if bias is not None:
        _check_float("bias", bias, (N,))
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling: expected a real number, got {type(scaling).__name__}")
    for name, t in (("nf4 packed", nf4["packed"]), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")

    default_tma = _default_tma()
    # checked only where TMA may be used (an eager call with default knobs skips it)
    tma_ok = ((default_tma or tma is True) and K % nf4["blocksize"] == 0
              and _tma_ok(nf4["packed"], K, x.device))
    cfg = _default_config(M, N, K, dtype, _num_sms(x.device), tma_ok and default_tma)  # shared: not mutated
    if K % nf4["blocksize"] != 0:  # generic path: larger tiles spill (its per-element scale selection)
        cfg = dict(cfg, block_k=GENERIC_BLOCK_K)
    overrides = {k: v for k, v in (("block_n", block_n), ("block_k", block_k), ("split_k", split_k),
                                   ("num_warps", num_warps), ("num_stages", num_stages), ("lookup", lookup),
                                   ("fma", fma), ("max_registers", max_registers), ("tma", tma), ("join", join),
                                   ("x_tma", x_tma)) if v is not None}
    if overrides:  # the defaults are valid by construction; only what the caller passes needs checking
        cfg = dict(cfg, **overrides)
        _check_config(cfg)
    precision = input_precision or default_input_precision(dtype)

    y = x.new_empty((M, N))
    if M == 0 or N == 0:  # nothing to launch (S of an N = 0 layer is still x @ A.T)
        return y, x @ lora_A.to(dtype).t()
    S = x.new_empty((M, R))

    use_cuda = _use_cuda(x, nf4, N, cuda, cuda_warps, overrides.keys() - {"split_k"}, input_precision)
    dot_fp32 = INTERPRET and dtype == torch.bfloat16
    # PDL only where it measured faster (gemv-pdl-h100.txt): M <= PDL_MAX_M and a finish grid of one wave
    pdl = (not INTERPRET and M <= PDL_MAX_M and cdiv(N, FINISH_BLOCK_N) <= _num_sms(x.device)
           and _pdl(x.device))
    if use_cuda:
        warps, n_split = nf4_gemv_cuda.default_launch(M, N, K, _num_sms(x.device))
        k_per_split = cdiv(cdiv(K, nf4_gemv_cuda.GROUP_K), split_k or n_split) * nf4_gemv_cuda.GROUP_K
        n_split = cdiv(K, k_per_split)  # no empty slices
        ws = torch.empty((n_split, M, N), dtype=torch.float32, device=x.device)
        ws_s = torch.empty((n_split, M, R), dtype=torch.float32, device=x.device)
        nf4_gemv_cuda.partials(x, nf4, lora_A, ws, ws_s, k_per_split, n_split, cuda_warps or warps)
    else:
        n_split, ws, ws_s = _triton_partials(x, nf4, lora_A, cfg, tma, tma_ok, dot_fp32, precision, pdl)
    has_bias = bias is not None
    launch(nf4_gemv_finish_kernel, (cdiv(N, FINISH_BLOCK_N),),
           (ws, ws_s, lora_B, bias if has_bias else x, y, S, M, N, R, float(scaling),
            lora_B.stride(0), lora_B.stride(1), bias.stride(0) if has_bias else 0, y.stride(0), y.stride(1),
            S.stride(0), S.stride(1),
            n_split, has_bias, max(8, next_pow2(M)), max(16, min(MAX_RANK_CHUNK, next_pow2(R))), FINISH_BLOCK_N,
            dot_fp32, precision, pdl),  # SPLIT_K, HAS_BIAS, M_PAD, R_BLOCK, BLOCK_N, DOT_FP32, .., PDL
           # num_stages=1: no software pipelining of the rank loop, whose SPLIT_K loads per chunk would otherwise
           # be staged in shared memory (320 KB at M = 64, r = 64 over 9 slices)
           num_warps=4, num_stages=1, enable_fp_fusion=False, **(dict(launch_pdl=True) if pdl else {}))
    return y, S
