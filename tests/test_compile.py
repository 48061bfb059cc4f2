"""``torch.compile`` of our layers and of peft models converted to them, with LoRA dropout, in training.

Under compile every layer call is one node of the ``lowrank_kernels::lora_linear`` operator (its dropout seed one
``lowrank_kernels::dropout_seed`` node), so models trace with ``fullgraph=True``. For one RNG state a compiled model
draws the masks the eager one draws: losses and every adapter gradient equal eager's (to the compiler's rounding),
with activation checkpointing too (the recomputed forward draws the same seeds), with AdaLoRA rank masks; under
inductor that holds with ``fallback_random=True`` where inductor chains random operators (it reorders them
otherwise, as it does torch's own); without dropout on any torch. Each operator passes ``torch.library.opcheck``
(schema, fake implementation, autograd registration, AOT dispatch).

CPU: fp32 on the torch path, backends ``aot_eager`` (the AOTAutograd graphs run eagerly) and ``inductor``.
"""
import pytest
import torch
import torch._dynamo
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowrank_kernels import AdaLoraLinear, LoraLinear, NF4Weight, QLoraLinear, ops
from tests.conftest import DEVICE
from tests.test_lora_forward import rel_err

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# fp32 everywhere: compiled and eager run the same kernels for our operators, and the compiler's fusions of the ops
# around them round differently only at fp32's level (bf16 would hide a wrong mask in rounding noise).
TOL = 1e-5 if DEVICE == "cpu" else 1e-4
DTYPE = torch.float32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend):
    return torch.compile(fn, fullgraph=True, backend=backend)


