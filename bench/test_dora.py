"""DoRA / QDoRA layer: forward, and forward + backward, of one layer over an NF4 base (bf16 activations, fp32 adapters
and magnitude, as peft keeps them), r = 16, no dropout (fwd+bwd also with lora_dropout 0.05, as DoRA recipes
train: peft then computes the base product twice, and so do we). Timed eagerly: the forward, then for fwd+bwd
``torch.autograd.grad(y, inputs, dy)`` on its fresh graph; inputs x, A, B, magnitude (LoRA: x, A, B). fwd+bwd
recomputes our weight norm every call, as a training step does (the optimizer changes the adapters: ``lora_A``'s
version is bumped before each call); the forward reuses it while the adapters are unchanged, as evaluation and
decode do (peft recomputes it on every call).
  lowrank_kernels  ``lowrank_kernels.dora_linear`` (what a converted peft DoRA layer runs)
  peft+bnb         peft's own ``lora.bnb.Linear4bit`` with ``use_dora=True`` over a ``bnb.nn.Linear4bit`` holding the
                   same NF4 weight: ``matmul_4bit``, then the DoRA term (the row norm of ``W + s·B·A`` from the
                   dequantized weight every call) (CUDA only)
  lora             ``qlora_linear``, the plain QLoRA layer: what DoRA should cost
FLOPs counted as the LoRA layer's: 2·M·N·K (+ 4·M·N·K backward) + the adapters' 2·M·r·(K + N) (x3).
"""
import itertools

import pytest
import torch
from torch.autograd.graph import increment_version

from bench.conftest import HAS_CUDA
from bench.layer import DEVICE, DTYPE, RANK, layers
from lowrank_kernels import dora_linear, qlora_linear

TOKENS = [4096, 8192] if HAS_CUDA else [16]  # M; --bench-m overrides


def peft_dora_layer(layer, dropout=0.0):
    """peft's QDoRA layer over ``layer``'s weight (quantized by bitsandbytes to the same NF4 bits), adapters set to
    ``layer``'s A, B, magnitude initialized by peft (the row norms)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    pytest.importorskip("peft", reason="peft is not installed")
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    N, K = layer.dense.shape
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, quant_type="nf4", compress_statistics=True,
                             device="meta")
    base.weight = bnb.nn.Params4bit(layer.dense.cpu(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True, module=base)
    base = base.to(DEVICE)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, use_dora=True)
    peft_layer = PeftLinear4bit(base, "default", config, r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout,
                                use_dora=True)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.A)
        peft_layer.lora_B["default"].weight.copy_(layer.B)
    return peft_layer


def step(provider, layer, M, mode, dropout=0.0):
    """``fn()``: the forward (and backward) of ``provider`` on ``layer`` (bench.layer.Layer)."""
    N, K = layer.dense.shape
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    A, B = (t.detach().clone().requires_grad_() for t in (layer.A, layer.B))
    if provider == "peft+bnb":
        peft_layer = peft_dora_layer(layer, dropout)
        peft_layer.train()
        inputs = (x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                  peft_layer.lora_magnitude_vector["default"].weight)
        forward = lambda: peft_layer(x)  # noqa: E731
    elif provider == "lowrank_kernels":
        m = layer.dense.float().norm(dim=1).requires_grad_()
        inputs = (x, A, B, m)
        forward = lambda: dora_linear(x, layer.nf4, A, B, m, layer.scaling, dropout=dropout)  # noqa: E731
        if mode == "fwd+bwd":
            forward = lambda f=forward: (increment_version(A), f())[1]  # noqa: E731  (a new norm per step)
    else:
        inputs = (x, A, B)
        forward = lambda: qlora_linear(x, layer.nf4, A, B, layer.scaling, dropout=dropout)  # noqa: E731
    if mode == "forward":
        def fn():
            with torch.no_grad():
                return forward()
        return fn
    return lambda: torch.autograd.grad(forward(), inputs, dy)


@pytest.mark.parametrize("provider", ["lowrank_kernels", "peft+bnb", "lora"])
@pytest.mark.parametrize("mode,dropout", [("forward", 0.0), ("fwd+bwd", 0.0), ("fwd+bwd", 0.05)],
                         ids=["forward", "fwd+bwd", "fwd+bwd-dropout"])
def test_dora_layer(run, shape, M, mode, dropout, provider):
    if provider == "peft+bnb" and not HAS_CUDA:
        pytest.skip("bitsandbytes' matmul_4bit is benchmarked on CUDA only")
    fns = [step(provider, layer, M, mode, dropout) for layer in layers(shape, M)]
    cycle = itertools.cycle(fns)
    in_f, out_f = shape
    flops = 2 * M * out_f * in_f + 2 * M * RANK * (in_f + out_f)
    run(lambda: next(cycle)(), "qlora" if provider == "lora" else provider, eager=True,
        group=f"dora_{mode}{' dropout' if dropout else ''} M={M}", mode=mode, shape=list(shape), dtype=str(DTYPE),
        M=M, dropout=dropout,
        flops=flops * (3 if mode == "fwd+bwd" else 1))
