"""QLoRA linear forward, r=16, bf16: ours vs what users run today.

providers: lowrank_kernels (the default dispatch), lowrank_kernels[inference] (the same on the weight's inference form,
``NF4Weight.with_flat_scales``: what ``prepare_for_inference`` makes layers read), lowrank_kernels[fused] (the fused
NF4 GEMM + LoRA), peft+bnb
(``bnb.matmul_4bit`` + the LoRA branch as peft runs it), unfused (our bit-exact dequant + cuBLAS + addmm for the
LoRA term), dense (bf16 ``x @ W.t()``, no LoRA, no quantization: the floor). FLOPs = 2·M·N·K + 2·M·r·(K + N).
"""
import itertools

import pytest
import torch

from bench.conftest import HAS_CUDA
from bench.layer import DEVICE, DTYPE, RANK, layers, peft_lora
from lowrank_kernels import qlora_linear

TOKENS = [1, 4, 16, 64, 256, 4096, 8192] if HAS_CUDA else [1, 64]  # M; --bench-m overrides
PROVIDERS = ["lowrank_kernels", "lowrank_kernels[inference]", "lowrank_kernels[fused]", "peft+bnb", "unfused", "dense"]


def provider_fn(provider, layer, x):
    if provider == "lowrank_kernels":  # the default dispatch
        return lambda: qlora_linear(x, layer.nf4, layer.A, layer.B, layer.scaling)
    if provider == "lowrank_kernels[inference]":  # double quantization undone once (prepare_for_inference)
        flat = layer.nf4.with_flat_scales()
        return lambda: qlora_linear(x, flat, layer.A, layer.B, layer.scaling)
    if provider == "lowrank_kernels[fused]":  # the fused Triton GEMM, forced
        return lambda: qlora_linear(x, layer.nf4, layer.A, layer.B, layer.scaling, backend="triton")
    if provider == "dense":
        return lambda: x @ layer.dense.t()
    if provider == "unfused":  # the adapters cast to bf16, dequantize, cuBLAS, then the LoRA term by addmm
        def unfused():
            y = x @ layer.nf4.dequantize(x.dtype).t()
            return torch.addmm(y, x @ layer.A.to(x.dtype).t(), layer.B.to(x.dtype).t(), alpha=layer.scaling)
        return unfused
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    packed, state = layer.nf4.to_bnb()

    def peft_bnb():  # peft's Linear4bit forward: base result + lora_B(lora_A(dropout(x))) * scaling, as x.dtype
        result = bnb.matmul_4bit(x, packed.t(), bias=None, quant_state=state)
        return (result + peft_lora(x, layer.A, layer.B, layer.scaling)).to(x.dtype)
    return peft_bnb


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward"])
def test_qlora_forward(run, shape, M, mode, provider):
    if provider == "peft+bnb" and not HAS_CUDA:
        pytest.skip("bitsandbytes' matmul_4bit is benchmarked on CUDA only")
    if provider == "lowrank_kernels[fused]" and not HAS_CUDA and M > 1:
        pytest.skip("the Triton interpreter is too slow for this on CPU")
    in_f, out_f = shape
    fns = []
    for layer in layers(shape, M):
        x = torch.randn(M, in_f, device=DEVICE, dtype=DTYPE)
        fns.append(provider_fn(provider, layer, x))
    cycle = itertools.cycle(fns)
    flops = 2 * M * out_f * in_f + 2 * M * RANK * (in_f + out_f)
    run(lambda: next(cycle)(), provider, shape=list(shape), dtype=str(DTYPE), M=M, flops=flops, mode=mode,
        group=f"qlora_{mode} M={M}")
