"""Mixed-adapter LoRA batches: every row of a batch uses its own adapter (or none), as peft computes them when a
model is called with ``adapter_names=[...]`` (peft 0.21.2: ``tuners/lora/layer.py`` ``LoraLayer._mixed_batch_forward``,
called by ``Linear.forward`` when ``adapter_names`` is given). The oracle for a fused multi-adapter serving kernel.

Shapes: ``x [M, K]`` (leading dims are flattened: ``M`` rows = tokens), base weight ``W [N, K]``, ``bias [N]`` or
None, ``adapters`` a list of ``(A_i [r_i, K], B_i [N, r_i], s_i)`` whose ranks ``r_i`` may differ, and
``adapter_index [M]`` (int64 or int32) naming each row's adapter: ``i`` in ``[0, len(adapters))``, or ``-1`` for no
adapter (peft's ``"__base__"``: base output only).

    y[m] = x[m] @ W.T + bias + s_a * (x[m] @ A_a.T) @ B_a.T      a = adapter_index[m]  (no LoRA term when a = -1)

How peft gets there:

* ``PeftModel.forward(..., adapter_names=names)`` enters ``LoraModel._enable_peft_forward_hooks``, which refuses
  training mode (so no dropout is ever applied: ``lora_dropout`` modules are identities in eval mode), raises on a
  name that no LoRA layer of the model has (``"__base__"`` excepted), and registers a forward pre-hook on every
  ``LoraLayer`` that injects ``adapter_names`` into its kwargs (repeated ``num_beams`` times per name for beam
  search; the original list for an encoder).
* ``LoraLayer._check_forward_args`` requires ``len(x) == len(adapter_names)``: names index **dim 0** of the layer's
  input. For ``x [batch, seq, K]`` that is one name per sample, applying to all ``seq`` tokens of the sample; after
  flattening to rows ``m = b * seq + t`` the row index is the sample's name repeated ``seq`` times (``rows_of``).
  Merged adapters and DoRA adapters are refused.
* ``_mixed_batch_forward``: ``result = base_layer(x)`` (``x @ W.T + bias`` in x's dtype, which must be W's); then for
  each distinct name (rows are disjoint, so the order does not matter), skipping ``"__base__"`` and names this
  layer has no adapter for: ``sub = x[rows].to(A.dtype)`` (x cast to the adapter's dtype: peft keeps a bf16 model's
  adapters in fp32), ``out = lora_B(lora_A(sub)) * scaling`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with
  rslora; set per adapter in ``update_layer``), and ``result[rows] += out.to(result.dtype)`` (back to x's dtype,
  then added: two roundings in low precision, both reproduced here).

This function does the same ops in the same order on the same row sets (a gather of each adapter's rows, in
ascending order, two ``F.linear``, the scaling, the cast, a scatter-add), so it agrees with peft bitwise on CPU, bf16
included. Pass fp64 tensors to get the oracle; it is differentiable by autograd (peft's path is too, in eval mode).
A layer that lacks one of the model's adapters (peft then gives base output for its rows): map that name to -1.

``segments``: the serving form, rows grouped by adapter: ``(start, end, adapter)`` with ``0 <= start <= end <= M``,
non-overlapping, rows outside every segment get no adapter. ``segments_of(adapter_index)`` gives the maximal runs.
"""
import math
import numbers

import torch
import torch.nn.functional as F

BASE = "__base__"  # peft's name for "no adapter"
NO_ADAPTER = -1  # its adapter_index


def rows_of(adapter_names, names, seq_len: int = 1, device=None) -> torch.Tensor:
    """peft's per-sample ``adapter_names`` as the per-row ``adapter_index [len(adapter_names) * seq_len]`` (int64).

    ``names``: the adapter names in the order of ``adapters`` (name ``names[i]`` -> index ``i``); ``"__base__"``
    -> -1. ``seq_len``: rows per sample, i.e. ``x [batch, seq_len, K]`` flattened to ``[batch * seq_len, K]``
    (peft's names index the batch dimension). A name not in ``names`` raises (as peft does for a name no layer has).
    """
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names must be a list of str (one per sample), got the str {adapter_names!r}")
    names = list(names)
    if BASE in names:
        raise ValueError(f"names must not contain {BASE!r} (it means no adapter, index -1)")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    if not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    lookup = {name: i for i, name in enumerate(names)}
    lookup[BASE] = NO_ADAPTER
    unknown = sorted({str(n) for n in adapter_names if n not in lookup})
    if unknown:
        raise ValueError(f"adapter_names has name(s) not in names {names}: {', '.join(unknown)}")
    per_sample = torch.tensor([lookup[n] for n in adapter_names], dtype=torch.int64, device=device)
    return per_sample.repeat_interleave(seq_len)


