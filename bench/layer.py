"""The QLoRA layer the layer benchmarks run: an NF4 base weight, its bf16 original (for dense), LoRA A and B, r=16."""
import torch

from bench.conftest import HAS_CUDA
from lowrank_kernels import NF4Weight

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
RANK = 16
L2_FLUSH_BYTES = 256 << 20


class Layer:
    """``dense [N, K]``, ``nf4`` (its NF4 form), ``A [r, K]``, ``B [N, r]``, ``scaling``; no tensor requires grad.

    The adapters are fp32, as peft keeps them by default (``autocast_adapter_dtype=True``) under bf16 activations.
    """

    def __init__(self, shape):
        in_f, out_f = shape
        weight = torch.randn(out_f, in_f, device=DEVICE, dtype=DTYPE) * 0.02
        self.dense = weight
        self.nf4 = NF4Weight.quantize(weight)
        self.A = torch.randn(RANK, in_f, device=DEVICE) * 0.02
        self.B = torch.randn(out_f, RANK, device=DEVICE) * 0.02
        self.scaling = 2.0


def peft_lora(x, A, B, scaling):
    """peft's LoRA branch with fp32 adapters: ``x`` cast to the adapters' dtype, ``B(A(x)) * scaling``."""
    x = x.to(A.dtype)
    return (x @ A.t()) @ B.t() * scaling


def layers(shape, M):
    """Enough independent layers to overflow L2 at small M (weights dominate), one at large M."""
    in_f, out_f = shape
    copies = max(1, min(8, L2_FLUSH_BYTES // (in_f * out_f // 2))) if HAS_CUDA and M <= 256 else 1
    return [Layer(shape) for _ in range(copies)]
