"""DoRA (weight-decomposed LoRA) linear layer: the forward formula, as peft's ``DoraLinearLayer`` computes it
(peft 0.21.2: ``tuners/lora/dora.py`` ``DoraLinearLayer.get_weight_norm`` / ``forward``, called by
``tuners/lora/variants.py`` ``DoraLinearVariant.forward``).

Shapes: ``x [..., K]``, ``W [N, K]``, ``A [r, K]``, ``B [N, r]``, magnitude ``m [N]``, ``bias [N]``, scaling ``s``.
Dropout: ``Xd = x * dropout_mask`` (mask of x's shape holding 0 or ``1 / (1 - p)``; ``None`` = no dropout, which is
also what peft does in eval mode or with ``lora_dropout=0``).

    norm = ||W + s * B @ A||_2 of each output row (over K)     [N]   recomputed every call, DETACHED (a constant)
    c    = m / norm                                           [N]
    y    = (x @ W.T + bias) + [(c - 1) * (Xd @ W.T) + c * s * (Xd @ A.T) @ B.T]

Without dropout (``Xd = x``) this is ``y = c * (x @ (W + s * B @ A).T) + bias``: the bias is not rescaled (peft
takes ``x @ W.T`` as its base output less the bias, and so do we). With dropout, peft keeps the base output of the
undropped ``x`` and computes the base product a second time, on ``Xd``, for the ``(c - 1)`` term. peft initializes
``m`` to the row norms of ``W + s * B @ A`` with ``B = 0``, i.e. ``||W row||``: at init the layer is the base layer.

Dtypes, as peft: the base output ``x @ W.T + bias`` is in x's dtype; the DoRA term (in brackets) is computed with x
and W cast to the adapter dtype (``A``'s; peft keeps bf16/fp16 models' adapters in fp32), ``c`` in the promoted
dtype of ``m`` and ``norm``, and the sum is cast back to x's dtype. Same ops in the same order as peft (bf16 results
equal peft's bitwise on CPU). Pass fp64 tensors to get the oracle; differentiate it with autograd (no gradient flows
through ``norm``).

Zero rows: peft divides by ``norm`` without an epsilon, so a row with ``W + s * B @ A = 0`` (e.g. an all-zero row
of ``W`` with ``B``'s row still zero) makes ``c`` inf, or NaN (0/0) when ``m`` was initialized from that zero row,
and its output column NaN. ``eps=None`` reproduces this exactly. A float ``eps > 0`` uses ``c = m / max(norm, eps)``
(as ``torch.nn.functional.normalize``): finite for finite inputs; rows with ``norm >= eps`` are unchanged. An exactly
zero row then has ``c * (Xd @ (W + s * B @ A).T) = 0``, so its output column is ``x @ W.T + bias - Xd @ W.T``
(``bias`` without dropout or when the row of W is zero), its ``m`` gets no gradient and, with ``m = 0`` as peft
initializes it, neither do ``A`` / ``B`` through it (it stays inert); with ``m != 0`` their gradients through that
row carry the factor ``m / eps``.
"""
import torch
import torch.nn.functional as F


def dora_weight_norm(W, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """``||W + scaling * B @ A||_2`` of each output row, ``[N]``, detached from the graph (peft's ``weight_norm``)."""
    with torch.no_grad():
        return torch.linalg.norm(W + scaling * (lora_B @ lora_A), dim=1)


def dora_forward(x, W, lora_A, lora_B, magnitude, scaling: float, bias=None, dropout_mask=None, eps=None):
    """Returns ``y [..., N]`` in x's dtype; ``eps``: None = peft exactly (NaN for a zero row), else ``> 0``."""
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be None or > 0, got {eps}")
    result = F.linear(x, W, bias)  # peft's base_layer(x)
    xa, Wa = x.to(lora_A.dtype), W.to(lora_A.dtype)  # peft casts x to the adapter dtype
    norm = dora_weight_norm(Wa, lora_A, lora_B, scaling)
    c = magnitude / (norm if eps is None else norm.clamp_min(eps))
    if dropout_mask is None:
        xd, base_d = xa, (result if bias is None else result - bias)  # peft reuses the base output, less bias
    else:
        xd = xa * dropout_mask.to(xa.dtype)
        base_d = F.linear(xd, Wa)  # peft's second base GEMM, on the dropped x
    dora = (c - 1) * base_d + c * F.linear(F.linear(xd, lora_A), lora_B) * scaling
    return (result + dora).to(x.dtype)
