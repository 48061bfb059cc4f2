"""AdaLoRA: packed rank masks, ``AdaLoraLinear`` (dense / NF4 base) against the fp64 oracle
``python_ref.adalora_forward``, and peft's AdaLoRA layers converted by ``lowrank_kernels.peft``."""
import copy
import json

import pytest
import torch
from torch import nn

import python_ref
from lowrank_kernels import AdaLoraLinear, NF4Weight, adalora_linear, pack_mask, unpack_mask
from lowrank_kernels.rank_allocator import RankAllocator
from tests.conftest import DEVICE, needs_bnb
from tests.test_lora_forward import rel_err

N, K, R = 24, 40, 6


def close(a, b):
    """Equal up to reduction-order noise (GPU split reductions need not be bitwise deterministic)."""
    return torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def random_mask(r, kind, device=DEVICE):
    """``"all"`` / ``"none"`` / ``"random"`` (at least one rank kept and one pruned)."""
    if kind == "all":
        return torch.ones(r, dtype=torch.bool, device=device)
    if kind == "none":
        return torch.zeros(r, dtype=torch.bool, device=device)
    mask = torch.rand(r, device=device) < 0.5
    mask[0], mask[-1] = True, False
    return mask[torch.randperm(r, device=device)]


def make_layer(dtype=torch.float32, lora_dtype=torch.float32, device=DEVICE, bias=True, quantize=False, r=R,
               lora_alpha=12):
    """An AdaLoraLinear with random (nonzero) A, E, B and a trainable bias (so that it gets a gradient)."""
    lin = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
    layer = AdaLoraLinear.from_linear(lin, init_r=r, lora_alpha=lora_alpha, lora_dtype=lora_dtype, quantize=quantize)
    with torch.no_grad():
        layer.lora_A.normal_(std=K**-0.5)
        layer.lora_E.normal_()
        layer.lora_B.normal_()
    if bias:
        layer.bias.requires_grad_(True)
    return layer


def base_weight_f64(layer):
    w = layer.weight
    return (w.dequantize(torch.float32) if isinstance(w, NF4Weight) else w.detach()).double()


