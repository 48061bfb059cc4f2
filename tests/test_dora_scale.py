"""``kernels.dora_scale`` (DoRA's column scale ``y = L * c + bias`` and its backward, one pass each) against fp64
torch on the same inputs: every dtype of ``L`` / ``c`` / bias, strided ``L`` and ``dY``, ragged M and N (not
multiples of the tiles), without bias, each gradient alone; and ``dora_linear(backend="triton")`` through it.
On the CPU through Triton's interpreter."""
import pytest
import torch

from lowrank_kernels import NF4Weight, policy
from lowrank_kernels.dora import DoraScaleFunction, dora_linear
from lowrank_kernels.kernels.dora_scale import BLOCK_M, ROW_TILES, dora_scale_backward, dora_scale_forward
from tests.conftest import DEVICE, HAS_CUDA
from tests.test_lora_forward import rel_err

pytestmark = pytest.mark.skipif(not (HAS_CUDA or policy.interpreting()), reason="needs CUDA or Triton's interpreter")

SHAPES = [(1, 7), (37, 130), (BLOCK_M * ROW_TILES + 5, 33)]  # M, N: one row; ragged; two row slices
DTYPES = [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]  # L's dtype, tolerance


def inputs(M, N, dtype, c_dtype=torch.float32, strided=False):
    L = torch.randn(M, N, device=DEVICE).to(dtype)
    if strided:  # column-major
        L = L.T.contiguous().T
    c = (torch.rand(N, device=DEVICE) + 0.5).to(c_dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    return L, c, bias


@pytest.mark.parametrize("M, N", SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_forward(M, N, dtype, tol, with_bias, strided):
    L, c, bias = inputs(M, N, dtype, strided=strided)
    y = dora_scale_forward(L, c, bias if with_bias else None, dtype)
    ref = L.double() * c.double() + (bias.double() if with_bias else 0)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) <= tol


@pytest.mark.parametrize("M, N", SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_forward_with_residual(M, N, dtype, tol, strided):
    """``y = L * c + bias + R``: the residual (DoRA's ``(x - Xd) @ W.T`` with dropout) added in fp32, one rounding."""
    L, c, bias = inputs(M, N, dtype)
    R = torch.randn(N, M, device=DEVICE).to(dtype).T if strided else torch.randn(M, N, device=DEVICE).to(dtype)
    y = dora_scale_forward(L, c, bias, dtype, R)
    assert y.dtype == dtype and rel_err(y, L.double() * c.double() + bias.double() + R.double()) <= tol


@pytest.mark.parametrize("M, N", SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_backward(M, N, dtype, tol, strided):
    L, c, _ = inputs(M, N, dtype, strided=strided)
    dY = torch.randn(N, M, device=DEVICE).to(dtype).T if strided else torch.randn(M, N, device=DEVICE).to(dtype)
    dL, dc, db = dora_scale_backward(dY, L, c, True, True, True)
    assert dL.dtype == dtype and dc.dtype == db.dtype == torch.float32
    assert rel_err(dL, dY.double() * c.double()) <= tol
    assert rel_err(dc, (dY.double() * L.double()).sum(0)) <= 1e-5
    assert rel_err(db, dY.double().sum(0)) <= 1e-5


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dL", "dc", "dbias"])
def test_backward_computes_only_what_is_needed(need):
    L, c, _ = inputs(20, 40, torch.float32)
    dY = torch.randn(20, 40, device=DEVICE)
    got = dora_scale_backward(dY, L, c, *need)
    expect = [dY * c, (dY * L).sum(0), dY.sum(0)]
    for g, e, n in zip(got, expect, need):
        assert (g is None) != n and (g is None or rel_err(g, e) <= 1e-6)


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16])
def test_function_gradients_in_their_dtypes(c_dtype):
    """Through autograd: gradients to L, c and bias in their own dtypes, equal to the torch form's."""
    L, c, bias = inputs(45, 70, torch.bfloat16, c_dtype)
    R = torch.randn(45, 70, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (L, c, bias, R)]
    y = DoraScaleFunction.apply(*leaves, torch.bfloat16)
    dY = torch.randn_like(y)
    y.backward(dY)
    ref_leaves = [t.double().requires_grad_() for t in (L, c, bias, R)]
    (ref_leaves[0] * ref_leaves[1] + ref_leaves[2] + ref_leaves[3]).backward(dY.double())
    tols = (8e-3, 8e-3 if c_dtype == torch.bfloat16 else 1e-5, 8e-3, 0)  # bf16 L, bias; dR = dY exactly
    for t, r, tol in zip(leaves, ref_leaves, tols):
        assert t.grad.dtype == t.dtype and rel_err(t.grad, r.grad) <= tol


def test_empty_rows():
    L, c, bias = inputs(0, 12, torch.float32)
    assert dora_scale_forward(L, c, bias, torch.float32).shape == (0, 12)
    dL, dc, db = dora_scale_backward(torch.empty(0, 12, device=DEVICE), L, c, True, True, True)
    assert dL.shape == (0, 12) and torch.equal(dc, torch.zeros(12, device=DEVICE)) and torch.equal(db, dc)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_linear_runs_the_kernels(nf4, p, monkeypatch):
    """``dora_linear(backend="triton")`` scales through :class:`DoraScaleFunction` (with dropout adding the product
    over the dropped-out part of x as its residual); outputs and gradients equal the torch backend's."""
    from lowrank_kernels.kernels import dora_scale as module

    calls = []
    for name in ("dora_scale_forward", "dora_scale_backward"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    N, K, r = 24, 128, 8
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    weight = NF4Weight.quantize(W) if nf4 else W
    results = []
    for backend in ("triton", "torch"):
        x = torch.randn(2, 5, K, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)).requires_grad_()
        A = (torch.randn(r, K, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)) / 8).requires_grad_()
        B = (torch.randn(N, r, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2)) / 4).requires_grad_()
        m = (torch.rand(N, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3)) + 0.5).requires_grad_()
        b = torch.randn(N, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(4)).requires_grad_()
        torch.manual_seed(5)  # the same dropout mask for both backends
        y = dora_linear(x, weight, A, B, m, 1.5, b, dropout=p, backend=backend)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), x.grad, A.grad, B.grad, m.grad, b.grad])
    assert calls == ["dora_scale_forward", "dora_scale_backward"]
    for got, ref in zip(*results):
        assert rel_err(got, ref) <= 1e-5
