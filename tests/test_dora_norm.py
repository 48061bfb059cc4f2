"""``kernels.dora_norm`` (DoRA's row norms of ``W + s * B @ A`` in one pass over W) against the fp64 oracle
``python_ref.dora_weight_norm`` (which forms the sum): NF4 weights (word-aligned rows and not, nested scales and
not, blocksizes 64 / 128), dense weights in every dtype and strides, adapters in every dtype and strides, ragged
N / K / r, zero rows. On the CPU through Triton's interpreter (IEEE fp32 dots)."""
import pytest
import torch

import python_ref
from lowrank_kernels import NF4Weight, policy
from lowrank_kernels.dora import dora_linear
from lowrank_kernels.kernels.dora_norm import dora_norm
from tests.conftest import DEVICE, HAS_CUDA
from tests.test_dora import dense_oracle
from tests.test_lora_forward import rel_err

pytestmark = pytest.mark.skipif(not (HAS_CUDA or policy.interpreting()), reason="needs CUDA or Triton's interpreter")

SHAPES = [(24, 256, 1), (37, 96, 8), (50, 200, 16), (33, 512, 64)]  # N, K, r: K = 96 / 200 not word-aligned rows
PRECISION = "ieee" if not HAS_CUDA else "tf32x3"
TOL = 1e-5


def adapters(N, K, r, dtype, transposed=False):
    A = torch.randn(r, K, device=DEVICE) / K**0.5
    B = torch.randn(N, r, device=DEVICE) * 0.3
    if transposed:  # column-major A and B: any strides
        A, B = A.T.contiguous().T, B.T.contiguous().T
    return A.to(dtype), B.to(dtype)


def expected(weight, A, B, s):
    return python_ref.dora_weight_norm(dense_oracle(weight), A.double(), B.double(), s)


@pytest.mark.parametrize("N, K, r", SHAPES)
@pytest.mark.parametrize("blocksize, nested", [(64, True), (64, False), (128, True)])
def test_nf4_weight(N, K, r, blocksize, nested):
    weight = NF4Weight.quantize(torch.randn(N, K, device=DEVICE) / K**0.5, blocksize=blocksize, double_quant=nested)
    A, B = adapters(N, K, r, torch.float32)
    got = dora_norm(weight, A, B, 1.7, PRECISION)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert rel_err(got, expected(weight, A, B, 1.7)) <= TOL


@pytest.mark.parametrize("N, K, r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_dense_weight(N, K, r, dtype, transposed):
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    weight = (W.T.contiguous().T if transposed else W).to(dtype)
    A, B = adapters(N, K, r, dtype, transposed)
    got = dora_norm(weight, A, B, 0.5, PRECISION)
    assert rel_err(got, expected(weight, A, B, 0.5)) <= TOL


def test_zero_rows():
    """A zero row of W with a zero row of B gives exactly 0 (not NaN, not a tiny negative's root); a zero row of W
    alone gives ``s * ||(B @ A)_n||``."""
    N, K, r = 20, 128, 4
    W = torch.randn(N, K, device=DEVICE)
    W[3] = 0
    W[7] = 0
    A, B = adapters(N, K, r, torch.float32)
    B[3] = 0
    got = dora_norm(NF4Weight.quantize(W), A, B, 2.0, PRECISION)
    assert got[3].item() == 0.0
    ba = (B.double() @ A.double())[7].norm() * 2.0
    assert abs(got[7].item() - ba.item()) <= 1e-5 * ba.item()


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_dora_linear_runs_the_kernel(nf4, monkeypatch):
    """``dora_linear(backend="triton")`` takes its norm from this kernel, and the output equals the torch backend's."""
    from lowrank_kernels.kernels import dora_norm as module

    calls = []
    real = module.dora_norm
    monkeypatch.setattr(module, "dora_norm", lambda *a: calls.append(1) or real(*a))
    N, K, r = 24, 128, 8
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    weight = NF4Weight.quantize(W) if nf4 else W
    A, B = adapters(N, K, r, torch.float32)
    m = torch.rand(N, device=DEVICE) + 0.5
    x = torch.randn(5, K, device=DEVICE)
    got = dora_linear(x, weight, A, B, m, 1.5, backend="triton")
    assert calls == [1]
    assert rel_err(got, dora_linear(x, weight, A, B, m, 1.5, backend="torch")) <= 1e-5
