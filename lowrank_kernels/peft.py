"""peft interop: run a ``PeftModel``'s LoRA / QLoRA layers through lowrank_kernels, in place.

``convert(model)`` turns every supported ``peft.tuners.lora.Linear`` (dense base) and
``peft.tuners.lora.bnb.Linear4bit`` (NF4 base) in ``model`` into its lowrank_kernels counterpart,
``PeftLoraLinear`` / ``PeftLoraLinear4bit``: subclasses of peft's own classes whose ``forward`` runs
``lora_linear`` / ``qlora_linear``. The layer object keeps its identity, its children and the very same
Parameter objects, so an optimizer built before conversion keeps working, ``model.state_dict()`` and
``model.save_pretrained()`` write exactly what peft writes, and peft's own methods (merge, adapter switching,
``disable_adapter()``) keep working: whenever a layer is in a state our kernels do not cover (adapters disabled
or merged, several active adapters, ``adapter_names=`` mixed batches, extra forward arguments) its forward is
peft's. ``revert(model)`` undoes the conversion.

Numerics: peft computes the LoRA branch in the adapters' dtype (fp32 by default, after casting ``x``); ours
computes it in the activation dtype (bf16 / fp16) with fp32 accumulation and returns each gradient in its
parameter's own dtype. The base product runs in the activation dtype (bitsandbytes would use its
``compute_dtype``).

Layers that cannot be converted (DoRA and other LoRA variants, ``lora_bias``, ``fan_in_fan_out``, FP4 or
unquantized bitsandbytes weights, several active adapters) are left as they are and listed in a warning.
"""
import warnings

import torch
from torch import nn

from lowrank_kernels.functional import lora_linear, qlora_linear
from lowrank_kernels.nf4 import NF4Weight

try:
    from peft.tuners.lora import Linear as _PeftLinear
except ImportError as e:  # pragma: no cover - peft is an optional dependency
    raise ImportError("lowrank_kernels.peft needs the `peft` package (pip install peft)") from e
try:
    from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit
except ImportError:  # bitsandbytes missing: peft defines no 4-bit LoRA layer
    _PeftLinear4bit = None

__all__ = ["convert", "revert", "PeftLoraLinear", "PeftLoraLinear4bit"]


class _FusedForward:
    """Mixin for a peft LoRA layer: our forward whenever exactly one plain LoRA adapter is active."""

    def _lowrank_adapter(self):
        """The active adapter's name if our kernels cover the layer's current state, else ``None``."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        return name

    def forward(self, x, *args, **kwargs):
        name = None if (args or kwargs) else self._lowrank_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return self._lowrank_forward(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)


class PeftLoraLinear(_FusedForward, _PeftLinear):
    """peft's ``lora.Linear`` (dense ``nn.Linear`` base) with the forward/backward of ``lora_linear``."""

    def _lowrank_forward(self, x, A, B, scaling, p):
        base = self.get_base_layer()
        return lora_linear(x, base.weight, A, B, scaling, base.bias, dropout=p)


if _PeftLinear4bit is not None:
    class PeftLoraLinear4bit(_FusedForward, _PeftLinear4bit):
        """peft's ``lora.bnb.Linear4bit`` (NF4 base) with the forward/backward of ``qlora_linear``."""

        def _lowrank_forward(self, x, A, B, scaling, p):
            base = self.get_base_layer()
            return qlora_linear(x, self._lowrank_nf4(base.weight), A, B, scaling, base.bias, dropout=p)

        def _lowrank_nf4(self, weight) -> NF4Weight:
            """``NF4Weight`` view of the bitsandbytes weight (shared storage), rebuilt when the weight changes."""
            key = (weight.data_ptr(), id(weight.quant_state), weight.device)
            cached = self.__dict__.get("_lowrank_nf4_cache")
            if cached is None or cached[0] != key:
                cached = (key, NF4Weight.from_bnb(weight))
                self.__dict__["_lowrank_nf4_cache"] = cached
            return cached[1]
else:
    PeftLoraLinear4bit = None

_OURS = {_PeftLinear: PeftLoraLinear}
if _PeftLinear4bit is not None:
    _OURS[_PeftLinear4bit] = PeftLoraLinear4bit
_ORIGINAL = {ours: theirs for theirs, ours in _OURS.items()}


def _unsupported(module) -> str:
    """Why ``module`` (a peft LoRA layer) cannot be converted; ``""`` if it can."""
    if len(module.active_adapters) != 1:
        return f"{len(module.active_adapters)} active adapters (exactly one is supported)"
    name = module.active_adapters[0]
    if name not in module.lora_A:
        return f"active adapter {name!r} has no LoRA weights in this layer"
    if name in module.lora_variant:
        return f"LoRA variant {type(module.lora_variant[name]).__name__} (e.g. DoRA) is not supported"
    if module.lora_bias.get(name, False):
        return "lora_bias=True is not supported"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    base = module.get_base_layer()
    if type(module) is _PeftLinear:
        if not isinstance(base, nn.Linear) or getattr(base.weight, "quant_state", None) is not None \
                or not base.weight.is_floating_point():
            return f"base layer {type(base).__name__} is not a dense nn.Linear"
        return ""
    weight = base.weight
    if getattr(weight, "quant_state", None) is None:
        return "the bitsandbytes weight is not quantized yet (move the model to the GPU first)"
    if getattr(weight.quant_state, "quant_type", None) != "nf4":
        return f"quant_type {weight.quant_state.quant_type!r} (only nf4 is supported)"
    try:
        NF4Weight.from_bnb(weight)
    except (TypeError, ValueError) as e:
        return f"weight not readable as NF4: {e}"
    return ""


def convert(model: nn.Module) -> int:
    """Converts peft LoRA / QLoRA layers in ``model`` in place; returns how many were converted.

    Unsupported layers are left unchanged and listed in one ``UserWarning``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module (e.g. a PeftModel), got {type(model).__name__}")
    converted, skipped = 0, []
    for name, module in model.named_modules():
        ours = _OURS.get(type(module))
        if ours is None:
            continue
        reason = _unsupported(module)
        if reason:
            skipped.append(f"{name}: {reason}")
            continue
        module.__class__ = ours
        converted += 1
    if skipped:
        warnings.warn(f"lowrank_kernels.peft.convert left {len(skipped)} layer(s) unconverted:\n  "
                      + "\n  ".join(skipped))
    return converted


def revert(model: nn.Module) -> int:
    """Turns converted layers back into peft's own classes; returns how many were reverted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    reverted = 0
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__dict__.pop("_lowrank_nf4_cache", None)
            module.__class__ = original
            reverted += 1
    return reverted
