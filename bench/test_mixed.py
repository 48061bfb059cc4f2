"""Mixed-adapter batch over one NF4 layer (bf16 activations, fp32 adapters as peft keeps them): 8 adapters of ranks
8, 16, 24, 32, 40, 48, 56, 64, each row of the M-row batch through one of them, round-robin. Forward only (serving).
M = 16, 64: decode (the gather kernels); 2048: prefill (the segment kernels).
  lowrank_kernels  ``mixed_lora_linear`` (the base product once, every row's LoRA term in one shrink and one expand)
  peft+bnb         peft's ``_mixed_batch_forward`` as it runs: ``bnb.matmul_4bit``, then per adapter a gather of its
                   rows, x cast to fp32, ``lora_B(lora_A(x))``, a scatter-add (CUDA only)
  single           ``qlora_linear`` with one adapter of rank 16 on every row: the target (mixed within 1.2× of it)
CUDA: timed as CUDA-graph replays (peft+bnb eagerly: its loop reads the row sets on the host).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import HAS_CUDA
from bench.layer import DEVICE, DTYPE, layers
from lowrank_kernels import qlora_linear
from lowrank_kernels.mixed import mixed_lora_linear

TOKENS = [16, 64, 2048] if HAS_CUDA else [8, 80]  # M (decode: gather kernels; 2048: segments); --bench-m overrides
RANKS = [8, 16, 24, 32, 40, 48, 56, 64]


def step(provider, layer, M):
    N, K = layer.dense.shape
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
    gen = torch.Generator(device="cpu").manual_seed(0)
    adapters = [(torch.randn(r, K, generator=gen).to(DEVICE) * 0.02, torch.randn(N, r, generator=gen).to(DEVICE) * 0.02,
                 2.0) for r in RANKS]
    index = (torch.arange(M) % len(RANKS)).to(DEVICE)
    if provider == "lowrank_kernels":
        return lambda: mixed_lora_linear(x, layer.nf4, adapters, index)
    if provider == "single":
        return lambda: qlora_linear(x, layer.nf4, layer.A, layer.B, layer.scaling)
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    packed, state = layer.nf4.to_bnb()
    rows = [torch.nonzero(index == i).squeeze(1) for i in range(len(RANKS))]

    def peft_loop():  # LoraLayer._mixed_batch_forward with bnb's base product
        result = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        for (A, B, s), r in zip(adapters, rows):
            sub = x[r].to(A.dtype)
            result[r] += (F.linear(F.linear(sub, A), B) * s).to(result.dtype)
        return result

    return peft_loop


@pytest.mark.parametrize("provider", ["lowrank_kernels", "peft+bnb", "single"])
def test_mixed_batch(run, shape, M, provider):
    if provider == "peft+bnb" and not HAS_CUDA:
        pytest.skip("bitsandbytes' matmul_4bit is benchmarked on CUDA only")
    fns = [step(provider, layer, M) for layer in layers(shape, M)]
    cycle = itertools.cycle(fns)
    with torch.no_grad():
        for fn in fns:  # each layer's first call reads its adapter index on the host (once): not under capture
            fn()
        run(lambda: next(cycle)(), provider, eager=provider == "peft+bnb", group=f"mixed_8_adapters M={M}",
            shape=list(shape), dtype=str(DTYPE), M=M, adapters=len(RANKS))