def _loss_and_grads(model, step, params):
    """``(loss, [grad of each of params])`` of one ``step(model)``, gradients cleared first."""
    for p in params:
        p.grad = None
    loss = step(model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def assert_compiled_equals_eager(model, step, backend, *, seed=7, steps=2):
    """``steps`` training steps of ``step(model)`` eager and compiled from one RNG state: equal losses and gradients
    of every trainable parameter, step by step (each step draws new masks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = _compiled(model, backend)
    runs = []
    for fn in (model, compiled):
        torch.manual_seed(seed)
        runs.append([_loss_and_grads(fn, step, params) for _ in range(steps)])
    for (l0, g0), (l1, g1) in zip(*runs):
        assert rel_err(l1, l0) <= TOL, (float(l0), float(l1))
        for a, b in zip(g0, g1):
            assert rel_err(b, a) <= TOL
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0][1], runs[0][1][1]))  # each step drew new masks
    return runs


# ------------------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    """A decoder-shaped block: q/k/v/o, gate/up/down projections (ragged sizes), residuals, no attention."""

    def __init__(self, d=40, ffn=72):
        super().__init__()
        for name, (i, o) in dict(q=(d, d), k=(d, d), v=(d, d), o=(d, d), gate=(d, ffn), up=(d, ffn),
                                 down=(ffn, d)).items():
            setattr(self, f"{name}_proj", nn.Linear(i, o, bias=name == "q"))

    def forward(self, h):
        a = self.o_proj(torch.tanh(self.q_proj(h)) * self.k_proj(h) + self.v_proj(h))  # q, k, v: siblings on h
        h = h + a
        return h + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, n=2, d=40, ckpt=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.ckpt = ckpt

    def forward(self, h):
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=False) if self.ckpt else b(h)
        return h


def our_layers(model, kind, dropout, r=4):
    """``model`` with every ``nn.Linear`` replaced by our layer of ``kind`` (LoRA, QLoRA, AdaLoRA on NF4 with a
    rank mask), lora_B non-zero so every adapter has a gradient."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if kind == "lora":
                layer = LoraLinear.from_linear(child, r=r, lora_alpha=2 * r, lora_dropout=dropout)
            elif kind == "qlora":
                layer = QLoraLinear.from_linear(child, r=r, lora_alpha=2 * r, lora_dropout=dropout)
            else:
                layer = AdaLoraLinear.from_linear(child, init_r=r + 2, lora_alpha=2 * r, lora_dropout=dropout,
                                                  quantize=True)
                with torch.no_grad():
                    layer.lora_E.normal_()
                mask = torch.ones(r + 2, dtype=torch.bool)
                mask[1::3] = False
                layer.set_rank_mask(mask.to(layer.lora_A.device))
            if kind != "adalora":
                with torch.no_grad():
                    layer.lora_B.weight.normal_(std=0.1)
            setattr(parent, name, layer)
    return model


def _inductor_keeps_random_order() -> bool:
    """Whether this torch's inductor runs random operators in program order under ``fallback_random=True``: it
    chains them (pytorch/pytorch#181245; torch 2.13 does); without that, its scheduler could reorder the draws of
    sibling layers, torch's own dropout's as ours (pytorch/pytorch#181136)."""
    from torch._inductor.fx_passes import post_grad

    return hasattr(post_grad, "_chain_random_ops_for_ordering")


needs_ordered_random = pytest.mark.skipif(
    not _inductor_keeps_random_order(),
    reason="this torch's inductor may reorder random operators even under fallback_random (pytorch#181136)")


def _stack_step(x):
    return lambda m: m(x).square().mean()


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_our_layers_compile_fullgraph_with_dropout(kind):
    model = our_layers(Stack(), kind, dropout=0.2).to(DEVICE, DTYPE).train()
    x = torch.randn(3, 5, 40, device=DEVICE, dtype=DTYPE)
    assert_compiled_equals_eager(model, _stack_step(x), "aot_eager")


@pytest.mark.parametrize("kind", ["qlora", "adalora"])
def test_inductor_without_dropout_equals_eager(kind):
    """Inductor's fusions around our operators, no random operator: loss and gradients equal eager's on any torch."""
    model = our_layers(Stack(), kind, dropout=0.0).to(DEVICE, DTYPE).train()
    _equal_once(model, _stack_step(torch.randn(3, 5, 40, device=DEVICE, dtype=DTYPE)), "inductor")


@needs_ordered_random
def test_inductor_with_fallback_random_equals_eager():
    """Inductor runs random operators in program order only under ``fallback_random=True`` (as for torch's own
    dropout); then its masks are eager's."""
    import torch._inductor.config

    model = our_layers(Stack(), "qlora", dropout=0.2).to(DEVICE, DTYPE).train()
    x = torch.randn(3, 5, 40, device=DEVICE, dtype=DTYPE)
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_equals_eager(model, _stack_step(x), "inductor")


def test_inductor_default_trains_with_dropout():
    """With inductor's defaults the same seeds are drawn, but inductor may hand sibling layers (q, k, v) each other's
    seeds: a compiled step is a valid dropout step whose masks differ from eager's. Its backward uses its forward's
    masks: with p -> 0 the step tends to the no-dropout one, and a fixed-seed step repeats exactly."""
    model = our_layers(Stack(), "lora", dropout=0.2).to(DEVICE, DTYPE).train()
    x = torch.randn(3, 5, 40, device=DEVICE, dtype=DTYPE)
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = _compiled(model, "inductor")
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(_loss_and_grads(compiled, _stack_step(x), params))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert torch.isfinite(runs[0][0]) and not torch.equal(runs[0][0], _loss_and_grads(compiled, _stack_step(x),
                                                                                       params)[0])


@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_compile_with_activation_checkpointing(kind):
    """Compile + checkpointing + dropout: the recomputed forward draws the forward's seeds, so gradients equal
    eager's (with and without checkpointing). On CUDA, AOTAutograd gives each random operator of a checkpointed
    region a generator of its own (graph-safe RNG, for CUDA graphs) unless ``fallback_random=True``: eager's masks
    need that setting there, as torch's own dropout does."""
    import torch._inductor.config

    model = our_layers(Stack(ckpt=True), kind, dropout=0.3).to(DEVICE, DTYPE).train()
    x = torch.randn(4, 40, device=DEVICE, dtype=DTYPE)
    with torch._inductor.config.patch(fallback_random=True):
        runs = assert_compiled_equals_eager(model, _stack_step(x), "aot_eager")
    model.ckpt = False
    torch.manual_seed(7)
    plain = _loss_and_grads(model, _stack_step(x), [p for p in model.parameters() if p.requires_grad])
    assert rel_err(plain[0], runs[1][0][0]) <= TOL
    for a, b in zip(plain[1], runs[1][0][1]):
        assert rel_err(b, a) <= TOL


def test_sibling_calls_draw_different_masks_when_compiled():
    """Two calls on one input (q, k, v on the hidden state; here one layer twice) are two draws under compile too:
    the compiler must not merge the seed operator like a pure function."""
    layer = LoraLinear(32, 24, r=4, lora_dropout=0.5).to(DEVICE, DTYPE).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 32, device=DEVICE, dtype=DTYPE)

    def two(x):
        return layer(x), layer(x)

    for fn in (two, _compiled(two, "aot_eager")):
        torch.manual_seed(3)
        a, b = fn(x)
        assert not torch.allclose(a, b)
    torch.manual_seed(3)
    eager = two(x)
    torch.manual_seed(3)
    compiled = _compiled(two, "aot_eager")(x)
    for e, c in zip(eager, compiled):
        assert rel_err(c, e) <= TOL


