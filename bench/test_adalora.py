"""AdaLoRA: the layer's forward + backward with a fraction of its ranks active, and one rank-allocator step.

test_adalora_layer: NF4 base, bf16 activations, fp32 adapters (as peft keeps them), init_r = 16; a random rank
mask leaves ρ = 100 %, 50 %, 25 % of the ranks active. Timed (eagerly) is the forward, then
``torch.autograd.grad(y, inputs, dy)`` on its fresh graph; inputs x, A, E, B (LoRA: x, A, B).
  lowrank_kernels  ``AdaLoraLinear`` with the mask installed by ``set_rank_mask``: only the ρ active ranks run
  peft+bnb         peft's ``SVDLinear4bit`` forward as peft runs it: ``bnb.matmul_4bit``, then x cast to fp32,
                   ``(x @ (A·E)ᵀ @ Bᵀ)`` cast back, ``· scaling / (ranknum + 1e-5)``, over all 16 ranks (the masked
                   E entries zeroed: peft computes every rank whatever the mask), torch autograd (CUDA only)
  lora             ``qlora_linear`` with a plain LoRA of rank ρ, recorded as ``lora_r{ρ}``: the issue's target
                   (AdaLoRA with ρ active ranks within 10 % of it)
FLOPs with r = ρ: 4·M·N·K + 6·M·ρ·(K + N). Memory (CUDA): ``peak_extra_bytes`` as in test_backward.py.

test_rank_allocator: one ``update_and_allocate(step)`` over the 224 adapted linears of Llama-3-8B (32 blocks × q, k,
v, o, gate, up, down; on CPU 2 blocks with every dimension / 64), init_r = 12 (peft's default), target_r = 4, fp32
adapters with the same random values and gradients for both providers (set once, untimed). The layers are the real
ones over a stride-0 zero base weight taking no memory (the allocator never reads base weights). Schedule: tinit 100,
tfinal 200, deltaT 10, total_step 1000.
  mask  the budgeting phase's masking steps, alternating 400 and 410: statistics, triplet scores, the k-th value,
        E masked, rank pattern; the budgets differ, so some ranks change on every call (our layers whose mask
        changes get ``set_rank_mask``, as in training)
  stat  step 405: the statistics update alone
providers: lowrank_kernels (our ``RankAllocator`` over ``AdaLoraLinear`` layers), peft (peft's ``RankAllocator`` over
``SVDLinear`` layers, called as ``AdaLoraModel.update_and_allocate`` calls it). The issue's target: ours ≥ 10× faster.
"""
import itertools

import pytest
import torch
from torch import nn

from bench import shapes
from bench.conftest import HAS_CUDA, peak_memory
from bench.layer import DEVICE, DTYPE, RANK, layers
from lowrank_kernels import AdaLoraLinear, RankAllocator, qlora_linear

TOKENS = [4096, 8192] if HAS_CUDA else [16]  # M; --bench-m overrides
ACTIVE = [100, 50, 25]  # % of the RANK ranks active

