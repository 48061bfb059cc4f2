"""The one place that chooses a backend (Triton on CUDA, pure torch elsewhere) for every op.

Callers pass format objects and plain tensors; this module unpacks them for the kernel launchers.
``backend=None`` picks by device; ``"torch"`` or ``"triton"`` force one (``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before Triton is imported, as the tests do).
"""
import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

import python_ref

BACKENDS = ("torch", "triton")


def cast(t, dtype):
    """``t`` in ``dtype`` (``None`` stays ``None``; no call into torch when it already is: this is the hot path)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


_UNUSED = {}


def _unused_input(ref, dtype=None):
    """A cached 0-dim tensor of ``dtype`` (default ``ref``'s) on ``ref``'s device: the ``input`` of an ``addmm``
    with ``beta=0``, which torch ignores (it is never read); saves an allocation per call."""
    key = (ref.device, dtype or ref.dtype)
    t = _UNUSED.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor even when first needed under inference mode
            t = _UNUSED[key] = torch.zeros((), dtype=key[1], device=ref.device)
    return t


def choose_backend(device, backend=None) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        _check_triton(device)
    return backend


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check_triton(device):
    """Raises unless Triton kernels can run on ``device``: CUDA, or CPU tensors under Triton's interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        if not _triton_installed():
            raise RuntimeError("backend='triton': the `triton` package is not installed (pip install triton)")
        return
    hint = ("set TRITON_INTERPRET=1 before Triton is imported to run the kernels in Triton's interpreter (slow, "
            "for tests), or use backend='torch' / None") if device.type == "cpu" else "use backend='torch' or None"
    raise ValueError(f"backend='triton': the Triton kernels run on CUDA tensors, got tensors on {device}; {hint}")


def nf4_dequantize(w, dtype, backend=None):
    """``[*w.shape]`` tensor of ``dtype`` holding the dequantized NF4 weight ``w`` (an ``NF4Weight``); on the meta
    device an empty one."""
    if w.device.type == "meta":
        return torch.empty(w.shape, dtype=dtype, device="meta")
    if choose_backend(w.device, backend) == "triton":
        from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize as launch

        return launch(w.packed, w.absmax, w.code, w.shape, w.blocksize, dtype, w.absmax2, w.code2, w.offset,
                      w.nested_blocksize)
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, w.shape, w.blocksize, dtype)


# The tiled fused Triton GEMM is opt-in (backend="triton") until it beats dequantize + cuBLAS: on the H100 it is
# 26-42x dense bf16 at M >= 256, where the default (dequantize + cuBLAS) is 1.10-2.66x
# (bench/results/bench-h100-forward.json).
# Above GEMV_MAX_M the default on CUDA is therefore the unfused path.
FUSED_BY_DEFAULT = False


# Decode and small batches (M <= GEMV_MAX_M, NF4 weight, no LoRA dropout): the NF4 GEMV kernels on either Triton
# path, unless a ``config`` for the tiled GEMM is passed. On the H100 the whole layer call takes 0.59-0.66x the time
# of dense bf16 at M = 1, 0.59-0.92x at M = 4, 0.70-1.00x at M = 16 and 1.18-1.55x at M = 64, where dequantize +
# cuBLAS takes 2.4-2.8x (bench/results/bench-h100-forward.json); 2 <= M <= 16 partly on the CUDA C++ kernel.
GEMV_MAX_M = 64


def _fused(device, backend) -> bool:
    chosen = choose_backend(device, backend)
    return chosen == "triton" and (backend == "triton" or FUSED_BY_DEFAULT)


def _nf4_state(w) -> dict:
    state = dict(packed=w.packed, absmax=w.absmax, code=w.code, blocksize=w.blocksize, shape=tuple(w.shape))
    if w.nested:
        state.update(absmax2=w.absmax2, code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize)
    return state


def _weight_arg(weight) -> dict:
    return dict(weight=weight) if isinstance(weight, torch.Tensor) else dict(nf4=_nf4_state(weight))


def dense_weight(weight, dtype, backend=None):
    """``W [N, K]`` in ``dtype``: an ``NF4Weight`` dequantized (bit-exact kernel on CUDA), a dense one cast."""
    if isinstance(weight, torch.Tensor):
        return cast(weight, dtype)
    return nf4_dequantize(weight, dtype, backend)


def _apply_keep(t, keep, keep_scale):
    """``t * keep * keep_scale`` (the dropout mask ``keep`` is 0/1), rounded once to ``t.dtype``."""
    return (t * keep_scale) * keep


