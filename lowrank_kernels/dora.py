"""DoRA (weight-decomposed LoRA) over a dense or NF4 base weight, with peft's semantics (``python_ref/dora.py``):

    norm = ||W + s * B @ A|| per output row (detached)      c = m / max(norm, eps)
    y    = x @ W.T + bias + (c - 1) * (Xd @ W.T) + c * s * (Xd @ A.T) @ B.T        Xd = dropout(x)

Without dropout (``Xd = x``) that is ``y = c * (x @ W.T + s * (x @ A.T) @ B.T) + bias``: the LoRA layer's product
(``lora_linear`` / ``qlora_linear``: our kernels, the merged weight at large M) scaled per output column, plus the
bias; on the Triton backend the scale and bias take one pass over ``[M, N]`` forward and one backward
(``kernels.dora_scale``, :class:`DoraScaleFunction`), where torch ops make fp32 ``[M, N]`` temporaries. With
dropout peft computes the base product a second time, on the dropped ``x``; the same sum regrouped,

    y = (x - Xd) @ W.T + c * L(Xd) + bias            L(Xd) = Xd @ W.T + s * (Xd @ A.T) @ B.T

takes the same two products over W, the second one the LoRA layer's (our kernels, merged weight at large M), and
the first one keeps no dequantized copy of an NF4 weight for backward (``nf4_matmul``: peft keeps it, ``[N, K]``
in bf16); ``(x - Xd) @ W.T`` is the residual of the scale pass.

The norm never materializes ``W + s * B @ A``: with ``w_n`` the rows of W and ``b_n`` those of B,

    ||w_n + s (B A)_n||^2 = ||w_n||^2 + 2 s b_n . (A w_n^T) + s^2 b_n (A A^T) b_n^T

so it takes ``||w_n||^2``, one skinny product ``W @ A.T [N, r]`` and ``A @ A.T [r, r]``, in fp32 (peft forms the
``[N, K]`` sum, and ``B @ A`` through a ``[K, K]`` identity). On the Triton backend one kernel
(``kernels.dora_norm``) reads W once (NF4: 0.5 byte per element, dequantized in registers) for both; elsewhere,
and in fp64, torch products over W dequantized to fp32 (``policy.dora_norm_on_triton`` decides).

``eps`` (default 1e-12): peft divides by the norm without one, so an all-zero row of ``W + s * B @ A``
(Llama-3.1-8B's ``o_proj`` has 511 zero rows of W, and B starts at zero) gives NaN there; here ``c = m / eps`` for
such a row, and with ``m`` initialized from that zero norm (``m = 0``, as peft initializes it) the row's output is
``bias`` (no dropout) and it gets no gradient: it stays inert, finite.

Gradients flow to ``x``, ``lora_A``, ``lora_B``, ``magnitude``, ``bias`` (and a dense weight that requires one),
through the LoRA functional and torch ops (autograd): ``dm = sum_rows(dY * L) / norm`` with ``L`` the unscaled
product, which autograd keeps for it (an ``[M, N]`` activation).
"""
import contextlib
import numbers

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import dispatch, ops, policy
from lowrank_kernels.checks import check_finite, tensor_version
from lowrank_kernels.functional import base_product, check_inputs, lora_linear, qlora_linear
from lowrank_kernels.nf4 import NF4Weight

__all__ = ["dora_linear", "dora_weight_norm"]


# lora_A -> (key of the inputs, norm): the norm of the last call, reused while the weight, the adapters (their
# version counters: an optimizer step bumps them) and the scaling are unchanged (decode steps, evaluation, the
# recomputed forward of activation checkpointing); a training step changes the adapters, and recomputes.
_NORMS = WeakIdKeyDictionary()


def _norm_key(weight, lora_A, lora_B, scaling, backend):
    t = weight.packed if isinstance(weight, NF4Weight) else weight
    return (id(weight), t.data_ptr(), tensor_version(t), t.dtype, lora_A.data_ptr(), tensor_version(lora_A),
            id(lora_B), lora_B.data_ptr(), tensor_version(lora_B), float(scaling), backend)


def dora_weight_norm(weight, lora_A, lora_B, scaling: float, backend=None) -> torch.Tensor:
    """``||W + scaling * lora_B @ lora_A||`` of each output row, fp32 ``[N]``, without forming that matrix, detached.
    ``weight``: dense ``[N, K]`` or ``NF4Weight`` (dequantized bit-exactly to fp32); ``lora_A [r, K]``,
    ``lora_B [N, r]`` in any float dtype (used in fp32, or fp64 when they are fp64). Reused from the previous call
    on the same ``lora_A`` while nothing it depends on changed (not while ``torch.compile`` traces)."""
    if torch.compiler.is_compiling() or lora_A.device.type == "meta":
        return _weight_norm(weight, lora_A, lora_B, scaling, backend)
    key = _norm_key(weight, lora_A, lora_B, scaling, backend)
    cached = _NORMS.get(lora_A)
    if cached is None or cached[0] != key:
        cached = _NORMS[lora_A] = (key, _weight_norm(weight, lora_A, lora_B, scaling, backend))
    return cached[1]


