"""AdaLoRA (SVD-form LoRA) with packed rank masks: only the active ranks are computed.

    y = x @ W.T + bias + (dropout(x) @ A_act.T) @ B_act.T * scaling / (ranknum + 1e-5)
    A_act = (lora_A * lora_E)[idx]   [ρ, K]        B_act = lora_B[:, idx]   [N, ρ]

``lora_A [r, K]``, ``lora_E [r, 1]``, ``lora_B [N, r]`` are peft's ``SVDLinear`` parameters (fp32 by default) and
``idx`` (int64 ``[ρ]``, sorted) the active ranks. The gather is differentiable (``index_select``): the gradients
of the active triplets scatter back into dense ``[r, ...]`` gradients whose pruned rows/columns are exactly
zero. The ρ-rank product runs through ``lora_linear`` / ``qlora_linear`` (DESIGN.md §4: only active ranks enter
``S``). With ρ = 0 only the base product ``x @ W.T + bias`` runs, and ``lora_A``, ``lora_E``, ``lora_B`` get
all-zero gradients (not ``None``: ``RankAllocator`` needs a gradient for every parameter).

Rank masks are stored bit-packed (``pack_mask``): rank ``i`` is bit ``i % 32`` (LSB first) of int32 word
``i // 32``; the unused high bits of the last word are zero.

Semantic difference with peft during AdaLoRA's budgeting phase: peft keeps computing every rank; its allocator
zeroes the pruned ``E`` entries, but their ``E`` still gets a gradient and the optimizer regrows them between
masking steps. Here a pruned triplet is not computed at all: its A, E and B get exactly zero gradient, and
nonzero values left in its E are ignored (the layer never writes its parameters). The mask is installed by
``set_rank_mask`` (``RankAllocator`` calls it whenever a layer's mask changes).
"""
import contextlib
import numbers

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import nf4_module
from lowrank_kernels.checks import check_finite, check_float_dtype, check_rank, tensor_version
from lowrank_kernels.functional import base_product, check_inputs, lora_linear, qlora_linear
from lowrank_kernels.nf4 import DTYPES as NF4_DTYPES, FlatScalesCache, NF4Weight

__all__ = ["AdaLoraLinear", "adalora_linear", "active_indices", "check_active", "check_mask", "pack_mask", "unpack_mask"]

_BITS = 32


def active_indices(mask: torch.Tensor, device) -> torch.Tensor:
    """Sorted int64 indices of the True entries of bool ``mask``, on ``device``; computed where ``mask`` lives
    (no device sync for a CPU mask: the copy to the device is asynchronous)."""
    active = mask.nonzero().flatten().to(device, non_blocking=True)
    _CHECKED_ACTIVE[active] = (tensor_version(active), mask.shape[0])  # valid by construction: no check needed
    return active


# Index tensors ``active`` whose values were checked (sorted, unique, in [0, r)): tensor -> (its _version, r).
# Reading values of a CUDA tensor syncs the device, so each tensor is checked once, not at every forward.
_CHECKED_ACTIVE = WeakIdKeyDictionary()


