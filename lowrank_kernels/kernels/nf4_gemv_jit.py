"""Triton kernels of the NF4 decode call (``M = 1 ... 64``; launcher: :mod:`.nf4_gemv`), LoRA and bias inside:

    S [M, r] = x [M, K] @ A.T,   y [M, N] = x @ deq(W).T + (s * S) @ B.T (+ bias [N])     W [N, K] NF4, A [r, K]

At decode sizes the layer is one read of the 4-bit weight: streaming it at HBM speed means every SM must
dequantize ~20 weight elements per clock against an issue rate of 128 thread-instructions per clock, so the
kernel is designed around *instructions per weight element* as much as around bytes.

Work decomposition
------------------
Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: program ``(i, s)`` owns rows ``[i*BLOCK_N, (i+1)*BLOCK_N)`` of W and the
``s``-th slice of K (a whole number of ``BLOCK_K`` chunks). Rows past ``N`` are clamped to ``N - 1`` (loads stay
in bounds and unmasked; those results are never stored).

Fast path (``WORDS``: ``K % blocksize == 0``, ``BLOCK_K >= 128``): each K step reads the ``[BLOCK_N, BLOCK_K // 8]``
tile of packed 32-bit words (8 nibbles each; every row a contiguous run of ``BLOCK_K // 2`` bytes, every weight
byte read once) plus its ``[BLOCK_N, max(1, BLOCK_K // blocksize)]`` first-level scales. The next step's words,
scales and x tile are loaded before the current step is computed: a register double buffer, so the HBM latency of
step ``i + 1`` hides behind the arithmetic of step ``i`` without the shared-memory round trip of ``num_stages``
pipelining (which costs more instructions here).

Dequantization, bit-identical to ``NF4Weight.dequantize`` / bitsandbytes' ``dequantize_4bit``:
``am = fp32(fp32(code2[q] * absmax2[b // 256]) + offset)`` (no FMA contraction: ``enable_fp_fusion=False``),
``w = round_to_dtype(fp32(code[nibble] * am))``. The 16-entry code lookup is a warp shuffle (``nf4_code``: one
shift and one ``shfl`` per element); the interpreter, which cannot run inline PTX, uses a global-memory gather.

The product at ``M > 1`` uses tensor cores: ``tl.dot`` of each dequantized ``[BLOCK_N, BLOCK_K // 8]`` tile (the A
operand, produced directly in the wgmma register layout: no shared-memory copy of W) with ``x.T`` padded to
``M_PAD = max(8, next_pow2(M))`` columns (wgmma's n = 8), accumulating ``[BLOCK_N, M_PAD]`` in fp32. The 8 nibble
positions of a word are kept apart: tile ``e`` holds elements ``k0 + 8c + e`` and is multiplied with the matching
strided columns of x (loaded contiguous and split in registers), so W is never interleaved.

``FMA`` (``M = 1``): the tensor-core dot would waste 7/8 of its padded columns and need every weight element
scaled, rounded and packed into its operand layout. Instead, per packed word, ``t = sum_e code[nibble_e] * x_e``
with 8 fp32 FMAs on the looked-up codes, and the block scale applied once per word (``acc += t * am``): a shift, a
shuffle and an FMA per element. Its result is the unrounded dequantized weight times ``x`` (closer to the fp32
product than the bf16-rounded one).

``TMA``: the word tiles come through a host-side tensor descriptor of the packed weight as uint32 ``[N, K // 8]``
in a ``tl.range(..., num_stages=STAGES)`` loop, so Triton's pipeliner keeps ``STAGES`` tiles in flight in shared
memory (filled by the tensor memory accelerator) instead of in registers; the x tiles the same way where x's rows
are 16-byte aligned (``X_TMA``). ``JOIN`` (``M > 1``): the 8 nibble positions joined back into element order and
one ``tl.dot`` per step on the contiguous x tile.

Generic path (any K: odd K, blocks straddling rows, ``BLOCK_K < 128``): a tile row's even- and odd-position
elements are read as two byte tiles (``nf4_tile.nf4_tile_even_odd``). Correct, slower.

LoRA, bias and the second launch
--------------------------------
The adapters are read in their own dtype (peft keeps them in fp32) and rounded to ``x.dtype`` in the kernels, so
a decode step is exactly two launches: no casts, no separate ``S`` GEMM. Program ``(i, s)`` stores its fp32
partial tile to a workspace ``[SPLIT_K, M, N]``; the programs ``i < cdiv(r, RANKS)`` of each K slice also store
the slice's partial ``S = x @ A.T`` for ``RANKS = cdiv(r, grid_n)`` ranks each (``[SPLIT_K, M, r]``).
``nf4_gemv_finish_kernel`` sums both workspaces in the fixed order 0, 1, ... (no atomics: deterministic), rounds
``S`` and ``scaling * S`` to ``x.dtype`` as the unfused path does, adds ``(s S) @ round(B).T`` with one more
``tl.dot`` per 64 ranks, adds the bias and rounds to the output dtype. With ``PDL`` (Hopper) the finish kernel is
launched while the main kernel's last programs still store (``gdc_launch_dependents`` after the K loop) and waits
(``gdc_wait``) before it reads, so its launch latency hides behind the main kernel's tail.

Indices: flat element indices ``n*K + k`` are int32 (the launcher checks ``N*K``); offsets into x, y, the LoRA
factors and the workspace are int64. Interpreter (``TRITON_INTERPRET=1``): bf16 dot operands are upcast (exactly)
to fp32 because its ``tl.dot`` mishandles bf16 (``DOT_FP32``).
"""
import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch, sm_90+); Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: the two launches stay plainly serialized
    gdc_launch_dependents = gdc_wait = None

from lowrank_kernels.kernels.dot import dot as _dot
from lowrank_kernels.kernels.nf4_code import nf4_word_codes, nf4_word_values
from lowrank_kernels.kernels.nf4_tile import nf4_tile_even_odd, nf4_word_ptrs
from lowrank_kernels.kernels.rounding import round_fp32_to

HAS_GDC = gdc_wait is not None  # the finish kernel can be a programmatic dependent launch


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
    ptrs = nf4_word_ptrs(packed_ptr, row_word[:, None, None] + kw[None, :, :])
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
