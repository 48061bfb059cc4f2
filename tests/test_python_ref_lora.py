"""The LoRA reference formulas against torch.autograd, in fp64 (the oracle must be right by itself)."""
import pytest
import torch

import python_ref


def make(M, N, K, r, p, bias):
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64)
    A = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True) if bias else None
    mask = None
    if p > 0:
        mask = (torch.rand(M, K, dtype=torch.float64) >= p).double() / (1 - p)
    return x, W, A, B, b, mask


@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_backward_formulas_match_autograd(r, p, bias):
    M, N, K, s = 37, 29, 51, 0.7
    x, W, A, B, b, mask = make(M, N, K, r, p, bias)
    y, S = python_ref.lora_forward(x, W, A, B, s, b, mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dA, dB, db = python_ref.lora_backward(dy, x.detach(), W, A.detach(), B.detach(), s, S.detach(), mask)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dA, A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, B.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(db, b.grad, rtol=1e-12, atol=1e-12)


def test_forward_is_the_layer_formula():
    x, W, A, B, b, mask = make(5, 7, 9, 3, 0.5, True)
    y, S = python_ref.lora_forward(x, W, A, B, 2.0, b, mask)
    expected = x @ W.T + 2.0 * ((x * mask) @ A.T) @ B.T + b
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, (x * mask) @ A.T, rtol=1e-12, atol=1e-12)


def test_leading_dims_and_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert python_ref.lora_forward(x, W, A, B, 0.5)[0].shape == (2, 3, 4)
    assert torch.autograd.gradcheck(lambda x, A, B: python_ref.lora_forward(x, W, A, B, 0.5)[0], (x, A, B))
