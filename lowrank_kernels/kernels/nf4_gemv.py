"""Launcher of the NF4 decode call (``M = 1 ... 64``): two launches, nothing else.

    S [M, r] = x [M, K] @ A.T,   y [M, N] = x @ deq(W).T + (s * S) @ B.T (+ bias [N])     W [N, K] NF4, A [r, K]

The first launch fills fp32 partial-sum workspaces per K slice: the Triton kernel of :mod:`.nf4_gemv_jit`, or the
CUDA C++ tensor-core kernel of :mod:`.nf4_mma_gemv` (same workspaces); the second (``nf4_gemv_finish_kernel``)
sums them in a fixed order and adds the LoRA term and the bias. Which kernel, which tile configuration, TMA and
PDL: ``policy.gemv_plan`` decides; this module executes the plan.
"""
import torch

from lowrank_kernels import policy
from lowrank_kernels.kernels import nf4_mma_gemv
from lowrank_kernels.kernels.launch import INTERPRET, MAX_ELEMENTS, cdiv, device_of, launch, next_pow2
from lowrank_kernels.kernels.nf4_gemv_jit import HAS_GDC, nf4_gemv_finish_kernel, nf4_gemv_kernel

try:  # host-side TMA descriptors; Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: no TMA path
    TensorDescriptor = None

__all__ = ["nf4_gemv", "default_config", "check_config", "HAS_GDC"]

MAX_M = 64  # M_PAD <= 64; the design point is M <= 16
MAX_RANK_CHUNK = 64  # LoRA ranks per tl.dot in the finish kernel
LOOKUPS = ("shfl", "load")
FINISH_BLOCK_N = 64
GENERIC_BLOCK_K = 64  # default block_k when K % blocksize != 0 (larger tiles spill: per-element scale selection)
CONFIG_KEYS = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "lookup", "fma", "max_registers",
               "tma", "join", "x_tma")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def default_config(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16, num_sms: int = 132,
                   tma: bool = False) -> dict:
    """Launch configuration of the Triton first launch (``CONFIG_KEYS``) for ``y [M, N]``, tuned on the H100
    (``docs/perf-log.md``); ``tma``: the word tiles can come by TMA (:func:`tma_possible`).

    With TMA (Hopper): a 3-stage ring of word tiles, 256 K per step; ``M = 1``: the CUDA-core ``fma`` variant,
    256 rows x 8 warps x split-K 2 for N > 8192, else 64 rows x 4 warps x split-K 4; ``8 < M <= 16``: the joined
    tile, 64 rows x 4 warps x split-K 4; above: the joined tile, 128 rows x 8 warps, split-K 4 (2 past 64 row
    blocks). At ``2 <= M <= 8`` the register-double-buffered configuration below (the joined tile was slower).
    Without TMA: ``M = 1``: ``fma`` with 128 rows x 256 K, 8 warps, split-K 8; ``M <= 8``: 64 x 256, 4 warps,
    split-K 8; ``M <= 16``: 128 x 256, 8 warps, split-K 8; above, 128 x 128, 4 warps, split-K for about 256
    programs; 1 stage (the kernel double-buffers in registers). fp32 uses ``block_k`` 128 at ``M > 1`` (256
    spills). Always the shuffle lookup; ``split_k`` is capped at two K steps per slice.
    """
    join = False
    stages = 1
    tma = tma and not 2 <= M <= 8
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


def check_config(cfg: dict) -> dict:
    """``cfg`` if every key of ``CONFIG_KEYS`` holds a valid value (tuning overrides), else a ``ValueError``."""
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
    return cfg


