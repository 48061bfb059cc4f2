"""The one place that chooses a backend (Triton on CUDA, pure torch elsewhere) for every op.

Callers pass format objects and plain tensors; this module unpacks them for the kernel launchers.
``backend=None`` picks by device; ``"torch"`` or ``"triton"`` force one (``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before Triton is imported, as the tests do).
"""
import torch

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
    return backend


def nf4_dequantize(w, dtype, backend=None):
    """``[*w.shape]`` tensor of ``dtype`` holding the dequantized NF4 weight ``w`` (an ``NF4Weight``)."""
    if choose_backend(w.device, backend) == "triton":
        from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize as launch

        return launch(w.packed, w.absmax, w.code, w.shape, w.blocksize, dtype, w.absmax2, w.code2, w.offset,
                      w.nested_blocksize)
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, w.shape, w.blocksize, dtype)


# The tiled fused Triton GEMM is opt-in (backend="triton") until it beats dequantize + cuBLAS: on the H100 it is
# 26-39x dense bf16 at M >= 256, where dequantize + cuBLAS is 1.10-2.64x (bench/results/bench-h100-forward.json).
# Above GEMV_MAX_M the default on CUDA is therefore the unfused path.
FUSED_BY_DEFAULT = False


# Decode and small batches (M <= GEMV_MAX_M, NF4 weight, no LoRA dropout): the NF4 GEMV kernels on either Triton
# path, unless a ``config`` for the tiled GEMM is passed. On the H100 the whole layer call takes 0.60-0.65x the time
# of dense bf16 at M = 1, 0.87-0.91x at M = 4, 0.98-1.00x at M = 16 and 1.18-1.53x at M = 64, where dequantize +
# cuBLAS takes 2.4-2.8x (bench/results/bench-h100-forward.json).
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


# The skinny LoRA products (S, dS, dA, dB): with dropout, our Triton kernels apply the mask on the fly (no
# ``Xd`` in memory); without, cuBLAS is as fast on the GPU (bench/results/sweep-large-m-h100.txt) and costs one
# launch where a Triton launch costs several times the host time.
def _project(a, p, alpha, keep, keep_scale, triton_):
    """``alpha * a_d @ p.T`` ``[M, r]``, ``a_d = a`` through the dropout mask."""
    if triton_ and keep is not None:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        return lowrank_project(a, p, alpha=alpha, keep=keep, keep_scale=keep_scale)
    a = a if keep is None else _apply_keep(a, keep, keep_scale)
    return a @ p.t() if alpha == 1.0 else torch.addmm(_unused_input(a), a, p.t(), beta=0, alpha=alpha)


