"""The Triton dropout-mask kernel (``kernels/dropout_mask.py``, the CUDA mask of ``autograd.dropout_keep``): a pure
function of the seed's value, ``P(keep) = 1 - p``, independent elements, any element count (ragged against its
block), on the seed's device. CPU: the interpreter."""
import math

import pytest
import torch

from lowrank_kernels.kernels.dropout_mask import BLOCK, dropout_mask
from tests.conftest import DEVICE

SEED = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)


@pytest.mark.parametrize("shape", [(1,), (7, 33), (3, BLOCK + 5), (2, 3, 5)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_a_function_of_the_seed(shape, p):
    seed = SEED.to(DEVICE)
    keep = dropout_mask(seed, shape, p)
    assert keep.dtype == torch.bool and keep.shape == shape and keep.device == seed.device
    assert torch.equal(keep, dropout_mask(seed.clone(), shape, p))
    if math.prod(shape) > 64:
        assert not torch.equal(keep, dropout_mask(seed + 1, shape, p))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    n = 40_000
    keep = dropout_mask(torch.randint(0, 2**62, (), device=DEVICE), (n,), p)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) <= 5 * sigma


def test_neighbouring_elements_are_independent():
    """Pairs of adjacent elements (in a row and across rows) are kept together with probability (1 - p)^2."""
    p, n = 0.5, 40_000
    keep = dropout_mask(torch.randint(0, 2**62, (), device=DEVICE), (n // 100, 100), p).float()
    for a, b in ((keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1])):
        both = (a * b).mean().item()
        assert abs(both - (1 - p) ** 2) <= 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / a.numel())


def test_p_zero_keeps_everything_and_empty_shapes():
    seed = SEED.to(DEVICE)
    assert dropout_mask(seed, (5, 9), 0.0).all()
    assert dropout_mask(seed, (0, 9), 0.3).shape == (0, 9)