@pytest.mark.parametrize("dropout, backend", [(0.0, "aot_eager"), (0.1, "aot_eager"),
                                              pytest.param(0.1, "inductor", marks=needs_ordered_random)])
def test_peft_llama_converted_compiles_fullgraph(dropout, backend):
    """The usual QLoRA recipe's model shape: a (tiny) HF Llama, peft LoRA on every projection, converted."""
    pytest.importorskip("transformers")
    import torch._inductor.config
    from tests.test_training_stack import lora_pair, tiny_llama

    _, ours = lora_pair(tiny_llama(), dropout=dropout)
    ours = ours.to(DEVICE).train()
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    step = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    if not dropout:
        _equal_once(ours, step)
        return
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_equals_eager(ours, step, backend)


def test_bnb_qlora_llama_converted_compiles_fullgraph(tmp_path):
    """QLoRA as users load it (``from_pretrained`` with bitsandbytes NF4), peft LoRA with dropout, converted: the
    NF4 view of each ``Params4bit`` is built inside the graph."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    import torch._inductor.config
    from tests.test_training_stack import lora_pair, qlora_llama

    _, ours = lora_pair(qlora_llama(tmp_path, device=DEVICE), dropout=0.1)
    ours = ours.train()
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_equals_eager(ours, lambda m: m(input_ids=ids, labels=ids).loss, "aot_eager")


def test_peft_adalora_converted_with_rank_mask_compiles_fullgraph():
    """peft AdaLoRA with dropout, converted, a rank mask installed (as ``RankAllocator`` does): only the active
    ranks computed in the compiled graph too, pruned ranks' gradients exactly zero."""
    pytest.importorskip("peft")
    from peft import AdaLoraConfig, get_peft_model

    from lowrank_kernels import peft as lk_peft
    from tests.test_peft_convert import Tiny

    model = get_peft_model(Tiny(), AdaLoraConfig(init_r=6, target_r=3, total_step=20, lora_dropout=0.2,
                                                 target_modules=["up", "down"])).to(DEVICE).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    assert lk_peft.convert(model) == 2
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    for layer in (model.base_model.model.up, model.base_model.model.down):
        layer.set_rank_mask(mask)
    x = torch.randn(7, 40, device=DEVICE, dtype=DTYPE)
    runs = assert_compiled_equals_eager(model, lambda m: m(x).square().mean(), "aot_eager")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g in zip(names, runs[1][0][1]):
        if "lora_E" in name:
            assert torch.all(g[~mask] == 0) and torch.any(g[mask] != 0), name


def _equal_once(model, step, backend="aot_eager"):
    params = [p for p in model.parameters() if p.requires_grad]
    l0, g0 = _loss_and_grads(model, step, params)
    l1, g1 = _loss_and_grads(_compiled(model, backend), step, params)
    assert rel_err(l1, l0) <= TOL
    for a, b in zip(g0, g1):
        assert rel_err(b, a) <= TOL