def run_and_compare(layer, x, mask, tol):
    """Forward + backward of ``layer`` and of the fp64 oracle; returns ``layer``'s gradients."""
    layer.zero_grad(set_to_none=True)
    leaves = {n: getattr(layer, n).detach().double().requires_grad_() for n in ("lora_A", "lora_E", "lora_B")}
    b = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    x0 = x.detach().double().requires_grad_()
    y_ref = python_ref.adalora_forward(x0, base_weight_f64(layer), leaves["lora_A"], leaves["lora_E"],
                                       leaves["lora_B"], layer.scaling, layer.r, b, mask)
    x1 = x.detach().clone().requires_grad_()
    y = layer(x1)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= tol
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y.backward(dy.to(y.dtype))
    assert rel_err(x1.grad, x0.grad) <= tol
    if b is not None:
        assert layer.bias.grad.dtype == layer.bias.dtype and rel_err(layer.bias.grad, b.grad) <= tol
    keep = torch.ones(layer.r, dtype=torch.bool) if mask is None else mask.cpu()
    grads = {n: getattr(layer, n).grad for n in leaves}
    for n, g in grads.items():
        assert g is not None and g.dtype == getattr(layer, n).dtype, n
        ref = leaves[n].grad
        if keep.any():
            assert rel_err(g, ref) <= tol, n
    # pruned triplets: exactly zero gradient
    assert torch.all(grads["lora_A"][~keep] == 0) and torch.all(grads["lora_E"][~keep] == 0)
    assert torch.all(grads["lora_B"][:, ~keep] == 0)
    return grads


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("r", [1, 31, 32, 33, 64, 100])
def test_pack_unpack_round_trip(r):
    for mask in (torch.rand(r) < 0.5, torch.ones(r, dtype=torch.bool), torch.zeros(r, dtype=torch.bool)):
        words = pack_mask(mask)
        assert words.dtype == torch.int32 and words.shape == (-(-r // 32),)
        # independent layout check: rank i is bit i % 32 of word i // 32, words as signed int32
        expected = [0] * words.shape[0]
        for i in mask.nonzero().flatten().tolist():
            expected[i // 32] |= 1 << (i % 32)
        assert words.tolist() == [w - (1 << 32) if w >= 1 << 31 else w for w in expected]
        assert torch.equal(unpack_mask(words, r), mask)


def test_pack_errors():
    with pytest.raises(TypeError, match="mask"):
        pack_mask(torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        pack_mask(torch.ones(2, 3, 4, dtype=torch.bool))
    rows = torch.rand(3, 40) > 0.5  # a 2-D mask packs row by row
    assert torch.equal(pack_mask(rows), torch.stack([pack_mask(row) for row in rows]))
    with pytest.raises(ValueError, match="words"):
        unpack_mask(torch.zeros(2, dtype=torch.int32), 32)
    with pytest.raises(TypeError, match="words"):
        unpack_mask(torch.zeros(1, dtype=torch.int64), 5)


# ------------------------------------------------------------------------------------------------ layer
def test_init_as_peft():
    lin = nn.Linear(128, 96)
    layer = AdaLoraLinear.from_linear(lin, init_r=16, lora_alpha=32)
    assert layer.weight is lin.weight and layer.bias is lin.bias and not lin.weight.requires_grad
    assert torch.all(layer.lora_E == 0) and layer.lora_E.shape == (16, 1)
    assert layer.lora_A.shape == (16, 128) and layer.lora_B.shape == (96, 16)
    for p in (layer.lora_A, layer.lora_B):
        assert p.dtype == torch.float32 and p.requires_grad and 0.017 < p.std().item() < 0.023
    assert layer.ranknum.tolist() == [16.0] and layer.scaling == 32
    assert AdaLoraLinear.from_linear(lin, init_r=5, lora_alpha=0).scaling == 5.0  # peft: r if alpha <= 0
    assert [n for n, _ in layer.named_parameters() if _.requires_grad] == ["lora_A", "lora_E", "lora_B"]
    assert layer.active_r == 16 and torch.all(layer.rank_mask)


@pytest.mark.parametrize("kind", ["all", "random", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_fp64_matches_oracle(kind, bias):
    layer = make_layer(torch.float64, torch.float64, device="cpu", bias=bias)  # fp64: torch backend, CPU
    mask = None if kind == "all" else random_mask(R, kind, "cpu")
    if mask is not None:
        layer.set_rank_mask(mask)
    run_and_compare(layer, torch.randn(3, 5, K, dtype=torch.float64), mask, 1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 3e-3)])
@pytest.mark.parametrize("kind", ["all", "random", "none"])
def test_default_path_matches_oracle(dtype, tol, kind):
    layer = make_layer(dtype)
    mask = random_mask(R, kind)
    layer.set_rank_mask(mask)
    run_and_compare(layer, torch.randn(7, K, device=DEVICE, dtype=dtype), mask, tol)


@pytest.mark.parametrize("kind", ["all", "random", "none"])
def test_nf4_base_matches_oracle(kind):
    layer = make_layer(quantize=True)
    assert isinstance(layer.weight, NF4Weight)
    mask = random_mask(R, kind)
    layer.set_rank_mask(mask)
    run_and_compare(layer, torch.randn(2, 9, K, device=DEVICE), mask, 1e-4)


def test_pruned_ranks_are_not_computed():
    """NaN in the pruned triplets does not reach the output nor the gradients (peft would compute NaN * 0)."""
    layer = make_layer()
    mask = random_mask(R, "random")
    layer.set_rank_mask(mask)
    assert layer.active_r == int(mask.sum()) and torch.equal(layer.rank_mask, mask)
    clean = copy.deepcopy(layer)
    with torch.no_grad():
        layer.lora_A[~mask] = float("nan")
        layer.lora_B[:, ~mask] = float("nan")
        layer.lora_E[~mask] = float("nan")
    x = torch.randn(5, K, device=DEVICE)
    dy = torch.randn(5, N, device=DEVICE)
    for m in (layer, clean):
        m(x).backward(dy)
    assert close(layer(x), clean(x))
    for n in ("lora_A", "lora_E", "lora_B"):
        assert close(getattr(layer, n).grad, getattr(clean, n).grad), n
    run_and_compare(clean, x, mask, 1e-4)  # and the clean layer matches the oracle


def test_zero_active_ranks_is_the_base_layer():
    lin = nn.Linear(K, N, device=DEVICE)
    layer = AdaLoraLinear.from_linear(lin, init_r=R)
    layer.set_rank_mask(torch.zeros(R, dtype=torch.bool, device=DEVICE))
    x = torch.randn(4, K, device=DEVICE)
    assert torch.allclose(layer(x), lin(x), atol=1e-6, rtol=0)
    with torch.no_grad():  # inference: nothing attached
        assert layer(x).grad_fn is None
    layer.lora_A.requires_grad_(False), layer.lora_E.requires_grad_(False), layer.lora_B.requires_grad_(False)
    assert layer(x).grad_fn is None  # nothing needs a gradient


def test_zero_active_ranks_on_nf4_keeps_no_dequantized_weight():
    """An NF4 layer with no active rank is the base product alone: ``x`` gets ``dY @ W`` and no ``[N, K]``
    dequantized copy of the weight is kept for backward (bitsandbytes' layer keeps none either)."""
    layer = make_layer(quantize=True)
    layer.set_rank_mask(torch.zeros(R, dtype=torch.bool, device=DEVICE))
    W = layer.weight.dequantize(torch.float32)
    x = torch.randn(3, 5, K, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (N, K) not in saved and (K, N) not in saved
    dy = torch.randn_like(y)
    y.backward(dy)
    assert rel_err(y, x.detach() @ W.T + layer.bias) <= 1e-6 and rel_err(x.grad, dy @ W) <= 1e-6
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))


def test_dropout_train_only():
    layer = make_layer()
    layer.lora_dropout = 0.5
    x = torch.randn(16, K, device=DEVICE)
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    ref = python_ref.adalora_forward(x.double(), base_weight_f64(layer), layer.lora_A.double(),
                                     layer.lora_E.double(), layer.lora_B.double(), layer.scaling, R,
                                     layer.bias.double())
    assert rel_err(layer(x), ref) <= 1e-5


def test_delta_weight():
    layer = make_layer(bias=False)
    mask = random_mask(R, "random")
    layer.set_rank_mask(mask)
    x = torch.randn(3, K, device=DEVICE)
    expected = layer(x) - x @ layer.weight.T
    assert rel_err(x @ layer.delta_weight().T, expected.double()) <= 1e-5


@pytest.mark.parametrize("quantize", [False, True])
def test_state_dict_round_trip_keeps_the_mask(quantize):
    layer = make_layer(quantize=quantize)
    mask = random_mask(R, "random")
    layer.set_rank_mask(mask)
    sd = layer.state_dict()
    assert torch.equal(sd["rank_mask_words"], pack_mask(mask.cpu()).to(DEVICE)) and "active_idx" not in sd
    assert ("weight.absmax" in sd) == quantize
    fresh = make_layer(quantize=quantize)
    assert fresh.active_r == R
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.rank_mask, mask) and fresh.active_r == int(mask.sum())
    x = torch.randn(4, K, device=DEVICE)
    assert close(fresh(x), layer(x))


def test_rank_allocator_drives_our_layers():
    """RankAllocator finds AdaLoraLinear layers by their plain Parameters and installs masks through the hook."""
    model = nn.Sequential(make_layer(), nn.ReLU(), AdaLoraLinear.from_linear(nn.Linear(N, K, device=DEVICE), init_r=R))
    alloc = RankAllocator(model, R, 2, tinit=1, tfinal=2, deltaT=1, total_step=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(16, K, device=DEVICE)
    for step in range(8):
        model(x).square().mean().backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
    pattern = alloc.rank_pattern
    for i in (0, 2):
        mask = torch.tensor(pattern[f"{i}.lora_E"], device=DEVICE)
        assert torch.equal(model[i].rank_mask, mask) and model[i].active_r == int(mask.sum())
        assert torch.all(model[i].lora_E[~mask] == 0)
    assert sum(sum(v) for v in pattern.values()) == 2 * 2 and model[0].active_r + model[2].active_r == 4


def test_errors():
    lin = nn.Linear(K, N)
    for bad in (0, -1, 2.5, True, "6"):
        with pytest.raises(ValueError, match="init_r"):
            AdaLoraLinear.from_linear(lin, init_r=bad)
    with pytest.raises(TypeError, match="weight"):
        AdaLoraLinear(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="linear"):
        AdaLoraLinear.from_linear(torch.zeros(3, 4))
    layer = AdaLoraLinear.from_linear(lin, init_r=R)
    with pytest.raises(ValueError, match="mask"):
        layer.set_rank_mask(torch.ones(R + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        layer.set_rank_mask(torch.ones(R, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask"):
        layer.set_rank_mask([True] * R)
    with pytest.raises(ValueError, match="lora_E"):
        adalora_linear(torch.randn(2, K), lin.weight, layer.lora_A, layer.lora_E.view(-1), layer.lora_B, 1.0)


# ------------------------------------------------------------------------------------------------ peft
peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, PeftModel, get_peft_model  # noqa: E402

from lowrank_kernels import peft as lk_peft  # noqa: E402
from tests.test_peft_convert import Tiny, outputs_and_grads, quantized_tiny, runs_our_function  # noqa: E402


def ada_pair(base, **config):
    """(peft AdaLoRA model, converted deep copy) with random nonzero E (peft inits E = 0)."""
    cfg = {"init_r": R, "target_r": 3, "total_step": 20, "target_modules": ["up", "down"], **config}
    model = get_peft_model(base, AdaLoraConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    model = model.to(DEVICE)
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    return model, ours


def assert_same_as_peft(model, ours, x, tol=1e-4):
    up = ours.base_model.model.up
    assert runs_our_function(up(torch.randn(2, K, device=DEVICE)))
    y0, dx0, g0 = outputs_and_grads(model, x)
    y1, dx1, g1 = outputs_and_grads(ours, x)
    assert rel_err(y1, y0.double()) <= tol and rel_err(dx1, dx0.double()) <= tol
    # the adapters' gradients (peft's 4-bit layer on CUDA also lets its ranknum Parameter collect one)
    g0, g1 = ({k: v for k, v in g.items() if ".lora_" in k} for g in (g0, g1))
    assert g0.keys() == g1.keys() and len(g0) == 6  # A, E, B of two layers
    for name in g0:
        assert g1[name].dtype == g0[name].dtype and rel_err(g1[name], g0[name].double()) <= tol, name


def test_peft_dense_adalora_matches_peft():
    model, ours = ada_pair(Tiny())
    assert type(ours.base_model.model.up).__name__ == "PeftAdaLoraLinear"
    assert_same_as_peft(model, ours, torch.randn(3, 5, K, device=DEVICE))


@needs_bnb
def test_peft_adalora_4bit_matches_peft():
    model, ours = ada_pair(quantized_tiny())
    assert type(ours.base_model.model.up).__name__ == "PeftAdaLoraLinear4bit"
    assert_same_as_peft(model, ours, torch.randn(7, K, device=DEVICE))


def test_peft_same_parameters_save_pretrained_and_revert(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model, ours = ada_pair(Tiny())
    before = [id(p) for p in ours.parameters()]
    converted_copy = copy.deepcopy(ours)
    assert lk_peft.convert(converted_copy) == 0  # already converted: nothing left to do
    model.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    a = safetensors.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = safetensors.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 6 and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    for c in configs:
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]
    ours.base_model.model.up.set_rank_mask(random_mask(R, "random"))
    assert lk_peft.revert(ours) == 2 and [id(p) for p in ours.parameters()] == before
    assert type(ours.base_model.model.up) is type(model.base_model.model.up)
    assert "_lowrank_rank_masks" not in ours.base_model.model.up.__dict__
    x = torch.randn(4, K, device=DEVICE)
    assert torch.equal(ours(x), model(x))


def test_peft_disabled_adapters_fall_back_to_peft():
    model, ours = ada_pair(Tiny())
    x = torch.randn(4, K, device=DEVICE)
    with ours.disable_adapter():
        y = ours(x)
    with model.disable_adapter():
        assert torch.equal(y, model(x))


def test_peft_set_rank_mask_errors():
    _, ours = ada_pair(Tiny())
    up = ours.base_model.model.up
    with pytest.raises(ValueError, match="mask"):
        up.set_rank_mask(torch.ones(R - 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        up.set_rank_mask(torch.ones(R))
    with pytest.raises(ValueError, match="adapter_name"):
        up.set_rank_mask(torch.ones(R, dtype=torch.bool), adapter_name="other")


def test_rank_allocator_drives_converted_model():
    """Real gradients from the converted model; the allocator installs masks; after masking, pruned triplets get
    zero gradient and the output equals peft's on the same parameters with the pruned E zeroed."""
    tinit, tfinal, deltaT, total = 1, 2, 1, 8
    _, ours = ada_pair(Tiny(), tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=total)
    alloc = RankAllocator(ours, R, 3, tinit, tfinal, deltaT, total_step=total)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, K, device=DEVICE)
    for step in range(total):
        ours(x).square().mean().backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
    layers = {n: getattr(ours.base_model.model, n) for n in ("up", "down")}
    pattern = alloc.rank_pattern
    masks = {}
    for n, layer in layers.items():
        A, idx = layer._lowrank_rank_masks["default"]
        assert A is layer.lora_A["default"]
        masks[n] = torch.zeros(R, dtype=torch.bool, device=DEVICE).index_fill_(0, idx, True)
        assert masks[n].tolist() == pattern[f"{n}.lora_E.default"]
    assert sum(int(m.sum()) for m in masks.values()) == 2 * 3  # target budget
    assert ours.peft_config["default"].rank_pattern == pattern
    # The optimizer regrows pruned E entries: ours ignores them, peft computes them.
    with torch.no_grad():
        for n, layer in layers.items():
            layer.lora_E["default"][~masks[n]] = 1.0
    ref = copy.deepcopy(ours)
    lk_peft.revert(ref)
    y_unmasked = ref(x)
    with torch.no_grad():
        for n in layers:
            getattr(ref.base_model.model, n).lora_E["default"][~masks[n]] = 0.0
    y, _, grads = outputs_and_grads(ours, x)
    assert rel_err(y, ref(x).double()) <= 1e-5 and rel_err(y, y_unmasked.double()) > 1e-3
    for n, m in masks.items():
        assert torch.all(grads[f"base_model.model.{n}.lora_A.default"][~m] == 0)
        assert torch.all(grads[f"base_model.model.{n}.lora_E.default"][~m] == 0)
        assert torch.all(grads[f"base_model.model.{n}.lora_B.default"][:, ~m] == 0)
        assert grads[f"base_model.model.{n}.lora_A.default"][m].abs().sum() > 0


@pytest.mark.filterwarnings("ignore:.*invalid shape", "ignore:.*rank_pattern keys did not match")
def test_load_trimmed_rank_pattern_then_convert(tmp_path):
    """peft trims ranks at load (here ``up`` to rank 0, ``down`` to 3); the converted model gives peft's output."""
    base = Tiny()
    base_copy = copy.deepcopy(base)
    model = get_peft_model(base, AdaLoraConfig(init_r=R, target_r=3, total_step=20, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    model.peft_config["default"].rank_pattern = {"up.lora_E.default": [False] * R,
                                                 "down.lora_E.default": [True, False, True, False, False, True]}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_copy, tmp_path).to(DEVICE)
    up, down = loaded.base_model.model.up, loaded.base_model.model.down
    assert up.lora_A["default"].shape == (0, K) and down.lora_A["default"].shape == (3, 72)
    ours = copy.deepcopy(loaded)
    assert lk_peft.convert(ours) == 2
    x = torch.randn(5, K, device=DEVICE)
    assert runs_our_function(ours.base_model.model.down(torch.randn(2, 72, device=DEVICE, requires_grad=True)))
    assert rel_err(ours(x), loaded(x).double()) <= 1e-5
    assert rel_err(loaded(x), model.to(DEVICE)(x).double()) > 1e-3  # the trimming changed the model
