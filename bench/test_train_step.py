"""One QLoRA (LoRA, AdaLoRA or DoRA) training step of a Llama-architecture model: peft + bitsandbytes as users run
it, and the same model after ``lowrank_kernels.peft.convert`` (AdaLoRA: with our ``RankAllocator`` instead of
peft's; DoRA: peft's ``use_dora=True``, without dropout and with ``lora_dropout=0.05`` as DoRA recipes set it:
method ``dora-dropout``).

Model: ``LlamaForCausalLM`` with the layer dimensions of a bench/shapes.py model (head_dim 128), random init
(nothing downloaded), bf16, --bench-layers decoder layers (default 4). The vocabulary is cut to 32000 so that the
frozen bf16 lm_head does not outweigh so few layers: with 4 Llama-3-8B layers it does about 13% of the GEMM
FLOPs (38% with the real 128256 tokens; 7% in the real 32-layer model). Every q/k/v/o/gate/up/down projection
becomes a ``bnb.nn.Linear4bit`` (NF4, double quantization, bf16 compute) as
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` makes it, then peft LoRA r=16, alpha 32, no
dropout (peft keeps the adapters in fp32); AdamW over the adapters. Gradient checkpointing off unless
--bench-grad-ckpt. Sequences of 2048 random tokens, batch 1 and 4 (M = 2048 and 8192 rows per linear layer).
--bench-liger: Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy on every provider's model. Timed
(eager calls of the step, compiled model or not): forward + loss + backward + ``optimizer.step()`` +
``zero_grad()``; mode "graphed" (CUDA, LoRA): the whole step captured once in a CUDA graph and replayed
(:func:`graphed_step`), the step without host time; ``peft-bf16`` is the same LoRA model on a bf16 base (no
quantization).
extra_info: ``tokens`` per step, ``tokens_per_s``, ``peak_bytes`` (max allocated during one step) and
``peak_extra_bytes`` (that minus what was allocated before it: weights, adapters, optimizer state); CUDA only.
CPU: the "tiny" config below (hidden 64, 2 layers, 32 tokens), to keep the code path alive.
"""
import pytest
import torch

from bench import shapes
from bench.conftest import HAS_CUDA, peak_memory

DEVICE = "cuda" if HAS_CUDA else "cpu"
HEAD_DIM = 128
VOCAB = 32000
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations peft triggers


def llama_config(model, layers):
    from transformers import LlamaConfig

    if model == "tiny":
        dims = TINY
    else:
        layer = shapes.MODELS[model]
        hidden = layer["q_proj"][0]
        dims = dict(hidden_size=hidden, intermediate_size=layer["gate_proj"][1], head_dim=HEAD_DIM,
                    num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=layer["k_proj"][1] // HEAD_DIM,
                    vocab_size=VOCAB)
    return LlamaConfig(num_hidden_layers=layers, use_cache=False, **dims)


def quantize_(model, bnb):
    """Replaces each ``nn.Linear`` of the decoder layers by an NF4 ``bnb.nn.Linear4bit`` holding its weight."""
    for parent in list(model.model.layers.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                  device="meta")
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=q)
            if linear.bias is not None:
                q.bias = linear.bias
            setattr(parent, name, q.to(DEVICE))  # moving a Params4bit quantizes it
    model.is_loaded_in_4bit = True  # as from_pretrained sets it; peft picks its Linear4bit LoRA layer by it


# AdaLoRA (method "adalora"): peft's defaults except the schedule, chosen so that the timed steps (after ~30
# warm-up steps) fall in the budgeting phase, with a rank reallocation every DELTA_T steps.
ADALORA = dict(init_r=12, target_r=8, tinit=20, tfinal=200, deltaT=10, total_step=1000)


def build(model, layers, grad_ckpt, method="lora", quantized=True):
    """The peft QLoRA (or AdaLoRA) model as users train it: quantized (unless ``quantized=False``: the bf16-base
    LoRA model), adapter-wrapped, adapters trainable."""
    from transformers import LlamaForCausalLM

    peft = pytest.importorskip("peft", reason="peft is not installed")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        net = LlamaForCausalLM(llama_config(model, layers)).to(torch.bfloat16)
    if quantized:
        quantize_(net, pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed"))
    if grad_ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "adalora":
        config = peft.AdaLoraConfig(lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, **ADALORA)
    else:
        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05 if method == "dora-dropout" else 0.0,
                                 target_modules=TARGETS, use_dora=method.startswith("dora"))
    return peft.get_peft_model(net, config)


def apply_liger(net):
    """Liger-Kernel's Llama kernels (RMSNorm, RoPE, SwiGLU MLP, fused linear cross-entropy) on the Llama inside
    ``net`` (a peft model), as a speed-seeking user adds them to either provider."""
    if not HAS_CUDA:
        pytest.skip("--bench-liger: Liger-Kernel's Triton kernels need a CUDA GPU")
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
    liger.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                      cross_entropy=False, model=net.get_base_model())


