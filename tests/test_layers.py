"""LoraLinear / QLoraLinear: peft semantics (scaling, init, dropout only in training), constructors, merge,
state_dict keys and round trips, device moves, errors."""
import math

import pytest
import torch
from torch import nn

from lowrank_kernels import LoraLinear, NF4Weight, QLoraLinear
from tests.conftest import DEVICE, needs_bnb
from tests.test_lora_forward import oracle_nf4_weight, rel_err


def randomize_B(layer):
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def expected(layer, x, W):
    """fp64 ``x W^T + b + s B A x`` for ``layer`` (dropout off)."""
    x64 = x.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    y = x64 @ W.double().t() + layer.scaling * (x64 @ A.t()) @ B.t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_matches_formula_and_peft_scaling(use_rslora):
    layer = randomize_B(LoraLinear(40, 24, r=4, lora_alpha=16, use_rslora=use_rslora, device=DEVICE))
    assert layer.scaling == (16 / math.sqrt(4) if use_rslora else 16 / 4)
    x = torch.randn(2, 7, 40, device=DEVICE)
    assert rel_err(layer(x), expected(layer, x, layer.weight)) <= 1e-5


def test_init_like_peft():
    torch.manual_seed(0)
    layer = LoraLinear(64, 32, r=8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    g = LoraLinear(64, 32, r=8, init_lora_weights="gaussian")
    assert abs(g.lora_A.weight.std().item() - 1 / 8) < 0.03 and torch.count_nonzero(g.lora_B.weight) == 0
    assert torch.count_nonzero(LoraLinear(64, 32, r=8, init_lora_weights=False).lora_B.weight) > 0
    assert layer.lora_A.weight.dtype == torch.float32  # peft keeps adapters in fp32
    assert not layer.weight.requires_grad and layer.lora_A.weight.requires_grad


def test_dropout_only_in_training():
    layer = randomize_B(LoraLinear(32, 16, r=4, lora_dropout=0.5, device=DEVICE))
    x = torch.randn(6, 32, device=DEVICE)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_lora_from_linear_shares_parameters_and_merges():
    lin = nn.Linear(48, 20).to(DEVICE)
    layer = randomize_B(LoraLinear.from_linear(lin, r=4, lora_alpha=8))
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(5, 48, device=DEVICE)
    y = layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer(x), y, atol=1e-5)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_lora_state_dict_keys_and_round_trip():
    layer = randomize_B(LoraLinear(16, 8, r=2))
    sd = layer.state_dict()
    assert sorted(sd) == ["bias", "lora_A.weight", "lora_B.weight", "weight"]
    other = LoraLinear(16, 8, r=2)
    other.load_state_dict(sd)
    x = torch.randn(3, 16)
    assert torch.equal(other(x), layer(x))


def test_qlora_from_linear_forward_backward():
    lin = nn.Linear(96, 40).to(DEVICE)
    layer = randomize_B(QLoraLinear.from_linear(lin, r=8, lora_alpha=16))
    x = torch.randn(9, 96, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert rel_err(y, expected(layer, x.detach(), oracle_nf4_weight(layer.nf4))) <= 1e-5
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert layer.bias.grad is None  # the base bias is frozen, as in peft


def test_qlora_merged_linear_and_lossy_merge():
    layer = randomize_B(QLoraLinear.from_linear(nn.Linear(64, 32).to(DEVICE), r=4, lora_alpha=4))
    x = torch.randn(5, 64, device=DEVICE)
    y = layer(x)
    dense = layer.merged_linear(torch.float32)
    assert isinstance(dense, nn.Linear) and torch.allclose(dense(x), y, atol=1e-4)
    requant = NF4Weight.quantize(dense.weight.detach().to(layer.nf4.dtype), blocksize=layer.nf4.blocksize)
    with pytest.warns(UserWarning, match="lossy"):
        layer.merge()
    assert layer.merged and torch.equal(layer.nf4.packed, requant.packed)  # NF4 of deq(W) + delta
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, requant.dequantize(torch.float32), layer.bias))
    with pytest.warns(UserWarning, match="lossy"):
        layer.unmerge()


def test_qlora_state_dict_round_trip_and_keys():
    layer = randomize_B(QLoraLinear.from_linear(nn.Linear(64, 32), r=4))
    sd = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A.weight", "lora_B.weight"} == set(sd)
    other = QLoraLinear.from_linear(nn.Linear(64, 32), r=4)
    other.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(RuntimeError, match="shape"):
        QLoraLinear.from_linear(nn.Linear(32, 32), r=4).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="weight"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "weight"})


@needs_bnb
def test_qlora_state_dict_matches_bitsandbytes_linear4bit():
    import bitsandbytes as bnb

    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to(DEVICE)
    ours = QLoraLinear.from_bnb(q, r=4)
    assert ours.nf4.packed.data_ptr() == q.weight.data_ptr()  # storage shared
    theirs, mine = q.state_dict(), ours.state_dict()
    for key, value in theirs.items():
        assert torch.equal(value.cpu(), mine[key].cpu()), key


def test_qlora_moves_with_module():
    layer = QLoraLinear.from_linear(nn.Linear(64, 32), r=4)
    moved = layer.to(DEVICE)
    assert moved.nf4.device.type == DEVICE and moved.lora_A.weight.device.type == DEVICE
    if DEVICE == "cuda":
        assert layer.cpu().nf4.device.type == "cpu"
    layer.to(torch.float64)  # dtype casts leave the NF4 weight alone
    assert layer.nf4.packed.dtype == torch.uint8 and layer.lora_A.weight.dtype == torch.float64


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(r=0), ValueError, "r"),
    (dict(r=2.0), ValueError, "r"),
    (dict(lora_alpha="8"), TypeError, "lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights"),
])
def test_layer_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        LoraLinear(16, 8, **kwargs)


def test_qlora_bad_arguments():
    with pytest.raises(TypeError, match="weight"):
        QLoraLinear(torch.randn(8, 16))
    with pytest.raises(ValueError, match="bias"):
        QLoraLinear(NF4Weight.quantize(torch.randn(8, 16), blocksize=32), bias=torch.randn(7))
    with pytest.raises(TypeError, match="linear"):
        QLoraLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="linear4bit"):
        QLoraLinear.from_bnb(nn.Linear(4, 4))
