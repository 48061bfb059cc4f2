"""Greedy generation with a QLoRA model: peft + bitsandbytes as users serve it, the same model after
``lowrank_kernels.peft.convert``, and the bf16-base LoRA model; and a batch of mixed adapters (``adapter_names=``).

Model: the training-step model of bench/test_train_step.py (``build``): ``LlamaForCausalLM`` with the layer
dimensions of a bench/shapes.py model (default llama3-8b: hidden 4096, head_dim 128, GQA 32/8 heads), random init,
bf16, --bench-layers decoder layers (default 4), vocabulary cut to 32000; every q/k/v/o/gate/up/down projection an
NF4 ``bnb.nn.Linear4bit`` (double quantization, bf16 compute), peft LoRA r=16, alpha 32, no dropout, adapters in
fp32 as peft keeps them; lora_B drawn at random (peft starts it at zero) such that each adapter's product
``scaling · B @ A`` has entries of the base weights' size (std ``initializer_range``): the adapters change the output
as much as a layer's weights do. Eval mode, ``torch.no_grad``.
  lowrank_kernels  that model after ``convert``: ``qlora_linear`` in every projection
  peft+bnb         that model as peft runs it: ``bnb.matmul_4bit`` (its GEMV at one row), LoRA branch in fp32
  peft-bf16        the same peft LoRA model (r=16, fp32 adapters, peft's forward) on an unquantized bf16 base
                   (``nn.Linear``): what 4-bit weights are measured against, not a merged or adapter-free model
Generation: a prompt of PROMPT random tokens at batch 1 and 16, then NEW_TOKENS new tokens, greedy, with a static
KV cache (``transformers.StaticCache``), as ``generate(cache_implementation="static")`` decodes but in our own loop:
the prefill (one eager forward, ``logits_to_keep=1``) gives the first token, then one forward per token, each step's
argmax fed back in place. On CUDA one decode step (forward + argmax) is captured as a CUDA graph and replayed once
per token (no torch.compile: no compile time, and bitsandbytes' layers need none); a provider whose step cannot be
captured (a host synchronization, an uncapturable copy) is timed eagerly, with the reason in extra_info
(``graphs``, ``graphs_reason``); --bench-eager times every provider eagerly.
Mixed adapters: one such model with 8 more adapters of ranks 8, 16, ..., 64 (alpha 2r), a batch of 16 rows, row i
through adapter i mod 9 (the 9th choice ``"__base__"``: no adapter), generating NEW_TOKENS tokens with
``adapter_names=`` on every forward (peft's hooks hand it to each LoRA layer):
  lowrank_kernels  converted: ``mixed_lora_linear`` (the base product once, all rows' LoRA terms in two launches)
  peft+bnb         peft's ``_mixed_batch_forward``: ``bnb.matmul_4bit``, then per adapter a gather of its rows,
                   ``lora_B(lora_A(x))`` in fp32 and a scatter-add
  single           converted, the same batch through one adapter (r=16, no ``adapter_names``): the target
peft+bnb eagerly (its loop selects each adapter's rows on the host at every layer call); the converted model's
decode steps as CUDA graphs like the single-adapter runs (its row index is built once per set of requests and
reused by every layer and step: ``lowrank_kernels.peft.row_index``), and ``single`` the same way.
Timed: the whole generation, from the cache reset and prefill to the last token (GPU clock, host launch time
included where the GPU waits for it). extra_info: ``tokens`` = batch × new tokens (tokens/s in bench/report.py),
``tokens_per_s``, ``ms_per_token`` (time / new tokens: one step of the whole batch), ``peak_bytes`` (max allocated
during one generation, weights and KV cache included), ``peak_extra_bytes`` (that minus what was allocated before it)
and ``peak_reserved_bytes`` (max reserved by the caching allocator: also the CUDA graph's memory pool, whose
activations a replay uses without allocating); CUDA only.
Guards, before anything is timed: the converted model's prefill logits equal peft's on the same model (before
conversion) within ``TOL``, while the adapters move them by more than ``5 × TOL``; on CUDA, the graph-replayed decode
steps give the eager steps' logits within ``TOL``.
CPU: the "tiny" config of test_train_step.py (hidden 64, 2 layers), batch 1 and 4, NEW_TOKENS = 4, eager, to keep the
code path alive (bitsandbytes' base layers are left in training mode there: in eval mode bitsandbytes repacks the
weights for its CPU kernel, and the converted layers would then run peft's forward; no layer has dropout).
"""
import inspect
import sys
import warnings

import pytest
import torch

from bench.conftest import HAS_CUDA, peak_memory
from bench.test_train_step import DEVICE, TARGETS, build