# The skinny LoRA products (S, dS, dA, dB) outside the one-launch branch below: cuBLAS, or with dropout our Triton
# kernels, which apply the mask on the fly (no ``Xd`` in memory). Each is written as the fewest torch calls (a
# ``.t()`` view is one more call, a few µs of host time: a training step makes these calls for every layer).
def _mm(a, b, alpha=1.0):
    """``alpha * a @ b`` in ``a.dtype``, one torch call."""
    return torch.mm(a, b) if alpha == 1.0 else torch.addmm(_unused_input(a), a, b, beta=0, alpha=alpha)


def _mm_fp32(a, b, alpha=1.0):
    """``alpha * a @ b`` in fp32 with bf16 / fp16 operands on CUDA: cuBLAS writes its fp32 accumulator directly
    (one rounding, no cast afterwards: peft keeps adapters, and wants their gradients, in fp32)."""
    if alpha == 1.0:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.addmm(_unused_input(a, torch.float32), a, b, torch.float32, beta=0, alpha=alpha)


def _project(a, p, keep, keep_scale, triton_):
    """``S = a_d @ p.T`` ``[M, r]``, ``a_d = a`` through the dropout mask; ``p [r, K]``."""
    if keep is None:
        return F.linear(a, p)
    if triton_:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        return lowrank_project(a, p, keep=keep, keep_scale=keep_scale)
    return F.linear(_apply_keep(a, keep, keep_scale), p)


def _reduce(l, a, keep, keep_scale, triton_, out_dtype=None):
    """``l.T @ a_d`` ``[r, K]`` (``dA``): fp32 from the Triton kernel (dropout) and, with 16-bit operands on CUDA,
    where ``out_dtype`` is fp32; else ``a.dtype``."""
    if triton_ and keep is not None:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_reduce

        return lowrank_reduce(l, a, keep=keep, keep_scale=keep_scale)
    a = a if keep is None else _apply_keep(a, keep, keep_scale)
    if _fp32_out(out_dtype, a):
        return _mm_fp32(l.t(), a)
    return torch.mm(l.t(), a)


def _fp32_out(out_dtype, a) -> bool:
    return out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda


# The LoRA branch in one launch (kernels.lowrank_proj: S and the LoRA term, adapters read in their own dtype)
# where it is at least as fast on the GPU as cuBLAS's two products, or where there is a dropout mask to apply
# (which the torch calls do in extra passes). On the H100 (bench/results/branch-large-m-h100.txt) it takes
# 0.86-0.94x their time at M = 8192 (forward and dX), at M = 4096 0.92-1.03x in the forward but up to 1.44x in dX,
# and 1.15-1.44x at M = 2048 (a program per 16 rows: long reductions on few SMs); below BRANCH_MIN_M rows the torch
# calls run (two casts, two products: more host time, less GPU time).
BRANCH_MIN_M = 8192


def _one_launch_branch(M, keep) -> bool:
    return keep is not None or M >= BRANCH_MIN_M


# Without LoRA dropout, an NF4 layer of at least MERGE_MIN_M rows on the default CUDA path merges the LoRA update
# into the temporary bf16 copy of W that it dequantizes anyway (kernels.nf4_merge: W' = round(deq(W) + s * B @ A)),
# so that y = x @ W'.T + bias and dX = dY @ W' are plain cuBLAS GEMMs: no [M, N] LoRA term is written and re-read
# (bench/results/profile-layer-gpu-h100.txt: that pass and the beta = 1 GEMM were 7-16% of a layer's fwd+bwd), and
# an inference forward needs no S at all. The merge kernel (CUDA C++ where it applies, 1.14-1.26x a plain
# dequantization's time) saves GPU time from M = 2048 on the H100: merged vs unmerged kernel time at M = 2048 / 4096
# / 8192, inference forward 0.85-0.92x, fwd+bwd 0.92-0.97x (bench/results/merge-cuda-h100.txt); at M = 256 it
# cost 1.09-1.17x (merge-ab-h100.txt). But at M = 2048 the end-to-end training step (host-bound at batch 1) measured
# 9-10% slower with it (merge-small-m-h100.txt), so it starts at 4096 (eager fwd+bwd wall time there: QLoRA layers
# 0.89-0.97x, AdaLoRA 0.96-1.12x).
MERGE_LORA = True
MERGE_MIN_M = 4096
MERGE_MAX_ELEMENTS = 2**31 - 2**16  # the merge kernel's int32 element indices (kernels.lora_matmul.MAX_ELEMENTS)