def test_compiled_inference_and_no_grad():
    """Eval mode (no dropout) and ``torch.no_grad`` trace too; outputs equal eager's."""
    model = our_layers(Stack(), "qlora", dropout=0.1).to(DEVICE, DTYPE).eval()
    x = torch.randn(2, 3, 40, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        assert rel_err(_compiled(model, "aot_eager")(x), model(x)) <= TOL


# ---------------------------------------------------------------------------------------------------- opcheck
def _nf4(N, K, nested=True):
    return NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=64, double_quant=nested)


def _layer_args(weight, dropout, bias, need_S, grad):
    N, K = weight.shape
    x = torch.randn(5, K, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    A = (torch.randn(3, K, device=DEVICE) / K**0.5).requires_grad_(grad)
    B = torch.randn(N, 3, device=DEVICE).requires_grad_(grad)
    b = torch.randn(N, device=DEVICE).requires_grad_(grad) if bias else None
    tensors, meta = ops.weight_args(weight)
    seed = ops.dropout_seed(x) if dropout else None
    return (x, tensors, meta, A, B, b, 1.5, dropout, seed, need_S, None, None)


WEIGHTS = {"nf4": lambda: _nf4(24, 72), "nf4-single": lambda: _nf4(24, 72, nested=False),
           "dense": lambda: torch.randn(24, 72, device=DEVICE, dtype=DTYPE)}


@pytest.mark.parametrize("weight", sorted(WEIGHTS))
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_opcheck_lora_linear(weight, dropout, bias, grad):
    args = _layer_args(WEIGHTS[weight](), dropout, bias, need_S=grad, grad=grad)
    torch.library.opcheck(torch.ops.lowrank_kernels.lora_linear.default, args)


@pytest.mark.parametrize("weight", sorted(WEIGHTS))
@pytest.mark.parametrize("needs", [(True, True, True, True, False), (False, True, False, False, False),
                                   (True, False, True, False, False)])
def test_opcheck_lora_linear_backward(weight, needs):
    w = WEIGHTS[weight]()
    x, tensors, meta, A, B, b, s, p, seed, _, _, _ = _layer_args(w, 0.25, True, True, False)
    S = torch.randn(x.shape[0], A.shape[0], device=DEVICE, dtype=DTYPE)
    dy = torch.randn(x.shape[0], w.shape[0], device=DEVICE, dtype=DTYPE)
    args = (dy, x, tensors, meta, A, B, b, S, s, p, seed, list(needs), None, None)
    torch.library.opcheck(torch.ops.lowrank_kernels.lora_linear_backward.default, args)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_opcheck_nf4_dequantize(nested, dtype):
    tensors, meta = _nf4(24, 72, nested).op_args()
    torch.library.opcheck(torch.ops.lowrank_kernels.nf4_dequantize.default, (tensors, meta, dtype, None))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_opcheck_nf4_matmul(nested, trans_w, grad):
    w = _nf4(24, 72, nested)
    tensors, meta = w.op_args()
    x = torch.randn(5, 24 if trans_w else 72, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    torch.library.opcheck(torch.ops.lowrank_kernels.nf4_matmul.default, (x, tensors, meta, trans_w, None))


@pytest.mark.parametrize("weight", sorted(WEIGHTS))
def test_opcheck_dora_weight_norm(weight):
    w = WEIGHTS[weight]()
    tensors, meta = ops.weight_args(w)
    A = torch.randn(4, w.shape[1], device=DEVICE)
    B = torch.randn(w.shape[0], 4, device=DEVICE)
    torch.library.opcheck(torch.ops.lowrank_kernels.dora_weight_norm.default, (tensors, meta, A, B, 1.5, None))


def test_opcheck_dropout_seed():
    """A random operator: the schema, fake and dispatch checks (``test_aot_dispatch_dynamic`` compares two draws)."""
    x = torch.randn(3, device=DEVICE)
    torch.library.opcheck(torch.ops.lowrank_kernels.dropout_seed.default, (x,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.manual_seed(0)
    a = ops.dropout_seed(x)
    torch.manual_seed(0)
    assert a.dtype == torch.int64 and a.shape == () and a.device == x.device and torch.equal(a, ops.dropout_seed(x))
    assert not torch.equal(a, ops.dropout_seed(x))


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 5)])
def test_opcheck_dropout_mask(shape):
    seed = ops.dropout_seed(torch.empty(0, device=DEVICE))
    torch.library.opcheck(torch.ops.lowrank_kernels.dropout_mask.default, (seed, list(shape), 0.3))
    keep = ops.dropout_mask(seed, list(shape), 0.3)
    assert keep.dtype == torch.bool and keep.shape == shape and torch.equal(keep, ops.dropout_mask(seed, list(shape),
                                                                                                    0.3))


def test_operator_weights_come_back_as_plain_tensors():
    """Inductor hands a compiled graph's operators bitsandbytes' ``Params4bit`` itself as the packed weight (a tensor
    subclass whose Python ``__torch_function__`` would run for every torch call of our launchers): the operators'
    ``NF4Weight`` holds a plain tensor of the same storage, with the same results."""
    bnb = pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(96, 40, bias=False)
    param = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    try:
        param = param.to(DEVICE)  # quantizes
    except (RuntimeError, NotImplementedError) as e:  # no bitsandbytes 4-bit backend for this device
        pytest.skip(f"bitsandbytes cannot quantize on {DEVICE} here: {e}")
    tensors, meta = NF4Weight.from_bnb(param).op_args()
    assert type(param) is not torch.Tensor and type(tensors[0]) is torch.Tensor
    weight = NF4Weight.from_op_args([param] + tensors[1:], meta)
    assert type(weight.packed) is torch.Tensor and weight.packed.data_ptr() == param.data_ptr()
    plain = NF4Weight.from_op_args(tensors, meta)
    assert torch.equal(weight.dequantize(torch.float32), plain.dequantize(torch.float32))


def test_operators_run_on_meta():
    """The fake implementations also serve the meta device: shapes only."""
    w = NF4Weight.empty((24, 72), torch.bfloat16, device="meta")
    x = torch.empty(5, 72, device="meta", requires_grad=True)
    A, B = torch.empty(3, 72, device="meta", requires_grad=True), torch.empty(24, 3, device="meta", requires_grad=True)
    tensors, meta = w.op_args()
    y, S = torch.ops.lowrank_kernels.lora_linear(x, tensors, meta, A, B, None, 1.0, 0.1, ops.dropout_seed(x), True,
                                                 None, None)
    assert y.shape == (5, 24) and S.shape == (5, 3) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape and A.grad.shape == A.shape and B.grad.shape == B.shape
    assert torch.ops.lowrank_kernels.nf4_dequantize(tensors, meta, torch.float16, None).shape == (24, 72)


# ------------------------------------------------------------------------------------------------- CUDA graphs
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU")


def _captured(fn, before=lambda: None, warmups=3):
    """``(graph, output)``: ``fn()`` captured in a ``torch.cuda.CUDAGraph`` as torch's whole-network recipe does it,
    after ``warmups`` calls on a side stream (Triton compiles, caches fill); ``before()`` runs before each call and
    before the capture (e.g. ``zero_grad(set_to_none=True)``, so that the captured backward writes the gradients)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


@needs_cuda
@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_cuda_graph_captures_a_training_step(kind):
    """Forward, backward and an SGD step captured in one ``torch.cuda.CUDAGraph`` (torch's whole-network recipe):
    a replay equals the eager step from the same parameters and RNG state (the seeds are drawn on the device
    generator, which replays advance), and the next replay draws new masks."""
    model = our_layers(Stack(), kind, dropout=0.2).to(DEVICE, DTYPE).train()
    start = [p.detach().clone() for p in _params(model)]
    x = torch.randn(3, 5, 40, device=DEVICE, dtype=DTYPE)
    opt = torch.optim.SGD(_params(model), lr=0.05)

    def step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    graph, static_loss = _captured(step, lambda: opt.zero_grad(set_to_none=True))

    def reset():
        with torch.no_grad():
            for p, s in zip(_params(model), start):
                p.copy_(s)
            for p in _params(model):
                p.grad.zero_()

    reset()
    torch.manual_seed(5)
    graph.replay()
    replayed = (static_loss.clone(), [p.detach().clone() for p in _params(model)])
    reset()
    torch.manual_seed(5)
    eager_loss = step()  # accumulates into the zeroed .grad, as the graph's backward does
    assert rel_err(replayed[0], eager_loss) <= TOL
    for a, b in zip(replayed[1], _params(model)):
        assert rel_err(a, b) <= TOL
    reset()
    graph.replay()  # new masks: other adapter updates (compared, not the loss, which may round to the same value)
    assert not all(torch.equal(a, b) for a, b in zip(replayed[1], _params(model)))


@needs_cuda
def test_cuda_graph_captures_a_converted_qlora_llama_step(tmp_path):
    """The whole training step of a converted bnb-QLoRA Llama (forward, loss, backward, a capturable AdamW) in one
    CUDA graph, as ``bench/test_train_step.py``'s "graphed" mode times it: a replay equals the eager step from the
    same parameters and optimizer state."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from tests.test_training_stack import lora_pair, qlora_llama

    _, model = lora_pair(qlora_llama(tmp_path, device=DEVICE), dropout=0.0)
    model.train()
    params = _params(model)
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    opt = torch.optim.AdamW(params, lr=1e-3, capturable=True)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    graph, static_loss = _captured(step, lambda: opt.zero_grad(set_to_none=True))
    # the state after the warm-up steps (a capture records kernels without running them)
    start = [p.detach().clone() for p in params]
    opt_start = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    def reset():
        with torch.no_grad():
            for p, s, state in zip(params, start, opt_start):
                p.copy_(s)
                p.grad.zero_()
                for k, v in state.items():
                    opt.state[p][k].copy_(v)

    reset()
    graph.replay()
    replayed = (static_loss.clone(), [p.detach().clone() for p in params])
    reset()
    eager_loss = step()  # accumulates into the zeroed .grad, as the graph's backward writes it
    assert rel_err(replayed[0], eager_loss) <= TOL
    for a, b in zip(replayed[1], params):
        assert rel_err(a, b) <= TOL
    assert not all(torch.equal(a, s) for a, s in zip(replayed[1], start))  # the replay trained


@needs_cuda
@pytest.mark.parametrize("dropout", [0.0, pytest.param(0.2, marks=needs_ordered_random)])
@pytest.mark.parametrize("kind", ["qlora", "adalora"])
def test_reduce_overhead_training_step_equals_eager(kind, dropout):
    """``torch.compile(mode="reduce-overhead")`` (inductor + CUDA graph trees) of forward + backward."""
    import torch._inductor.config

    model = our_layers(Stack(), kind, dropout=dropout).to(DEVICE, DTYPE).train()
    x = torch.randn(3, 5, 40, device=DEVICE, dtype=DTYPE)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        for i in range(4):  # the graphs are recorded on the first calls and replayed after
            results = []
            for fn in (model, compiled):
                torch.compiler.cudagraph_mark_step_begin()
                torch.manual_seed(100 + i)
                results.append(_loss_and_grads(fn, _stack_step(x), _params(model)))
            (l0, g0), (l1, g1) = results
            assert rel_err(l1, l0) <= TOL
            for a, b in zip(g0, g1):
                assert rel_err(b, a) <= TOL


@needs_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_decode_step_graph_capture(M):
    """A decode step (eval, no grad, M tokens: the GEMV kernels) captured manually and through reduce-overhead."""
    model = our_layers(Stack(), "qlora", dropout=0.1).to(DEVICE, DTYPE).eval()
    x = torch.randn(M, 40, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        eager = model(x)
        graph, static_y = _captured(lambda: model(x), warmups=2)
        graph.replay()
        assert torch.equal(static_y, eager)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x)
        assert rel_err(y, eager) <= TOL
