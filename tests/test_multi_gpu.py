"""Kernels run on their tensors' device, whichever device is current (as torch operations do): every public path
on ``cuda:1`` while ``cuda:0`` is current gives the same bits as with ``cuda:1`` current, and leaves ``cuda:0``
current. Needs two GPUs (skipped otherwise).
"""
import pytest
import torch

from lowrank_kernels import NF4Weight, qlora_linear
from lowrank_kernels.kernels.nf4_gemv import nf4_gemv

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

BF16 = torch.bfloat16
DEV = torch.device("cuda", 1)


def _both(fn):
    """``fn()`` with cuda:0 current and with cuda:1 current; checks cuda:0 is still current after the first."""
    with torch.cuda.device(0):
        other = fn()
        assert torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        same = fn()
    torch.cuda.synchronize(DEV)
    return other, same


def _inputs(M, N, K, r, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = NF4Weight.quantize((torch.randn(N, K, device=DEV, generator=g) * 0.05).to(BF16))
    x = torch.randn(M, K, device=DEV, generator=g).to(BF16)
    A = torch.randn(r, K, device=DEV, generator=g) / K**0.5
    B = torch.randn(N, r, device=DEV, generator=g) * 0.1
    bias = (torch.randn(N, device=DEV, generator=g) * 0.1).to(BF16)
    return w, x, A, B, bias


def test_dequantize_on_another_device():
    w, *_ = _inputs(1, 300, 512, 4, 0)
    other, same = _both(lambda: w.dequantize())
    assert other.device == DEV and torch.equal(other, same)


@pytest.mark.parametrize("cuda", [False, None], ids=["triton", "default"])
def test_decode_on_another_device(cuda):
    w, x, A, B, bias = _inputs(4, 300, 1024, 8, 1)
    tune = None if cuda is None else dict(cuda=cuda)
    other, same = _both(lambda: nf4_gemv(x, w, A, B, 2.0, bias, tune=tune))
    assert other[0].device == DEV and torch.equal(other[0], same[0]) and torch.equal(other[1], same[1])


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_forward_backward_on_another_device(backend, dropout):
    w, x, A, B, bias = _inputs(300, 384, 512, 8, 2)

    def step():
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(0)  # the dropout seed comes from the CPU generator
        y = qlora_linear(xs, w, As, Bs, 2.0, bias, dropout=dropout, backend=backend)
        y.float().square().sum().backward()
        return y, xs.grad, As.grad, Bs.grad

    other, same = _both(step)
    assert all(o.device == DEV and torch.equal(o, s) for o, s in zip(other, same))
