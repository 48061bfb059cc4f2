"""Executes the plans of ``policy`` for a (Q)LoRA layer call: the forward and backward of every path, as torch
calls and kernel launches. Nothing here chooses a path: ``policy.forward_plan`` / ``policy.backward_plan`` did.

Callers pass format objects (``NF4Weight``) and plain tensors, validated (``functional``).
"""
import torch
import torch.nn.functional as F

import python_ref
from lowrank_kernels import policy


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


def nf4_dequantize(w, dtype, backend=None):
    """``[*w.shape]`` tensor of ``dtype`` holding the dequantized NF4 weight ``w`` (an ``NF4Weight``); on the meta
    device an empty one."""
    if w.device.type == "meta":
        return torch.empty(w.shape, dtype=dtype, device="meta")
    if torch.compiler.is_compiling():  # traced as one operator node (its implementation comes back here)
        from lowrank_kernels import ops

        return ops.nf4_dequantize(w, dtype, backend)
    if policy.choose_backend(w.device, backend) == "triton":
        from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize as launch

        return launch(w, dtype)
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, w.shape, w.blocksize, dtype)


def dense_weight(weight, dtype, backend=None):
    """``W [N, K]`` in ``dtype``: an ``NF4Weight`` dequantized (bit-exact, on ``backend``), a dense one cast."""
    if isinstance(weight, torch.Tensor):
        return cast(weight, dtype)
    return nf4_dequantize(weight, dtype, backend)


def nf4_matmul(x, w, trans_w=False, backend=None):
    """``x @ W.T`` (``trans_w``: ``x @ W``) for ``x [..., K]`` (``[..., N]``) in the compute dtype and an ``NF4Weight``
    ``w [N, K]``: the weight dequantized to ``x.dtype`` (bit-exact) for one product and then dropped, so autograd
    (``autograd.NF4MatmulFunction``, the ``nf4_matmul`` operator) keeps none of it."""
    W = nf4_dequantize(w, x.dtype, backend)
    return x @ W if trans_w else x @ W.t()


def _weight_arg(weight) -> dict:
    """The weight keyword of ``kernels.lora_matmul``: ``weight=`` a dense tensor or ``nf4=`` an ``NF4Weight``."""
    return dict(weight=weight) if isinstance(weight, torch.Tensor) else dict(nf4=weight)


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


def _project(a, p, keep, keep_scale, masked_kernels):
    """``S = a_d @ p.T`` ``[M, r]``, ``a_d = a`` through the dropout mask; ``p [r, K]``."""
    if keep is None:
        return F.linear(a, p)
    if masked_kernels:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        return lowrank_project(a, p, keep=keep, keep_scale=keep_scale)
    return F.linear(_apply_keep(a, keep, keep_scale), p)


def _reduce(l, a, keep, keep_scale, masked_kernels, out_dtype=None):
    """``l.T @ a_d`` ``[r, K]`` (``dA``): fp32 from the Triton kernel (dropout) and, with 16-bit operands on CUDA,
    where ``out_dtype`` is fp32; else ``a.dtype``."""
    if masked_kernels and keep is not None:
        from lowrank_kernels.kernels.lowrank_proj import lowrank_reduce

        return lowrank_reduce(l, a, keep=keep, keep_scale=keep_scale)
    a = a if keep is None else _apply_keep(a, keep, keep_scale)
    if _fp32_out(out_dtype, a):
        return _mm_fp32(l.t(), a)
    return torch.mm(l.t(), a)


def _fp32_out(out_dtype, a) -> bool:
    return out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda


def _merged_weight(weight, lora_A, lora_B, scaling, dtype):
    from lowrank_kernels.kernels.nf4_merge import nf4_merge

    return nf4_merge(weight, lora_A, lora_B, scaling, dtype)


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias, keep, keep_scale, plan, config=None,
                        need_S=True):
    """``(Y [M, N], S [M, r], A, B)``: ``Y = x @ W.T + scaling * S @ lora_B.T + bias``, ``S = Xd @ lora_A.T``;
    ``A``, ``B``: ``lora_A``, ``lora_B`` as the products used them (copies rounded to ``x.dtype`` where the path
    made them; else the tensors given), for :func:`lora_linear_backward` to take.

    ``x [M, K]``; ``weight`` an ``NF4Weight`` or a dense ``[N, K]`` tensor; ``lora_A``, ``lora_B`` and ``bias``
    in any float dtype, rounded to ``x.dtype`` (inputs validated by the caller). Dropout on the LoRA branch:
    ``Xd = x * keep * keep_scale`` with ``keep`` a bool ``[M, K]`` tensor (``None``: no dropout). All products in
    ``x.dtype`` with fp32 accumulation. ``plan``: ``policy.forward_plan``'s. ``config``: tile overrides of the
    fused GEMM. ``need_S=False`` (inference, or ``lora_B`` needs no gradient) lets the merged path skip ``S`` (a
    pass over ``x``); ``S`` is then ``None`` there.
    """
    path = plan.path
    if path == "gemv":  # two launches; the kernels read bf16 / fp16 / fp32 adapters and bias as they are
        from lowrank_kernels.kernels.nf4_gemv import nf4_gemv

        def operand(t):
            return t if t is None or t.dtype in (torch.bfloat16, torch.float16, torch.float32) else t.to(x.dtype)

        A, B = operand(lora_A), operand(lora_B)
        return (*nf4_gemv(x, weight, A, B, scaling, operand(bias)), A, B)
    if path == "merged":
        A, B = cast(lora_A, x.dtype), cast(lora_B, x.dtype)
        w = _merged_weight(weight, A, B, scaling, x.dtype)
        return F.linear(x, w, cast(bias, x.dtype)), F.linear(x, A) if need_S else None, A, B
    if path == "branch":
        # The LoRA term (and bias) first, in one launch that also writes S; then the big GEMM accumulates into it
        # (beta = 1): cuBLAS reads it in the epilogue of a compute-bound GEMM, where an addmm_ after the GEMM would
        # re-read and re-write all of Y.
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        y, S = lowrank_project(x, lora_A, keep=keep, keep_scale=keep_scale, expand=lora_B, alpha_y=scaling,
                               bias=bias)
        return y.addmm_(x, dense_weight(weight, x.dtype, "triton").t()), S, lora_A, lora_B
    lora_A, lora_B, bias = cast(lora_A, x.dtype), cast(lora_B, x.dtype), cast(bias, x.dtype)
    S = _project(x, lora_A, keep, keep_scale, plan.masked_kernels)
    if path == "fused":
        from lowrank_kernels.kernels.lora_matmul import lora_matmul

        return lora_matmul(x, S * scaling, lora_B.t(), bias, **_weight_arg(weight), config=config), S, lora_A, lora_B
    # "cublas" and "torch": torch calls, in the order of the one-launch path
    w = dense_weight(weight, x.dtype, "torch" if path == "torch" else "triton")
    y = torch.addmm(_unused_input(x) if bias is None else bias, S, lora_B.t(), beta=0 if bias is None else 1,
                    alpha=scaling)
    return y.addmm_(x, w.t()), S, lora_A, lora_B


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, scaling, S, keep, keep_scale, needs, plan, config=None,
                         adapter_dtypes=(None, None)):
    """Gradients ``(dX, dA, dB, db, dW)`` of :func:`lora_linear_forward` (``None`` where ``needs`` is False).

    ``needs``: which of x, lora_A, lora_B, bias and a dense weight need a gradient (an NF4 weight never
    does); ``x`` may be ``None`` unless lora_A or the weight needs one, ``S`` unless lora_B does. ``dX`` and
    ``dW`` are in ``grad_y.dtype``; ``dA``, ``dB`` (and ``db`` where ``plan.fp32_sums``) may come back in fp32
    (sums over M), and do where ``adapter_dtypes`` (the dtypes wanted for ``dA``, ``dB``) asks for fp32 on CUDA.
    Formulas (``python_ref.lora``): ``dS = s * dY @ B``, ``dX = dY @ W + (dS @ A) * mask``, ``dA = dS.T @ Xd``,
    ``dB = s * dY.T @ S``, ``db = sum_m dY``, ``dW = dY.T @ x``. ``plan``: ``policy.backward_plan``'s; on the
    merged path with ``plan.dual``, ``dS`` and ``dB`` come from one pass over dY (``lowrank_proj.lowrank_dual``).
    """
    need_x, need_A, need_B, need_bias, need_w = needs
    dx = dA = dB = db = dw = None
    path = plan.path
    dS = None
    if (need_x or need_A) and path == "merged":
        lora_A, lora_B = cast(lora_A, grad_y.dtype), cast(lora_B, grad_y.dtype)
        if plan.dual:  # both skinny products over dY in one pass
            from lowrank_kernels.kernels.lowrank_proj import lowrank_dual

            dS, dB = lowrank_dual(grad_y, lora_B, S, scaling, db_dtype=torch.float32 if _fp32_out(
                adapter_dtypes[1], grad_y) else grad_y.dtype)
        elif need_A:
            dS = _mm(grad_y, lora_B, scaling)
        if need_x:
            dx = torch.mm(grad_y, _merged_weight(weight, lora_A, lora_B, scaling, grad_y.dtype))
    elif need_x and path == "branch":
        # dS and the LoRA term of dX in one launch, then the big GEMM accumulates into it
        from lowrank_kernels.kernels.lowrank_proj import lowrank_project

        dx, dS = lowrank_project(grad_y, lora_B.t(), alpha=scaling, expand=lora_A.t(), keep=keep,
                                 keep_scale=keep_scale, keep_y=True)
        dx.addmm_(grad_y, dense_weight(weight, grad_y.dtype, "triton"))
    elif need_x or need_A:
        lora_A, lora_B = cast(lora_A, grad_y.dtype), cast(lora_B, grad_y.dtype)
        dS = _mm(grad_y, lora_B, scaling)
        if need_x and path == "fused":
            from lowrank_kernels.kernels.lora_matmul import lora_matmul

            dx = lora_matmul(grad_y, dS, lora_A, trans_w=True, keep=keep, keep_scale=keep_scale,
                             **_weight_arg(weight), config=config)
        elif need_x:
            dx = dS @ lora_A  # as in the forward: the LoRA term first, the big GEMM accumulates into it
            if keep is not None:
                dx = _apply_keep(dx, keep, keep_scale)
            dx.addmm_(grad_y, dense_weight(weight, grad_y.dtype, "torch" if path == "torch" else "triton"))
    if need_A:
        dA = _reduce(dS, x, keep, keep_scale, plan.masked_kernels, adapter_dtypes[0])
    if need_B and dB is None:  # [N, r] directly (lora_B's layout: autograd takes it as the .grad without a copy)
        dB = (_mm_fp32 if _fp32_out(adapter_dtypes[1], grad_y) else _mm)(grad_y.t(), S, scaling)
    if need_bias:
        db = grad_y.sum(0, dtype=torch.float32) if plan.fp32_sums else grad_y.sum(0)
    if need_w:
        dw = grad_y.t() @ x
    return dx, dA, dB, db, dw
