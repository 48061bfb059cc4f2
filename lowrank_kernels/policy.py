"""The one place that decides which code runs for a call: every other module executes a plan made here.

A (Q)LoRA layer call ``y = x @ W.T + s * (Xd @ A.T) @ B.T + bias`` (``x [M, K]``, ``W [N, K]`` NF4 or dense, rank
``r``, dropout mask ``keep`` or none) runs one of these paths, forward and backward:

  ``torch``    any device, the reference: torch calls (``python_ref`` dequantization).
  ``gemv``     CUDA, NF4, ``M <= GEMV_MAX_M``, no dropout: the decode kernels (``kernels.nf4_gemv``), two launches:
               the first on the CUDA C++ tensor-core kernel (``kernels.nf4_mma_gemv``) at
               ``CUDA_GEMV_MIN_M <= M <= CUDA_GEMV_MAX_M`` on weights of ``>= CUDA_GEMV_MIN_ELEMENTS``, else on
               Triton (its word tiles through a TMA ring while a CUDA graph is captured on Hopper, the second launch
               a programmatic dependent launch on Hopper at ``M <= PDL_MAX_M``); see :class:`GemvPlan`.
  ``merged``   CUDA, NF4, ``M >= MERGE_MIN_M``, no dropout: ``W' = deq(W) + s * B @ A`` in one kernel
               (``kernels.nf4_merge``; CUDA C++ where it applies) and plain cuBLAS GEMMs with it (``y``, ``dX``);
               the backward's ``dS`` and ``dB`` from one pass over ``dY`` when both are needed.
  ``branch``   CUDA, ``M >= BRANCH_MIN_M`` or dropout: the LoRA branch (``S``, the LoRA term, bias) in one Triton
               launch (``kernels.lowrank_proj``), cuBLAS accumulating ``x @ deq(W).T`` into it.
  ``cublas``   CUDA otherwise: our dequantization, cuBLAS products for everything.
  ``fused``    opt-in (``backend="triton"``): the tiled Triton GEMM with NF4 dequantized in its main loop
               (``kernels.lora_matmul``); correct, not yet faster than ``merged`` / ``cublas``.
With dropout on the Triton backend, ``S`` and ``dA`` read ``x`` through the mask in Triton kernels (no ``Xd`` in
memory). Every threshold below is a measurement on the H100 (see ``docs/performance.md``).

Environment switches, read here once: ``LOWRANK_KERNELS_PDL=0`` turns the programmatic dependent launch off;
``LOWRANK_KERNELS_CUDA=0`` keeps the CUDA C++ kernels from being built or used.
"""
import functools
import importlib.util
import os
from typing import NamedTuple

import torch

from lowrank_kernels.kernels.launch import INTERPRET, MAX_ELEMENTS, num_sms

BACKENDS = ("torch", "triton")

# Decode and small batches: the NF4 GEMV kernels (faster than dense bf16 at M <= 16, where dequantize + cuBLAS is
# several times slower: docs/performance.md).
GEMV_MAX_M = 64
# The CUDA C++ first launch of the decode kernels: where it measured faster than the Triton kernel.
CUDA_GEMV_MIN_M, CUDA_GEMV_MAX_M = 2, 16
CUDA_GEMV_MIN_ELEMENTS = 2**25
# The decode kernels' second launch as a programmatic dependent launch (Hopper): at M <= 16 and a one-wave grid.
PDL_MAX_M = 16
# The merged-weight path: from M = 4096 (at 2048 it saved GPU time but the host-bound batch-1 training step lost).
MERGE_MIN_M = 4096
MERGE_MAX_ELEMENTS = MAX_ELEMENTS  # int32 element indices in the merge kernels
# The one-launch LoRA branch: at M >= 8192 (or with a dropout mask to apply) it beats cuBLAS's two products.
BRANCH_MIN_M = 8192
# The tiled fused Triton GEMM stays opt-in (backend="triton") until it beats the default.
FUSED_BY_DEFAULT = False

