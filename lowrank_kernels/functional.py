"""Functional (Q)LoRA linear layers, differentiable: ``y = x @ W.T + scaling * (Xd @ A.T) @ B.T + bias``.

``qlora_linear`` takes an NF4 base weight (``NF4Weight``), ``lora_linear`` a dense one. ``Xd`` is ``x`` after
dropout with probability ``dropout`` (the LoRA branch only, as in peft; ``dropout=0`` means none).
Gradients flow to ``x``, ``lora_A``, ``lora_B``, ``bias`` (and a dense weight that requires grad), each in its
own dtype; the NF4 weight never gets one. Arithmetic happens in ``x``'s dtype (bf16 / fp16 / fp32; under
``torch.autocast``, the autocast dtype) with fp32 accumulation: ``lora_A``, ``lora_B`` and ``bias`` are cast to
it, as peft does with fp32 adapters on bf16 activations.

Which kernels run (decode GEMV, merged weight, one-launch LoRA branch, cuBLAS, the opt-in fused GEMM with
``backend="triton"``; the torch path on CPU) is ``policy.forward_plan`` / ``policy.backward_plan``'s choice.
"""
import contextlib
import numbers

import torch
import torch.nn.functional as F

from lowrank_kernels import dispatch, ops, policy
from lowrank_kernels.autograd import LoraLinearFunction, NF4MatmulFunction, draw_seed, lora_forward
from lowrank_kernels.checks import check_finite
from lowrank_kernels.nf4 import NF4Weight

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TORCH_ONLY_DTYPES = (torch.float64,)  # the fp64 torch path exists for gradcheck and oracles


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None, *, dropout=0.0, backend=None, config=None):
    """``x [..., K]``, NF4 ``weight [N, K]``, ``lora_A [r, K]``, ``lora_B [N, r]``, ``bias [N]`` -> ``[..., N]``.

    ``dropout``: LoRA-branch dropout probability in ``[0, 1)`` (pass 0 in eval mode). ``backend``: ``None``
    (CUDA: our bit-exact dequant kernel + cuBLAS; CPU: torch), ``"torch"``, or ``"triton"`` for the fused GEMMs.
    ``config``: Triton tile overrides (keys of ``lowrank_kernels.kernels.lora_matmul.default_config``).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight: expected an NF4Weight, got {type(weight).__name__} "
                        "(use lora_linear for a dense weight)")
    return _apply(x, weight, lora_A, lora_B, scaling, bias, dropout, backend, config)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, *, dropout=0.0, backend=None, config=None):
    """As :func:`qlora_linear` with a dense ``weight [N, K]`` (bf16 / fp16 / fp32; rounded to the compute dtype)."""
    if isinstance(weight, NF4Weight):
        raise TypeError("weight: got an NF4Weight; use qlora_linear for NF4 weights")
    return _apply(x, weight, lora_A, lora_B, scaling, bias, dropout, backend, config)


def base_product(x, weight, backend=None):
    """``x @ W.T`` for ``x [..., K]`` in the compute dtype and a dense or NF4 ``weight [N, K]``, no bias,
    differentiable in ``x`` (and in a dense weight that requires a gradient). An NF4 weight is dequantized for the
    product and again for ``dX = dY @ W`` in backward (the ``nf4_matmul`` operator under ``torch.compile``): no
    ``[N, K]`` dequantized copy is kept between them, as ``F.linear`` over it would keep one. For the products over
    the base weight alone: AdaLoRA layers left with no rank, DoRA's ``(x - Xd) @ W.T`` with dropout."""
    if not isinstance(weight, NF4Weight):
        return F.linear(x, dispatch.cast(weight, x.dtype))
    if torch.compiler.is_compiling():
        return ops.nf4_matmul(x, weight, backend)
    if torch.is_grad_enabled() and x.requires_grad:
        return NF4MatmulFunction.apply(x, weight, backend)
    return dispatch.nf4_matmul(x, weight, False, backend)


