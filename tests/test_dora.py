"""``lowrank_kernels.dora.dora_linear`` against the DoRA oracle ``python_ref.dora_forward`` (itself checked against
peft's ``DoraLinearLayer`` in tests/test_python_ref_dora.py) and against peft directly: outputs and the gradients of
x, lora_A, lora_B, magnitude, bias; dense and NF4 bases, dropout, ragged shapes, r in {1, 8, 16, 64}; the norm
without forming ``W + s * B @ A``; zero rows finite; bad input; ``torch.compile``.

CPU: the torch path, fp64 against the fp64 oracle (1e-10), fp32 (1e-5).
"""
import pytest
import torch
from torch import nn

import python_ref
from lowrank_kernels import NF4Weight, policy
from lowrank_kernels.autograd import draw_seed, dropout_keep
from lowrank_kernels.dora import dora_linear, dora_weight_norm
from tests.conftest import DEVICE
from tests.test_lora_forward import rel_err

SHAPES = [(5, 24, 40, 1), (7, 24, 40, 8), (3, 72, 96, 16), (4, 72, 96, 64)]  # M, N, K, r
SEED = 99


def dense_oracle(weight):
    """The base weight as the oracle sees it, fp64: dense as given, NF4 dequantized."""
    if isinstance(weight, NF4Weight):
        absmax = weight.absmax if not weight.nested else python_ref.dequantize_absmax(
            weight.absmax, weight.absmax2, weight.code2, weight.offset, weight.nested_blocksize)
        return python_ref.dequantize_nf4(weight.packed, absmax, weight.shape, weight.blocksize, torch.float64)
    return weight.detach().double()


def make(M, N, K, r, dtype, nf4, bias=True, leading=()):
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    weight = NF4Weight.quantize(W) if nf4 else W.to(dtype)
    x = torch.randn(*leading, M, K, device=DEVICE).to(dtype).requires_grad_()
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, device=DEVICE) * 0.1).to(dtype).requires_grad_()
    m = (dense_oracle(weight).norm(dim=1) * (1 + 0.1 * torch.randn(N, device=DEVICE, dtype=torch.float64))
         ).to(dtype).requires_grad_()
    b = torch.randn(N, device=DEVICE).to(dtype).requires_grad_() if bias else None
    return x, weight, A, B, m, b


def run(fn, x, weight, A, B, m, b, s, p, **kw):
    """Output and gradients (x, A, B, m, bias) of ``fn`` under RNG seed SEED, for one fixed random dY."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)] + \
        ([b.detach().clone().requires_grad_()] if b is not None else [None])
    torch.manual_seed(SEED)
    y = fn(leaves[0], weight, leaves[1], leaves[2], leaves[3], s, leaves[4], p, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves if t is not None]


def ours(x, weight, A, B, m, s, b, p, **kw):
    return dora_linear(x, weight, A, B, m, s, b, dropout=p, **kw)


def oracle(x, weight, A, B, m, s, b, p):
    """The fp64 oracle with the mask our call draws under the same seed."""
    mask = None
    if p:
        torch.manual_seed(SEED)
        mask = dropout_keep(x.shape, p, draw_seed(x)).double() / (1 - p)
    y = python_ref.dora_forward(x.double(), dense_oracle(weight), A.double(), B.double(), m.double(), s,
                                None if b is None else b.double(), mask)
    return y


@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_fp64_matches_oracle(M, N, K, r, nf4, p, bias):
    x, weight, A, B, m, b = make(M, N, K, r, torch.float64, nf4, bias, leading=(2,))
    y, grads = run(ours, x, weight, A, B, m, b, 1.7, p, backend="torch")  # fp64: the torch backend only
    y_ref, grads_ref = run(oracle, x, weight, A, B, m, b, 1.7, p)
    assert y.dtype == torch.float64 and rel_err(y, y_ref) <= 1e-10
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= 1e-10


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapters_and_activations(nf4, p):
    x, weight, A, B, m, b = make(6, 72, 96, 16, torch.float32, nf4)
    y, grads = run(ours, x, weight, A, B, m, b, 2.0, p)
    y_ref, grads_ref = run(oracle, x, weight, A, B, m, b, 2.0, p)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32 and rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bf16_activations_fp32_adapters(nf4, p):
    """peft's usual dtypes: bf16 activations (and dense weight), fp32 adapters and magnitude; 1e-2 of the fp64 oracle
    and each gradient in its parameter's dtype."""
    x, weight, A, B, m, b = make(6, 72, 96, 16, torch.float32, nf4)
    x = x.detach().to(torch.bfloat16)
    weight = weight if nf4 else weight.to(torch.bfloat16)
    y, grads = run(ours, x, weight, A, B, m, b, 2.0, p)
    y_ref, grads_ref = run(oracle, x, weight, A, B, m, b, 2.0, p)
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) <= 1e-2
    for g, g_ref, t in zip(grads, grads_ref, (x, A, B, m, b)):
        assert g.dtype == t.dtype and rel_err(g, g_ref) <= 1e-2


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_norm_without_forming_the_sum(nf4):
    _, weight, A, B, _, _ = make(3, 72, 96, 8, torch.float64, nf4)
    W = dense_oracle(weight)
    expect = python_ref.dora_weight_norm(W, A.double(), B.double(), 1.3)
    got = dora_weight_norm(weight, A, B, 1.3)
    assert not got.requires_grad and rel_err(got, expect) <= 1e-12


