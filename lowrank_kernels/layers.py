"""Drop-in LoRA / QLoRA linear layers with peft's semantics, on top of ``functional``.

    y = x @ W.T + bias + scaling * lora_B(lora_A(dropout(x)))      scaling = lora_alpha / r  (rsLoRA: / sqrt(r))

``LoraLinear`` holds a dense base weight, ``QLoraLinear`` an NF4 one (bitsandbytes' format). The base weight
and bias are frozen (``requires_grad=False``, as peft leaves them); ``lora_A`` (``[r, in]``) and ``lora_B``
(``[out, r]``) are ``nn.Linear`` modules, so ``state_dict`` keys are peft's adapter keys (``lora_A.weight``,
``lora_B.weight``) next to the base keys ``nn.Linear`` / ``bnb.nn.Linear4bit`` write (``weight``,
``weight.absmax``, ..., ``bias``). Initialization as peft: ``"kaiming"`` (or ``True``; A kaiming-uniform,
B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``False`` (nn.Linear's default init for both).
Dropout acts on the LoRA branch, in training mode only. Adapters are fp32 by default (``lora_dtype``), as
peft keeps them; the products run in the activation dtype. ``use_dora=True`` makes the layer peft's DoRA: a
magnitude Parameter ``lora_magnitude_vector [out]`` (initialized to the base weight's row norms, as peft does) and
the forward ``lowrank_kernels.dora.dora_linear``; merging a DoRA layer is left to peft (``convert`` a peft model).
"""
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import nf4_module
from lowrank_kernels.checks import FLOAT_DTYPES, check_finite, check_float_dtype, check_rank
from lowrank_kernels.dora import dora_linear, dora_weight_norm
from lowrank_kernels.functional import lora_linear, qlora_linear
from lowrank_kernels.nf4 import FlatScalesCache, NF4Weight

_INITS = (True, False, "kaiming", "gaussian")