def _weight_norm(weight, lora_A, lora_B, scaling, backend):
    if torch.compiler.is_compiling():  # one operator node; its implementation comes back here
        return ops.dora_weight_norm(weight, lora_A, lora_B, scaling, backend)
    if policy.dora_norm_on_triton(weight, lora_A, lora_B, backend):
        from lowrank_kernels.kernels.dora_norm import dora_norm

        with torch.no_grad():
            return dora_norm(weight, lora_A, lora_B, scaling, policy.fp32_dot_precision(torch.float32, "tf32x3"))
    with torch.no_grad():
        dtype = torch.float64 if torch.float64 in (lora_A.dtype, lora_B.dtype, getattr(weight, "dtype", None)) \
            else torch.float32
        W = dispatch.dense_weight(weight, dtype, backend)
        A, B = lora_A.to(dtype), lora_B.to(dtype)
        s = float(scaling)
        WA = W @ A.T  # [N, r]
        norm2 = W.square().sum(1) + 2 * s * (B * WA).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return norm2.clamp_min(0).sqrt()  # rounding can leave a tiny negative for an (almost) zero row


class DoraScaleFunction(torch.autograd.Function):
    """``y = round(L * c + bias + residual)`` for ``L [M, N]``, ``c [N]``, ``bias [N]`` or ``None``, ``residual
    [M, N]`` or ``None``, in one Triton pass (``kernels.dora_scale``), and its backward in one more: gradients to
    ``L``, ``c`` and ``bias`` (the residual's is ``dY`` itself)."""

    @staticmethod
    def forward(ctx, L, c, bias, residual, dtype):
        from lowrank_kernels.kernels.dora_scale import dora_scale_forward

        ctx.save_for_backward(L, c)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        return dora_scale_forward(L, c, bias, dtype, residual)

    @staticmethod
    def backward(ctx, dY):
        from lowrank_kernels.kernels.dora_scale import dora_scale_backward

        L, c = ctx.saved_tensors
        need_dL, need_dc, need_db, need_dr = ctx.needs_input_grad[:4]
        dL, dc, db = dora_scale_backward(dY, L, c, need_dL, need_dc, need_db)
        dr = dispatch.cast(dY, ctx.residual_dtype) if need_dr else None
        return dL, None if dc is None else dc.to(c.dtype), None if db is None else db.to(ctx.bias_dtype), dr, None


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, *, dropout=0.0, eps=1e-12,
                backend=None, config=None):
    """``x [..., K]``, ``weight`` dense ``[N, K]`` or ``NF4Weight``, ``lora_A [r, K]``, ``lora_B [N, r]``,
    ``magnitude [N]`` (peft's ``lora_magnitude_vector``), ``bias [N]`` -> ``[..., N]`` in x's dtype (or the autocast
    dtype). ``dropout``: LoRA dropout probability (0 in eval mode); ``eps > 0``: the least norm divided by (module
    docstring); ``backend``, ``config``: as in :func:`~lowrank_kernels.functional.lora_linear`."""
    check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout, backend, config)
    N = weight.shape[0]
    if not isinstance(magnitude, torch.Tensor) or not magnitude.is_floating_point() or \
            tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude: expected a floating-point tensor of shape [{N}], got "
                         f"{getattr(magnitude, 'dtype', type(magnitude).__name__)} "
                         f"{tuple(getattr(magnitude, 'shape', ()))}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude: on {magnitude.device}, but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    check_finite(eps, "eps")
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, backend)
    c = magnitude / norm.clamp_min(eps).to(magnitude.dtype)  # [N]; gradient to magnitude only
    lora = qlora_linear if isinstance(weight, NF4Weight) else lora_linear
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if dropout == 0:
        L = lora(x, weight, lora_A, lora_B, scaling, None, backend=backend, config=config)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if policy.dora_scale_on_triton(L, backend):
                return DoraScaleFunction.apply(L.reshape(-1, N), c, bias, None, dtype).reshape(L.shape)
            y = (L * c).to(dtype)
            return y if bias is None else y + bias.to(dtype)
    # peft's form, base(x) + (c - 1) * (Xd @ W.T) + c * s * (Xd @ A.T) @ B.T, is (x - Xd) @ W.T + c * L(Xd) + bias
    # with L(Xd) the LoRA layer's product on the dropped x: two products over W as peft's, ours, and no dequantized
    # weight kept for backward.
    keep = ops.dropout_keep(x, float(dropout))
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        xc = x.to(dtype)
        xd = (xc * (1.0 / (1.0 - dropout))) * keep
        rest = base_product(xc - xd, weight, backend)
        L = lora(xd, weight, lora_A, lora_B, scaling, None, backend=backend, config=config)
        if policy.dora_scale_on_triton(L, backend):
            return DoraScaleFunction.apply(L.reshape(-1, N), c, bias, rest.reshape(-1, N), dtype).reshape(L.shape)
        y = (L * c + rest).to(dtype)
        return y if bias is None else y + bias.to(dtype)
