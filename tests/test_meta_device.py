"""Meta device and low-memory loading: ``NF4Weight``, our layers and ``convert`` work on meta tensors (shapes
only), so ``init_empty_weights`` -> convert -> ``to_empty`` / ``load_state_dict(assign=True)`` gives the model a
real checkpoint would; ``.to()`` moves all or nothing."""
import copy

import pytest
import torch
from torch import nn

from lowrank_kernels import AdaLoraLinear, NF4Weight, QLoraLinear, qlora_linear

SHAPE = (72, 40)


def meta_linear(bias=True):
    with torch.device("meta"):
        return nn.Linear(SHAPE[1], SHAPE[0], bias=bias)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_quantize_on_meta_has_the_real_layout(blocksize, double_quant):
    real = NF4Weight.quantize(torch.randn(*SHAPE), blocksize=blocksize, double_quant=double_quant)
    meta = NF4Weight.quantize(torch.empty(*SHAPE, device="meta"), blocksize=blocksize, double_quant=double_quant)
    assert meta.device.type == "meta" and meta.nested == real.nested
    for name, t in real._tensors().items():
        m = getattr(meta, name)
        assert m.is_meta and (m.shape, m.dtype) == (t.shape, t.dtype), name
    assert meta.state_dict().keys() == real.state_dict().keys()
    deq = meta.dequantize(torch.bfloat16)
    assert deq.is_meta and deq.shape == SHAPE and deq.dtype == torch.bfloat16


def test_from_state_dict_onto_meta():
    real = NF4Weight.quantize(torch.randn(*SHAPE))
    meta = NF4Weight.from_state_dict(real.state_dict(), device="meta")
    assert meta.device.type == "meta" and meta.shape == real.shape and meta.nested


def test_meta_blob_cannot_be_read():
    meta = NF4Weight.quantize(torch.empty(*SHAPE, device="meta"))
    with pytest.raises(ValueError, match="bitsandbytes__nf4.*meta device"):
        NF4Weight.from_state_dict(meta.state_dict())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_layers_forward_and_backward_on_meta(dropout):
    layer = QLoraLinear.from_linear(meta_linear(), r=4, lora_dropout=dropout)
    x = torch.randn(3, 5, SHAPE[1], device="meta", requires_grad=True)
    y = layer(x)
    assert y.is_meta and y.shape == (3, 5, SHAPE[0])
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape and layer.lora_A.weight.grad.is_meta
    ada = AdaLoraLinear.from_linear(meta_linear(), init_r=4, quantize=True, lora_dropout=dropout)
    assert ada(x).shape == (3, 5, SHAPE[0])
    w = NF4Weight.quantize(torch.empty(*SHAPE, device="meta"))
    A, B = torch.empty(4, SHAPE[1], device="meta"), torch.empty(SHAPE[0], 4, device="meta")
    assert qlora_linear(x.detach(), w, A, B, 2.0, dropout=dropout).shape == (3, 5, SHAPE[0])


def real_and_meta(cls_kwargs):
    torch.manual_seed(0)
    real = QLoraLinear.from_linear(nn.Linear(SHAPE[1], SHAPE[0]), **cls_kwargs)
    with torch.no_grad():
        real.lora_B.weight.normal_()
    return real, QLoraLinear.from_linear(meta_linear(), **cls_kwargs)


@pytest.mark.parametrize("double_quant", [True, False])
def test_to_empty_then_load_state_dict(double_quant):
    real, meta = real_and_meta(dict(r=4, double_quant=double_quant))
    meta.to_empty(device="cpu")
    assert meta.nf4.device.type == "cpu" and meta.lora_A.weight.device.type == "cpu"
    meta.load_state_dict(real.state_dict())
    x = torch.randn(6, SHAPE[1])
    assert torch.equal(meta(x), real(x))
    for name, t in real.nf4._tensors().items():
        assert torch.equal(getattr(meta.nf4, name), t), name


def test_load_state_dict_assign_into_meta():
    real, meta = real_and_meta(dict(r=4))
    meta.load_state_dict(real.state_dict(), assign=True)
    assert meta.nf4.device.type == "cpu" and not meta.lora_A.weight.is_meta
    x = torch.randn(6, SHAPE[1])
    assert torch.equal(meta(x), real(x))


def test_load_state_dict_without_assign_into_meta_stays_meta():
    real, meta = real_and_meta(dict(r=4))
    meta.load_state_dict(real.state_dict())  # as torch does for meta parameters: a no-op copy
    assert meta.nf4.device.type == "meta" and meta.lora_A.weight.is_meta


def test_adalora_to_empty_then_load():
    torch.manual_seed(1)
    real = AdaLoraLinear.from_linear(nn.Linear(SHAPE[1], SHAPE[0]), init_r=6, quantize=True)
    with torch.no_grad():
        real.lora_E.normal_()
    meta = AdaLoraLinear.from_linear(meta_linear(), init_r=6, quantize=True)
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    x = torch.randn(5, SHAPE[1])
    assert torch.equal(meta(x), real(x))


def test_to_meta_and_back_to_empty():
    real, _ = real_and_meta(dict(r=4))
    moved = copy.deepcopy(real).to("meta")
    assert moved.nf4.device.type == "meta" and moved.lora_A.weight.is_meta
    with pytest.raises(NotImplementedError, match="meta"):
        moved.to("cpu")  # nothing to copy, as for any meta tensor
    assert moved.nf4.device.type == "meta" and moved.lora_A.weight.is_meta  # nothing moved


def test_failed_move_moves_nothing():
    layer, _ = real_and_meta(dict(r=4))

    def fn(t):
        if t.dtype == torch.uint8:
            raise RuntimeError("no room for the NF4 bytes")
        return t.to("meta")

    with pytest.raises(RuntimeError, match="no room"):
        layer._apply(fn)
    assert layer.nf4.device.type == "cpu" and layer.lora_A.weight.device.type == "cpu"


def test_dtype_casts_leave_nf4_bytes():
    layer, _ = real_and_meta(dict(r=4, double_quant=True))
    before = {k: t.clone() for k, t in layer.nf4._tensors().items()}
    layer.half()
    assert layer.lora_A.weight.dtype == torch.float16
    for name, t in before.items():
        assert getattr(layer.nf4, name).dtype == t.dtype and torch.equal(getattr(layer.nf4, name), t), name


def test_peft_init_empty_weights_convert_to_empty_load():
    accelerate = pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from lowrank_kernels import peft as lk_peft
    from tests.test_peft_convert import Tiny

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.1)
    real = get_peft_model(Tiny(), config)
    with torch.no_grad():
        for name, p in real.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert lk_peft.convert(real) == 2
    with accelerate.init_empty_weights():
        empty = get_peft_model(Tiny(), config)
    assert empty.base_model.model.up.base_layer.weight.is_meta
    assert lk_peft.convert(empty) == 2
    x = torch.randn(2, 40, device="meta")
    assert empty(x).shape == (2, 24)  # a forward on meta: shapes only
    for assign in (False, True):
        model = copy.deepcopy(empty)
        if not assign:
            model.to_empty(device="cpu")
        model.load_state_dict(real.state_dict(), assign=assign)
        model.eval(), real.eval()
        x = torch.randn(3, 40)
        assert torch.equal(model(x), real(x))