USE_PDL = os.environ.get("LOWRANK_KERNELS_PDL", "1") != "0"
USE_CUDA_KERNELS = os.environ.get("LOWRANK_KERNELS_CUDA", "1") != "0"


# ---------------------------------------------------------------------------------------------- facts
class DeviceFacts(NamedTuple):
    """What the plans depend on about a device: its type, CUDA compute capability major (0 elsewhere), SM count."""
    type: str
    capability: int
    sms: int


@functools.lru_cache(maxsize=None)
def device_facts(device: torch.device) -> DeviceFacts:
    if device.type == "cuda":
        return DeviceFacts("cuda", torch.cuda.get_device_capability(device)[0], num_sms(device))
    return DeviceFacts(device.type, 0, num_sms(device))


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, set before Triton is imported)."""
    return INTERPRET


def choose_backend(device: torch.device, backend=None) -> str:
    """``"triton"`` on CUDA, ``"torch"`` elsewhere; a forced ``"triton"`` needs CUDA or Triton's interpreter."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        _check_triton(device)
    return backend


# read once at import: torch.compile cannot trace importlib's find_spec
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _check_triton(device):
    """Raises unless Triton kernels can run on ``device``: CUDA, or CPU tensors under Triton's interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        if not TRITON_INSTALLED:
            raise RuntimeError("backend='triton': the `triton` package is not installed (pip install triton)")
        return
    hint = ("set TRITON_INTERPRET=1 before Triton is imported to run the kernels in Triton's interpreter (slow, "
            "for tests), or use backend='torch' / None") if device.type == "cpu" else "use backend='torch' or None"
    raise ValueError(f"backend='triton': the Triton kernels run on CUDA tensors, got tensors on {device}; {hint}")


def fp32_dot_precision(dtype: torch.dtype, exact: str) -> str:
    """``tl.dot`` input precision for fp32 operands (16-bit operands ignore it): ``"tf32"`` where torch allows TF32
    for fp32 matmuls, else ``exact`` (``"ieee"``, or ``"tf32x3"`` where that is cheaper in the kernel)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else exact


# ---------------------------------------------------------------------------------------------- layer plans
class LayerPlan(NamedTuple):
    """How one (Q)LoRA layer call runs (forward, or backward when made by :func:`backward_plan`).

    ``path``: one of the module docstring's paths. ``masked_kernels``: the dropout mask is applied inside Triton
    kernels (``S``, ``dA``). ``dual``: backward ``dS`` and ``dB`` from one pass over ``dY`` (merged path).
    ``fp32_sums``: reductions over M (``db``; ``dA``, ``dB`` where the adapter wants fp32) come back in fp32.
    """
    path: str
    masked_kernels: bool = False
    dual: bool = False
    fp32_sums: bool = False


def layer_path(triton: bool, fused: bool, nf4: bool, numel: int, M: int, dropout: bool) -> str:
    """The path of a forward, or of a backward's ``dX``, from the call's facts (module docstring)."""
    if not triton:
        return "torch"
    if fused:
        return "fused"
    if nf4 and not dropout and M >= MERGE_MIN_M and numel <= MERGE_MAX_ELEMENTS:
        return "merged"
    if dropout or M >= BRANCH_MIN_M:
        return "branch"
    return "cublas"


def forward_plan(x: torch.Tensor, weight, dropout: bool, backend=None, config=None) -> LayerPlan:
    """The plan of a layer's forward for ``x [M, K]`` and ``weight`` (``NF4Weight`` or dense tensor). ``config``
    (tile overrides of the fused GEMM) selects that GEMM at every size."""
    triton = choose_backend(x.device, backend) == "triton"
    nf4 = not isinstance(weight, torch.Tensor)
    M = x.shape[0]
    if triton and nf4 and M <= GEMV_MAX_M and config is None and not dropout:
        return LayerPlan("gemv")
    fused = triton and (backend == "triton" or FUSED_BY_DEFAULT)
    return LayerPlan(layer_path(triton, fused, nf4, weight.numel(), M, dropout), masked_kernels=triton and dropout)


