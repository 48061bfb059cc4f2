"""Mixed-adapter batches: one base weight, several LoRA adapters (different ranks allowed), each row of the batch
through its own adapter or none, as peft computes a model called with ``adapter_names=[...]``
(``python_ref/mixed.py`` states peft's semantics and is the oracle):

    y[m] = x[m] @ W.T + bias + s_a * (x[m] @ A_a.T) @ B_a.T      a = adapter_index[m]   (-1: no adapter)

The base product runs once for the whole batch; the LoRA terms in one shrink and one expand launch for all rows
(``kernels/lora_gather.py``: each row gathers its adapter's tiles at decode sizes, rows sorted by adapter into
tensor-core tiles above; ``policy.mixed_path`` decides), where peft loops over the adapters, gathering and
scattering each one's rows. With a gradient to compute (peft's mixed path is differentiable in eval mode), or
on the torch backend, the terms are torch products per used adapter over all rows, kept where the row's adapter is
that one (no data-dependent shapes).
"""
import numbers

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import policy
from lowrank_kernels.checks import tensor_version
from lowrank_kernels.functional import lora_linear, qlora_linear
from lowrank_kernels.nf4 import NF4Weight

__all__ = ["mixed_lora_linear"]
# adapter_index tensors whose values were checked: tensor -> (its version, number of adapters)
_CHECKED = WeakIdKeyDictionary()
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# the first adapter's lora_A -> (key of all adapters, their stacked form): serving calls a layer with the same
# adapters every step; stacking copies them (and a CUDA graph cannot capture the host-to-device copy of the scalings)
_STACKS = WeakIdKeyDictionary()


_ZEROS = {}


def _zero_adapter(device, dtype, N, K):
    key = (device, dtype, N, K)
    if key not in _ZEROS:
        with torch.inference_mode(False):
            _ZEROS[key] = (torch.zeros(1, K, device=device, dtype=dtype), torch.zeros(N, 1, device=device, dtype=dtype))
    return _ZEROS[key]


def _stacked(adapters, stack_adapters, dtype):
    key = tuple((id(A), A.data_ptr(), tensor_version(A), id(B), B.data_ptr(), tensor_version(B), float(s))
                for A, B, s in adapters) + (dtype,)
    cached = _STACKS.get(adapters[0][0])
    if cached is None or cached[0] != key:
        cached = _STACKS[adapters[0][0]] = (key, stack_adapters([(A, B, float(s)) for A, B, s in adapters], dtype))
    return cached[1]


def _check(x, weight, adapters, adapter_index, bias):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.dtype not in _X_DTYPES:
        raise TypeError(f"x: expected a bf16 / fp16 / fp32 / fp64 tensor [..., K], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(weight, (torch.Tensor, NF4Weight)) or len(weight.shape) != 2:
        raise TypeError(f"weight: expected a dense [N, K] tensor or an NF4Weight, got {type(weight).__name__}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension must be in_features={K}, got shape {tuple(x.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias: expected shape [{N}], got {tuple(getattr(bias, 'shape', ()))}")
    if isinstance(adapters, (torch.Tensor, str)) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError("adapters: expected a non-empty list of (lora_A [r, K], lora_B [N, r], scaling)")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, (tuple, list)) or len(ad) != 3:
            raise TypeError(f"adapters[{i}]: expected a tuple (lora_A, lora_B, scaling), got {type(ad).__name__}")
        A, B, s = ad
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.is_floating_point()
                and B.is_floating_point()) or A.dim() != 2 or A.shape[0] < 1 or A.shape[1] != K \
                or tuple(B.shape) != (N, A.shape[0]):
            raise ValueError(f"adapters[{i}]: expected float lora_A [r, {K}] and lora_B [{N}, r], got "
                             f"{tuple(getattr(A, 'shape', ()))} and {tuple(getattr(B, 'shape', ()))}")
        if A.device != x.device or B.device != x.device:
            raise ValueError(f"adapters[{i}]: on {A.device} / {B.device}, but x is on {x.device}")
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"adapters[{i}]: scaling must be a real number, got {type(s).__name__}")
    M = x.numel() // K if K else 0
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in (torch.int64, torch.int32) \
            or tuple(adapter_index.shape) != (M,):
        raise TypeError(f"adapter_index: expected an int64 / int32 tensor [{M}] (one entry per row of x), got "
                        f"{getattr(adapter_index, 'dtype', type(adapter_index).__name__)} "
                        f"{tuple(getattr(adapter_index, 'shape', ()))}")
    if not M or adapter_index.is_meta:
        return
    if torch.compiler.is_compiling():  # traced: the same check as a device-side assert (no host read)
        torch._assert_async((adapter_index.min() >= -1) & (adapter_index.max() < len(adapters)),
                            f"adapter_index: values must lie in [-1, {len(adapters)}) (-1 = no adapter)")
        return
    n = len(adapters)
    key = (tensor_version(adapter_index), n)
    if _CHECKED.get(adapter_index) == key:  # a device tensor is read once per version: a CUDA graph replays it
        return
    lo, hi = int(adapter_index.min()), int(adapter_index.max())  # a host read (a sync on CUDA)
    if lo < -1 or hi >= n:
        raise ValueError(f"adapter_index: values must lie in [-1, {n}) (-1 = no adapter), got [{lo}, {hi}]")
    _CHECKED[adapter_index] = key