def _reduce(l, a, alpha, keep, keep_scale, triton_, out_dtype=None):
    """``alpha * l.T @ a_d`` ``[r, K]``: fp32 from the Triton kernel; else ``a.dtype``, except that on CUDA
    ``out_dtype=torch.float32`` with bf16 / fp16 operands has cuBLAS write its fp32 accumulator directly (one
    rounding, and no cast afterwards: one host call less per adapter gradient, peft keeping adapters in fp32)."""
    if triton_ and keep is not None:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_reduce

        return lowrank_reduce(l, a, alpha=alpha, keep=keep, keep_scale=keep_scale)
    a = a if keep is None else _apply_keep(a, keep, keep_scale)
    if out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        if alpha == 1.0:
            return torch.mm(l.t(), a, out_dtype=torch.float32)
        return torch.addmm(_unused_input(a, torch.float32), l.t(), a, torch.float32, beta=0, alpha=alpha)
    return l.t() @ a if alpha == 1.0 else torch.addmm(_unused_input(a), l.t(), a, beta=0, alpha=alpha)


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, keep_scale=1.0, backend=None,
                        config=None):
    """``(Y [M, N], S [M, r])``: ``Y = x @ W.T + scaling * S @ lora_B.T + bias``, ``S = Xd @ lora_A.T``.

    ``x [M, K]``; ``weight`` an ``NF4Weight`` or a dense ``[N, K]`` tensor; ``lora_A``, ``lora_B`` and ``bias``
    in any float dtype, rounded to ``x.dtype`` (inputs validated by the caller). Dropout on the LoRA branch:
    ``Xd = x * keep * keep_scale`` with ``keep`` a bool ``[M, K]`` tensor (``None``: no dropout). All products in
    ``x.dtype`` with fp32 accumulation. ``config``: tile overrides of the tiled Triton GEMM
    (``kernels.lora_matmul.default_config``); passing one selects that GEMM also at decode sizes.

    Decode (NF4, at most ``GEMV_MAX_M`` rows, no dropout): the NF4 GEMV kernels, two launches in all (the
    adapters are read and rounded in the kernels). The fused Triton path runs one GEMM (NF4 tiles dequantized in
    registers, LoRA in the accumulator); the default dequantizes with our bit-exact kernel into a temporary and
    runs cuBLAS.
    """
    triton_ = choose_backend(x.device, backend) == "triton"
    if (triton_ and x.shape[0] <= GEMV_MAX_M and not isinstance(weight, torch.Tensor) and config is None
            and keep is None):
        from lowrank_kernels.kernels.nf4_gemv import nf4_gemv

        def operand(t):  # the kernels read bf16 / fp16 / fp32 adapters as they are
            return t if t is None or t.dtype in (torch.bfloat16, torch.float16, torch.float32) else t.to(x.dtype)

        return nf4_gemv(x, _nf4_state(weight), operand(lora_A), operand(lora_B), scaling, operand(bias))
    lora_A, lora_B, bias = cast(lora_A, x.dtype), cast(lora_B, x.dtype), cast(bias, x.dtype)
    S = _project(x, lora_A, 1.0, keep, keep_scale, triton_)
    if _fused(x.device, backend):
        from lowrank_kernels.kernels.lora_matmul import lora_matmul

        return lora_matmul(x, S * scaling, lora_B.t(), bias, **_weight_arg(weight), config=config), S
    # The LoRA term (and bias) first, then the big GEMM accumulates into it (beta = 1): cuBLAS reads it in the
    # epilogue of a compute-bound GEMM, where an addmm_ after the GEMM would re-read and re-write all of Y.
    w = dense_weight(weight, x.dtype, backend)
    y = torch.addmm(_unused_input(x) if bias is None else bias, S, lora_B.t(), beta=0 if bias is None else 1,
                    alpha=scaling)
    return y.addmm_(x, w.t()), S


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, scaling, S, keep=None, keep_scale=1.0,
                         needs=(True, True, True, True, False), backend=None, config=None, adapter_dtypes=(None, None)):
    """Gradients ``(dX, dA, dB, db, dW)`` of :func:`lora_linear_forward` (``None`` where ``needs`` is False).

    ``needs``: which of x, lora_A, lora_B, bias and a dense weight need a gradient (an NF4 weight never
    does); ``x`` may be ``None`` unless lora_A or the weight needs one, ``S`` unless lora_B does. ``dX`` and
    ``dW`` are in ``grad_y.dtype``; ``dA``, ``dB`` (and ``db`` on CUDA) may come back in fp32 (sums over M),
    and do where ``adapter_dtypes`` (the dtypes wanted for ``dA``, ``dB``) asks for fp32 on CUDA.
    Formulas (``python_ref.lora``): ``dS = s * dY @ B``, ``dX = dY @ W + (dS @ A) * mask``, ``dA = dS.T @ Xd``,
    ``dB = s * dY.T @ S``, ``db = sum_m dY``, ``dW = dY.T @ x``.
    """
    need_x, need_A, need_B, need_bias, need_w = needs
    dx = dA = dB = db = dw = None
    triton_ = choose_backend(grad_y.device, backend) == "triton"
    dS = None
    if need_x or need_A:
        dS = _project(grad_y, lora_B.t(), scaling, None, 1.0, triton_)
    if need_x:
        if _fused(grad_y.device, backend):
            from lowrank_kernels.kernels.lora_matmul import lora_matmul

            dx = lora_matmul(grad_y, dS, lora_A, trans_w=True, keep=keep, keep_scale=keep_scale,
                             **_weight_arg(weight), config=config)
        else:
            dx = dS @ lora_A  # as in the forward: the LoRA term first, the big GEMM accumulates into it
            if keep is not None:
                dx = _apply_keep(dx, keep, keep_scale)
            dx.addmm_(grad_y, dense_weight(weight, grad_y.dtype, backend))
    if need_A:
        dA = _reduce(dS, x, 1.0, keep, keep_scale, triton_, adapter_dtypes[0])
    if need_B:
        dB = _reduce(S, grad_y, scaling, None, 1.0, triton_, adapter_dtypes[1]).t()
    if need_bias:
        db = grad_y.sum(0, dtype=torch.float32) if triton_ else grad_y.sum(0)
    if need_w:
        dw = grad_y.t() @ x
    return dx, dA, dB, db, dw