def _merge(weight, keep, triton_, fused, M) -> bool:
    return (MERGE_LORA and M >= MERGE_MIN_M and triton_ and not fused and keep is None
            and not isinstance(weight, torch.Tensor) and weight.numel() <= MERGE_MAX_ELEMENTS)


def _merged_weight(weight, lora_A, lora_B, scaling, dtype):
    from lowrank_kernels.kernels.nf4_merge import nf4_merge

    return nf4_merge(_nf4_state(weight), lora_A, lora_B, scaling, dtype)


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, keep_scale=1.0, backend=None,
                        config=None, need_S=True):
    """``(Y [M, N], S [M, r], A, B)``: ``Y = x @ W.T + scaling * S @ lora_B.T + bias``, ``S = Xd @ lora_A.T``;
    ``A``, ``B``: ``lora_A``, ``lora_B`` as the products used them (copies rounded to ``x.dtype`` where the path
    made them; else the tensors given), for :func:`lora_linear_backward` to take.

    ``x [M, K]``; ``weight`` an ``NF4Weight`` or a dense ``[N, K]`` tensor; ``lora_A``, ``lora_B`` and ``bias``
    in any float dtype, rounded to ``x.dtype`` (inputs validated by the caller). Dropout on the LoRA branch:
    ``Xd = x * keep * keep_scale`` with ``keep`` a bool ``[M, K]`` tensor (``None``: no dropout). All products in
    ``x.dtype`` with fp32 accumulation. ``config``: tile overrides of the tiled Triton GEMM
    (``kernels.lora_matmul.default_config``); passing one selects that GEMM also at decode sizes.
    ``need_S=False`` (inference, or ``lora_B`` needs no gradient) lets the merged path skip ``S`` (a pass over
    ``x``); ``S`` is then ``None`` there.

    Decode (NF4, at most ``GEMV_MAX_M`` rows, no dropout): the NF4 GEMV kernels, two launches in all (the
    adapters are read and rounded in the kernels). The fused Triton path runs one GEMM (NF4 tiles dequantized in
    registers, LoRA in the accumulator). The default on CUDA: NF4 at ``MERGE_MIN_M`` rows or more without dropout,
    the LoRA update merged into the dequantized temporary (``_merge``) and one cuBLAS GEMM; otherwise one launch
    for ``S`` and the LoRA term (adapters read in their own dtype), our bit-exact dequantize kernel into a
    temporary, and cuBLAS accumulating ``x @ W.T`` into the LoRA term; on CPU, the same in torch calls.
    """
    triton_ = choose_backend(x.device, backend) == "triton"
    if (triton_ and x.shape[0] <= GEMV_MAX_M and not isinstance(weight, torch.Tensor) and config is None
            and keep is None):
        from lowrank_kernels.kernels.nf4_gemv import nf4_gemv

        def operand(t):  # the kernels read bf16 / fp16 / fp32 adapters as they are
            return t if t is None or t.dtype in (torch.bfloat16, torch.float16, torch.float32) else t.to(x.dtype)

        A, B = operand(lora_A), operand(lora_B)
        return (*nf4_gemv(x, _nf4_state(weight), A, B, scaling, operand(bias)), A, B)
    fused = _fused(x.device, backend)
    if _merge(weight, keep, triton_, fused, x.shape[0]):
        A, B = cast(lora_A, x.dtype), cast(lora_B, x.dtype)
        w = _merged_weight(weight, A, B, scaling, x.dtype)
        return F.linear(x, w, cast(bias, x.dtype)), F.linear(x, A) if need_S else None, A, B
    if triton_ and not fused and _one_launch_branch(x.shape[0], keep):
        # The LoRA term (and bias) first, in one launch that also writes S; then the big GEMM accumulates into it
        # (beta = 1): cuBLAS reads it in the epilogue of a compute-bound GEMM, where an addmm_ after the GEMM would
        # re-read and re-write all of Y.
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        y, S = lowrank_project(x, lora_A, keep=keep, keep_scale=keep_scale, expand=lora_B, alpha_y=scaling,
                               bias=bias)
        return y.addmm_(x, dense_weight(weight, x.dtype, backend).t()), S, lora_A, lora_B
    lora_A, lora_B, bias = cast(lora_A, x.dtype), cast(lora_B, x.dtype), cast(bias, x.dtype)
    S = _project(x, lora_A, keep, keep_scale, triton_)
    if fused:
        from lowrank_kernels.kernels.lora_matmul import lora_matmul

        return lora_matmul(x, S * scaling, lora_B.t(), bias, **_weight_arg(weight), config=config), S, lora_A, lora_B
    w = dense_weight(weight, x.dtype, backend)  # torch calls, in the order of the one-launch path
    y = torch.addmm(_unused_input(x) if bias is None else bias, S, lora_B.t(), beta=0 if bias is None else 1,
                    alpha=scaling)
    return y.addmm_(x, w.t()), S, lora_A, lora_B


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, scaling, S, keep=None, keep_scale=1.0,
                         needs=(True, True, True, True, False), backend=None, config=None, adapter_dtypes=(None, None)):
    """Gradients ``(dX, dA, dB, db, dW)`` of :func:`lora_linear_forward` (``None`` where ``needs`` is False).

    ``needs``: which of x, lora_A, lora_B, bias and a dense weight need a gradient (an NF4 weight never
    does); ``x`` may be ``None`` unless lora_A or the weight needs one, ``S`` unless lora_B does. ``dX`` and
    ``dW`` are in ``grad_y.dtype``; ``dA``, ``dB`` (and ``db`` on CUDA) may come back in fp32 (sums over M),
    and do where ``adapter_dtypes`` (the dtypes wanted for ``dA``, ``dB``) asks for fp32 on CUDA.
    Formulas (``python_ref.lora``): ``dS = s * dY @ B``, ``dX = dY @ W + (dS @ A) * mask``, ``dA = dS.T @ Xd``,
    ``dB = s * dY.T @ S``, ``db = sum_m dY``, ``dW = dY.T @ x``. On the merged path (``_merge``) ``dS`` and ``dB``
    come from one pass over dY when both are needed (``kernels.lowrank_proj.lowrank_dual``).
    """
    need_x, need_A, need_B, need_bias, need_w = needs
    dx = dA = dB = db = dw = None
    triton_ = choose_backend(grad_y.device, backend) == "triton"
    fused = _fused(grad_y.device, backend)
    dS = None
    if (need_x or need_A) and _merge(weight, keep, triton_, fused, grad_y.shape[0]):
        lora_A, lora_B = cast(lora_A, grad_y.dtype), cast(lora_B, grad_y.dtype)
        if need_A and need_B:  # both skinny products over dY in one pass
            from lowrank_kernels.kernels.lowrank_proj import lowrank_dual

            dS, dB = lowrank_dual(grad_y, lora_B, S, scaling, db_dtype=torch.float32 if _fp32_out(
                adapter_dtypes[1], grad_y) else grad_y.dtype)
        elif need_A:
            dS = _mm(grad_y, lora_B, scaling)
        if need_x:
            dx = torch.mm(grad_y, _merged_weight(weight, lora_A, lora_B, scaling, grad_y.dtype))
    elif need_x and triton_ and not fused and _one_launch_branch(grad_y.shape[0], keep):
        # dS and the LoRA term of dX in one launch, then the big GEMM accumulates into it
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        dx, dS = lowrank_project(grad_y, lora_B.t(), alpha=scaling, expand=lora_A.t(), keep=keep,
                                 keep_scale=keep_scale, keep_y=True)
        dx.addmm_(grad_y, dense_weight(weight, grad_y.dtype, backend))
    elif need_x or need_A:
        lora_A, lora_B = cast(lora_A, grad_y.dtype), cast(lora_B, grad_y.dtype)
        dS = _mm(grad_y, lora_B, scaling)
        if need_x and fused:
            from lowrank_kernels.kernels.lora_matmul import lora_matmul

            dx = lora_matmul(grad_y, dS, lora_A, trans_w=True, keep=keep, keep_scale=keep_scale,
                             **_weight_arg(weight), config=config)
        elif need_x:
            dx = dS @ lora_A  # as in the forward: the LoRA term first, the big GEMM accumulates into it
            if keep is not None:
                dx = _apply_keep(dx, keep, keep_scale)
            dx.addmm_(grad_y, dense_weight(weight, grad_y.dtype, backend))
    if need_A:
        dA = _reduce(dS, x, keep, keep_scale, triton_, adapter_dtypes[0])
    if need_B and dB is None:  # [N, r] directly (lora_B's layout: autograd takes it as the .grad without a copy)
        dB = (_mm_fp32 if _fp32_out(adapter_dtypes[1], grad_y) else _mm)(grad_y.t(), S, scaling)
    if need_bias:
        db = grad_y.sum(0, dtype=torch.float32) if triton_ else grad_y.sum(0)
    if need_w:
        dw = grad_y.t() @ x
    return dx, dA, dB, db, dw
