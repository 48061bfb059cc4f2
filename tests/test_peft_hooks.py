"""``convert`` never changes what a model computes when modules carry hooks: a hooked base layer (or adapter
module) runs peft's own forward, so its hooks fire exactly as under peft, accelerate's device-map / offload hooks
included; layers whose base computes something our kernels do not (a subclass with its own ``forward``, an fp8
weight) are left to peft with the reason."""
import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402

from lowrank_kernels import peft as lk_peft  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.test_lora_forward import rel_err  # noqa: E402
from tests.test_peft_convert import Tiny, outputs_and_grads, runs_our_function  # noqa: E402


def lora_tiny(base=None, **config):
    """A peft LoRA model over ``base`` (default ``Tiny()``) with random (non-zero) lora_B."""
    model = get_peft_model(base or Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.to(DEVICE)


def hook_pair(kind, where="base"):
    """``(peft model, converted copy, calls of each, handles)`` with the same hook registered on ``up``'s base
    layer (or its ``lora_A`` module) in both, *after* conversion. The hooks change what they see (input * 2,
    output + 1, grad * 3), so a skipped hook changes the result."""
    model = lora_tiny()
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    calls = {"peft": 0, "ours": 0}
    handles = []
    for key, m in (("peft", model), ("ours", ours)):
        layer = m.base_model.model.up
        target = layer.base_layer if where == "base" else layer.lora_A["default"]

        def count(key=key):
            calls[key] += 1

        if kind == "forward_pre":
            handles.append(target.register_forward_pre_hook(lambda mod, args, c=count: (c(), (args[0] * 2,))[1]))
        elif kind == "forward":
            handles.append(target.register_forward_hook(lambda mod, args, out, c=count: (c(), out + 1)[1]))
        elif kind == "backward":
            handles.append(target.register_full_backward_hook(
                lambda mod, gin, gout, c=count: (c(), tuple(None if g is None else g * 3 for g in gin))[1]))
    return model, ours, calls, handles


@pytest.mark.parametrize("where", ["base", "lora_A"])
@pytest.mark.parametrize("kind", ["forward_pre", "forward", "backward"])
def test_hooks_added_after_convert_fire_as_under_peft(kind, where):
    model, ours, calls, handles = hook_pair(kind, where)
    x = torch.randn(5, 40, device=DEVICE)
    with pytest.warns(UserWarning, match="runs peft's forward while"):
        y1, dx1, g1 = outputs_and_grads(ours, x)
    y0, dx0, g0 = outputs_and_grads(model, x)
    assert calls["ours"] == calls["peft"] > 0
    assert rel_err(y1, y0.double()) <= 1e-5 and rel_err(dx1, dx0.double()) <= 1e-5
    assert g0.keys() == g1.keys() and all(rel_err(g1[k], g0[k].double()) <= 1e-5 for k in g0)
    with warnings.catch_warnings():  # warned once per layer
        warnings.simplefilter("error")
        ours(x)
    for h in handles:
        h.remove()
    x_in = torch.randn(2, 40, device=DEVICE, requires_grad=True)
    assert runs_our_function(ours.base_model.model.up(x_in))  # hooks gone: our kernels again


def test_hooked_layers_are_not_converted():
    model = lora_tiny()
    seen = []
    model.base_model.model.up.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    ours = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) unconverted(.|\n)*up: the base layer has forward hooks"):
        assert lk_peft.convert(ours) == 1
    assert type(ours.base_model.model.up).__name__ == "Linear"
    assert type(ours.base_model.model.down).__name__ == "PeftLoraLinear"
    x = torch.randn(3, 40, device=DEVICE)
    assert rel_err(ours(x), model(x).double()) <= 1e-5 and len(seen) == 2


def test_global_hooks_run_peft_forward():
    model = lora_tiny()
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    names = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: names.append(type(mod).__name__))
    try:
        x = torch.randn(3, 40, device=DEVICE)
        with pytest.warns(UserWarning, match="global forward hooks"):
            y1 = ours(x)
        ours_names, names[:] = list(names), []
        y0 = model(x)
        assert len(ours_names) == len(names) > 0  # base layers, adapters and dropouts fired, as under peft
        assert rel_err(y1, y0.double()) <= 1e-5
    finally:
        handle.remove()