def mixed_lora_linear(x, weight, adapters, adapter_index, bias=None, *, backend=None):
    """``x [..., K]``, ``weight`` dense ``[N, K]`` or ``NF4Weight``, ``adapters`` a list of ``(lora_A [r_i, K],
    lora_B [N, r_i], scaling_i)``, ``adapter_index [M]`` (rows of x flattened; -1 = no adapter; peft's per-sample
    names give it through ``python_ref.rows_of``), ``bias [N]`` -> ``[..., N]`` in x's dtype. ``backend``: as in
    :func:`~lowrank_kernels.functional.lora_linear`."""
    _check(x, weight, adapters, adapter_index, bias)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    index = adapter_index.to(x.device, non_blocking=True)
    # the base product through the LoRA functional's paths (the decode kernels at small M), with an all-zero rank-1
    # adapter: its term is exactly 0
    zero_A, zero_B = _zero_adapter(x.device, x.dtype, N, K)
    base = qlora_linear if isinstance(weight, NF4Weight) else lora_linear
    y = base(x2, weight, zero_A, zero_B, 0.0, bias, backend=backend)
    tracked = [x2] + [t for A, B, _ in adapters for t in (A, B)]
    path = policy.mixed_path(x2, backend, torch.is_grad_enabled() and any(t.requires_grad for t in tracked))
    if path == "torch":
        # torch products per adapter over all rows, kept where the row is that adapter's (no data-dependent shapes);
        # eagerly only for the adapters some row uses, so an unused one gets no gradient (as under peft), where a
        # traced call gives it zeros
        used = range(len(adapters)) if torch.compiler.is_compiling() else sorted(set(index.tolist()) - {-1})
        for i in used:
            A, B, s = adapters[i]
            rows = (index == i).unsqueeze(1)
            term = F.linear(F.linear(x2, A.to(x.dtype)), B.to(x.dtype)) * float(s)
            y = torch.where(rows, y + term.to(x.dtype), y)
    else:
        from lowrank_kernels import ops
        from lowrank_kernels.kernels.lora_gather import stack_adapters

        # stacked in x's dtype, to which the kernels round the adapters anyway (peft's fp32 adapters: half the bytes
        # every decode step reads)
        stack = stack_adapters([(A, B, float(s)) for A, B, s in adapters], x.dtype) \
            if torch.compiler.is_compiling() else _stacked(adapters, stack_adapters, x.dtype)
        y = (ops.lora_gather if path == "gather" else ops.lora_segments)(x2, y, index, *stack)
    return y.reshape(*x.shape[:-1], N)