def test_norm_is_reused_until_an_input_changes(monkeypatch):
    """Decode and evaluation call a layer many times with the same parameters: the norm is computed once; an
    optimizer-style in-place update of an adapter (or another scaling) recomputes it, with the new value."""
    from lowrank_kernels import dora

    _, weight, A, B, m, _ = make(3, 24, 40, 4, torch.float32, True)
    calls = []
    real = dora._weight_norm
    monkeypatch.setattr(dora, "_weight_norm", lambda *a: calls.append(1) or real(*a))
    first = dora_weight_norm(weight, A, B, 2.0)
    assert dora_weight_norm(weight, A, B, 2.0) is first and len(calls) == 1
    with torch.no_grad():
        B.add_(0.5)
    updated = dora_weight_norm(weight, A, B, 2.0)
    assert len(calls) == 2 and not torch.equal(updated, first)
    assert rel_err(updated, python_ref.dora_weight_norm(dense_oracle(weight), A.double(), B.double(), 2.0)) <= 1e-6
    dora_weight_norm(weight, A, B, 3.0)
    assert len(calls) == 3
    torch.autograd.graph.increment_version(A)  # what bench/test_dora.py does per fwd+bwd call: a new norm
    dora_weight_norm(weight, A, B, 3.0)
    assert len(calls) == 4


def test_zero_rows_are_finite_and_inert():
    """A zero row of W with B's row zero and m initialized from it (0): peft gives NaN there; ours gives the bias,
    no NaN anywhere, and no gradient for that row's magnitude."""
    x, W, A, B, m, b = make(5, 24, 40, 8, torch.float32, False)
    with torch.no_grad():
        W[3] = 0
        B[3] = 0
        m[3] = 0
    y, (dx, dA, dB, dm, db) = run(ours, x, W, A, B, m, b, 2.0, 0.0)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in (dx, dA, dB, dm, db))
    assert torch.equal(y[:, 3], b.detach()[3].expand(5)) and dm[3] == 0 and dB[3].abs().max() == 0
    y_peft_like = python_ref.dora_forward(x.double(), W.double(), A.double(), B.double(), m.double(), 2.0, b.double())
    assert torch.isnan(y_peft_like[:, 3]).all()


