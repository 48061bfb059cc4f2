"""Test setup: without CUDA, Triton kernels run in the interpreter (set before Triton is imported)."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError when its native library is missing
        return False
    return True


HAS_BNB = _has_bnb()
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """Each test draws its own random inputs, reproducibly (seeded from its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
