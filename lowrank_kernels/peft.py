"""peft interop: run a ``PeftModel``'s LoRA / QLoRA layers through lowrank_kernels, in place.

``convert(model)`` turns every supported ``peft.tuners.lora.Linear`` (dense base) and
``peft.tuners.lora.bnb.Linear4bit`` (NF4 base) in ``model`` into its lowrank_kernels counterpart,
``PeftLoraLinear`` / ``PeftLoraLinear4bit``: subclasses of peft's own classes whose ``forward`` runs
``lora_linear`` / ``qlora_linear``. The layer object keeps its identity, its children and the very same
Parameter objects, so an optimizer built before conversion keeps working, ``model.state_dict()`` and
``model.save_pretrained()`` write exactly what peft writes, and peft's own methods (merge, adapter switching,
``disable_adapter()``) keep working: whenever a layer is in a state our kernels do not cover (adapters disabled
or merged, several active adapters, extra forward arguments, mixed batches with a non-LoRA adapter or active
dropout) its forward is peft's. ``adapter_names=`` mixed batches of plain LoRA adapters run ``mixed_lora_linear``.
``revert(model)`` undoes the conversion.

Numerics: peft computes the LoRA branch in the adapters' dtype (fp32 by default, after casting ``x``); ours
computes it in the activation dtype (bf16 / fp16) with fp32 accumulation and returns each gradient in its
parameter's own dtype. The base product runs in the activation dtype (bitsandbytes would use its
``compute_dtype``).

AdaLoRA: peft's ``adalora.SVDLinear`` (dense base) and ``adalora.bnb.SVDLinear4bit`` (NF4 base) become
``PeftAdaLoraLinear`` / ``PeftAdaLoraLinear4bit``, whose forward is ``adalora.adalora_linear`` with peft's factor
``scaling / (ranknum + 1e-5)`` (``ranknum`` is read from the device once per change). They compute all ``r``
ranks (``A * E``, ``B``), exactly as peft, until ``set_rank_mask(mask)`` installs a mask (``RankAllocator``
calls it); from then on only the active ranks, and the pruned triplets get exactly zero gradient (peft's own
forward still computes them: see ``lowrank_kernels.adalora``). The mask is a plain attribute, not in the state
dict; it applies while its adapter is the single active one and its ``lora_A`` Parameter is unchanged. Layers
that peft trimmed to rank 0 when loading a ``rank_pattern`` run the base product alone.

Hooks: peft's forward calls ``base_layer(x)``, ``lora_A``, ``lora_B`` and ``lora_dropout`` as modules, so their
forward / backward hooks fire, and accelerate's device-map and offload hooks (which replace ``forward`` on the
instance) move weights in and out around them. Our fused forward calls none of them, so a layer whose base layer
or adapter modules carry hooks (or while global module hooks are registered) runs peft's own forward, and the hooks
fire exactly as under peft: ``convert`` leaves such layers unconverted (and says why); a converted layer that
gets hooks later falls back to peft's forward while they are registered (warned once per layer).

DoRA adapters run ``lowrank_kernels.dora.dora_linear`` with the layer's parameters (``lora_magnitude_vector``
included). Layers that cannot be converted (LoRA variants other than DoRA, ``lora_bias``, ``fan_in_fan_out``, FP4 or
unquantized bitsandbytes weights, several active adapters, hooked layers, a base layer that is a subclass with its
own ``forward``, a dense weight of another dtype than bf16 / fp16 / fp32 / fp64 (fp8, say) or a tensor subclass)
are left to peft and listed in one warning: what the model computes never changes.
"""
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from lowrank_kernels.adalora import active_indices, adalora_linear, check_mask
from lowrank_kernels.dora import dora_linear
from lowrank_kernels.functional import lora_linear, qlora_linear
from lowrank_kernels.mixed import mixed_lora_linear
from lowrank_kernels.nf4 import FlatScalesCache, NF4Weight

