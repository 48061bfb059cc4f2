"""``lowrank_kernels.peft.convert`` / ``revert`` on real peft models: same outputs and gradients as peft,
same Parameter objects (an existing optimizer keeps working), same ``save_pretrained`` files, unsupported layers
left alone with a warning."""
import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_kernels import peft as lk_peft  # noqa: E402
from tests.conftest import DEVICE, HAS_BNB, needs_bnb  # noqa: E402
from tests.test_lora_forward import rel_err  # noqa: E402


class Tiny(nn.Module):
    """Ragged dims; ``up``/``down`` get LoRA, ``head`` does not."""

    def __init__(self, d=40, h=72, out=24):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(d, h), nn.Linear(h, d, bias=False), nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def quantized_tiny(device=DEVICE, owned=False, quant_storage=torch.uint8):
    """``Tiny`` with up/down as bitsandbytes NF4 ``Linear4bit`` layers (double quant), on ``device`` (the move
    quantizes). ``owned``: each ``Params4bit`` knows its layer (``module=``, as transformers builds them), so
    bitsandbytes also keeps the quant_state on the layer. ``quant_storage``: the dtype holding the packed bytes."""
    import bitsandbytes as bnb

    model = Tiny()
    for name in ("up", "down"):
        lin = getattr(model, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
                              quant_storage=quant_storage)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, quant_storage=quant_storage,
                                     **(dict(module=q) if owned else {}))
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(model, name, q)
    model.is_loaded_in_4bit = True  # what transformers sets; peft then wraps Linear4bit with lora.bnb.Linear4bit
    return model.to(device)


def peft_pair(base, **config):
    """(peft model, converted deep copy) with random (non-zero) LoRA B."""
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model = model.to(DEVICE)
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    return model, ours


def outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return y, x.grad, grads


def runs_our_function(y) -> bool:
    """Whether the autograd graph of ``y`` contains our LoraLinearFunction node."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith("LoraLinearFunction"):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def assert_same(model, ours, x, tol):
    x_in = torch.randn(2, model.base_model.model.up.in_features, device=DEVICE, dtype=x.dtype, requires_grad=True)
    assert runs_our_function(ours.base_model.model.up(x_in)) and not runs_our_function(model.base_model.model.up(x_in))
    y0, dx0, g0 = outputs_and_grads(model, x)
    y1, dx1, g1 = outputs_and_grads(ours, x)
    assert y1.dtype == y0.dtype and rel_err(y1, y0.double()) <= tol
    assert rel_err(dx1, dx0.double()) <= tol
    assert g0.keys() == g1.keys() and len(g0) == 4  # lora_A, lora_B of two layers
    for name in g0:
        assert g1[name].dtype == g0[name].dtype, name
        assert rel_err(g1[name], g0[name].double()) <= tol, name


def test_dense_lora_fp32_matches_peft():
    model, ours = peft_pair(Tiny())
    assert type(ours.base_model.model.up).__name__ == "PeftLoraLinear"
    assert_same(model, ours, torch.randn(3, 5, 40, device=DEVICE), 1e-4)


def test_dense_lora_bf16_activations_fp32_adapters():
    model, ours = peft_pair(Tiny().to(torch.bfloat16))
    assert ours.base_model.model.up.lora_A["default"].weight.dtype == torch.float32  # peft's default
    assert_same(model, ours, torch.randn(6, 40, device=DEVICE, dtype=torch.bfloat16), 1e-2)


@needs_bnb
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_qlora_bnb_matches_peft(quant_storage):
    """Also with the packed bytes stored as another dtype (FSDP-QLoRA's ``bnb_4bit_quant_storage``): read as bytes."""
    model, ours = peft_pair(quantized_tiny(quant_storage=quant_storage))
    up = ours.base_model.model.up
    assert type(up).__name__ == "PeftLoraLinear4bit"
    assert up.base_layer.weight.dtype == quant_storage
    assert_same(model, ours, torch.randn(7, 40, device=DEVICE), 1e-4)


def test_parameters_shared_and_optimizer_keeps_working():
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"])).to(DEVICE)
    before = [id(p) for p in model.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert lk_peft.convert(model) == 2
    assert [id(p) for p in model.parameters()] == before
    B = model.base_model.model.up.lora_B["default"].weight
    start = B.detach().clone()
    model(torch.randn(4, 40, device=DEVICE)).square().sum().backward()
    opt.step()
    assert not torch.equal(B, start)  # the optimizer updated the converted layer's parameter


def test_save_pretrained_writes_the_same_files(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model, ours = peft_pair(Tiny())
    model.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    a = safetensors.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = safetensors.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    for c in configs:  # peft writes this set in hash order
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]


def test_dropout_eval_equal_train_differs():
    model, ours = peft_pair(Tiny(), lora_dropout=0.3)
    x = torch.randn(8, 40, device=DEVICE)
    model.eval(), ours.eval()
    assert rel_err(ours(x), model(x).double()) <= 1e-5
    ours.train()
    y1, y2 = ours(x), ours(x)
    assert not torch.allclose(y1, y2)
    y1.sum().backward()
    assert ours.base_model.model.up.lora_A["default"].weight.grad is not None


def test_disabled_adapters_fall_back_to_peft():
    model, ours = peft_pair(Tiny())
    x = torch.randn(4, 40, device=DEVICE)
    with ours.disable_adapter():
        base = ours(x)
    with model.disable_adapter():
        assert torch.equal(base, model(x))
    assert not torch.allclose(ours(x), base)


def test_unsupported_layers_are_left_and_listed():
    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["up", "down"], lora_bias=True))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) unconverted(.|\n)*up: lora_bias=True"):
        assert lk_peft.convert(model) == 0
    assert type(model.base_model.model.up).__name__ == "Linear"


def test_revert_restores_peft_classes():
    model, ours = peft_pair(Tiny())
    assert lk_peft.revert(ours) == 2
    assert type(ours.base_model.model.up) is type(model.base_model.model.up)
    x = torch.randn(4, 40, device=DEVICE)
    assert torch.equal(ours(x), model(x))


def test_convert_bad_input():
    with pytest.raises(TypeError, match="model"):
        lk_peft.convert("model")
    with pytest.raises(TypeError, match="model"):
        lk_peft.revert(None)


@pytest.mark.skipif(HAS_BNB, reason="checks the import path without bitsandbytes")
def test_no_bnb_means_no_4bit_class():
    assert lk_peft.PeftLoraLinear4bit is None