def backward_plan(grad_y: torch.Tensor, weight, dropout: bool, need_A: bool, need_B: bool,
                  backend=None) -> LayerPlan:
    """The plan of a layer's backward (``dX``, ``dS`` / ``dA``, ``dB``, ``db``) for ``grad_y [M, N]``."""
    triton = choose_backend(grad_y.device, backend) == "triton"
    fused = triton and (backend == "triton" or FUSED_BY_DEFAULT)
    path = layer_path(triton, fused, not isinstance(weight, torch.Tensor), weight.numel(), grad_y.shape[0], dropout)
    return LayerPlan(path, masked_kernels=triton and dropout, dual=path == "merged" and need_A and need_B,
                     fp32_sums=triton)


# ---------------------------------------------------------------------------------------------- decode
class GemvPlan(NamedTuple):
    """How ``kernels.nf4_gemv`` runs a decode call: ``cuda`` (the first launch on the CUDA C++ kernel, with
    ``cuda_warps`` warps and ``split_k`` K slices, ``None``: its default) or else the Triton kernel with ``config``
    (``kernels.nf4_gemv.default_config``'s keys); ``pdl``: the second launch as a programmatic dependent launch;
    ``precision``: ``tl.dot`` input precision of fp32 operands."""
    cuda: bool
    config: dict | None
    pdl: bool
    precision: str
    cuda_warps: int | None = None
    split_k: int | None = None


class GemvFacts(NamedTuple):
    """What a decode plan depends on: the call's sizes and dtype, the weight's blocksize, the device, whether
    Triton interprets and a CUDA graph is being captured, and what the operands allow: the CUDA C++ kernel
    (``nf4_mma_gemv.supported``; only asked where it could be chosen), TMA descriptors of the packed words
    (``nf4_gemv.tma_possible``), and packed words readable as aligned 32-bit words."""
    M: int
    N: int
    K: int
    dtype: torch.dtype
    blocksize: int
    device: DeviceFacts
    interpreting: bool
    capturing: bool
    cuda_kernel_fits: bool
    tma_descriptors: bool
    words_aligned: bool


def gemv_plan(x: torch.Tensor, nf4, tune: dict | None = None) -> GemvPlan:
    """The plan of a decode call (``x [M, K]``, ``M <= GEMV_MAX_M``; ``nf4`` an ``NF4Weight``): the facts
    (:class:`GemvFacts`) of the call, then :func:`plan_gemv`."""
    from lowrank_kernels.kernels import nf4_gemv, nf4_mma_gemv

    M, K = x.shape
    N = nf4.shape[0]
    device = device_facts(x.device)
    interp = interpreting()
    cuda = (tune or {}).get("cuda")
    could_cuda = (cuda is True or (cuda is None and CUDA_GEMV_MIN_M <= M <= CUDA_GEMV_MAX_M
                                   and N * K >= CUDA_GEMV_MIN_ELEMENTS)) and USE_CUDA_KERNELS
    cuda_fits = could_cuda and not interp and x.is_cuda and nf4_mma_gemv.supported(x, nf4)
    capturing = not interp and x.is_cuda and torch.cuda.is_current_stream_capturing()
    packed = nf4.packed
    facts = GemvFacts(M, N, K, x.dtype, nf4.blocksize, device, interp, capturing, cuda_fits,
                      nf4_gemv.tma_possible(packed, K, device, interp),
                      packed.is_contiguous() and packed.data_ptr() % 4 == 0)
    return plan_gemv(facts, tune)


