"""The DoRA reference ``python_ref.dora_forward`` against peft's own DoRA layer (``LoraConfig(use_dora=True)``) on
CPU: outputs and gradients in fp64 (with / without bias, dropout, eval mode, leading dims), peft's magnitude init,
zero rows (NaN in peft, finite with ``eps``), and peft's bf16-model / fp32-adapter dtypes."""
import pytest
import torch
from torch import nn

import python_ref

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

P = 0.3  # dropout probability of the fixed masks


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class Net(nn.Module):
    def __init__(self, K, N, bias):
        super().__init__()
        self.lin = nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.lin(x)


class FixedMask(nn.Module):
    """Deterministic stand-in for peft's ``lora_dropout`` module (peft's DoRA calls it once, on x): ``x * mask``."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def random_mask(shape):
    return (torch.rand(shape, dtype=torch.float64) >= P).double() / (1 - P)


def peft_dora(K, N, r, bias, dropout="none", x_shape=None, dtype=torch.float64, zero_row=None):
    """(peft model, its DoRA layer, dropout mask or None) with random B and magnitude; W and bias made trainable so
    that their gradients get compared too. ``dropout``: ``"none"`` (lora_dropout=0), ``"mask"`` (a FixedMask of
    ``x_shape`` in training mode) or ``"eval"`` (lora_dropout > 0 in eval mode: peft then applies no dropout)."""
    base = Net(K, N, bias)
    if zero_row is not None:
        with torch.no_grad():
            base.lin.weight[zero_row] = 0
    config = LoraConfig(r=r, lora_alpha=12, lora_dropout=0.0 if dropout == "none" else P, use_dora=True,
                        target_modules=["lin"])
    model = get_peft_model(base.to(dtype), config)
    if dtype == torch.float64:
        model = model.double()
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(N) + 0.5)
        if zero_row is not None:
            layer.lora_B["default"].weight[zero_row] = 0
    layer.base_layer.requires_grad_(True)
    mask = None
    if dropout == "mask":
        mask = random_mask(x_shape)
        layer.lora_dropout["default"] = FixedMask(mask.to(layer.lora_A["default"].weight.dtype))
    model.train(dropout != "eval")
    return model, layer, mask


def tensors(layer):
    """(W, A, B, magnitude, bias) of the layer, as the reference takes them."""
    return (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight, layer.base_layer.bias)


def peft_run(model, layer, x, dy):
    """peft's output and the gradients of (x, W, A, B, magnitude, bias)."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [None if t is None else t.grad.clone() for t in tensors(layer)]


def ref_run(layer, x, dy, mask, eps=None):
    """The reference's output and gradients, fed fresh leaf copies of the layer's tensors."""
    x = x.clone().requires_grad_()
    W, A, B, m, b = [None if t is None else t.detach().clone().requires_grad_() for t in tensors(layer)]
    y = python_ref.dora_forward(x, W, A, B, m, layer.scaling["default"], b, mask, eps=eps)
    y.backward(dy)
    return y.detach(), [x.grad] + [None if t is None else t.grad for t in (W, A, B, m, b)]


GRADS = ("x", "W", "A", "B", "magnitude", "bias")