def test_matches_peft_dora_layer():
    """peft's own DoRA layer (fp32, no dropout), converted by nothing: the same parameters through dora_linear."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(40, 24)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    x = torch.randn(3, 5, 40)
    y_peft = model(x)
    base = layer.get_base_layer()
    y = dora_linear(x, base.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                    layer.lora_magnitude_vector["default"].weight, layer.scaling["default"], base.bias)
    assert rel_err(y, y_peft) <= 1e-5


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_autocast_computes_in_autocast_dtype(p):
    """fp32 inputs under autocast: the output in the autocast dtype, every gradient in its tensor's dtype, values
    within that dtype's tolerance of the fp64 oracle drawn with the same mask."""
    x, weight, A, B, m, b = make(6, 72, 96, 16, torch.float32, True)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16

    def autocast_ours(*args):
        with torch.autocast(DEVICE, dtype=dtype):
            return ours(*args)

    y, grads = run(autocast_ours, x, weight, A, B, m, b, 2.0, p)
    y_ref, grads_ref = run(oracle, x, weight, A, B, m, b, 2.0, p)
    assert y.dtype == dtype and rel_err(y, y_ref) <= 2e-2
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32 and rel_err(g, g_ref) <= 2e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_keeps_no_dequantized_weight(backend):
    """With dropout the base weight enters two products (``x - Xd`` and the LoRA layer's on ``Xd``); neither keeps
    the ``[N, K]`` dequantized NF4 weight for backward (peft keeps it: bf16, a quarter of the layer's NF4 bytes x 4),
    and the backward still gives x its gradient."""
    if backend == "triton" and not policy.interpreting() and DEVICE == "cpu":
        pytest.skip("the Triton backend needs CUDA or Triton's interpreter")
    N, K = 24, 40
    x, weight, A, B, m, b = make(7, N, K, 4, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = dora_linear(x, weight, A, B, m, 1.5, b, dropout=0.3, backend=backend)
    assert saved and (N, K) not in saved and (K, N) not in saved
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compiles_fullgraph_with_dropout():
    x, weight, A, B, m, b = make(6, 24, 40, 4, torch.float32, True)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    y0, g0 = run(ours, x, weight, A, B, m, b, 2.0, 0.2)
    y1, g1 = run(compiled, x, weight, A, B, m, b, 2.0, 0.2)
    assert rel_err(y1, y0) <= 1e-6
    for a, c in zip(g0, g1):
        assert rel_err(c, a) <= 1e-6


@pytest.mark.parametrize("change,exc,name", [
    (dict(magnitude=torch.ones(23)), ValueError, "magnitude"),
    (dict(magnitude=torch.ones(24, dtype=torch.int64)), ValueError, "magnitude"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(lora_B=torch.randn(23, 4)), ValueError, "lora_B"),
    (dict(dropout=1.0), ValueError, "dropout"),
])
def test_bad_input(change, exc, name):
    x, weight, A, B, m, b = make(3, 24, 40, 4, torch.float32, True)
    kw = dict(x=x, weight=weight, lora_A=A, lora_B=B, magnitude=m, scaling=1.0, bias=b)
    kw.update(change)
    with pytest.raises(exc, match=name):
        dora_linear(**kw)


# ------------------------------------------------------------------------------------------------ peft convert
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "bnb-nf4"])
def test_peft_dora_layers_convert_and_match_peft(quantized, tmp_path):
    """peft DoRA layers (dense and bitsandbytes 4-bit bases) are converted and compute what peft computes (outputs,
    gradients of x and of every adapter parameter, magnitudes included); ``save_pretrained`` writes peft's files."""
    peft = pytest.importorskip("peft")
    import copy

    from lowrank_kernels import peft as lk_peft
    from tests.test_peft_convert import Tiny, outputs_and_grads, quantized_tiny

    if quantized:
        pytest.importorskip("bitsandbytes")
        base = quantized_tiny()
    else:
        base = Tiny().to(DEVICE)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, use_dora=True,
                                                      target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    x = torch.randn(3, 5, 40, device=DEVICE)
    y0, dx0, g0 = outputs_and_grads(model, x)
    y1, dx1, g1 = outputs_and_grads(ours, x)
    assert rel_err(y1, y0) <= 1e-5 and rel_err(dx1, dx0) <= 1e-5
    adapters = [k for k in g0 if "lora_" in k]
    assert len(adapters) == 6 and sum("magnitude" in k for k in adapters) == 2
    for k in adapters:
        assert g1[k].dtype == g0[k].dtype and rel_err(g1[k], g0[k]) <= 1e-5, k
    model.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_dora_pair(peft, **config):
    """(peft DoRA model on tests' ``Tiny``, r = 4 on up / down, lora_B random; its converted deep copy)."""
    import copy

    from lowrank_kernels import peft as lk_peft
    from tests.test_peft_convert import Tiny

    model = peft.get_peft_model(Tiny().to(DEVICE), peft.LoraConfig(r=4, use_dora=True, target_modules=["up", "down"],
                                                                   **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    return model, ours


def test_converted_dora_with_dropout_runs_ours():
    """With dropout our masks differ from peft's: the converted layer draws its own (new ones each step), and in
    eval mode (no dropout) equals peft again."""
    peft = pytest.importorskip("peft")
    model, ours = tiny_dora_pair(peft, lora_dropout=0.5)
    x = torch.randn(6, 40, device=DEVICE)
    a, b = ours(x), ours(x)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    model.eval(), ours.eval()
    assert rel_err(ours(x), model(x)) <= 1e-5


def test_converted_dora_merges_as_peft():
    """peft's merge / unmerge / merge_and_unload on converted DoRA layers: the merged model computes what the
    adapter model computed (peft's own merge; our forward steps aside while merged)."""
    peft = pytest.importorskip("peft")
    import copy

    model, ours = tiny_dora_pair(peft)
    x = torch.randn(5, 40, device=DEVICE)
    with torch.no_grad():
        before = ours(x)
        ours.merge_adapter()
        assert rel_err(ours(x), before) <= 1e-5
        ours.unmerge_adapter()
        assert rel_err(ours(x), before) <= 1e-5
        merged = copy.deepcopy(ours).merge_and_unload()
        assert rel_err(merged(x), before) <= 1e-5 and rel_err(merged(x), model.merge_and_unload()(x)) <= 1e-6


# ------------------------------------------------------------------------------------------------ our layers
@pytest.mark.parametrize("quantized", [False, True], ids=["LoraLinear", "QLoraLinear"])
def test_our_layers_with_use_dora(quantized):
    """``use_dora=True`` on our layers: the magnitude starts at the base rows' norms (the layer then equals its base
    layer), is a saved Parameter, and the forward / gradients are the oracle's; merging is refused clearly."""
    from lowrank_kernels import LoraLinear, QLoraLinear

    linear = torch.nn.Linear(40, 24).to(DEVICE)
    cls = QLoraLinear if quantized else LoraLinear
    layer = cls.from_linear(linear, r=4, lora_alpha=8, use_dora=True)
    W = dense_oracle(layer.weight)
    m = layer.lora_magnitude_vector
    assert m.requires_grad and m.dtype == torch.float32 and "lora_magnitude_vector" in layer.state_dict()
    assert rel_err(m.detach(), W.norm(dim=1)) <= 1e-6
    x = torch.randn(3, 5, 40, device=DEVICE)
    assert rel_err(layer(x), torch.nn.functional.linear(x.double(), W, linear.bias.double())) <= 1e-5
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        m.mul_(1.1)
    y = layer(x)
    y.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (layer.lora_A.weight, layer.lora_B.weight, m)]
    ref = python_ref.dora_forward(x.double(), W, *leaves, layer.scaling, linear.bias.double())
    ref.square().sum().backward()
    assert rel_err(y, ref) <= 1e-5
    for p, r in zip((layer.lora_A.weight, layer.lora_B.weight, m), leaves):
        assert rel_err(p.grad, r.grad) <= 1e-4
    assert "use_dora=True" in repr(layer)
    with pytest.raises(NotImplementedError, match="DoRA"):
        layer.merge()
