"""Triton kernels: the LoRA terms of a mixed-adapter batch, each row through its own adapter (gather form, for
decode-sized batches; ``python_ref/mixed.py`` is the oracle):

    S[m]  = round(x[m] @ round(A_a).T)                     [R]   a = index[m]   (shrink: lora_gather_shrink_kernel)
    y[m] += s_a * S[m] @ round(B_a).T                      [N]   no term where a = -1 (expand: ..._expand_kernel)

The adapters are stacked and zero-padded to the largest rank ``R`` (:func:`stack_adapters`): ``A_all [n, R, K]``,
``B_all [n, N, R]``, ``scalings [n]`` fp32, ``ranks [n]``; the kernels read adapter ``a`` up to its own rank
``r_a`` (masked loads: the padding costs no bytes), so a row's ranks beyond ``r_a`` are exact zeros. Adapters may
be fp32 (as peft keeps them) and are rounded to x's dtype as they are read; sums accumulate in fp32; ``S`` is
rounded to x's dtype as the single-adapter path rounds it, and ``y[m] + s_a * (S @ B.T)`` once more at the end.

Two forms. Gather (decode-sized batches, :func:`lora_gather`), tiling: the shrink runs one program per (row,
``K_CHUNK`` columns of K) (``BLOCK_R >= R`` ranks at once, ``BLOCK_K`` steps), writing fp32 partial sums, so that
a 16-row batch spreads the adapters' reads over ``16 * K / K_CHUNK`` programs rather than 16; the expand one
program per (row, ``BLOCK_N`` output columns) adding the row's partials in chunk order into ``S`` and reading a
``[BLOCK_N, BLOCK_R]`` tile of its ``B``. Rows of one adapter read the same ``A`` / ``B`` tiles, which stay in L2
across the batch. Products are multiply-and-sum (no ``tl.dot``): a decode row is one vector, and the interpreter
computes these in every dtype.
Segments (prefill, :func:`lora_segments`): the rows sorted by adapter (a stable device sort), tiles of
``SEGMENT_BLOCK_M`` sorted rows, one ``tl.dot`` per adapter a tile holds (its rows kept, the others masked), so a
tile that straddles a boundary between adapters pays once per adapter in it.
"""
import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels.dot import dot
from lowrank_kernels.kernels.launch import INTERPRET, cdiv, launch, next_pow2
from lowrank_kernels.policy import fp32_dot_precision