PROMPT = 16
NEW_TOKENS = 128 if HAS_CUDA else 4
BATCHES = [1, 16] if HAS_CUDA else [1, 4]
RANKS = [8, 16, 24, 32, 40, 48, 56, 64]
MIXED_BATCH = 16
ROUNDS = 5  # timed generations per benchmark, after one warm-up generation
# relative (Frobenius) error of the guards' logits: peft's own model with its adapters cast to bf16 (the precision of
# our LoRA branch) differs from it by a few percent at 4 random layers; the adapters move the logits by ~100%
TOL = 0.1
WARMUP_STEPS = 3  # eager decode steps before a capture (kernel compilation, autotuning, allocator pools)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations peft triggers


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def _cache_kwarg():
    """The name under which the Llama forward takes its cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def prepare(net, seed=1):
    """Random lora_B (peft initializes it to zero; see the module doc), eval mode (bitsandbytes' base layers: see
    the module doc)."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if not isinstance(layer, LoraLayer):
                continue
            for name, B in layer.lora_B.items():
                A, r = layer.lora_A[name].weight, B.weight.shape[1]
                std = net.config.initializer_range / (layer.scaling[name] * r**0.5 * A.float().std().item())
                B.weight.copy_(torch.randn(B.weight.shape, generator=gen) * std)
    net.eval()
    bnb = sys.modules.get("bitsandbytes")  # imported where the model has bitsandbytes layers
    if not HAS_CUDA and bnb is not None:
        for m in net.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.train()
    return net


def build_generation(model, layers, quantized=True):
    return prepare(build(model, layers, False, quantized=quantized))


def build_mixed(model, layers):
    """The generation model plus the 8 adapters ``r8`` ... ``r64`` (alpha 2r); ``default`` (r=16) stays active."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    net = build(model, layers, False)
    for r in RANKS:
        net.add_adapter(f"r{r}", peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
    net.set_adapter("default")
    return prepare(net)


def mixed_names(batch=MIXED_BATCH):
    choices = [f"r{r}" for r in RANKS] + ["__base__"]
    return [choices[i % len(choices)] for i in range(batch)]


def prompt_ids(net, batch):
    gen = torch.Generator(device="cpu").manual_seed(batch)
    return torch.randint(0, net.config.vocab_size, (batch, PROMPT), generator=gen).to(DEVICE)


def prefill_logits(net, ids, **kwargs):
    with torch.no_grad():
        return net(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs).logits[:, -1].float()


def convert_checked(net, ids, expected, **kwargs):
    """``convert(net)``, guarded: its prefill logits against peft's on the same model, which the adapters move."""
    try:
        from lowrank_kernels.peft import convert
    except ImportError as e:
        pytest.skip(f"lowrank_kernels.peft.convert is not available ({e})")
    want = prefill_logits(net, ids, **kwargs)
    with net.disable_adapter():
        base = prefill_logits(net, ids)
    assert convert(net) == expected, "lowrank_kernels.peft.convert did not convert every LoRA layer"
    got = prefill_logits(net, ids, **kwargs)
    err, moved = rel_err(got, want), rel_err(base, want)
    assert moved > 5 * TOL, f"guard: the adapters move the logits by only {moved:.3g}; the guard would be blind"
    assert err < TOL, f"converted model: prefill logits differ from peft's by {err:.3g} (tolerance {TOL})"