try:
    from peft.tuners.lora import Linear as _PeftLinear
except ImportError as e:  # pragma: no cover - peft is an optional dependency
    raise ImportError("lowrank_kernels.peft needs the `peft` package (pip install peft)") from e
try:
    from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit
    from bitsandbytes.nn import Linear4bit as _Bnb4bit
except ImportError:  # bitsandbytes missing: peft defines no 4-bit LoRA layer
    _PeftLinear4bit = _Bnb4bit = None

try:
    from peft.tuners.lora.variants import DoraLinearVariant as _DoraLinearVariant
except ImportError:  # pragma: no cover - an old peft (DoRA layers are then left to peft)
    _DoraLinearVariant = None
try:
    from peft.tuners.adalora import SVDLinear as _PeftSVDLinear
except ImportError:  # pragma: no cover - an old peft without AdaLoRA
    _PeftSVDLinear = None
try:
    from peft.tuners.adalora.bnb import SVDLinear4bit as _PeftSVDLinear4bit
except ImportError:
    _PeftSVDLinear4bit = None

_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

__all__ = ["convert", "revert", "PeftLoraLinear", "PeftLoraLinear4bit", "PeftAdaLoraLinear",
           "PeftAdaLoraLinear4bit"]


def _own_forward(module) -> bool:
    """Whether ``module.forward`` is its class's (not replaced on the instance, as accelerate's hooks do)."""
    bound = module.__dict__.get("forward")
    return bound is None or (getattr(bound, "__self__", None) is module
                             and getattr(bound, "__func__", None) is type(module).forward)


_HOOK_KINDS = ("forward_pre", "forward", "backward_pre", "backward")


def _hooked(module) -> bool:
    """Whether anything would run around ``module``'s forward under peft that our fused forward would skip: its
    forward / backward hooks or a ``forward`` replaced on the instance (accelerate's ``add_hook_to_module``:
    device-map and offload hooks); global module hooks: ``_global_hooks``. The hot path: a few dict lookups."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or not _own_forward(module))


def _global_hooks() -> bool:
    return any(getattr(_torch_module, f"_global_{kind}_hooks", None) for kind in _HOOK_KINDS)


def _hooks(module) -> str:
    """The hooks ``_hooked`` found on ``module``, in words (``""``: none)."""
    words = {"forward_pre": "forward pre-hooks", "forward": "forward hooks", "backward_pre": "backward pre-hooks",
             "backward": "backward hooks"}
    found = [words[kind] for kind in _HOOK_KINDS if getattr(module, f"_{kind}_hooks", None)]
    found += [f"global {words[kind]}" for kind in _HOOK_KINDS if getattr(_torch_module, f"_global_{kind}_hooks", None)]
    if not _own_forward(module):
        found.append("accelerate hooks (_hf_hook)" if hasattr(module, "_hf_hook") else "a forward set on the instance")
    return ", ".join(found)


def _first_hooked(base, adapter_modules):
    """The first of ``base`` and ``adapter_modules`` that is hooked (``_hooked``; ``base`` while global module
    hooks are registered, which reach every module), or ``None``."""
    if _global_hooks():
        return base
    return next((m for m in (base, *adapter_modules) if _hooked(m)), None)


def _runtime_hooks(layer, adapter_modules) -> bool:
    """True while ``layer``'s base layer or one of ``adapter_modules`` is hooked (:func:`_first_hooked`): the layer
    then runs peft's own forward, so that the hooks fire exactly as under peft; warned once per layer."""
    hooked = _first_hooked(layer.base_layer, adapter_modules)
    if hooked is None:
        return False
    if not layer.__dict__.get("_lowrank_hooks_warned"):
        layer.__dict__["_lowrank_hooks_warned"] = True
        which = "its base layer" if hooked is layer.base_layer else f"its {type(hooked).__name__} adapter module"
        warnings.warn(f"lowrank_kernels: {type(layer).__name__} runs peft's forward while {which} has "
                      f"{_hooks(hooked)} (they fire exactly as under peft; our kernels would skip them)")
    return True


