"""Functional (Q)LoRA linear layers: ``y = x @ W.T + scaling * (x @ A.T) @ B.T + bias`` (forward only).

``qlora_linear`` takes an NF4 base weight (``NF4Weight``), ``lora_linear`` a dense one. ``backend="triton"``
runs one fused Triton GEMM (the NF4 weight is dequantized in registers, never materialized, the LoRA term in the
same accumulator); it is correct but not yet faster than dequantize + cuBLAS, which is the default on CUDA.
On CPU the torch reference path runs. Arithmetic happens in ``x``'s dtype (bf16 / fp16 / fp32) with fp32 accumulation:
``lora_A``, ``lora_B``, ``bias`` (and a dense weight of another dtype) are cast to ``x.dtype``, as peft does
with fp32 adapters on bf16 activations.

Autograd is not implemented yet: outputs of the fused Triton path carry no gradient.
"""
import numbers

import torch

from lowrank_kernels import dispatch
from lowrank_kernels.nf4 import NF4Weight

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None, *, backend=None, config=None):
    """``x [..., K]``, NF4 ``weight [N, K]``, ``lora_A [r, K]``, ``lora_B [N, r]``, ``bias [N]`` -> ``[..., N]``.

    ``backend``: ``None`` (CUDA: our bit-exact dequant kernel + cuBLAS; CPU: torch), ``"torch"``, or
    ``"triton"`` for the fused GEMM (opt-in until it is the faster one; see ``dispatch.FUSED_BY_DEFAULT``). ``config``: Triton
    tile overrides (keys of ``lowrank_kernels.kernels.lora_matmul.default_config``).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight: expected an NF4Weight, got {type(weight).__name__} "
                        "(use lora_linear for a dense weight)")
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] NF4 weight, got shape "
                         f"{tuple(weight.shape)}")
    x2, A, B, b, s = _prepare(x, weight.shape, weight.device, lora_A, lora_B, scaling, bias)
    y, _ = dispatch.qlora_linear_forward(x2, weight, A, B, s, b, backend=backend, config=config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, *, backend=None, config=None):
    """As :func:`qlora_linear` with a dense ``weight [N, K]`` (bf16 / fp16 / fp32; cast to ``x.dtype``)."""
    if isinstance(weight, NF4Weight):
        raise TypeError("weight: got an NF4Weight; use qlora_linear for NF4 weights")
    _check_tensor(weight, "weight", dims=2)
    if weight.dtype not in _X_DTYPES:
        raise TypeError(f"weight: expected dtype bfloat16, float16 or float32, got {weight.dtype}")
    x2, A, B, b, s = _prepare(x, weight.shape, weight.device, lora_A, lora_B, scaling, bias)
    y, _ = dispatch.lora_linear_forward(x2, weight, A, B, s, b, backend=backend, config=config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _check_tensor(t, name, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimension(s), got shape {tuple(t.shape)}")


def _prepare(x, weight_shape, weight_device, lora_A, lora_B, scaling, bias):
    """Validates the inputs; returns ``(x [M, K], A, B, bias, scaling)`` with the LoRA tensors in ``x.dtype``."""
    N, K = weight_shape
    _check_tensor(x, "x")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x: expected dtype bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x: last dimension must be in_features={K} (weight is [{N}, {K}]), got shape "
                         f"{tuple(x.shape)}")
    _check_tensor(lora_A, "lora_A", dims=2)
    _check_tensor(lora_B, "lora_B", dims=2)
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (out_features, r of lora_A), got "
                         f"{tuple(lora_B.shape)}")
    if bias is not None:
        _check_tensor(bias, "bias", dims=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias: expected shape [{N}], got {tuple(bias.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a real number, got {type(scaling).__name__}")
    for name, t in (("weight", weight_device), ("lora_A", lora_A.device), ("lora_B", lora_B.device),
                    ("bias", None if bias is None else bias.device)):
        if t is not None and t != x.device:
            raise ValueError(f"{name}: on {t}, but x is on {x.device}; all inputs must be on one device")
    dtype = x.dtype
    b = None if bias is None else bias.to(dtype)
    return x.reshape(-1, K), lora_A.to(dtype), lora_B.to(dtype), b, float(scaling)