def graphed_step(net, ids, optimizer, provider):
    """The whole step (forward, loss, backward, ``optimizer.step()``) captured once in a CUDA graph, as PyTorch's
    whole-network capture recipe does it: warm-up steps on a side stream, gradients set to None before the capture
    (the captured backward writes them, so each replay overwrites them), a ``capturable`` optimizer. Its replays
    cost no host time per kernel: the step's device time, the limit of any host-side trimming. Returns ``(replay,
    loss, peak, baseline)``: a synchronized replay, the loss tensor each replay rewrites; ``peak`` the bytes
    allocated at most during the capture (the graph's pool holds them), ``baseline`` those allocated before it."""
    def body():
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            loss = body()
    except RuntimeError as e:
        pytest.skip(f"{provider}: the training step does not capture in a CUDA graph ({e})")
    torch.cuda.synchronize()

    def replay():  # synchronized: a replay is one launch, and unsynchronized the timer would see only launches
        graph.replay()
        torch.cuda.synchronize()

    return replay, loss, torch.cuda.max_memory_allocated(), baseline


# Compiled variants: torch.compile of the whole model (inductor, default mode; on the CPU aot_eager, to keep the
# path alive in the smoke run at little cost). peft+bnb compiles with graph breaks around bitsandbytes' layers;
# converted models compile into one graph (the layers are torch operators: lowrank_kernels/ops.py).
COMPILE_BACKEND = "inductor" if HAS_CUDA else "aot_eager"


@pytest.mark.parametrize("provider", ["peft+bnb", "lowrank_kernels", "peft-bf16"])
@pytest.mark.parametrize("batch", [1, 4] if HAS_CUDA else [1], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("mode", ["eager", "compiled", "graphed"])
@pytest.mark.parametrize("method", ["lora", "adalora", "dora", "dora-dropout"])
def test_train_step(run, benchmark, request, model, method, mode, batch, provider):
    """One step; for AdaLoRA, ``update_and_allocate`` (peft's, or our ``RankAllocator`` on the converted model)
    runs after ``optimizer.step()`` as peft documents it. ``peft-bf16``: the same LoRA model on an unquantized
    bf16 base through peft (what "4-bit costs nothing" is measured against)."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    if provider == "peft-bf16" and method != "lora":
        pytest.skip("the bf16-base reference is measured for LoRA")
    if mode == "graphed" and (not HAS_CUDA or method != "lora"):
        pytest.skip("the step in one CUDA graph is measured for LoRA, on CUDA")
    layers = request.config.getoption("--bench-layers") or (4 if HAS_CUDA else 2)
    seq = 32 if model == "tiny" else 2048
    tokens = batch * seq
    net = build(model, layers, request.config.getoption("--bench-grad-ckpt"), method,
                quantized=provider != "peft-bf16")
    liger = request.config.getoption("--bench-liger")
    if liger:
        apply_liger(net)
    allocate = net.base_model.update_and_allocate if method == "adalora" else None
    if provider == "lowrank_kernels":
        try:
            from lowrank_kernels.peft import convert
        except ImportError as e:
            pytest.skip(f"lowrank_kernels.peft.convert is not available in this version ({e})")
        assert convert(net) > 0, "lowrank_kernels.peft.convert converted no layer of the peft model"
        if method == "adalora":
            from lowrank_kernels import RankAllocator

            allocate = RankAllocator(net, **ADALORA).update_and_allocate
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4,
                                  capturable=mode == "graphed")
    ids = torch.randint(0, net.config.vocab_size, (batch, seq), device=DEVICE)
    count = iter(range(10**9))
    forward = torch.compile(net, backend=COMPILE_BACKEND) if mode == "compiled" else net

    def step():
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if allocate is not None:
            allocate(next(count))
        optimizer.zero_grad(set_to_none=True)

    if mode == "graphed":
        step, loss, peak, baseline = graphed_step(net, ids, optimizer, provider)
    else:
        peak, baseline = peak_memory(step)
    name = "train_step" if method == "lora" else f"{method.replace('-', '_')}_train_step"
    run(step, provider, eager=True, rounds=5, group=f"{name} {model} batch={batch} {mode}", layers=layers,
        tokens=tokens, mode=mode, liger=bool(liger),
        grad_ckpt=bool(request.config.getoption("--bench-grad-ckpt")),
        peak_bytes=peak, peak_extra_bytes=peak and peak - baseline)
    if mode == "graphed":
        assert torch.isfinite(loss).item(), f"{provider}: the replayed step's loss is {loss.item()}"
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median