def _dora(module, name) -> bool:
    """Whether adapter ``name`` of a peft LoRA layer is a DoRA adapter (peft's ``DoraLinearVariant``)."""
    return _DoraLinearVariant is not None and type(module.lora_variant.get(name)) is _DoraLinearVariant


# (adapter names per sample, adapters used, rows per sample, device) -> the row index on the device: every layer of a
# forward, and every decode step with the same requests, reuses it (no host-to-device copy per layer call, which
# from pageable memory waits for the stream; and a CUDA graph can capture the calls)
_ROW_INDEX = {}
_ROW_INDEX_MAX = 64


def row_index(adapter_names: tuple, used: tuple, rows_per_sample: int, device) -> torch.Tensor:
    """The int64 row index of a mixed batch on ``device``: for each sample's name in ``adapter_names``, its position
    in ``used`` (-1 for a name not in it, such as ``"__base__"``), repeated ``rows_per_sample`` times. Cached per
    arguments (the same tensor for the same requests; never modified in place)."""
    key = (adapter_names, used, rows_per_sample, device)
    cache = not torch.compiler.is_compiling()  # traced, the index is built in the graph
    index = _ROW_INDEX.get(key) if cache else None
    if index is None:
        position = {n: i for i, n in enumerate(used)}
        with torch.inference_mode(False):  # also usable outside the inference mode it may be first built in
            per_sample = torch.tensor([position.get(n, -1) for n in adapter_names], dtype=torch.int64)
            index = per_sample.repeat_interleave(rows_per_sample).to(device)
        if cache:
            if len(_ROW_INDEX) >= _ROW_INDEX_MAX:
                _ROW_INDEX.clear()
            _ROW_INDEX[key] = index
    return index


class _FusedForward:
    """Mixin for a peft LoRA layer: our forward whenever exactly one plain LoRA adapter is active and nothing
    peft's forward would run around the base product or the adapters (hooks) would be skipped."""

    def _lowrank_adapter(self):
        """The active adapter's name if our kernels cover the layer's current state, else ``None``."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or (name in self.lora_variant and not _dora(self, name)) or \
                self.lora_bias.get(name, False):
            return None
        adapters = (self.lora_A[name], self.lora_B[name], self.lora_dropout[name]) + \
            ((self.lora_magnitude_vector[name],) if _dora(self, name) else ())
        if _runtime_hooks(self, adapters):
            return None
        return name

    def _lowrank_base_ok(self) -> bool:
        """Whether the base weight is in a form our kernels read (a 4-bit one may not be: see the subclass)."""
        return True

    def _lowrank_mixed(self, x, adapter_names):
        """peft's mixed batch (``adapter_names``: one adapter name per sample, ``"__base__"`` for none) through
        ``mixed_lora_linear``, or ``None`` where peft's forward must run: adapters disabled or merged, a used adapter
        that is not a plain LoRA adapter or whose dropout is active, hooks."""
        if self.disable_adapters or self.merged or not self._lowrank_base_ok():
            return None
        self._check_forward_args(x, adapter_names=adapter_names)  # peft's own errors (lengths, merged, DoRA)
        used = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and n in self.lora_A]
        if not used:
            return None
        modules = []
        for n in used:
            dropout = self.lora_dropout[n]
            if n in self.lora_variant or self.lora_bias.get(n, False) or (
                    isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0) or \
                    type(dropout) not in (nn.Dropout, nn.Identity):
                return None
            modules += [self.lora_A[n], self.lora_B[n], dropout]
        if _runtime_hooks(self, tuple(modules)):
            return None
        index = row_index(tuple(adapter_names), tuple(used), x[0].numel() // x.shape[-1] if x.dim() > 1 else 1,
                          x.device)
        base = self.get_base_layer()
        adapters = [(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in used]
        return mixed_lora_linear(x, self._lowrank_weight(base), adapters, index, base.bias)

    def forward(self, x, *args, **kwargs):
        if not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None:
            y = self._lowrank_mixed(x, kwargs["adapter_names"])
            if y is not None:
                return y
        name = None if (args or kwargs) else self._lowrank_adapter()
        if name is None or not self._lowrank_base_ok():
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        A, B, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if _dora(self, name):  # peft's DoRA: the same parameters through dora_linear
            base = self.get_base_layer()
            return dora_linear(x, self._lowrank_weight(base), A, B, self.lora_magnitude_vector[name].weight, scaling,
                               base.bias, dropout=p)
        return self._lowrank_forward(x, A, B, scaling, p)


class PeftLoraLinear(_FusedForward, _PeftLinear):
    """peft's ``lora.Linear`` (dense ``nn.Linear`` base) with the forward/backward of ``lora_linear``."""

    def _lowrank_forward(self, x, A, B, scaling, p):
        base = self.get_base_layer()
        return lora_linear(x, base.weight, A, B, scaling, base.bias, dropout=p)

    def _lowrank_weight(self, base):
        return base.weight