def assert_matches_peft(model, layer, x, mask, tol=1e-10):
    y_peft = model(x)
    dy = torch.randn_like(y_peft)
    y_peft, g_peft = peft_run(model, layer, x, dy)
    y_ref, g_ref = ref_run(layer, x, dy, mask)
    assert y_ref.shape == y_peft.shape and y_ref.dtype == y_peft.dtype
    assert rel_err(y_ref, y_peft) < tol
    for name, a, b in zip(GRADS, g_ref, g_peft):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("K,N,r", [(40, 24, 1), (40, 24, 8), (40, 24, 16), (96, 72, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", ["none", "mask", "eval"])
def test_matches_peft_fp64(K, N, r, bias, dropout):
    model, layer, mask = peft_dora(K, N, r, bias, dropout, x_shape=(13, K))
    assert_matches_peft(model, layer, torch.randn(13, K, dtype=torch.float64), mask)


@pytest.mark.parametrize("dropout", ["none", "mask"])
def test_leading_dims(dropout):
    K, N = 40, 24
    model, layer, mask = peft_dora(K, N, 8, True, dropout, x_shape=(2, 5, K))
    x = torch.randn(2, 5, K, dtype=torch.float64)
    assert model(x).shape == (2, 5, N)
    assert_matches_peft(model, layer, x, mask)


def test_magnitude_init_is_the_base_row_norm():
    """peft: ``m = ||W + s * B @ A||`` per row with B = 0, so at init the DoRA layer is the base layer."""
    K, N = 40, 24
    base = Net(K, N, True).double()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=12, use_dora=True, target_modules=["lin"]))
    layer = model.base_model.model.lin
    W, A, B, m, b = tensors(layer)
    assert torch.count_nonzero(B) == 0
    torch.testing.assert_close(m, W.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(python_ref.dora_weight_norm(W, A, B, layer.scaling["default"]), m, rtol=1e-12, atol=0)
    x = torch.randn(9, K, dtype=torch.float64)
    y = python_ref.dora_forward(x, W, A, B, m, layer.scaling["default"], b)
    torch.testing.assert_close(y, x @ W.T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


def test_formula_is_sensitive():
    """The peft comparison can fail: plausible variants of the formula (norm not detached, dropout on all of x, a
    rescaled bias, no second base GEMM under dropout) are far from peft."""
    K, N = 40, 24
    model, layer, mask = peft_dora(K, N, 8, True, "mask", x_shape=(13, K))
    x = torch.randn(13, K, dtype=torch.float64)
    dy = torch.randn(13, N, dtype=torch.float64)
    y_peft, g_peft = peft_run(model, layer, x, dy)
    W, A, B, m, b = [t.detach() for t in tensors(layer)]
    s = layer.scaling["default"]
    B = B.clone().requires_grad_()
    V = W + s * B @ A
    c_live = m / V.norm(dim=1)  # not detached
    c = c_live.detach()
    xd = x * mask
    lo = s * ((xd @ A.T) @ B.T)
    variants = {
        "live norm": x @ W.T + b + (c_live - 1) * (xd @ W.T) + c_live * lo,
        "dropout on x": xd @ (c[:, None] * V).T + b,
        "rescaled bias": x @ W.T + b + (c - 1) * (xd @ W.T + b) + c * lo,
        "one base GEMM": c * (x @ W.T) + c * lo + b,
    }
    for name, y in variants.items():
        (gB,) = torch.autograd.grad(y, B, dy, retain_graph=True)
        assert max(rel_err(y.detach(), y_peft), rel_err(gB, g_peft[3])) > 1e-3, name


@pytest.mark.parametrize("m_zero", [True, False])  # m_i = 0 as peft inits it (0/0), or m_i != 0 (inf * 0)
@pytest.mark.parametrize("dropout", ["none", "mask"])
def test_zero_row(m_zero, dropout):
    K, N, i = 40, 24, 5
    model, layer, mask = peft_dora(K, N, 8, True, dropout, x_shape=(7, K), zero_row=i)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[i] = 0.0 if m_zero else 1.3
    x = torch.randn(7, K, dtype=torch.float64)
    dy = torch.randn(7, N, dtype=torch.float64)
    y_peft, _ = peft_run(model, layer, x, dy)
    y_ref, _ = ref_run(layer, x, dy, mask)
    others = torch.arange(N) != i
    assert torch.isnan(y_peft[:, i]).all() and torch.isnan(y_ref[:, i]).all()
    assert rel_err(y_ref[:, others], y_peft[:, others]) < 1e-10

    y_eps, g_eps = ref_run(layer, x, dy, mask, eps=1e-6)
    assert rel_err(y_eps[:, others], y_peft[:, others]) < 1e-10
    torch.testing.assert_close(y_eps[:, i], layer.base_layer.bias[i].detach().expand(7), rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in g_eps if g is not None)
    gm, gB = g_eps[4], g_eps[3]
    assert gm[i] == 0
    assert (torch.count_nonzero(gB[i]) == 0) == m_zero


def test_eps_must_be_positive():
    x, W, A, B = torch.randn(3, 4), torch.randn(2, 4), torch.randn(1, 4), torch.randn(2, 1)
    with pytest.raises(ValueError):
        python_ref.dora_forward(x, W, A, B, torch.ones(2), 1.0, eps=0.0)


@pytest.mark.parametrize("dropout", ["none", "mask"])
def test_bf16_model_fp32_adapters_match_peft(dropout):
    """peft keeps a bf16 model's adapters (A, B, magnitude) in fp32 and computes the DoRA term in fp32; the reference
    does the same ops in the same order (bitwise equal on CPU; 1e-5 still catches a single bf16 rounding)."""
    K, N = 40, 24
    model, layer, mask = peft_dora(K, N, 8, True, dropout, x_shape=(2, 5, K), dtype=torch.bfloat16)
    W, A, B, m, b = tensors(layer)
    assert (W.dtype, A.dtype, m.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    x = torch.randn(2, 5, K).bfloat16()
    assert_matches_peft(model, layer, x, mask, tol=1e-5)
    # and both are within bf16 rounding of the fp64 oracle
    d = lambda t: t.detach().double()  # noqa: E731
    oracle = python_ref.dora_forward(d(x), d(W), d(A), d(B), d(m), layer.scaling["default"], d(b), mask)
    assert rel_err(model(x), oracle) < 1e-2