def plan_gemv(f: GemvFacts, tune: dict | None = None) -> GemvPlan:
    """The decode plan for the facts ``f`` (module docstring): the CUDA C++ first launch where it measured faster
    (``CUDA_GEMV_MIN_M <= M <= CUDA_GEMV_MAX_M``, ``N * K >= CUDA_GEMV_MIN_ELEMENTS``, the kernel fits, no
    Triton knob passed), else the Triton kernel with ``nf4_gemv.default_config`` (its TMA word tiles only while a
    CUDA graph is captured: their descriptors cost host time on every eager call); PDL on Hopper at
    ``M <= PDL_MAX_M`` with a one-wave finish grid.

    ``tune`` (maintainers and tests: sweeps, probes) overrides the choice: ``cuda`` (True / False), ``cuda_warps``,
    ``input_precision``, and any key of ``nf4_gemv.CONFIG_KEYS`` (``block_n``, ``block_k``, ``split_k``,
    ``num_warps``, ``num_stages``, ``lookup``, ``fma``, ``max_registers``, ``tma``, ``join``, ``x_tma``).
    ``tma=True`` or ``cuda=True`` raise where they cannot run. Without ``tune`` the plan is cached per facts (a
    decode step makes one per layer: host time)."""
    if not tune:
        tf32 = f.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        return _default_gemv_plan(f, USE_PDL, USE_CUDA_KERNELS, tf32)
    return _plan_gemv(f, tune)


@functools.lru_cache(maxsize=4096)
def _default_gemv_plan(f: GemvFacts, use_pdl: bool, use_cuda_kernels: bool, tf32: bool) -> GemvPlan:
    return _plan_gemv(f, None)  # what else the plan reads is part of the key (the switches, torch's TF32 setting)