class _LoraAdapter(nn.Module):
    """The adapter half shared by both layers: ``lora_A``, ``lora_B``, ``scaling``, ``lora_dropout``."""

    def _init_adapter(self, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                      device, dtype, use_dora=False):
        r = check_rank(r, "r")
        lora_alpha = check_finite(lora_alpha, "lora_alpha")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
                or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in _INITS:
            raise ValueError(f"init_lora_weights: expected one of {_INITS}, got {init_lora_weights!r}")
        check_float_dtype(dtype, "lora_dtype")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.use_rslora = lora_alpha, bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(lora_dropout)
        self.merged = False
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters(init_lora_weights)
        self.use_dora = bool(use_dora)
        if self.use_dora:  # peft: the row norms of W + s * B @ A at init (B = 0 with peft's inits: ||W row||)
            norm = dora_weight_norm(self._base_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))

    def _lora_forward(self, x, weight):
        """The adapted product of ``x`` over base ``weight`` (LoRA, or DoRA with the magnitude)."""
        if self.use_dora:
            return dora_linear(x, weight, self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector,
                               self.scaling, self.bias, dropout=self._dropout())
        lora = qlora_linear if isinstance(weight, NF4Weight) else lora_linear
        return lora(x, weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.bias,
                    dropout=self._dropout())

    def _check_not_dora(self, what):
        if self.use_dora:
            raise NotImplementedError(f"{type(self).__name__}.{what}: not implemented for DoRA layers (peft's DoRA "
                                      "merge rescales rows by the magnitude); convert a peft model to merge DoRA")

    def reset_lora_parameters(self, init_lora_weights="kaiming"):
        """peft's init: A kaiming-uniform (``"kaiming"``/``True``) or N(0, 1/r) (``"gaussian"``); B = 0."""
        if init_lora_weights is False:
            return
        if init_lora_weights not in _INITS:
            raise ValueError(f"init_lora_weights: expected one of {_INITS}, got {init_lora_weights!r}")
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def _dropout(self) -> float:
        return self.lora_dropout if self.training else 0.0

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``scaling * lora_B @ lora_A`` ``[out, in]``, computed in fp32, returned in ``dtype``."""
        self._check_not_dora("delta_weight")
        with torch.no_grad():
            return (self.lora_B.weight.float() @ self.lora_A.weight.float()).mul_(self.scaling).to(dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"merged={self.merged}" + (", use_dora=True" if self.use_dora else ""))


class LoraLinear(_LoraAdapter):
    """LoRA over a dense base weight ``[out, in]`` (any float dtype); forward/backward via ``lora_linear``.

    ``merge()`` adds ``delta_weight()`` into the base weight in place (exact up to rounding in its dtype);
    ``unmerge()`` subtracts it.
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                 bias=True, init_lora_weights="kaiming", device=None, dtype=None, lora_dtype=torch.float32,
                 use_dora=False):
        super().__init__()
        check_float_dtype(dtype, "dtype")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self._init_adapter(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                           device, lora_dtype, use_dora)

    def _base_weight(self):
        return self.weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights="kaiming", lora_dtype=torch.float32, use_dora=False):
        """Wraps ``linear``, sharing its ``weight`` and ``bias`` Parameters (frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear.weight: expected dtype bfloat16, float16, float32 or float64, got "
                            f"{linear.weight.dtype}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.weight = linear.weight.requires_grad_(False)
        self.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        self._init_adapter(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora,
                           init_lora_weights, linear.weight.device, lora_dtype, use_dora)
        return self

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self._lora_forward(x, self.weight)

    def merge(self):
        self._check_not_dora("merge")
        if self.merged:
            warnings.warn("LoraLinear.merge: already merged; nothing done")
            return
        with torch.no_grad():
            self.weight += self.delta_weight(self.weight.dtype)
        self.merged = True

    def unmerge(self):
        self._check_not_dora("unmerge")
        if not self.merged:
            warnings.warn("LoraLinear.unmerge: not merged; nothing done")
            return
        with torch.no_grad():
            self.weight -= self.delta_weight(self.weight.dtype)
        self.merged = False


class QLoraLinear(_LoraAdapter):
    """LoRA over an NF4 base weight (``NF4Weight``, bitsandbytes' format); forward/backward via ``qlora_linear``.

    Build with ``from_linear`` (quantizes a dense ``nn.Linear``), ``from_bnb`` (a quantized
    ``bnb.nn.Linear4bit``, storage shared) or the constructor (an ``NF4Weight``). ``merged_linear()`` returns a
    dense ``nn.Linear`` holding ``deq(W) + delta``; ``merge()`` re-quantizes ``deq(W) + delta`` into NF4 in
    place, which is lossy (warned), as is ``unmerge()``.
    """

    def __init__(self, weight: NF4Weight, bias=None, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                 init_lora_weights="kaiming", lora_dtype=torch.float32, use_dora=False):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight: expected an NF4Weight, got {type(weight).__name__} "
                            "(use QLoraLinear.from_linear to quantize a dense layer)")
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-D NF4 weight, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias: expected a tensor of shape [{out_features}], got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.nf4 = weight
        self.bias = bias
        self._init_adapter(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                           weight.device, lora_dtype, use_dora)

    def _base_weight(self):
        return self.nf4

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize=64, double_quant=True, **lora_kwargs):
        """Quantizes ``linear.weight`` to NF4 (bitsandbytes-exact); shares ``linear.bias``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        nf4 = NF4Weight.quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        return cls(nf4, bias, **lora_kwargs)

    @classmethod
    def from_bnb(cls, linear4bit, **lora_kwargs):
        """Wraps a quantized ``bnb.nn.Linear4bit`` (NF4), sharing its packed weight, scales and bias."""
        weight = getattr(linear4bit, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            raise TypeError(f"linear4bit: expected a quantized bitsandbytes Linear4bit (move it to the GPU first), "
                            f"got {type(linear4bit).__name__}")
        return cls(NF4Weight.from_bnb(weight), linear4bit.bias, **lora_kwargs)

    @property
    def weight(self) -> NF4Weight:
        return self.nf4

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.nf4.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self._lora_forward(x, FlatScalesCache.weight_of(self, self.nf4))

    def set_inference_form(self, enabled: bool = True) -> bool:
        """Whether the kernels read the NF4 weight with its double quantization undone once
        (:meth:`NF4Weight.with_flat_scales`: same outputs, bit for bit; an fp32 scale per block held beside
        the saved format, which does not change: 4 bytes per 64 weights, 1/8 of the packed weight's size).
        :func:`lowrank_kernels.prepare_for_inference` sets it. Returns whether this layer has such a form (an NF4
        weight: True)."""
        FlatScalesCache.attach(self, enabled)
        return True

    def merged_linear(self, dtype=None) -> nn.Linear:
        """A dense ``nn.Linear`` with weight ``deq(W) + delta`` (``dtype``: the NF4 weight's), and this bias."""
        self._check_not_dora("merged_linear")
        dtype = dtype or self.nf4.dtype
        delta = 0 if self.merged else self.delta_weight(torch.float32)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.nf4.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.nf4.dequantize(torch.float32) + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _requantize(self, sign):
        w = self.nf4.dequantize(torch.float32) + sign * self.delta_weight(torch.float32)
        self.nf4 = NF4Weight.quantize(w.to(self.nf4.dtype), blocksize=self.nf4.blocksize,
                                      double_quant=self.nf4.nested)

    def merge(self):
        self._check_not_dora("merge")
        if self.merged:
            warnings.warn("QLoraLinear.merge: already merged; nothing done")
            return
        warnings.warn("QLoraLinear.merge re-quantizes deq(W) + delta into NF4, which is lossy; merged_linear() "
                      "gives the exact dense result")
        self._requantize(+1)
        self.merged = True

    def unmerge(self):
        self._check_not_dora("unmerge")
        if not self.merged:
            warnings.warn("QLoraLinear.unmerge: not merged; nothing done")
            return
        warnings.warn("QLoraLinear.unmerge re-quantizes deq(W) - delta into NF4, which is lossy")
        self._requantize(-1)
        self.merged = False

    # -- the NF4 weight is not a Parameter: move it with the module, (de)serialize it as bitsandbytes does
    def _apply(self, fn, recurse=True):
        nf4 = nf4_module.moved(self.nf4, fn)  # first: if moving the NF4 weight fails, nothing has moved
        super()._apply(fn, recurse)
        self.nf4 = nf4
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nf4_module.save(self.nf4, destination, prefix, keep_vars)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.nf4, rest = nf4_module.load(self.nf4, state_dict, prefix, local_metadata, missing_keys,
                                         error_msgs)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
