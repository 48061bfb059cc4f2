"""QLoRA linear backward and forward + backward, r=16, bf16: ours vs what users train with today.

modes (the math: shared DESIGN.md §4, python_ref/lora.py):
  backward  the forward runs once, untimed; timed is ``torch.autograd.grad(y, inputs, dy, retain_graph=True)``
            on that saved graph: dX, dA, dB from dY (dense: dX only)
  fwd+bwd   timed is the forward, then the same backward on its fresh graph
  fwd+bwd-graph  the same step captured in a CUDA graph and replayed (CUDA only; skipped for a provider whose
            step cannot be captured): device time without Python / launch overhead
``backward`` and ``fwd+bwd`` are timed eagerly on CUDA (each span between CUDA events includes the GPU waiting
for the host), so where the host takes longer than the GPU to issue a step, they measure the host.

providers: lowrank_kernels (``qlora_linear`` under autograd), peft+bnb (``bnb.matmul_4bit`` + the LoRA branch,
torch autograd, as peft trains), unfused (our dequant + cuBLAS, dequantizing again in a hand-written
backward: the best unfused), dense (bf16 ``x @ W.t()``, no LoRA, no quantization: the floor), python_ref
(the reference formulas with its torch dequant, CPU only).
FLOPs (of the QLoRA layer, recorded for dense too): backward 2·M·N·K + 4·M·r·(K + N), fwd+bwd 4·M·N·K + 6·M·r·(K + N).
Memory (fwd+bwd, CUDA): ``peak_extra_bytes`` = peak allocated during one step minus what was allocated before it
(inputs, weights); ``weight_bytes`` = the base weight in the provider's format (NF4 packed + scales, or bf16).
"""
import itertools

import pytest
import torch

import python_ref
from bench.conftest import HAS_CUDA, cuda_graph_of, peak_memory
from bench.layer import DEVICE, DTYPE, RANK, layers, peft_lora
from lowrank_kernels import qlora_linear

TOKENS = [256, 4096, 8192] if HAS_CUDA else [16, 64]  # M; --bench-m overrides
PROVIDERS = ["lowrank_kernels", "peft+bnb", "unfused", "dense", "python_ref"]


class UnfusedQLoRA(torch.autograd.Function):
    """``y = x @ deq(W).t() + s * (x @ A.t()) @ B.t()``; saves x and S, never deq(W): dequantizes again backward."""

    @staticmethod
    def forward(ctx, x, nf4, A, B, scaling):
        S = x @ A.t()
        y = x @ nf4.dequantize(x.dtype).t()
        y.addmm_(S, B.t(), alpha=scaling)
        ctx.save_for_backward(x, A, B, S)
        ctx.nf4, ctx.scaling = nf4, scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, S = ctx.saved_tensors
        dS = (dy @ B).mul_(ctx.scaling)
        dx = (dy @ ctx.nf4.dequantize(dy.dtype)).addmm_(dS, A)
        dA = dS.t() @ x
        dB = (dy.t() @ S).mul_(ctx.scaling)
        return dx, None, dA, dB, None


class Step:
    """One provider's layer call on one input: ``forward()`` -> output, ``backward(out, retain)`` -> grads."""

    def __init__(self, provider, layer, M):
        self.x = torch.randn(M, layer.dense.shape[1], device=DEVICE, dtype=DTYPE)
        self.dy = torch.randn(M, layer.dense.shape[0], device=DEVICE, dtype=DTYPE)
        self.weight_bytes = layer.nf4.nbytes()
        autograd = provider != "python_ref"
        x, s = self.x.requires_grad_(autograd), layer.scaling
        A, B = (t.detach().requires_grad_(autograd) for t in (layer.A, layer.B))
        self.inputs = (x, A, B)
        if provider == "lowrank_kernels":
            self.forward = lambda: qlora_linear(x, layer.nf4, A, B, s)
        elif provider == "unfused":  # adapters cast to bf16 (autograd casts the gradients back)
            self.forward = lambda: UnfusedQLoRA.apply(x, layer.nf4, A.to(x.dtype), B.to(x.dtype), s)
        elif provider == "dense":
            self.forward, self.inputs = (lambda: x @ layer.dense.t()), (x,)
            self.weight_bytes = layer.dense.numel() * layer.dense.element_size()
        elif provider == "peft+bnb":
            bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
            packed, state = layer.nf4.to_bnb()
            # peft's Linear4bit forward: base result + lora_B(lora_A(dropout(x))) * scaling, back to x.dtype
            self.forward = lambda: (bnb.matmul_4bit(x, packed.t(), bias=None, quant_state=state)
                                    + peft_lora(x, A, B, s)).to(x.dtype)
        else:  # python_ref: the explicit formulas, no autograd; replaces the backward method below
            deq = lambda: layer.nf4.dequantize(x.dtype, backend="torch")  # noqa: E731
            self.forward = lambda: python_ref.lora_forward(x, deq(), A, B, s)
            self.backward = lambda out, retain=False: python_ref.lora_backward(self.dy, x, deq(), A, B, s, out[1])

    def backward(self, out, retain=False):
        return torch.autograd.grad(out, self.inputs, self.dy, retain_graph=retain)


def training_flops(mode, M, shape):
    in_f, out_f = shape
    gemm, lora = 2 * M * out_f * in_f, 2 * M * RANK * (in_f + out_f)
    return gemm + 2 * lora if mode == "backward" else 2 * gemm + 3 * lora


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["backward", "fwd+bwd", "fwd+bwd-graph"])
def test_qlora_training(run, shape, M, mode, provider):
    if mode == "fwd+bwd-graph" and not HAS_CUDA:
        pytest.skip("CUDA-graph timing needs a GPU")
    if provider == "peft+bnb" and not HAS_CUDA:
        pytest.skip("bitsandbytes' matmul_4bit is benchmarked on CUDA only")
    if provider == "python_ref" and HAS_CUDA:
        pytest.skip("python_ref runs in the CPU smoke only (on CUDA, unfused is the same math on our kernels)")
    steps = [Step(provider, layer, M) for layer in layers(shape, M)]
    if provider == "lowrank_kernels" and steps[0].forward().grad_fn is None:
        pytest.skip("qlora_linear is not differentiable in this version (its output has no grad_fn)")
    info = dict(shape=list(shape), dtype=str(DTYPE), M=M, mode=mode, flops=training_flops(mode, M, shape),
                group=f"qlora_{mode} M={M}")
    if mode == "backward":
        saved = itertools.cycle([(step, step.forward()) for step in steps])

        def fn():
            step, out = next(saved)
            return step.backward(out, retain=True)
    else:
        cycle = itertools.cycle(steps)

        def fn():
            step = next(cycle)
            return step.backward(step.forward())

        if mode == "fwd+bwd":
            peak, baseline = peak_memory(lambda: steps[0].backward(steps[0].forward()))
            info.update(peak_extra_bytes=peak and peak - baseline, weight_bytes=steps[0].weight_bytes)
        else:
            try:
                cuda_graph_of(fn, calls=1)
            except Exception as e:  # e.g. a host sync inside the provider's step
                torch.cuda.synchronize()
                pytest.skip(f"{provider}: the forward + backward step cannot be captured ({type(e).__name__}: {e})")
    run(fn, provider, eager=mode != "fwd+bwd-graph", **info)