BLOCK_K = 128
K_CHUNK = 512  # columns of K per gather-shrink program: M * cdiv(K, K_CHUNK) programs share a decode batch's work
BLOCK_N = 64
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def lora_gather_shrink_kernel(x_ptr, idx_ptr, a_ptr, rank_ptr, part_ptr, M, K, R, stride_xm, stride_an, stride_ar,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr):
    """Program (m, c): the fp32 partial ``x[m, chunk c] @ A_a[:, chunk c].T`` over ``K_CHUNK`` columns of K, into
    ``part[c, m, :R]``."""
    m = tl.program_id(0)
    c = tl.program_id(1)
    a = tl.load(idx_ptr + m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if a >= 0:
        r_a = tl.load(rank_ptr + a)  # the adapter's own rank: its zero padding up to R is not read
        for k0 in range(c * K_CHUNK, c * K_CHUNK + K_CHUNK, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0)
            ak = tl.load(a_ptr + a * stride_an + offs_r[:, None] * stride_ar + offs_k[None, :],
                         mask=(offs_r[:, None] < r_a) & (offs_k[None, :] < K), other=0.0)
            acc += tl.sum(ak.to(xk.dtype).to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
    tl.store(part_ptr + (c * M + m) * R + offs_r, acc, mask=offs_r < R)


@triton.jit
def lora_gather_expand_kernel(part_ptr, idx_ptr, b_ptr, scal_ptr, rank_ptr, y_ptr, out_ptr, M, N, R, CHUNKS,
                              stride_ym, stride_yn, stride_om, stride_bn, stride_bo, BLOCK_R: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """Program (m, j): ``S[m]`` as the sum of the shrink's ``CHUNKS`` partials (in chunk order, rounded once to y's
    dtype), then ``out[m, cols j] = y[m, cols j] + s_a * S[m] @ B_a[cols j].T``, or ``y`` itself where a = -1."""
    m = tl.program_id(0)
    a = tl.load(idx_ptr + m).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    y = tl.load(y_ptr + m * stride_ym + offs_n * stride_yn, mask=n_ok, other=0.0)
    out_ptrs = out_ptr + m * stride_om + offs_n
    if a >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        s = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c in range(CHUNKS):
            s += tl.load(part_ptr + (c * M + m) * R + offs_r, mask=offs_r < R, other=0.0)
        s = s.to(y_ptr.dtype.element_ty)
        b = tl.load(b_ptr + a * stride_bn + offs_n[:, None] * stride_bo + offs_r[None, :],
                    mask=n_ok[:, None] & (offs_r[None, :] < tl.load(rank_ptr + a)), other=0.0)
        term = tl.sum(b.to(s.dtype).to(tl.float32) * s.to(tl.float32)[None, :], axis=1) * tl.load(scal_ptr + a)
        tl.store(out_ptrs, (y.to(tl.float32) + term).to(y.dtype), mask=n_ok)
    else:
        tl.store(out_ptrs, y, mask=n_ok)


def stack_adapters(adapters, dtype=None):
    """``(A_all [n, R, K], B_all [n, N, R], scalings [n] fp32, ranks [n] int32)`` of ``adapters`` (a list of
    ``(A_i [r_i, K], B_i [N, r_i], s_i)``), zero-padded to ``R = max r_i``, in ``dtype`` (default the first A's);
    the kernels read each adapter's own ``r_i`` ranks only."""
    if not adapters:
        raise ValueError("adapters: expected at least one (lora_A, lora_B, scaling)")
    A0, B0, _ = adapters[0]
    K, N = A0.shape[1], B0.shape[0]
    R = max(A.shape[0] for A, _, _ in adapters)
    dtype = dtype or A0.dtype
    A_all = A0.new_zeros((len(adapters), R, K), dtype=dtype)
    B_all = A0.new_zeros((len(adapters), N, R), dtype=dtype)
    for i, (A, B, _) in enumerate(adapters):
        if A.shape[1] != K or B.shape != (N, A.shape[0]):
            raise ValueError(f"adapters[{i}]: expected lora_A [r, {K}] and lora_B [{N}, r], got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        A_all[i, : A.shape[0]] = A
        B_all[i, :, : A.shape[0]] = B
    scalings = torch.tensor([float(s) for _, _, s in adapters], dtype=torch.float32, device=A0.device)
    ranks = torch.tensor([A.shape[0] for A, _, _ in adapters], dtype=torch.int32, device=A0.device)
    return A_all, B_all, scalings, ranks


def _operands(name, x, y, A_all, B_all):
    """``(x, A_all, B_all, out)`` as the kernels read them (unit stride along K, contiguous stacks, ``out`` a new
    contiguous ``[M, N]`` tensor that the expand fills from ``y``), after checking that ``y`` is ``[M, N]`` in x's
    dtype."""
    M, N = x.shape[0], B_all.shape[1]
    if x.dtype not in _DTYPES or y.dtype != x.dtype or tuple(y.shape) != (M, N):
        raise ValueError(f"{name}: x (bf16 / fp16 / fp32) and y [M, N] in its dtype, got x {x.dtype} and y "
                         f"{y.dtype} {tuple(y.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    return x, A_all.contiguous(), B_all.contiguous(), torch.empty((M, N), dtype=y.dtype, device=y.device)


def lora_gather(x, y, adapter_index, A_all, B_all, scalings, ranks):
    """``y`` plus each row's LoRA term (a new tensor; ``y`` unchanged): ``x [M, K]`` (bf16 / fp16 / fp32, unit
    stride along K), ``y [M, N]`` in x's dtype (e.g. the base product), ``adapter_index [M]`` int32 / int64 in
    ``[-1, n)`` (-1: no adapter; not checked here: the caller validates), ``A_all``, ``B_all``, ``scalings``,
    ``ranks`` from :func:`stack_adapters`."""
    x, A_all, B_all, out = _operands("lora_gather", x, y, A_all, B_all)
    (M, K), R, N = x.shape, A_all.shape[1], out.shape[1]
    if M == 0 or N == 0:
        return out
    chunks = max(1, cdiv(K, K_CHUNK))  # K = 0: one program per row writes zeros
    partials = x.new_empty((chunks, M, R), dtype=torch.float32)
    block_r = max(2, next_pow2(R))
    launch(lora_gather_shrink_kernel, (M, chunks), (x, adapter_index, A_all, ranks, partials, M, K, R, x.stride(0),
                                                    A_all.stride(0), A_all.stride(1), block_r, BLOCK_K, K_CHUNK),
           num_warps=4)
    launch(lora_gather_expand_kernel, (M, cdiv(N, BLOCK_N)),
           (partials, adapter_index, B_all, scalings, ranks, y, out, M, N, R, chunks, y.stride(0), y.stride(1),
            out.stride(0), B_all.stride(0), B_all.stride(1), block_r, BLOCK_N), num_warps=4)
    return out


# --------------------------------------------------------------------------------------------- segment form
@triton.jit
def lora_segment_shrink_kernel(x_ptr, perm_ptr, idx_ptr, a_ptr, rank_ptr, s_ptr, M, K, R, stride_xm, stride_an,
                               stride_ar, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Rows sorted by adapter (``perm``: original row of sorted row i, ``idx``: sorted adapters, -1 first): a tile of
    ``BLOCK_M`` sorted rows, for each adapter it holds (a contiguous range), ``S = x_rows @ A_a.T`` by ``tl.dot``
    on the rows of that adapter (the others masked to zero). Writes ``S`` in sorted row order."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    ids = tl.load(idx_ptr + offs_m, mask=row_ok, other=-1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    first = tl.min(tl.where(row_ok & (ids >= 0), ids, 2**30), axis=0)  # no adapter row: first > last
    last = tl.max(tl.where(row_ok, ids, -1), axis=0)
    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for a in range(first, last + 1):
        mine = row_ok & (ids == a)
        r_a = tl.load(rank_ptr + a)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                         mask=mine[:, None] & (offs_k[None, :] < K), other=0.0)
            ak = tl.load(a_ptr + a * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None],
                         mask=(offs_r[None, :] < r_a) & (offs_k[:, None] < K), other=0.0)
            acc = dot(xk, ak.to(xk.dtype), acc, DOT_FP32, PRECISION)
        total += tl.where(mine[:, None], acc, 0.0)
    tl.store(s_ptr + offs_m[:, None] * R + offs_r[None, :], total.to(s_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_r[None, :] < R))


@triton.jit
def lora_segment_expand_kernel(s_ptr, perm_ptr, idx_ptr, b_ptr, scal_ptr, rank_ptr, y_ptr, out_ptr, M, N, R,
                               stride_ym, stride_yn, stride_om, stride_bn, stride_bo, BLOCK_M: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                               PRECISION: tl.constexpr):
    """``out[perm[i]] = y[perm[i]] + s_a * S[i] @ B_a.T`` (``y`` itself for a row without adapter) for a tile of
    sorted rows and ``BLOCK_N`` columns, one ``tl.dot`` per adapter in the tile (rows of other adapters masked)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    ids = tl.load(idx_ptr + offs_m, mask=row_ok, other=-1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    first = tl.min(tl.where(row_ok & (ids >= 0), ids, 2**30), axis=0)
    last = tl.max(tl.where(row_ok, ids, -1), axis=0)
    s = tl.load(s_ptr + offs_m[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & (offs_r[None, :] < R),
                other=0.0)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for a in range(first, last + 1):
        mine = row_ok & (ids == a)
        b = tl.load(b_ptr + a * stride_bn + offs_n[None, :] * stride_bo + offs_r[:, None],
                    mask=(offs_n[None, :] < N) & (offs_r[:, None] < tl.load(rank_ptr + a)), other=0.0)
        term = dot(tl.where(mine[:, None], s, 0.0).to(s.dtype), b.to(s.dtype),
                   tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, PRECISION) * tl.load(scal_ptr + a)
        total += tl.where(mine[:, None], term, 0.0)
    ok = row_ok[:, None] & (offs_n[None, :] < N)
    y = tl.load(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=ok, other=0.0)
    out = tl.where(ids[:, None] >= 0, (y.to(tl.float32) + total).to(y.dtype), y)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], out, mask=ok)


SEGMENT_BLOCK_M = 32


def lora_segments(x, y, adapter_index, A_all, B_all, scalings, ranks):
    """As :func:`lora_gather`, with the rows grouped by adapter (a stable sort on the device) and each group's
    products on tensor cores (``tl.dot`` over ``BLOCK_M``-row tiles): the prefill form. ``R`` is padded to at least
    16 inside the kernels (``tl.dot``'s least inner dimension)."""
    x, A_all, B_all, out = _operands("lora_segments", x, y, A_all, B_all)
    (M, K), R, N = x.shape, A_all.shape[1], out.shape[1]
    if M == 0 or N == 0:
        return out
    ids, perm = torch.sort(adapter_index.to(torch.int64), stable=True)
    S = x.new_empty((M, R))
    block_r = max(16, next_pow2(R))
    grid_m = cdiv(M, SEGMENT_BLOCK_M)
    precision = fp32_dot_precision(x.dtype, "ieee")
    dot_fp32 = INTERPRET and x.dtype == torch.bfloat16
    launch(lora_segment_shrink_kernel, (grid_m,), (x, perm, ids, A_all, ranks, S, M, K, R, x.stride(0),
                                                   A_all.stride(0), A_all.stride(1), SEGMENT_BLOCK_M, block_r, 32,
                                                   dot_fp32, precision), num_warps=4)
    launch(lora_segment_expand_kernel, (grid_m, cdiv(N, BLOCK_N)),
           (S, perm, ids, B_all, scalings, ranks, y, out, M, N, R, y.stride(0), y.stride(1), out.stride(0),
            B_all.stride(0), B_all.stride(1), SEGMENT_BLOCK_M, block_r, BLOCK_N, dot_fp32, precision), num_warps=4)
    return out
