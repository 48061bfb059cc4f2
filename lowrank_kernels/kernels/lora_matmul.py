"""Triton kernel: one GEMM with a LoRA term in the same accumulator, for the (Q)LoRA forward and backward.

    out [M, N] = a [M, K] @ op(W) + keep * keep_scale * (L [M, r] @ R [r, N]) (+ bias)

* forward:     ``a = X``,  ``op(W) = W.T`` (``W [N, K]``),     ``L = s * S``, ``R = B.T``, no mask;
* backward dX: ``a = dY``, ``op(W) = W`` (``W [K, N]``, ``TRANS_W``), ``L = dS``, ``R = A``, and with dropout
  ``keep`` the 0/1 dropout mask of the LoRA branch and ``keep_scale = 1 / (1 - p)``.

``W`` is a dense bf16/fp16/fp32 tensor (any strides) or an NF4 weight that is dequantized *in registers*
inside the K loop (a dequantized ``W`` never touches memory). ``L`` and ``R`` are tiny (computed by the caller);
the LoRA term is one extra ``tl.dot`` of the ``[BLOCK_M, R_PAD]`` tile of ``L`` with the ``[R_PAD, BLOCK_N]``
tile of ``R`` after the K loop (``R_PAD``: ``r`` rounded up to a power of two >= 16, masked), into the same
fp32 accumulator, or into a second one that is multiplied by the ``keep`` tile and ``keep_scale`` before it is added.

Tiling: a 1-D grid over ``[BLOCK_M, BLOCK_N]`` output tiles with GROUP_M swizzling (L2 reuse of W), times a
second grid axis of ``SPLIT_K`` slices of K. Every slice covers a whole number of ``BLOCK_K`` chunks.

NF4 dequantization of a ``[rows, cols]`` tile of the stored ``W`` (``W_COLS`` columns; element ``(n, k)`` is flat
index ``e = n*W_COLS + k``, high nibble when ``e`` is even, scale block ``e // BLOCKSIZE``; with ``TRANS_W`` the
tile is ``[BLOCK_K, BLOCK_N]`` and is transposed in registers):

* ``ALIGNED`` (``W_COLS % BLOCKSIZE == 0`` and a 4-byte aligned packed weight, the usual case): every row starts
  on a 32-bit word and on a scale block, so the tile is loaded as ``[BLOCK_N, BLOCK_K // 8]`` packed words, each
  word's 8 nibbles are looked up by warp shuffles (``nf4_code.nf4_word_values``; a gather of the 16-entry table in
  the interpreter) and joined back into element order, and the scales form a ``[BLOCK_N, max(1, BLOCK_K //
  BLOCKSIZE)]`` tile (one scale per row when ``BLOCK_K <= BLOCKSIZE``), rebuilt once per (row, block) and broadcast.
* otherwise (odd K, or blocks straddling rows): the tile row's even-position and odd-position elements are
  read as two ``[BLOCK_N, BLOCK_K // 2]`` byte tiles starting at byte ``e0 >> 1`` and ``(e0 >> 1) + (e0 & 1)``
  (``e0 = n*K + k0``), taking the high or low nibble by the row's parity; the scales of the (at most
  ``cdiv(BLOCK_K, BLOCKSIZE) + 1``) blocks a tile row touches are rebuilt once per row and selected per element
  with ``tl.where``. Correct for any K; somewhat slower.

The scale is rebuilt exactly as ``nf4_dequant``: ``am = fp32(fp32(code2[q] * absmax2[b // NBS]) + offset)``
when nested (the kernel is launched with ``enable_fp_fusion=False``: no FMA contraction), then
``w = round_to_dtype(fp32(code[nibble] * am))``, so the W operand equals ``NF4Weight.dequantize(x.dtype)``
bit for bit. Products accumulate in fp32 (``tl.dot``).

Split-K (small M): each K slice writes its fp32 partial tile to a workspace ``[SPLIT_K, M, N]``; a second
small kernel sums the slices in a fixed order (deterministic, unlike fp32 atomics), adds the bias and rounds
to the output dtype. The LoRA term is added by slice 0 only.

fp32 inputs: ``tl.dot`` with ``input_precision="tf32"`` where torch allows TF32 for fp32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``), else ``"tf32x3"`` (three TF32 tensor-core products, close to
fp32 accuracy; the ``"ieee"`` FMA dot is available through ``config={"input_precision": "ieee"}`` but is
several times slower).

Triton's interpreter computes ``tl.dot`` on bf16 operands wrongly; with ``TRITON_INTERPRET=1`` bf16 operands
are upcast (exactly) to fp32 before the dot (``DOT_FP32``).
"""