class Decoder:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` with a static KV cache; ``decoder()`` runs one
    generation (from the cache reset) and returns nothing; ``generate(n, graph)`` returns ``[(tokens, logits)]`` per
    step for the guards. ``forward_kwargs`` go to every forward (``adapter_names``)."""

    def __init__(self, net, prompt, new_tokens, **forward_kwargs):
        from transformers import StaticCache

        self.net, self.prompt, self.new_tokens, self.kwargs = net, prompt, new_tokens, forward_kwargs
        self.cache = StaticCache(config=net.config, max_cache_len=prompt.shape[1] + new_tokens)
        self.kwargs[_cache_kwarg()] = self.cache
        self.ids = torch.zeros(prompt.shape[0], 1, dtype=torch.long, device=prompt.device)
        self.logits = None  # the last forward's [B, vocab] logits
        self.graph, self.graph_logits, self.reason = None, None, "eager"

    def _forward(self, ids):
        return self.net(input_ids=ids, use_cache=True, logits_to_keep=1, **self.kwargs).logits[:, -1]

    def prefill(self):
        self.cache.reset()
        self.logits = self._forward(self.prompt)
        self.ids.copy_(self.logits.argmax(-1, keepdim=True))

    def step(self):
        self.logits = self._forward(self.ids)
        self.ids.copy_(self.logits.argmax(-1, keepdim=True))

    def capture(self):
        """Captures one decode step as a CUDA graph (``self.graph``); on failure ``self.reason`` says why."""
        if not HAS_CUDA:
            self.reason = "no CUDA: eager"
            return
        try:
            with torch.no_grad():
                self.prefill()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(WARMUP_STEPS):
                        self.step()
                torch.cuda.current_stream().wait_stream(stream)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # a host sync cannot be captured: find it before capturing
                try:
                    self.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.step()
            torch.cuda.synchronize()
            self.graph, self.graph_logits, self.reason = graph, self.logits, "cuda-graph"  # replays refill them
        except Exception as e:  # noqa: BLE001 - any failure to capture means: time it eagerly, and say why
            self.graph = None
            self.reason = f"capture failed, eager: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            warnings.warn(f"bench/test_generate.py: {self.reason}")
            torch.cuda.synchronize()  # raises if the failed capture broke the CUDA context (the reason is warned)

    def _decode(self, graph):
        """One decode step, replayed or eager; its logits."""
        if graph:
            self.graph.replay()
            return self.graph_logits
        self.step()
        return self.logits

    def __call__(self):
        graph = self.graph is not None
        with torch.no_grad():
            self.prefill()
            for _ in range(self.new_tokens - 1):
                self._decode(graph)

    def generate(self, n, graph):
        """``[(tokens [B, 1], logits [B, V])]`` of the first ``n`` generated tokens, decoded through the captured
        graph or eagerly."""
        out = []
        with torch.no_grad():
            self.prefill()
            out.append((self.ids.clone(), self.logits.float().clone()))
            for _ in range(n - 1):
                logits = self._decode(graph)
                out.append((self.ids.clone(), logits.float().clone()))
        return out

    def check_graph(self, n=3):
        """Guard: the graph-replayed steps give the eager steps' logits (compared while both picked the same
        tokens: a near-tie decided otherwise by a last bit makes the rest incomparable)."""
        if self.graph is None:
            return
        for i, ((t_ref, l_ref), (t_got, l_got)) in enumerate(zip(self.generate(n, False), self.generate(n, True))):
            err = rel_err(l_got, l_ref)
            assert err < TOL, f"CUDA-graph decode step {i}: logits differ from the eager step's by {err:.3g}"
            if not torch.equal(t_ref, t_got):
                break


def timed(benchmark, decoder, provider, group, **info):
    """Times ``decoder()`` (one generation) and records what the module doc lists."""
    graphs = decoder.graph is not None
    if HAS_CUDA:
        torch.cuda.empty_cache()  # what model building freed: not the generation's
    peak, baseline = peak_memory(decoder)
    reserved = torch.cuda.max_memory_reserved() if HAS_CUDA else None  # over the generation peak_memory measured
    batch = decoder.prompt.shape[0]
    tokens = batch * decoder.new_tokens
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, timing="cuda-graph" if graphs else "eager", graphs=graphs,
                                graphs_reason=decoder.reason, batch=batch, prompt_tokens=decoder.prompt.shape[1],
                                new_tokens=decoder.new_tokens, tokens=tokens, peak_bytes=peak,
                                peak_extra_bytes=peak and peak - baseline, peak_reserved_bytes=reserved, **info)
    benchmark.pedantic(decoder, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(tokens_per_s=tokens / median, ms_per_token=median / decoder.new_tokens * 1e3)


def layer_count(request):
    return request.config.getoption("--bench-layers") or (4 if HAS_CUDA else 2)


@pytest.mark.parametrize("provider", ["lowrank_kernels", "peft+bnb", "peft-bf16"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
def test_generate(benchmark, request, model, batch, provider):
    pytest.importorskip("transformers", reason="transformers is not installed")
    layers = layer_count(request)
    net = build_generation(model, layers, quantized=provider != "peft-bf16")
    ids = prompt_ids(net, batch)
    if provider == "lowrank_kernels":
        convert_checked(net, ids, expected=len(TARGETS) * layers)
    decoder = Decoder(net, ids, NEW_TOKENS)
    if request.config.getoption("--bench-eager"):
        decoder.reason = "--bench-eager: eager"
    else:
        decoder.capture()
        decoder.check_graph()
    timed(benchmark, decoder, provider, f"generate {model} batch={batch}", layers=layers, rank=16)


@pytest.mark.parametrize("provider", ["lowrank_kernels", "peft+bnb", "single"])
def test_generate_mixed(benchmark, request, model, provider):
    pytest.importorskip("transformers", reason="transformers is not installed")
    layers = layer_count(request)
    net = build_mixed(model, layers)
    ids = prompt_ids(net, MIXED_BATCH)
    kwargs = {} if provider == "single" else {"adapter_names": mixed_names()}
    if provider != "peft+bnb":
        convert_checked(net, ids, expected=len(TARGETS) * layers, **kwargs)
    decoder = Decoder(net, ids, NEW_TOKENS, **kwargs)
    if provider == "peft+bnb":
        decoder.reason = "eager: peft's adapter_names loop selects each adapter's rows on the host at every call"
    elif request.config.getoption("--bench-eager"):
        decoder.reason = "--bench-eager: eager"
    else:
        decoder.capture()
        decoder.check_graph()
    timed(benchmark, decoder, provider, f"generate_mixed_8_adapters {model} batch={MIXED_BATCH}", layers=layers,
          adapters=len(RANKS), ranks=RANKS, adapter_names=kwargs.get("adapter_names"))
