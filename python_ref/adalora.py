"""AdaLoRA (SVD-form LoRA) linear layer: the forward formula, as peft's ``SVDLinear`` computes it.

Shapes: ``x [..., K]``, ``W [N, K]``, ``A [r, K]``, ``E [r, 1]``, ``B [N, r]``, ``bias [N]``, ``mask`` bool ``[r]``
(True = rank kept; ``None`` = all ranks).

    y = x @ W.T + ((x @ (A * E * mask).T) @ B.T) * scaling / (ranknum + 1e-5) + bias

All arithmetic happens in the inputs' dtype (pass fp64 tensors to get the oracle); differentiate it with autograd.
"""
from python_ref.lora import lora_forward


def adalora_forward(x, W, A, E, B, scaling: float, ranknum: float, bias=None, mask=None):
    """Returns ``y [..., N]``; ``ranknum`` a float or a one-element tensor (peft's ``ranknum`` Parameter)."""
    AE = A * E if mask is None else A * (E * mask.reshape(-1, 1).to(E.dtype))
    return lora_forward(x, W, AE, B, scaling / (float(ranknum) + 1e-5), bias)[0]