def check_inputs(x, weight, lora_A, lora_B, scaling, bias=None, dropout=0.0, backend=None, config=None, *,
                 min_rank=1):
    """Raises a ``TypeError`` / ``ValueError`` naming the argument unless the arguments of :func:`qlora_linear`
    (an ``NF4Weight``) or :func:`lora_linear` (a dense tensor) are valid together (``min_rank``: the least rank
    ``r`` of the adapters; AdaLoRA layers that peft trimmed have 0)."""
    if isinstance(weight, NF4Weight):
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-D [out_features, in_features] NF4 weight, got shape "
                             f"{tuple(weight.shape)}")
    else:
        _check_tensor(weight, "weight", dims=2)
        if weight.dtype not in _X_DTYPES + _TORCH_ONLY_DTYPES:
            raise TypeError(f"weight: expected dtype bfloat16, float16, float32 or float64, got {weight.dtype}")
    N, K = weight.shape
    _validate(x, N, K, weight.device, lora_A, lora_B, scaling, bias, dropout, min_rank)
    if policy.choose_backend(x.device, backend) != "torch":
        if x.dtype in _TORCH_ONLY_DTYPES:
            raise TypeError(f"x: dtype {x.dtype} runs on the torch backend only (pass backend='torch'); the Triton "
                            "kernels take bfloat16, float16 or float32")
        if config is not None:
            from lowrank_kernels.kernels.lora_matmul import check_config

            check_config(config)


def _apply(x, weight, lora_A, lora_B, scaling, bias, dropout, backend, config):
    check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout, backend, config)
    N, K = weight.shape
    dtype = x.dtype
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # no autocast on meta
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
    x2 = dispatch.cast(x if x.dim() == 2 else x.reshape(-1, K), dtype)
    s, p = float(scaling), float(dropout)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():  # one opaque operator node, its seed drawn by another
            y = ops.lora_linear(x2, weight, lora_A, lora_B, s, bias, p, backend, config)
        else:
            # The dropout mask is a function of a seed drawn from torch's generator of x's device, which
            # torch.utils.checkpoint saves and restores: a recomputed forward (and the backward) sees the same mask.
            seed = draw_seed(x2) if p > 0 else None
            tracked = [x2, lora_A, lora_B] + ([bias] if bias is not None else []) + \
                ([weight] if isinstance(weight, torch.Tensor) else [])
            if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
                y = LoraLinearFunction.apply(x2, lora_A, lora_B, bias, weight, s, p, seed, backend, config)
            else:  # inference: nothing is saved
                y, *_ = lora_forward(x2, weight, lora_A, lora_B, bias, s, p, seed, False, backend, config)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def _check_tensor(t, name, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimension(s), got shape {tuple(t.shape)}")


def _validate(x, N, K, weight_device, lora_A, lora_B, scaling, bias, dropout, min_rank=1):
    _check_tensor(x, "x")
    if x.dtype not in _X_DTYPES + _TORCH_ONLY_DTYPES:
        raise TypeError(f"x: expected dtype bfloat16, float16 or float32 (float64: torch backend only), got "
                        f"{x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x: last dimension must be in_features={K} (weight is [{N}, {K}]), got shape "
                         f"{tuple(x.shape)}")
    _check_tensor(lora_A, "lora_A", dims=2)
    _check_tensor(lora_B, "lora_B", dims=2)
    r = lora_A.shape[0]
    if r < min_rank or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}] with r >= {min_rank}, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (out_features, r of lora_A), got "
                         f"{tuple(lora_B.shape)}")
    if bias is not None:
        _check_tensor(bias, "bias", dims=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias: expected shape [{N}], got {tuple(bias.shape)}")
    check_finite(scaling, "scaling")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout: expected a probability (float), got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    for name, t in (("weight", weight_device), ("lora_A", lora_A.device), ("lora_B", lora_B.device),
                    ("bias", None if bias is None else bias.device)):
        if t is not None and t != x.device:
            raise ValueError(f"{name}: on {t}, but x is on {x.device}; all inputs must be on one device")