def test_accelerate_hook_after_convert():
    hooks = pytest.importorskip("accelerate.hooks")
    model = lora_tiny()
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2

    class Twice(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] * 2,), kwargs

    for m in (model, ours):
        hooks.add_hook_to_module(m.base_model.model.up.base_layer, Twice())
    x = torch.randn(4, 40, device=DEVICE)
    with pytest.warns(UserWarning, match="accelerate hooks"):
        y1 = ours(x)
    assert rel_err(y1, model(x).double()) <= 1e-5
    hooks.remove_hook_from_module(ours.base_model.model.up.base_layer)  # leaves forward set on the instance
    assert runs_our_function(ours.base_model.model.up(torch.randn(2, 40, device=DEVICE, requires_grad=True)))


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_accelerate_offload_of_a_converted_model(offload, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = lora_tiny()
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    x = torch.randn(6, 40, device=DEVICE)
    expected = model(x)
    if offload == "disk":
        accelerate.disk_offload(ours, offload_dir=str(tmp_path), execution_device=DEVICE)
    else:
        accelerate.cpu_offload(ours, execution_device=DEVICE)
    assert ours.base_model.model.up.base_layer.weight.device.type == "meta"  # offloaded
    with pytest.warns(UserWarning, match="accelerate hooks"):
        y = ours(x)
    assert rel_err(y, expected.double()) <= 1e-5


class Doubling(nn.Linear):
    """An ``nn.Linear`` subclass with its own forward: our kernels would compute a plain linear."""

    def forward(self, x):
        return 2 * super().forward(x)


class WithDoubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = Doubling(40, 72), nn.Linear(72, 40)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_base_subclass_with_own_forward_is_left_to_peft():
    model = lora_tiny(WithDoubling())
    ours = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="up: base layer Doubling overrides Linear.forward"):
        assert lk_peft.convert(ours) == 1
    x = torch.randn(3, 40, device=DEVICE)
    assert rel_err(ours(x), model(x).double()) <= 1e-5


def test_fp8_weight_is_left_to_peft():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtype")
    model = lora_tiny()
    base = model.base_model.model.up.base_layer
    base.weight = nn.Parameter(base.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.warns(UserWarning, match="up: base weight dtype torch.float8_e4m3fn"):
        assert lk_peft.convert(model) == 1
    assert type(model.base_model.model.up).__name__ == "Linear"


def test_custom_dropout_module_is_left_to_peft():
    model = lora_tiny(lora_dropout=0.1)
    model.base_model.model.up.lora_dropout["default"] = nn.AlphaDropout(0.1)
    with pytest.warns(UserWarning, match="up: lora_dropout is a AlphaDropout"):
        assert lk_peft.convert(model) == 1


def test_adalora_hooked_base_runs_peft_forward():
    model = get_peft_model(Tiny(), AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=["up", "down"],
                                                 total_step=10)).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    for m in (model, ours):
        m.base_model.model.up.base_layer.register_forward_hook(lambda mod, args, out: out * 0.5)
    x = torch.randn(4, 40, device=DEVICE)
    with pytest.warns(UserWarning, match="runs peft's forward while its base layer has forward hooks"):
        y = ours(x)
    assert rel_err(y, model(x).double()) <= 1e-5


def test_wrapped_classes_are_reported():
    """A wrapper that subclasses the layer's class (FSDP2's ``fully_shard`` makes ``FSDP<name>``) hides it from
    convert / revert: both say so instead of skipping it silently; converting twice is quiet."""
    model = lora_tiny()
    layer = model.base_model.model.up
    layer.__class__ = type("FSDPLinear", (type(layer),), {})
    with pytest.warns(UserWarning, match="up: its class FSDPLinear subclasses peft's Linear"):
        assert lk_peft.convert(model) == 1
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) unconverted:\n  base_model.model.up: its class"):
        assert lk_peft.convert(model) == 0  # down, already converted, is not listed
    down = model.base_model.model.down
    down.__class__ = type("FSDPPeftLoraLinear", (type(down),), {})
    with pytest.warns(UserWarning, match="revert left 1 converted layer.*down"):
        assert lk_peft.revert(model) == 0