def _check_pow2(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > hi or v & (v - 1):
        raise ValueError(f"nf4_gemv: {name} must be a power of two in [{lo}, {hi}], got {v!r}")


def tma_possible(packed, K: int, facts, interpreting: bool) -> bool:
    """The word tiles can come by TMA: a Triton with host descriptors, Hopper or newer (or the interpreter), and
    16-byte aligned packed rows (``K % 32 == 0``, aligned contiguous base). (The tile box must also be at most
    256 x 256 words: ``policy.plan_gemv`` checks the tile.)"""
    if TensorDescriptor is None or K % 32 or packed.data_ptr() % 16 or not packed.is_contiguous():
        return False
    return interpreting or (facts.type == "cuda" and facts.capability >= 9)


def _check_float(name, t, shape):
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a bfloat16, float16 or float32 tensor, got {got}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {tuple(t.shape)}")


def _triton_partials(x, nf4, lora_A, cfg, dot_fp32, precision, pdl, sms):
    """The first launch on Triton: ``(n_split, ws [n_split, M, N], ws_s [n_split, M, r])``."""
    M, K = x.shape
    N = nf4.shape[0]
    R = lora_A.shape[0]
    regs = cfg["max_registers"]
    blocksize, nested, code, packed = nf4.blocksize, nf4.nested, nf4.code, nf4.packed
    w_args = (packed, nf4.absmax, nf4.absmax2 if nested else code, nf4.code2 if nested else code,
              nf4.offset if nested else code, code)  # offset: its 0-dim tensor

    block_k = cfg["block_k"]
    k_iters = cdiv(K, block_k)
    iters_per_split = cdiv(k_iters, cfg["split_k"])
    n_split = cdiv(k_iters, iters_per_split)  # no empty slices
    words = K % blocksize == 0 and block_k >= 128 and packed.data_ptr() % 4 == 0 and packed.is_contiguous()
    use_fma = cfg["fma"] and words and M == 1
    use_tma = cfg["tma"]  # the plan made sure it can
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
            blocksize, nested, nf4.nested_blocksize if nested else 1,  # BLOCKSIZE, NESTED, NESTED_BLOCKSIZE
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


def nf4_gemv(x, nf4, lora_A, lora_B, scaling, bias=None, *, plan=None, tune=None):
    """``(y [M, N], S [M, r])``: ``S = x @ A.T``, ``y = x @ deq(W).T + (scaling * S) @ B.T + bias`` in
    ``x.dtype``. Two launches, nothing else.

    ``x [M, K]`` (bf16 / fp16 / fp32, any strides, ``M <= 64``); ``nf4``: the ``NF4Weight`` ``W [N, K]``;
    ``lora_A [r, K]``, ``lora_B [N, r]`` and ``bias [N]`` (or ``None``) in any of bf16 / fp16 / fp32 and any
    strides: the kernels round them to ``x.dtype`` as they read them (peft's fp32 adapters need no cast launches).
    ``S`` and ``scaling * S`` are rounded to ``x.dtype``, as the unfused path computes them.
    ``plan``: a ``policy.GemvPlan`` (default: ``policy.gemv_plan(x, nf4, tune)``); ``tune``: maintainers' overrides
    of the plan (see ``policy.gemv_plan``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, K] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    M, K = x.shape
    dtype = x.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {dtype}")
    if M > MAX_M:
        raise ValueError(f"x: nf4_gemv handles M <= {MAX_M} rows (decode); got M={M}")
    shape = tuple(nf4.shape)
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
    for name, t in (("nf4 packed", nf4.packed), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")

    y = x.new_empty((M, N))
    if M == 0 or N == 0:  # nothing to launch (S of an N = 0 layer is still x @ A.T)
        return y, x @ lora_A.to(dtype).t()
    if plan is None:
        plan = policy.gemv_plan(x, nf4, tune)
    S = x.new_empty((M, R))
    dot_fp32 = INTERPRET and dtype == torch.bfloat16
    sms = policy.device_facts(x.device).sms
    if plan.cuda:
        warps, n_split = nf4_mma_gemv.default_launch(M, N, K, sms)
        k_per_split = cdiv(cdiv(K, nf4_mma_gemv.GROUP_K), plan.split_k or n_split) * nf4_mma_gemv.GROUP_K
        n_split = cdiv(K, k_per_split)  # no empty slices
        ws = torch.empty((n_split, M, N), dtype=torch.float32, device=x.device)
        ws_s = torch.empty((n_split, M, R), dtype=torch.float32, device=x.device)
        nf4_mma_gemv.partials(x, nf4, lora_A, ws, ws_s, k_per_split, n_split, plan.cuda_warps or warps)
    else:
        n_split, ws, ws_s = _triton_partials(x, nf4, lora_A, plan.config, dot_fp32, plan.precision, plan.pdl, sms)
    has_bias = bias is not None
    launch(nf4_gemv_finish_kernel, (cdiv(N, FINISH_BLOCK_N),),
           (ws, ws_s, lora_B, bias if has_bias else x, y, S, M, N, R, float(scaling),
            lora_B.stride(0), lora_B.stride(1), bias.stride(0) if has_bias else 0, y.stride(0), y.stride(1),
            S.stride(0), S.stride(1),
            n_split, has_bias, max(8, next_pow2(M)), max(16, min(MAX_RANK_CHUNK, next_pow2(R))), FINISH_BLOCK_N,
            dot_fp32, plan.precision, plan.pdl),  # SPLIT_K, HAS_BIAS, M_PAD, R_BLOCK, BLOCK_N, DOT_FP32, .., PDL
           # num_stages=1: no software pipelining of the rank loop, whose SPLIT_K loads per chunk would otherwise
           # be staged in shared memory
           num_warps=4, num_stages=1, enable_fp_fusion=False, **(dict(launch_pdl=True) if plan.pdl else {}))
    return y, S
