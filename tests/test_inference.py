"""``prepare_for_inference`` and ``NF4Weight.with_flat_scales``: the inference form of NF4 weights (double
quantization undone once) gives bit-identical dequantization, layer outputs and gradients (torch path, and the
Triton kernels through the interpreter), for our layers and converted peft 4-bit layers; ``state_dict`` keeps
bitsandbytes' tensors; in-place reloads of the scales are followed; bad arguments raise."""
import copy

import pytest
import torch

from lowrank_kernels import AdaLoraLinear, LoraLinear, NF4Weight, QLoraLinear, prepare_for_inference, qlora_linear
from lowrank_kernels import policy
from tests.conftest import DEVICE, HAS_CUDA, needs_bnb

BACKENDS = ["torch"] + (["triton"] if HAS_CUDA or policy.interpreting() else [])
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # the interpreter's bf16 dot is wrong: fp32 on CPU


@pytest.mark.parametrize("N, K, blocksize", [(24, 256, 64), (37, 200, 64), (5, 1000, 128), (16, 64, 256)])
def test_flat_scales_dequantize_bit_identically(N, K, blocksize):
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=blocksize)
    flat = w.with_flat_scales()
    assert w.nested and not flat.nested and flat.absmax.dtype == torch.float32
    assert flat.packed.data_ptr() == w.packed.data_ptr()  # the nibbles are shared
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(flat.dequantize(dtype, backend), w.dequantize(dtype, backend))


def test_without_double_quant_is_itself():
    w = NF4Weight.quantize(torch.randn(8, 64, device=DEVICE), double_quant=False)
    assert w.with_flat_scales() is w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 5, 70])  # decode kernels, and above them
def test_qlora_outputs_and_gradients_identical(backend, M):
    w = NF4Weight.quantize(torch.randn(48, 256, device=DEVICE) * 0.05)
    x = torch.randn(M, 256, device=DEVICE, dtype=DTYPE)
    A = (torch.randn(8, 256, device=DEVICE) * 0.05).requires_grad_()
    B = (torch.randn(48, 8, device=DEVICE) * 0.05).requires_grad_()
    outs = []
    for weight in (w, w.with_flat_scales()):
        xi = x.clone().requires_grad_()
        y = qlora_linear(xi, weight, A, B, 2.0, backend=backend)
        gx, gA, gB = torch.autograd.grad(y, (xi, A, B), torch.ones_like(y))
        outs.append((y, gx, gA, gB))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _layers():
    torch.manual_seed(0)
    q = QLoraLinear.from_linear(torch.nn.Linear(128, 128), r=4).to(DEVICE)
    ada = AdaLoraLinear(NF4Weight.quantize(torch.randn(64, 128, device=DEVICE)), init_r=4).to(DEVICE)
    dense = LoraLinear(64, 40, r=4).to(DEVICE)
    for m in (q, ada, dense):
        for name, p in m.named_parameters():
            if "lora_B" in name or "lora_E" in name:
                torch.nn.init.normal_(p, std=0.1)
    return torch.nn.Sequential(q, ada, dense)


def test_prepare_our_layers(monkeypatch):
    model = _layers()
    x = torch.randn(6, 128, device=DEVICE)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    built = []
    real = NF4Weight.with_flat_scales
    monkeypatch.setattr(NF4Weight, "with_flat_scales", lambda self: built.append(1) or real(self))
    assert prepare_for_inference(model) == 2  # QLoraLinear and the NF4 AdaLoraLinear; the dense layer has none
    assert torch.equal(model(x), before)
    assert len(built) == 2  # each NF4 layer ran on its inference form...
    model(x)
    assert len(built) == 2  # ...built once
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert prepare_for_inference(model, enabled=False) == 2
    assert torch.equal(model(x), before)


def test_reloaded_scales_are_followed():
    """``load_state_dict`` copies into the weight's tensors in place: the inference form follows (no stale scales)."""
    torch.manual_seed(1)
    a = QLoraLinear.from_linear(torch.nn.Linear(128, 40), r=4).to(DEVICE)
    b = QLoraLinear.from_linear(torch.nn.Linear(128, 40), r=4).to(DEVICE)
    prepare_for_inference(a)
    x = torch.randn(3, 128, device=DEVICE)
    a(x)  # builds the inference form of a's weight
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


@needs_bnb
def test_prepare_converted_peft_model():
    from lowrank_kernels import peft as lk_peft
    from tests.test_peft_convert import peft_pair, quantized_tiny

    if DEVICE == "cpu":
        pytest.importorskip("peft")
    model, ours = peft_pair(quantized_tiny())
    x = torch.randn(5, 40, device=DEVICE)
    before = ours(x)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    assert prepare_for_inference(ours) == 2
    assert torch.equal(ours(x), before)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    reverted = copy.deepcopy(ours)
    lk_peft.revert(reverted)
    assert torch.equal(reverted(x), model(x))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        prepare_for_inference("model")
    with pytest.raises(TypeError, match="enabled"):
        prepare_for_inference(_layers(), enabled=1)