def _check_inputs(x, W, adapters, adapter_index, bias):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor [..., K], got {type(x).__name__}"
                        + (f" {x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else ""))
    K = x.shape[-1]
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.shape[1] != K:
        raise ValueError(f"W must be [N, K={K}], got {tuple(W.shape) if isinstance(W, torch.Tensor) else W!r}")
    if W.dtype != x.dtype:
        raise TypeError(f"W dtype {W.dtype} must equal x dtype {x.dtype} (peft's base layer runs in x's dtype)")
    N = W.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be None or [N={N}], got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias!r}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    if isinstance(adapters, (torch.Tensor, str)) or not hasattr(adapters, "__len__"):
        raise TypeError(f"adapters must be a list of (lora_A, lora_B, scaling), got {type(adapters).__name__}")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, (tuple, list)) or len(ad) != 3:
            raise TypeError(f"adapters[{i}] must be a tuple (lora_A, lora_B, scaling), got {type(ad).__name__}")
        A, B, s = ad
        if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] < 1 or A.shape[1] != K:
            raise ValueError(f"adapters[{i}] lora_A must be [r, K={K}] with r >= 1, got "
                             f"{tuple(A.shape) if isinstance(A, torch.Tensor) else A!r}")
        r = A.shape[0]
        if not isinstance(B, torch.Tensor) or tuple(B.shape) != (N, r):
            raise ValueError(f"adapters[{i}] lora_B must be [N={N}, r={r}] (N from W, r from lora_A), got "
                             f"{tuple(B.shape) if isinstance(B, torch.Tensor) else B!r}")
        if not A.is_floating_point() or B.dtype != A.dtype:
            raise TypeError(f"adapters[{i}] lora_A / lora_B must share one floating dtype, got {A.dtype} / {B.dtype}")
        if not isinstance(s, numbers.Real) or isinstance(s, bool):
            raise TypeError(f"adapters[{i}] scaling must be a real number, got {type(s).__name__}")
    M = math.prod(x.shape[:-1])
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be an int64/int32 tensor [M={M}], got {type(adapter_index).__name__}")
    if adapter_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"adapter_index must be int64 or int32, got {adapter_index.dtype}")
    if adapter_index.dim() != 1 or adapter_index.shape[0] != M:
        raise ValueError(f"adapter_index must be [M={M}] (one entry per row of x flattened to [M, K]; see rows_of), "
                         f"got {tuple(adapter_index.shape)}")
    if M:
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        if lo < NO_ADAPTER or hi >= len(adapters):
            raise IndexError(f"adapter_index values must be in [-1, {len(adapters)}) (-1 = no adapter, "
                             f"{len(adapters)} adapters), got values in [{lo}, {hi}]")


def mixed_lora_forward(x, W, adapters, adapter_index, bias=None) -> torch.Tensor:
    """Returns ``y [..., N]`` in x's dtype: row ``m`` gets the LoRA term of ``adapters[adapter_index[m]]``."""
    _check_inputs(x, W, adapters, adapter_index, bias)
    x2 = x.reshape(-1, x.shape[-1])
    result = F.linear(x2, W, bias)  # peft's base_layer(x), in x's dtype
    for i, (A, B, s) in enumerate(adapters):
        rows = torch.nonzero(adapter_index == i).squeeze(1).to(x2.device)  # ascending, as peft's index list
        if rows.numel() == 0:
            continue
        sub = x2[rows].to(A.dtype)  # peft: x[sub_batch].to(lora_A.weight.dtype)
        out = F.linear(F.linear(sub, A), B) * s  # lora_B(lora_A(dropout(sub))) * scaling; eval: no dropout
        result = result.index_put((rows,), result[rows] + out.to(result.dtype))  # result[rows] += out.to(...)
    return result.reshape(*x.shape[:-1], W.shape[0])


def segments_of(adapter_index) -> list:
    """The maximal runs of ``adapter_index [M]`` with an adapter: ``[(start, end, adapter), ...]`` (end exclusive),
    rows with -1 left out. ``mixed_lora_forward_segments`` with them equals ``mixed_lora_forward``."""
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dim() != 1 \
            or adapter_index.dtype not in (torch.int64, torch.int32):
        raise TypeError("adapter_index must be a 1-D int64/int32 tensor")
    idx = adapter_index.tolist()
    segments, start = [], 0
    for m in range(1, len(idx) + 1):
        if m == len(idx) or idx[m] != idx[start]:
            if idx[start] != NO_ADAPTER:
                segments.append((start, m, idx[start]))
            start = m
    return segments


def mixed_lora_forward_segments(x, W, adapters, segments, bias=None) -> torch.Tensor:
    """``mixed_lora_forward`` with rows grouped by adapter: ``segments`` = ``[(start, end, adapter), ...]`` over the
    rows of x flattened to ``[M, K]``, non-overlapping, ``0 <= start <= end <= M``; uncovered rows: no adapter."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a tensor [..., K], got {type(x).__name__}")
    M = math.prod(x.shape[:-1])
    index = torch.full((M,), NO_ADAPTER, dtype=torch.int64)
    covered = torch.zeros(M, dtype=torch.bool)
    for j, seg in enumerate(segments):
        if not isinstance(seg, (tuple, list)) or len(seg) != 3 \
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in seg):
            raise TypeError(f"segments[{j}] must be a tuple of 3 ints (start, end, adapter), got {seg!r}")
        start, end, a = seg
        if not 0 <= start <= end <= M:
            raise ValueError(f"segments[{j}] = {tuple(seg)} must have 0 <= start <= end <= M={M}")
        if not 0 <= a < len(adapters):
            raise IndexError(f"segments[{j}] adapter {a} out of range [0, {len(adapters)})")
        if covered[start:end].any():
            raise ValueError(f"segments[{j}] = {tuple(seg)} overlaps an earlier segment")
        covered[start:end] = True
        index[start:end] = a
    return mixed_lora_forward(x, W, adapters, index.to(x.device), bias)