def check_active(active, r: int, device) -> None:
    """Raises unless ``active`` is a 1-D int64 tensor on ``device`` of sorted, distinct rank indices in ``[0, r)``
    (the form ``active_indices`` returns). The values are read once per tensor and version (a device sync)."""
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active: expected an int64 tensor of rank indices, got {type(active).__name__}")
    if active.dtype == torch.bool:
        raise TypeError("active: got a bool mask; pass its sorted int64 indices (active_indices(mask, device)), "
                        "or install the mask with set_rank_mask")
    if active.dtype != torch.int64 or active.dim() != 1:
        raise TypeError(f"active: expected a 1-D int64 tensor of rank indices, got {active.dtype} "
                        f"{tuple(active.shape)}")
    if active.device != device:
        raise ValueError(f"active: on {active.device}, but lora_A is on {device}")
    if active.numel() > r:
        raise ValueError(f"active: {active.numel()} indices for r={r} ranks")
    if active.is_meta:
        return
    if torch.compiler.is_compiling():  # traced: the same checks as device-side asserts (no host read, no graph break)
        if active.numel():
            torch._assert_async((active.min() >= 0) & (active.max() < r),
                                f"active: rank indices must lie in [0, {r})")
            torch._assert_async((active[1:] > active[:-1]).all(), "active: rank indices must be sorted and distinct")
        return
    if _CHECKED_ACTIVE.get(active, (None, None)) == (tensor_version(active), r):
        return
    if active.numel():
        lo, hi, increasing = int(active.min()), int(active.max()), bool((active[1:] > active[:-1]).all())
        if lo < 0 or hi >= r:
            raise ValueError(f"active: rank indices must lie in [0, {r}), got values in [{lo}, {hi}]")
        if not increasing:
            raise ValueError("active: rank indices must be sorted and distinct (as active_indices returns them)")
    _CHECKED_ACTIVE[active] = (tensor_version(active), r)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[r]`` -> int32 ``[ceil(r / 32)]``: rank ``i`` is bit ``i % 32`` of word ``i // 32``.
    A 2-D ``[L, r]`` mask packs row by row into ``[L, ceil(r / 32)]``."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        for row in mask[:1]:
            check_mask(row, None, "mask")
    else:
        check_mask(mask, None, "mask")
    r = mask.shape[-1]
    bits = torch.zeros(*mask.shape[:-1], -(-r // _BITS) * _BITS, dtype=torch.int64, device=mask.device)
    bits[..., :r] = mask.to(torch.int64)
    shifts = torch.arange(_BITS, device=mask.device)
    words = (bits.view(*mask.shape[:-1], -1, _BITS) << shifts).sum(-1)   # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_mask(words: torch.Tensor, r: int) -> torch.Tensor:
    """int32 ``[ceil(r / 32)]`` -> bool ``[r]``, the inverse of :func:`pack_mask`."""
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 1:
        raise TypeError(f"words: expected a 1-D int32 tensor, got "
                        f"{words.dtype if isinstance(words, torch.Tensor) else type(words).__name__}")
    if words.shape[0] != -(-r // _BITS):
        raise ValueError(f"words: expected {-(-r // _BITS)} word(s) for r={r}, got {words.shape[0]}")
    shifts = torch.arange(_BITS, device=words.device)
    bits = (words.to(torch.int64).bitwise_and(0xFFFFFFFF).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:r].bool()


def check_mask(mask, r, what):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: expected a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{what}: expected dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 1 or (r is not None and mask.shape[0] != r):
        raise ValueError(f"{what}: expected shape [{'r' if r is None else r}], got {tuple(mask.shape)}")


class _ZeroGrads(torch.autograd.Function):
    """``apply(y, *params) -> y``; backward gives ``y`` its gradient and every param an all-zero one."""

    @staticmethod
    def forward(ctx, y, *params):
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return (dy, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs))


def adalora_linear(x, weight, lora_A, lora_E, lora_B, scaling, bias=None, *, ranknum=None, active=None,
                   dropout=0.0, backend=None, config=None):
    """``x [..., K]``, ``weight`` dense ``[N, K]`` or ``NF4Weight``, ``lora_A [r, K]``, ``lora_E [r, 1]``,
    ``lora_B [N, r]``, ``bias [N]`` -> ``[..., N]``.

    ``scaling``: the factor of the LoRA term; with ``ranknum`` (peft's one-element tensor) the factor is
    ``scaling / (ranknum + 1e-5)``, computed on ``ranknum``'s device and folded into the active columns of
    ``lora_B`` (no host read of ``ranknum``: no device sync, and ``torch.compile`` traces it).
    ``active``: int64 ``[ρ]`` sorted indices of the ranks to compute, or ``None`` for all ``r``.
    ``dropout``, ``backend``, ``config``: as in :func:`~lowrank_kernels.functional.lora_linear`.
    """
    for name, t in (("lora_A", lora_A), ("lora_E", lora_E), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A: expected shape [r, in_features], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_E.shape != (r, 1):
        raise ValueError(f"lora_E: expected shape [{r}, 1] (r of lora_A), got {tuple(lora_E.shape)}")
    if lora_E.device != lora_A.device:
        raise ValueError(f"lora_E: on {lora_E.device}, but lora_A is on {lora_A.device}")
    if active is not None:
        check_active(active, r, lora_A.device)
    if ranknum is not None:
        _check_ranknum(ranknum, lora_A.device)
    if active is not None and active.numel() < r:  # else (sorted, distinct, r of them) all ranks, in order
        A = lora_A.index_select(0, active) * lora_E.index_select(0, active)
        B = lora_B.index_select(1, active)
    else:
        A, B = lora_A * lora_E, lora_B
    if ranknum is not None:
        B = B * (scaling / (ranknum.to(torch.promote_types(B.dtype, torch.float32)) + 1e-5))  # fp32 at least
        scaling = 1.0
    if A.shape[0] > 0:
        fn = qlora_linear if isinstance(weight, NF4Weight) else lora_linear
        return fn(x, weight, A, B, scaling, bias, dropout=dropout, backend=backend, config=config)
    # ρ = 0: the base product alone, in the compute dtype the functional would use, after the functional's checks
    check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout, backend, config, min_rank=0)
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # no autocast on meta
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        y = base_product(x.to(dtype), weight, backend if dtype in NF4_DTYPES else "torch")
        if bias is not None:
            y = y + bias.to(dtype)
    params = (lora_A, lora_E, lora_B)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        y = _ZeroGrads.apply(y, *params)
    return y


def _check_ranknum(ranknum, device):
    if not isinstance(ranknum, torch.Tensor) or not ranknum.is_floating_point() or ranknum.numel() != 1:
        raise TypeError(f"ranknum: expected a one-element floating-point tensor, got "
                        f"{getattr(ranknum, 'dtype', type(ranknum).__name__)} {tuple(getattr(ranknum, 'shape', ()))}")
    if ranknum.device != device:
        raise ValueError(f"ranknum: on {ranknum.device}, but lora_A is on {device}")


class AdaLoraLinear(nn.Module):
    """AdaLoRA over a dense or NF4 base weight, computing only the active ranks (see the module docstring).

    ``weight``: a dense ``[N, K]`` tensor (bf16 / fp16 / fp32; a Parameter is shared, and frozen) or an
    ``NF4Weight``; ``bias``: ``[N]`` or ``None`` (frozen). As peft's ``SVDLinear``: parameters ``lora_A [r, K]``,
    ``lora_E [r, 1]``, ``lora_B [N, r]`` in ``lora_dtype`` (E = 0, A, B ~ N(0, 0.02)), ``ranknum`` (buffer
    ``[1]``, fp32, ``float(init_r)``) and ``scaling = lora_alpha if lora_alpha > 0 else init_r``; the LoRA term is
    multiplied by ``scaling / (ranknum + 1e-5)``. Dropout acts on the LoRA branch, in training mode only.

    Buffers: ``rank_mask_words`` (int32 ``[ceil(r / 32)]``, saved in ``state_dict``, so a reloaded model keeps its
    active ranks) and ``active_idx`` (int64 ``[ρ]``, rebuilt from the words, not saved). An NF4 weight is saved
    under bitsandbytes' ``weight.*`` keys, as ``QLoraLinear`` does.
    """

    def __init__(self, weight, bias=None, init_r=12, lora_alpha=8, lora_dropout=0.0, lora_dtype=torch.float32):
        super().__init__()
        init_r = check_rank(init_r, "init_r")
        lora_alpha = check_finite(lora_alpha, "lora_alpha")
        check_float_dtype(lora_dtype, "lora_dtype")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
                or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")
        if isinstance(weight, NF4Weight):
            if len(weight.shape) != 2:
                raise ValueError(f"weight: expected a 2-D NF4 weight, got shape {tuple(weight.shape)}")
        elif isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2:
            weight = weight.requires_grad_(False) if isinstance(weight, nn.Parameter) \
                else nn.Parameter(weight, requires_grad=False)
        else:
            raise TypeError(f"weight: expected a 2-D floating-point tensor or an NF4Weight, got "
                            f"{getattr(weight, 'shape', type(weight).__name__)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias: expected a tensor of shape [{self.out_features}], got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            bias = bias.requires_grad_(False) if isinstance(bias, nn.Parameter) \
                else nn.Parameter(bias, requires_grad=False)
        self.weight, self.bias = weight, bias   # an NF4Weight is a plain attribute (see _apply / state dict below)
        self.r, self.lora_alpha, self.lora_dropout = init_r, lora_alpha, float(lora_dropout)
        self.scaling = lora_alpha if lora_alpha > 0 else float(init_r)
        dev = weight.device
        self.lora_A = nn.Parameter(torch.empty(init_r, self.in_features, device=dev, dtype=lora_dtype))
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, device=dev, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, init_r, device=dev, dtype=lora_dtype))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.register_buffer("ranknum", torch.full((1,), float(init_r), device=dev))
        self.register_buffer("rank_mask_words", pack_mask(torch.ones(init_r, dtype=torch.bool, device=dev)))
        self.register_buffer("active_idx", torch.arange(init_r, device=dev), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, init_r=12, lora_alpha=8, lora_dropout=0.0, lora_dtype=torch.float32,
                    quantize=False, blocksize=64, double_quant=True):
        """Wraps ``linear``: shares its weight and bias (frozen), or with ``quantize=True`` quantizes the weight to
        NF4 (bitsandbytes-exact, ``blocksize``, ``double_quant``) and shares the bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = NF4Weight.quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant) \
            if quantize else linear.weight
        return cls(weight, linear.bias, init_r=init_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   lora_dtype=lora_dtype)

    # ------------------------------------------------------------------ rank mask
    def set_rank_mask(self, mask: torch.Tensor, *, words=None, active=None):
        """Installs bool ``mask [r]`` (True = rank computed). A device mask costs one device sync (the count of
        active ranks), a CPU mask none. ``words`` (``pack_mask(mask)``) and ``active`` (its indices) may be passed
        precomputed on the layer's device: ``RankAllocator`` packs every changed layer in one batch."""
        check_mask(mask, self.r, "mask")
        device = self.rank_mask_words.device
        if words is None:
            self.rank_mask_words.copy_(pack_mask(mask), non_blocking=True)
        else:
            self.rank_mask_words = words
        self.active_idx = active_indices(mask, device) if active is None else active

    @property
    def rank_mask(self) -> torch.Tensor:
        """bool ``[r]``, unpacked from ``rank_mask_words``."""
        return unpack_mask(self.rank_mask_words, self.r)

    @property
    def active_r(self) -> int:
        """ρ, the number of active ranks (no sync)."""
        return self.active_idx.numel()

    # ------------------------------------------------------------------ compute
    def forward(self, x):
        return adalora_linear(x, FlatScalesCache.weight_of(self, self.weight), self.lora_A, self.lora_E, self.lora_B,
                              self.scaling, self.bias, ranknum=self.ranknum, active=self.active_idx,
                              dropout=self.lora_dropout if self.training else 0.0)

    def set_inference_form(self, enabled: bool = True) -> bool:
        """As :meth:`QLoraLinear.set_inference_form` for an NF4 weight; a dense one has no other form (False)."""
        nf4 = isinstance(self.weight, NF4Weight)
        FlatScalesCache.attach(self, enabled and nf4)
        return nf4

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``B[:, idx] @ (A * E)[idx] * scaling / (ranknum + 1e-5)`` ``[N, K]``, computed in fp32."""
        idx = self.active_idx
        with torch.no_grad():
            AE = (self.lora_A.float() * self.lora_E.float())[idx]
            return (self.lora_B.float()[:, idx] @ AE).mul_(self.scaling / (self.ranknum.float() + 1e-5)).to(dtype)

    def extra_repr(self):
        base = "nf4" if isinstance(self.weight, NF4Weight) else str(self.weight.dtype)
        return (f"in_features={self.in_features}, out_features={self.out_features}, base={base}, r={self.r}, "
                f"active_r={self.active_r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}")

    # ------------------------------------------------------------------ NF4 weight and mask in the state dict
    def _apply(self, fn, recurse=True):
        nf4 = nf4_module.moved(self.weight, fn) if isinstance(self.weight, NF4Weight) else None  # first: all or nothing
        super()._apply(fn, recurse)
        if nf4 is not None:
            self.weight = nf4
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if isinstance(self.weight, NF4Weight):
            nf4_module.save(self.weight, destination, prefix, keep_vars)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if isinstance(self.weight, NF4Weight):
            self.weight, state_dict = nf4_module.load(self.weight, state_dict, prefix, local_metadata,
                                                      missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.active_idx = self.rank_mask.nonzero().flatten()