def _plan_gemv(f: GemvFacts, tune) -> GemvPlan:
    from lowrank_kernels.kernels import nf4_gemv, nf4_mma_gemv

    tune = dict(tune or {})
    unknown = set(tune) - {"cuda", "cuda_warps", "input_precision"} - set(nf4_gemv.CONFIG_KEYS)
    if unknown:
        raise ValueError(f"tune: unknown keys {sorted(unknown)}")
    cuda = tune.pop("cuda", None)
    cuda_warps = tune.pop("cuda_warps", None)
    precision = tune.pop("input_precision", None)
    if cuda is not None and not isinstance(cuda, bool):
        raise TypeError(f"tune: cuda must be None, True or False, got {cuda!r}")
    if cuda_warps is not None:
        if cuda is not True:
            raise ValueError("tune: cuda_warps applies to the CUDA kernel: pass cuda=True with it")
        if cuda_warps not in nf4_mma_gemv.WARPS:
            raise ValueError(f"tune: cuda_warps must be one of {nf4_mma_gemv.WARPS}, got {cuda_warps!r}")
    triton_knobs = set(tune) - {"split_k"}
    if cuda is True and (triton_knobs or precision is not None):
        knobs = sorted(triton_knobs) + (["input_precision"] if precision is not None else [])
        raise ValueError(f"tune: {', '.join(knobs)} apply to the Triton kernels, not with cuda=True")
    M, N, K = f.M, f.N, f.K
    pdl = (not f.interpreting and M <= PDL_MAX_M and -(-N // nf4_gemv.FINISH_BLOCK_N) <= f.device.sms and USE_PDL
           and f.device.capability >= 9 and nf4_gemv.HAS_GDC)
    if cuda is None:  # where it measured faster, and not when Triton knobs were passed
        cuda = (f.cuda_kernel_fits and CUDA_GEMV_MIN_M <= M <= CUDA_GEMV_MAX_M and N * K >= CUDA_GEMV_MIN_ELEMENTS
                and not triton_knobs and precision is None)
    elif cuda and not f.cuda_kernel_fits:
        raise ValueError("tune: cuda=True needs a CUDA GPU of compute capability >= 8 with the CUDA kernels built, "
                         "bf16 / fp16 x with M <= 16, K % 256 == 0, unit stride along K and 16-byte aligned rows, "
                         "blocksize >= 64, and contiguous aligned packed weight and scales")
    if cuda:
        return GemvPlan(True, None, pdl, fp32_dot_precision(f.dtype, "ieee"), cuda_warps, tune.get("split_k"))
    tma_ok = f.tma_descriptors and K % f.blocksize == 0
    config = _gemv_config(M, N, K, f.dtype, f.device.sms, tma_ok and f.capturing)  # shared: copy to change
    if K % f.blocksize != 0:  # generic path: larger tiles spill (its per-element scale selection)
        config = dict(config, block_k=nf4_gemv.GENERIC_BLOCK_K)
    if tune:
        config = nf4_gemv.check_config(dict(config, **tune))
    words = K % f.blocksize == 0 and config["block_k"] >= 128 and f.words_aligned
    if config["tma"] and not (tma_ok and words and config["block_n"] <= 256 and config["block_k"] <= 2048):
        if tune.get("tma") is True:
            raise ValueError("tune: tma=True needs the packed-word path (K % blocksize == 0, block_k >= 128), "
                             "K % 32 == 0, a contiguous 16-byte aligned packed tensor, block_n <= 256, "
                             "block_k <= 2048, and a Hopper GPU or the interpreter")
        config = dict(config, tma=False)
    return GemvPlan(False, config, pdl, precision or fp32_dot_precision(f.dtype, "ieee"))


@functools.lru_cache(maxsize=1024)
def _gemv_config(M, N, K, dtype, sms, tma) -> dict:
    from lowrank_kernels.kernels import nf4_gemv

    return nf4_gemv.default_config(M, N, K, dtype, sms, tma)


# ---------------------------------------------------------------------------------------------- mixed, DoRA
# Mixed-adapter batches (lowrank_kernels.mixed): the per-row gather kernels up to this many rows, the sorted
# segment kernels (tensor cores) above; a first guess, not yet measured on a GPU.
MIXED_GATHER_MAX_M = 64


def mixed_path(x: torch.Tensor, backend=None, grad: bool = False) -> str:
    """How a mixed-adapter batch computes its LoRA terms for ``x [M, K]``: ``"torch"`` (torch products per adapter:
    with a gradient to compute, fp64, or on the torch backend), ``"gather"`` (one row per program,
    ``M <= MIXED_GATHER_MAX_M``) or ``"segment"`` (rows sorted by adapter, tiles on tensor cores)."""
    if grad or x.dtype == torch.float64 or choose_backend(x.device, backend) == "torch":
        return "torch"
    return "gather" if x.shape[0] <= MIXED_GATHER_MAX_M else "segment"


def dora_norm_on_triton(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, backend=None) -> bool:
    """Whether DoRA's weight norm runs the one-pass Triton kernel (``kernels.dora_norm``) rather than torch products
    over the weight dequantized to fp32: on the Triton backend, for fp32 / 16-bit weights and adapters, NF4
    weights within the kernels' int32 element indices."""
    if choose_backend(lora_A.device, backend) != "triton":
        return False
    dtypes = (getattr(weight, "dtype", None), lora_A.dtype, lora_B.dtype)
    if torch.float64 in dtypes:
        return False
    return isinstance(weight, torch.Tensor) or weight.shape[0] * weight.shape[1] <= MAX_ELEMENTS


def dora_scale_on_triton(L: torch.Tensor, backend=None) -> bool:
    """Whether DoRA's column scale of the layer product ``L`` (``y = L * c + bias`` and its backward) runs the
    one-pass Triton kernels (``kernels.dora_scale``): on the Triton backend, for bf16 / fp16 / fp32 products, not
    while ``torch.compile`` traces (inductor fuses the torch form into one kernel itself)."""
    return not torch.compiler.is_compiling() and L.dtype != torch.float64 and \
        choose_backend(L.device, backend) == "triton"


# ---------------------------------------------------------------------------------------------- merge
def merge_on_cuda_kernel(nf4, r: int, dtype: torch.dtype, cuda=None) -> bool:
    """Whether ``kernels.nf4_merge`` runs the CUDA C++ kernel (``kernels.nf4_merge_mma``): by default wherever it
    supports the call; ``cuda=False`` forces Triton, ``cuda=True`` raises where it cannot run."""
    from lowrank_kernels.kernels import nf4_merge_mma

    if cuda is False:
        return False
    ok = USE_CUDA_KERNELS and not interpreting() and nf4_merge_mma.supported(nf4, r, dtype)
    if cuda and not ok:
        raise ValueError("nf4_merge: cuda=True, but the CUDA kernel does not support this call (it needs bf16 / "
                         "fp16 output, K % 64 == 0, blocksize >= 64, r <= 32, a CUDA device and the CUDA kernels "
                         "built)")
    return ok