if _PeftLinear4bit is not None:
    class PeftLoraLinear4bit(_FusedForward, _PeftLinear4bit):
        """peft's ``lora.bnb.Linear4bit`` (NF4 base) with the forward/backward of ``qlora_linear``."""

        def _lowrank_forward(self, x, A, B, scaling, p):
            base = self.get_base_layer()
            return qlora_linear(x, self._lowrank_weight(base), A, B, scaling, base.bias, dropout=p)

        def _lowrank_base_ok(self) -> bool:
            """False while bitsandbytes keeps the weight repacked for its CPU kernel (it does so on a CPU forward
            in eval mode; not NF4's layout): peft's forward runs then, as bitsandbytes' kernel reads that layout."""
            return not getattr(_quant_state(self.get_base_layer()), "packing_format_for_cpu", False)

        def _lowrank_weight(self, base) -> NF4Weight:
            """``NF4Weight`` view of the bitsandbytes weight (shared storage), rebuilt when the weight changes."""
            weight, quant_state = base.weight, _quant_state(base)
            if torch.compiler.is_compiling():  # traced once: the view is built in the graph, no cache to key
                return NF4Weight.from_bnb(weight, quant_state)
            key = (weight.data_ptr(), id(quant_state), weight.device)
            cached = self.__dict__.get("_lowrank_nf4_cache")
            if cached is None or cached[0] != key:
                cached = (key, NF4Weight.from_bnb(weight, quant_state))
                self.__dict__["_lowrank_nf4_cache"] = cached
            return FlatScalesCache.weight_of(self, cached[1])

        def set_inference_form(self, enabled: bool = True) -> bool:
            """As :meth:`lowrank_kernels.QLoraLinear.set_inference_form`: the kernels read the bitsandbytes
            weight with its double quantization undone once (same outputs; bitsandbytes' tensors untouched)."""
            FlatScalesCache.attach(self, enabled)
            return True
else:
    PeftLoraLinear4bit = None

_OURS = {_PeftLinear: PeftLoraLinear}
if _PeftLinear4bit is not None:
    _OURS[_PeftLinear4bit] = PeftLoraLinear4bit
_ORIGINAL = {ours: theirs for theirs, ours in _OURS.items()}