import torch
import triton
import triton.language as tl

from lowrank_kernels import policy
from lowrank_kernels.kernels.dot import dot as _dot
from lowrank_kernels.kernels.launch import INTERPRET, MAX_ELEMENTS, cdiv, device_of, next_pow2, num_sms
from lowrank_kernels.kernels.nf4_tile import nf4_tile, nf4_tile_args
from lowrank_kernels.kernels.rounding import round_fp32_to



@triton.jit
def lora_matmul_kernel(
    a_ptr,  # [M, K] activation dtype (any strides)
    w_ptr,  # dense: op(W) element (n, k) at n*stride_wn + k*stride_wk, any float dtype; NF4: packed uint8
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,  # NF4 state (dummies when dense)
    l_ptr,  # [M, r] left LoRA factor, activation dtype
    r_ptr,  # [r, N] right LoRA factor, activation dtype (any strides)
    keep_ptr,  # [M, N] uint8 0/1 dropout mask of the LoRA term (HAS_MASK only)
    bias_ptr,  # [N] (HAS_BIAS only)
    y_ptr,  # [M, N] activation dtype (SPLIT_K == 1)
    ws_ptr,  # fp32 [SPLIT_K, M, N] partial sums (SPLIT_K > 1)
    M, N, K, R, W_COLS,  # W_COLS: columns of the stored W (K, or N with TRANS_W)
    stride_am, stride_ak, stride_wn, stride_wk, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_mm, stride_mn, stride_ym, stride_yn,
    K_PER_SPLIT,  # multiple of BLOCK_K
    KEEP_SCALE,  # fp32 1 / (1 - p)
    NF4: tl.constexpr, TRANS_W: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SHFL: tl.constexpr,
):
    dtype: tl.constexpr = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    a_rows = a_ptr + offs_m64[:, None] * stride_am

    # The accumulator is the outᵀ tile [BLOCK_N, BLOCK_M]: the (dequantized) W tile is the dot's A operand, taken
    # straight from registers (Hopper wgmma reads A from registers; a register-made B operand failed to compile on
    # Triton 3.6), and small M becomes the dot's narrow N dimension.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NF4:
            if TRANS_W:  # stored W [K, N]: dequantize the [BLOCK_K, BLOCK_N] tile at (k0, pid_n * BLOCK_N)
                w = tl.trans(nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, offs_k,
                                       k_ok, pid_n * BLOCK_N, W_COLS, dtype, BLOCK_K, BLOCK_N, BLOCKSIZE, NESTED,
                                       NESTED_BLOCKSIZE, ALIGNED, SHFL))
            else:  # stored W [N, K]: the [BLOCK_N, BLOCK_K] tile at (pid_n * BLOCK_N, k0)
                w = nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, offs_n, n_ok, k0,
                              W_COLS, dtype, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, ALIGNED, SHFL)
        else:
            w = tl.load(w_ptr + offs_n64[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if w_ptr.dtype.element_ty != dtype:
                w = round_fp32_to(w.to(tl.float32), dtype)
        acc = _dot(w, tl.trans(a), acc, DOT_FP32, INPUT_PRECISION)

    # LoRA term: one more dot, [BLOCK_N, R_PAD] x [R_PAD, BLOCK_M] (slice 0 only), into the same accumulator,
    # or through the dropout mask into it.
    if pid_k == 0:
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        lt = tl.load(l_ptr + offs_m64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + offs_n64[:, None] * stride_rn + offs_r[None, :] * stride_rr,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_MASK:
            lora = _dot(rt, tl.trans(lt), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_FP32,
                        INPUT_PRECISION)
            keep = tl.load(keep_ptr + offs_n64[:, None] * stride_mn + offs_m64[None, :] * stride_mm,
                           mask=n_ok[:, None] & m_ok[None, :], other=0)
            acc += lora * (keep.to(tl.float32) * KEEP_SCALE)
        else:
            acc = _dot(rt, tl.trans(lt), acc, DOT_FP32, INPUT_PRECISION)

    out_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y = round_fp32_to(acc, y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_n64[:, None] * stride_yn + offs_m64[None, :] * stride_ym, y, mask=out_ok)
    else:
        ws = ws_ptr + pid_k.to(tl.int64) * M * N + offs_n64[:, None] + offs_m64[None, :] * N
        tl.store(ws, acc, mask=out_ok)


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, total, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """``y = round(sum_s ws[s] + bias)`` over a contiguous ``[M, N]`` (``total = M*N``), slices summed in
    order 0..SPLIT_K-1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, round_fp32_to(acc, y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- launcher
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages", "input_precision")
_PRECISIONS = ("ieee", "tf32", "tf32x3")
SMALL_M = 64  # M at or below this uses the small-M (split-K) configuration


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, next_pow2(n))


def default_config(M: int, N: int, K: int, dtype: torch.dtype, nf4: bool, aligned: bool = True,
                   input_precision=None) -> dict:
    """Tile configuration for H100 (untuned defaults; pass ``config=`` to override any key).

    Large M (> 64): 128x128x64 tiles (fp32: BLOCK_K 32; 16-bit NF4: BLOCK_M 256), GROUP_M 8, 8 warps, 3 stages
    (4 for dense 16-bit W).
    Small M (<= 64): BLOCK_M = 16/32/64 (next power of two >= M), BLOCK_N 64, BLOCK_K 128 (fp32: 64), 4 warps,
    4 stages, and split-K (``SPLIT_K=None``: chosen by the launcher for about two waves of programs).
    fp32 with ``input_precision="ieee"`` (a CUDA-core FMA dot) uses smaller tiles that fit in registers.
    ``aligned``: NF4 with ``K % blocksize == 0``; the unaligned (any-K) NF4 path uses one stage less.
    """
    precision = input_precision or policy.fp32_dot_precision(dtype, "tf32x3")
    fp32 = dtype == torch.float32
    ieee32 = fp32 and precision == "ieee"
    if M <= SMALL_M:
        return dict(BLOCK_M=_pow2_at_least(M, 16), BLOCK_N=64, BLOCK_K=32 if ieee32 else 64 if fp32 else 128,
                    GROUP_M=1, SPLIT_K=None, num_warps=4, num_stages=4 if (aligned or not nf4) else 3,
                    input_precision=precision)
    if ieee32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3,
                    input_precision=precision)
    # 16-bit NF4: 256-row x tiles halve how often each W tile is dequantized (docs/perf-log.md)
    return dict(BLOCK_M=256 if nf4 and not fp32 else 128, BLOCK_N=128, BLOCK_K=32 if fp32 else 64, GROUP_M=8,
                SPLIT_K=1, num_warps=8, num_stages=3 if (nf4 or fp32) else 4, input_precision=precision)


def _auto_split_k(M, N, K, cfg, device) -> int:
    tiles = max(1, cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]))
    k_iters = cdiv(K, cfg["BLOCK_K"])
    want = cdiv(2 * num_sms(device), tiles)
    return max(1, min(want, k_iters // 2, 16))


def check_config(config) -> dict:
    """Validates user tile overrides (keys and value types); returns them as a dict."""
    config = dict(config or {})
    unknown = set(config) - set(_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; expected a subset of {_CONFIG_KEYS}")
    precision = config.get("input_precision")
    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"config: input_precision must be one of {_PRECISIONS} or None, got {precision!r}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
            raise ValueError(f"config: {key} must be a power of two >= 16, got {v!r}")
    for key in ("GROUP_M", "num_warps", "num_stages"):
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"config: {key} must be a positive int, got {v!r}")
    v = config.get("SPLIT_K")
    if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"config: SPLIT_K must be a positive int or None, got {v!r}")
    return config


def resolve_config(M, N, K, dtype, nf4, aligned, device, config):
    """:func:`default_config` with the overrides ``config`` (checked), ``SPLIT_K`` chosen where it is ``None``."""
    config = check_config(config)
    cfg = default_config(M, N, K, dtype, nf4, aligned, config.get("input_precision"))
    cfg.update({k: v for k, v in config.items() if v is not None or k == "SPLIT_K"})
    if cfg["SPLIT_K"] is None:
        cfg["SPLIT_K"] = _auto_split_k(M, N, K, cfg, device)
    return cfg


def lora_matmul(a, lora_l, lora_r, bias=None, weight=None, nf4=None, trans_w=False, keep=None, keep_scale=1.0,
                config=None):
    """``out [M, N] = a @ op(W) + keep * keep_scale * (lora_l @ lora_r) + bias`` in ``a.dtype`` (module docstring).

    Inputs are already validated and on one CUDA device (or CPU under ``TRITON_INTERPRET=1``), all in
    ``a.dtype`` (any strides): ``a [M, K]``, ``lora_l [M, r]``, ``lora_r [r, N]``, ``bias [N]``; ``keep [M, N]`` a
    bool dropout mask or ``None``.
    Exactly one of ``weight`` (a dense float tensor) and ``nf4`` (an ``NF4Weight``) is given; the stored
    weight is ``[N, K]`` (``op(W) = W.T``), or ``[K, N]`` with ``trans_w`` (``op(W) = W``).
    ``config``: overrides of :func:`default_config`.
    """
    if (weight is None) == (nf4 is None):
        raise ValueError("lora_matmul: pass exactly one of weight (dense) and nf4")
    M, K = a.shape
    R, N = lora_r.shape
    dtype = a.dtype
    w_rows, w_cols = (K, N) if trans_w else (N, K)
    if nf4 is not None:
        if tuple(nf4.shape) != (w_rows, w_cols):
            raise ValueError(f"nf4: weight shape {tuple(nf4.shape)} does not fit a [{M}, {K}] operand "
                             f"(expected {(w_rows, w_cols)})")
        if w_rows * w_cols > MAX_ELEMENTS:
            raise ValueError(f"weight: {w_rows * w_cols} elements, over the int32-indexed kernel limit "
                             f"{MAX_ELEMENTS}")
        w_args, tile_meta = nf4_tile_args(nf4, w_cols)
        w_strides = (0, 0)
        nf4_meta = dict(NF4=True, **tile_meta)
        aligned = tile_meta["ALIGNED"]
    else:
        if tuple(weight.shape) != (w_rows, w_cols):
            raise ValueError(f"weight: shape {tuple(weight.shape)} does not fit a [{M}, {K}] operand "
                             f"(expected {(w_rows, w_cols)})")
        w_args = (weight, a, a, a, a, a)
        w_strides = (weight.stride(1), weight.stride(0)) if trans_w else (weight.stride(0), weight.stride(1))
        aligned = False
        nf4_meta = dict(NF4=False, NESTED=False, BLOCKSIZE=1, NESTED_BLOCKSIZE=1, ALIGNED=False)
    cfg = resolve_config(M, N, K, dtype, nf4 is not None, aligned, a.device, config)

    y = a.new_empty((M, N))
    if M == 0 or N == 0:
        return y

    block_k, split_k = cfg["BLOCK_K"], cfg["SPLIT_K"]
    k_iters = cdiv(K, block_k)
    iters_per_split = cdiv(k_iters, split_k) if k_iters else 1
    split_k = max(1, cdiv(k_iters, iters_per_split))  # no empty slices
    k_per_split = iters_per_split * block_k

    has_bias = bias is not None
    if has_bias and not bias.is_contiguous():  # the kernels read it as a contiguous [N] vector
        bias = bias.contiguous()
    bias_arg = bias if has_bias else a
    keep_arg = keep.view(torch.uint8) if keep is not None else a
    keep_strides = (keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=a.device) if split_k > 1 else y
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split_k)
    with device_of(a):  # Triton launches on the current device
        lora_matmul_kernel[grid](
            a, *w_args, lora_l, lora_r, keep_arg, bias_arg, y, ws,
            M, N, K, R, w_cols,
            a.stride(0), a.stride(1), *w_strides, lora_l.stride(0), lora_l.stride(1),
            lora_r.stride(0), lora_r.stride(1), *keep_strides, y.stride(0), y.stride(1),
            k_per_split, float(keep_scale),
            **nf4_meta, TRANS_W=trans_w, HAS_MASK=keep is not None, HAS_BIAS=has_bias and split_k == 1,
            R_PAD=_pow2_at_least(R, 16), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
            GROUP_M=cfg["GROUP_M"], SPLIT_K=split_k, DOT_FP32=INTERPRET and dtype == torch.bfloat16,
            INPUT_PRECISION=cfg["input_precision"], SHFL=not INTERPRET,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
        )
        if split_k > 1:
            block = 1024
            splitk_reduce_kernel[(cdiv(M * N, block),)](
                ws, bias_arg, y, M * N, N, SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block, num_warps=4,
            )
    return y