BLOCKS, SCALE_DOWN = (32, 1) if HAS_CUDA else (2, 64)
LAYOUT = [(proj, (K // SCALE_DOWN, N // SCALE_DOWN)) for proj, (K, N) in shapes.MODELS["llama3-8b"].items()]
INIT_R, TARGET_R, LORA_ALPHA = 12, 4, 8
SCHEDULE = dict(tinit=100, tfinal=200, deltaT=10, total_step=1000)
STEPS = {"mask": [400, 410], "stat": [405]}


def layer_step(provider, layer, M, active):
    """``fn()``: one forward and backward of ``provider`` on ``layer`` (bench.layer.Layer), ``active`` ranks."""
    N, K = layer.dense.shape
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    mask = torch.zeros(RANK, dtype=torch.bool)
    mask[torch.randperm(RANK)[:active]] = True
    E = torch.randn(RANK, 1, device=DEVICE) * 0.02
    if provider == "lowrank_kernels":
        ada = AdaLoraLinear(layer.nf4, init_r=RANK, lora_alpha=LORA_ALPHA)
        with torch.no_grad():
            for p, value in ((ada.lora_A, layer.A), (ada.lora_E, E), (ada.lora_B, layer.B)):
                p.copy_(value)
        ada.set_rank_mask(mask)
        inputs, forward = (x, ada.lora_A, ada.lora_E, ada.lora_B), lambda: ada(x)
    elif provider == "peft+bnb":
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
        packed, state = layer.nf4.to_bnb()
        A, B = (t.detach().requires_grad_() for t in (layer.A, layer.B))
        E = E.masked_fill(~mask.to(DEVICE).unsqueeze(1), 0.0).requires_grad_()
        ranknum = torch.full((1,), float(RANK), device=DEVICE)  # peft's ranknum Parameter, fp32 [1]

        def forward():  # SVDLinear4bit.forward, no autocast
            result = bnb.matmul_4bit(x, packed.t(), bias=None, quant_state=state).clone()
            output = (x.to(A.dtype) @ (A * E).T @ B.T).to(result.dtype)
            result += output * LORA_ALPHA / (ranknum + 1e-5)
            return result

        inputs = (x, A, E, B)
    else:  # lora: rank `active`
        A = layer.A[:active].clone().requires_grad_()
        B = layer.B[:, :active].clone().requires_grad_()
        inputs, forward = (x, A, B), lambda: qlora_linear(x, layer.nf4, A, B, layer.scaling)
    return lambda: torch.autograd.grad(forward(), inputs, dy)


@pytest.mark.parametrize("provider", ["lowrank_kernels", "peft+bnb", "lora"])
@pytest.mark.parametrize("active_pct", ACTIVE, ids=[f"active{p}" for p in ACTIVE])
@pytest.mark.parametrize("mode", ["fwd+bwd"])
def test_adalora_layer(run, shape, M, mode, active_pct, provider):
    if provider == "peft+bnb" and not HAS_CUDA:
        pytest.skip("bitsandbytes' matmul_4bit is benchmarked on CUDA only")
    active = RANK * active_pct // 100
    fns = [layer_step(provider, layer, M, active) for layer in layers(shape, M)]
    cycle = itertools.cycle(fns)
    in_f, out_f = shape
    peak, baseline = peak_memory(fns[0])
    run(lambda: next(cycle)(), f"lora_r{active}" if provider == "lora" else provider, eager=True,
        group=f"adalora_fwd+bwd M={M} active={active_pct}%", mode=mode, shape=list(shape), dtype=str(DTYPE), M=M,
        flops=4 * M * out_f * in_f + 6 * M * active * (in_f + out_f), peak_extra_bytes=peak and peak - baseline)


def zero_base(K, N):
    """A frozen ``[N, K]`` zero weight of stride 0: a layer's shape without its memory. fp32, since peft gives a
    layer's adapters its base's dtype (a peft model then casts them to fp32)."""
    return nn.Parameter(torch.zeros(1, device=DEVICE).expand(N, K), requires_grad=False)


def adapted_model(make_layer, adapters):
    """``BLOCKS`` blocks of ``make_layer(K, N)`` in ``LAYOUT``; ``adapters(layer)`` -> its (A, E, B) get values and
    gradients from one seed (the same for every provider)."""
    model = nn.ModuleList(nn.ModuleDict({proj: make_layer(K, N) for proj, (K, N) in LAYOUT}) for _ in range(BLOCKS))
    gen = torch.Generator(DEVICE).manual_seed(0)
    with torch.no_grad():
        for block in model:
            for layer in block.values():
                for p in adapters(layer):
                    p.copy_(torch.randn(p.shape, generator=gen, device=DEVICE) * 0.02)
                    p.grad = torch.randn(p.shape, generator=gen, device=DEVICE)
    return model


def allocator_step(provider):
    """``fn(step)``: one ``update_and_allocate`` of ``provider``'s allocator over a fresh adapted model."""
    if provider == "lowrank_kernels":
        model = adapted_model(lambda K, N: AdaLoraLinear(zero_base(K, N), init_r=INIT_R, lora_alpha=LORA_ALPHA),
                              lambda layer: (layer.lora_A, layer.lora_E, layer.lora_B))
        return RankAllocator(model, INIT_R, TARGET_R, **SCHEDULE).update_and_allocate
    pytest.importorskip("peft", reason="peft is not installed")
    from peft import AdaLoraConfig
    from peft.tuners.adalora import SVDLinear
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    config = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=LORA_ALPHA, **SCHEDULE)

    def make_layer(K, N):
        base = nn.Linear(K, N, bias=False, device="meta")
        base.weight = zero_base(K, N)
        return SVDLinear(base, "default", config, r=INIT_R, lora_alpha=LORA_ALPHA)

    model = adapted_model(make_layer, lambda layer: (layer.lora_A["default"], layer.lora_E["default"],
                                                     layer.lora_B["default"]))
    allocator = PeftRankAllocator(model, config, "default")

    def step(global_step):  # AdaLoraModel.update_and_allocate before total_step - tfinal
        _, rank_pattern = allocator.update_and_allocate(model, global_step)
        if rank_pattern:
            config.rank_pattern = rank_pattern

    return step


@pytest.mark.parametrize("provider", ["lowrank_kernels", "peft"])
@pytest.mark.parametrize("kind", list(STEPS))
def test_rank_allocator(run, kind, provider):
    step, steps = allocator_step(provider), itertools.cycle(STEPS[kind])
    run(lambda: step(next(steps)), provider, eager=True, rounds=5, group=f"allocator {kind} step",
        layers=BLOCKS * len(LAYOUT))