def _quant_state(base):
    """The bitsandbytes ``QuantState`` of a ``Linear4bit``: its weight's, or (a weight that lost it, as FSDP2's
    sharding of a ``Params4bit`` does) the one the layer keeps, which bitsandbytes' own forward falls back to."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _unsupported(module) -> str:
    """Why ``module`` (a peft LoRA or AdaLoRA layer) cannot be converted; ``""`` if it can."""
    if len(module.active_adapters) != 1:
        return f"{len(module.active_adapters)} active adapters (exactly one is supported)"
    name = module.active_adapters[0]
    if name not in module.lora_A:
        return f"active adapter {name!r} has no LoRA weights in this layer"
    if type(module) not in _ADALORA and name in module.lora_variant and not _dora(module, name):
        return f"LoRA variant {type(module.lora_variant[name]).__name__} is not supported"
    if module.lora_bias.get(name, False):
        return "lora_bias=True is not supported"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    base = module.get_base_layer()
    if module.base_layer is not base:
        return f"base layer {type(module.base_layer).__name__} wraps another layer (nested adapters)"
    adapters = [module.lora_dropout[name]]
    if type(module) not in _ADALORA:
        adapters += [module.lora_A[name], module.lora_B[name]]
        if _dora(module, name):
            adapters.append(module.lora_magnitude_vector[name])
        if any(type(m) is not nn.Linear for m in adapters[1:3]):
            return "lora_A / lora_B are not plain nn.Linear modules"
    if type(adapters[0]) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout is a {type(adapters[0]).__name__} (nn.Dropout or nn.Identity is supported)"
    hooked = _first_hooked(base, adapters)
    if hooked is not None:
        which = "the base layer" if hooked is base else f"the {type(hooked).__name__} adapter module"
        return f"{which} has {_hooks(hooked)}, which peft's forward runs and ours would skip"
    dense = type(module) in (_PeftLinear, _PeftSVDLinear)
    expected = nn.Linear if dense else _Bnb4bit
    if not isinstance(base, expected):
        return f"base layer {type(base).__name__} is not a{' dense' if dense else ''} {expected.__name__}"
    if type(base).forward is not expected.forward:
        return (f"base layer {type(base).__name__} overrides {expected.__name__}.forward (what it computes is "
                "unknown to our kernels)")
    weight = base.weight
    if dense:
        if getattr(weight, "quant_state", None) is not None:
            return f"base layer {type(base).__name__} holds a quantized weight"
        if type(weight) not in (nn.Parameter, torch.Tensor):
            return f"base weight is a {type(weight).__name__} (a tensor subclass our kernels do not compute)"
        if weight.dtype not in _DENSE_DTYPES:
            return (f"base weight dtype {weight.dtype} (our kernels compute bfloat16, float16, float32 and float64 "
                    "weights exactly)")
        return ""
    quant_state = _quant_state(base)
    if quant_state is None:
        return "the bitsandbytes weight is not quantized yet (move the model to the GPU first)"
    if getattr(quant_state, "quant_type", None) != "nf4":
        return f"quant_type {quant_state.quant_type!r} (only nf4 is supported)"
    try:
        NF4Weight.from_bnb(weight, quant_state)
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
            converted_already = type(module) in _ORIGINAL or _wrapped_class(module, _ORIGINAL) is not None
            wrapped = None if converted_already else _wrapped_class(module, _OURS)
            if wrapped is not None:
                skipped.append(f"{name}: its class {type(module).__name__} subclasses peft's {wrapped.__name__} "
                               "(as a wrapper such as FSDP2's fully_shard makes one): convert before wrapping")
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
    reverted, left = 0, []
    for name, module in model.named_modules():
        original = _ORIGINAL.get(type(module))
        if original is None and _wrapped_class(module, _ORIGINAL) is not None:
            left.append(name)
        if original is not None:
            for key in ("_lowrank_nf4_cache", "_lowrank_rank_masks", "_lowrank_hooks_warned"):
                module.__dict__.pop(key, None)
            module.__class__ = original
            reverted += 1
    if left:
        warnings.warn(f"lowrank_kernels.peft.revert left {len(left)} converted layer(s) whose class another library "
                      f"wrapped (as FSDP2's fully_shard does): {', '.join(left)}; revert before wrapping")
    return reverted


def _wrapped_class(module, classes):
    """The class of ``classes`` that ``type(module)`` subclasses without being it (a wrapper's dynamic subclass,
    e.g. FSDP2's ``FSDP<name>``), or ``None``."""
    return next((c for c in type(module).__mro__[1:] if c in classes), None)


# ---------------------------------------------------------------------------------------------------- AdaLoRA
class _AdaFusedForward:
    """Mixin for a peft AdaLoRA layer: ``adalora_linear`` whenever exactly one adapter is active (peft's forward
    otherwise), over all ranks or over those of the mask ``set_rank_mask`` installed."""

    _lowrank_base_ok = _FusedForward._lowrank_base_ok  # the 4-bit layer overrides it as the LoRA one does

    def set_rank_mask(self, mask: torch.Tensor, adapter_name=None, *, words=None, active=None):
        """Installs bool ``mask [r]`` (True = rank computed) for ``adapter_name`` (default: the single active
        adapter); a device sync only for a mask on the GPU. ``E`` is not touched (``RankAllocator`` zeroes the
        pruned entries itself)."""
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(f"adapter_name: required when {len(self.active_adapters)} adapters are active")
            adapter_name = self.active_adapters[0]
        if adapter_name not in self.lora_A:
            raise ValueError(f"adapter_name: {adapter_name!r} has no AdaLoRA weights in this layer")
        A = self.lora_A[adapter_name]
        check_mask(mask, A.shape[0], "mask")
        idx = active_indices(mask, A.device) if active is None else active  # ``words``: unused (no buffer here)
        self.__dict__.setdefault("_lowrank_rank_masks", {})[adapter_name] = (A, idx)

    def _lowrank_active(self, name, A):
        """The active-rank indices of adapter ``name``, or ``None`` (all ranks)."""
        entry = self.__dict__.get("_lowrank_rank_masks", {}).get(name)
        if entry is None or entry[0] is not A:
            return None
        if entry[1].device != A.device:  # the model moved since the mask was set
            entry = self._lowrank_rank_masks[name] = (A, entry[1].to(A.device))
        return entry[1]

    def forward(self, x, *args, **kwargs):
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1 \
                or self.active_adapters[0] not in self.lora_A or not self._lowrank_base_ok() \
                or _runtime_hooks(self, (self.lora_dropout[self.active_adapters[0]],)):
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        A, base = self.lora_A[name], self.get_base_layer()
        return adalora_linear(x, self._lowrank_weight(base), A, self.lora_E[name], self.lora_B[name],
                              self.scaling[name], base.bias, ranknum=self.ranknum[name],
                              active=self._lowrank_active(name, A), dropout=p)


if _PeftSVDLinear is not None:
    class PeftAdaLoraLinear(_AdaFusedForward, _PeftSVDLinear):
        """peft's ``adalora.SVDLinear`` (dense ``nn.Linear`` base) with the forward/backward of
        ``adalora_linear``."""

        def _lowrank_weight(self, base):
            return base.weight
else:  # pragma: no cover
    PeftAdaLoraLinear = None

if _PeftSVDLinear4bit is not None:
    class PeftAdaLoraLinear4bit(_AdaFusedForward, _PeftSVDLinear4bit):
        """peft's ``adalora.bnb.SVDLinear4bit`` (NF4 base) with the forward/backward of ``adalora_linear``."""

        _lowrank_weight = PeftLoraLinear4bit._lowrank_weight
        _lowrank_base_ok = PeftLoraLinear4bit._lowrank_base_ok
        set_inference_form = PeftLoraLinear4bit.set_inference_form
else:
    PeftAdaLoraLinear4bit = None

_ADALORA = {theirs: ours for theirs, ours in ((_PeftSVDLinear, PeftAdaLoraLinear),
                                               (_PeftSVDLinear4bit, PeftAdaLoraLinear4bit)) if theirs is not None}
_OURS.update(_ADALORA)
_ORIGINAL.update({ours: theirs for theirs, ours in _ADALORA.items()})
