"""The one place that chooses a backend (Triton on CUDA, pure torch elsewhere) for every op.

Callers pass format objects and plain tensors; this module unpacks them for the kernel launchers.
``backend=None`` picks by device; ``"torch"`` or ``"triton"`` force one (``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before Triton is imported, as the tests do).
"""
import torch

import python_ref

BACKENDS = ("torch", "triton")


def choose_backend(device, backend=None) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    return backend


def nf4_dequantize(w, dtype, backend=None):
    """Flat ``[n]`` tensor of ``dtype`` holding the dequantized NF4 weight ``w`` (an ``NF4Weight``)."""
    if choose_backend(w.device, backend) == "triton":
        from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize as launch

        state = _nf4_state(w)
        del state["shape"]
        return launch(n=w.numel(), out_dtype=dtype, **state)
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, (w.numel(),), w.blocksize, dtype)


# The fused Triton GEMM is opt-in (backend="triton") until it beats dequantize + cuBLAS: on the H100 it is
# 3.7-4.7x dense bf16 at M <= 64 and 27-40x at M >= 256, where dequantize + cuBLAS is 1.26-2.98x
# (bench/results/bench-h100.md). The default on CUDA is therefore the unfused path.
FUSED_BY_DEFAULT = False


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
        return weight.to(dtype)
    return nf4_dequantize(weight, dtype, backend).view(weight.shape)


def _apply_keep(t, keep, keep_scale):
    """``t * keep * keep_scale`` (the dropout mask ``keep`` is 0/1), rounded once to ``t.dtype``."""
    return (t * keep_scale) * keep


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, keep_scale=1.0, backend=None,
                        config=None):
    """``(Y [M, N], S [M, r])``: ``Y = x @ W.T + scaling * S @ lora_B.T + bias``, ``S = Xd @ lora_A.T``.

    ``x [M, K]``; ``weight`` an ``NF4Weight`` or a dense ``[N, K]`` tensor; ``lora_A``, ``lora_B`` and ``bias``
    already in ``x.dtype`` (inputs validated by the caller). Dropout on the LoRA branch: ``Xd = x * keep *
    keep_scale`` with ``keep`` a bool ``[M, K]`` tensor (``None``: no dropout). All products in ``x.dtype`` with
    fp32 accumulation. ``config``: Triton tile overrides (``kernels.lora_matmul.default_config``).

    Triton backend: ``S`` in one pass over ``x`` (dropout applied on the fly); then either the fused GEMM (NF4
    tiles dequantized in registers, LoRA in the accumulator) or, the default, our bit-exact dequantization into
    a temporary and cuBLAS. Torch backend: the same formulas with torch ops.
    """
    triton_ = choose_backend(x.device, backend) == "triton"
    if triton_:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        S = lowrank_project(x, lora_A, keep=keep, keep_scale=keep_scale)
    else:
        S = (x if keep is None else _apply_keep(x, keep, keep_scale)) @ lora_A.t()
    if _fused(x.device, backend):
        from lowrank_kernels.kernels.lora_matmul import lora_matmul

        return lora_matmul(x, S * scaling, lora_B.t(), bias, **_weight_arg(weight), config=config), S
    w = dense_weight(weight, x.dtype, backend)
    y = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
    return y.addmm_(S, lora_B.t(), alpha=scaling), S


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, scaling, S, keep=None, keep_scale=1.0,
                         needs=(True, True, True, True, False), backend=None, config=None):
    """Gradients ``(dX, dA, dB, db, dW)`` of :func:`lora_linear_forward` (``None`` where ``needs`` is False).

    ``needs``: which of x, lora_A, lora_B, bias and a dense weight need a gradient (an NF4 weight never
    does); ``x`` may be ``None`` unless lora_A or the weight needs one, ``S`` unless lora_B does. ``dX`` and
    ``dW`` are in ``grad_y.dtype``; ``dA``, ``dB`` and ``db`` are summed over M in fp32 on the Triton backend
    (``grad_y.dtype`` on torch). Formulas (``python_ref.lora``): ``dS = s * dY @ B``,
    ``dX = dY @ W + (dS @ A) * mask``, ``dA = dS.T @ Xd``, ``dB = s * dY.T @ S``, ``db = sum_m dY``,
    ``dW = dY.T @ x``.
    """
    need_x, need_A, need_B, need_bias, need_w = needs
    dx = dA = dB = db = dw = None
    triton_ = choose_backend(grad_y.device, backend) == "triton"
    if triton_:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project, lowrank_reduce
    dS = None
    if need_x or need_A:
        dS = lowrank_project(grad_y, lora_B.t(), alpha=scaling) if triton_ else (grad_y @ lora_B).mul_(scaling)
    if need_x:
        if _fused(grad_y.device, backend):
            from lowrank_kernels.kernels.lora_matmul import lora_matmul

            dx = lora_matmul(grad_y, dS, lora_A, trans_w=True, keep=keep, keep_scale=keep_scale,
                             **_weight_arg(weight), config=config)
        else:
            dx = grad_y @ dense_weight(weight, grad_y.dtype, backend)
            if keep is None:
                dx.addmm_(dS, lora_A)
            else:
                dx += _apply_keep(dS @ lora_A, keep, keep_scale)
    if need_A:
        if triton_:
            dA = lowrank_reduce(dS, x, keep=keep, keep_scale=keep_scale)
        else:
            dA = dS.t() @ (x if keep is None else _apply_keep(x, keep, keep_scale))
    if need_B:
        dB = lowrank_reduce(S, grad_y, alpha=scaling).t() if triton_ else (grad_y.t() @ S).mul_(scaling)
    if need_bias:
        db = grad_y.sum(0, dtype=torch.float32) if triton_ else grad_y.sum(0)
    if need_w:
        dw = grad_y.t() @ x
    return dx, dA, dB, db, dw
