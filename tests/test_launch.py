"""kernels.launch: the direct launch of a compiled kernel must pick what Triton's JIT would, call after call."""
import pytest
import torch

from tests.conftest import DEVICE, HAS_CUDA
from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels import launch as launch_mod
from lowrank_kernels.kernels.nf4_dequant import nf4_dequant_words_kernel, nf4_dequantize

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="the direct launch exists on CUDA only (the interpreter "
                                                     "always takes the JIT path)")


def _dequant(w, packed, out_dtype=torch.float32):
    w = NF4Weight(packed, w.absmax, w.shape, w.dtype, w.blocksize, absmax2=w.absmax2, code2=w.code2,
                  offset=w.offset, nested_blocksize=w.nested_blocksize)
    return nf4_dequantize(w, out_dtype, tune=dict(kernel="words")).view(-1)


def test_launch_checks_the_number_of_arguments():
    """A call with missing arguments is refused, and leaves nothing behind that would break the next call."""
    launch_mod._COMPILED.pop(nf4_dequant_words_kernel, None)
    launch_mod._LAYOUT.pop(nf4_dequant_words_kernel, None)
    with pytest.raises(TypeError, match="nf4_dequant_words_kernel takes 13 arguments"):
        launch_mod.launch(nf4_dequant_words_kernel, (1,), (1, 2, 3))
    w = NF4Weight.quantize(torch.randn(8, 64) * 0.02, blocksize=64).to(DEVICE)
    for _ in range(2):
        assert torch.equal(_dequant(w, w.packed), w.dequantize(torch.float32, backend="torch").view(-1))


@needs_cuda
def test_direct_launch_follows_pointer_alignment():
    """The same call with the packed words 16-byte aligned and then only 4-byte aligned (Triton specializes
    pointers on 16-byte alignment): each repeated call is launched directly, with its own compiled kernel, and
    matches the reference each time."""
    w = NF4Weight.quantize(torch.randn(40, 96) * 0.02, blocksize=32).to(DEVICE)
    ref = w.dequantize(torch.float32, backend="torch").view(-1)
    storage = torch.empty(w.packed.numel() + 16, dtype=torch.uint8, device=DEVICE)
    shifted = storage[4:4 + w.packed.numel()]  # 4-byte aligned, not 16
    shifted.copy_(w.packed.view(-1))
    launch_mod._COMPILED.pop(nf4_dequant_words_kernel, None)
    for _ in range(3):
        for packed in (w.packed, shifted):
            out = _dequant(w, packed)
            assert torch.equal(out, ref)
    keys = list(launch_mod._COMPILED[nf4_dequant_words_kernel])
    assert len(keys) == 2, keys
    compiled = list(launch_mod._COMPILED[nf4_dequant_words_kernel].values())
    assert compiled[0] is not compiled[1]


@needs_cuda
def test_direct_launch_matches_jit_launch_bit_for_bit():
    """Other shapes and dtypes through one cache: each call equals the reference (a stale kernel would not)."""
    launch_mod._COMPILED.pop(nf4_dequant_words_kernel, None)
    for _ in range(2):
        for shape, bs in (((64, 64), 64), ((33, 128), 128), ((7, 4096), 64)):
            w = NF4Weight.quantize(torch.randn(*shape) * 0.02, blocksize=bs).to(DEVICE)
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                assert torch.equal(_dequant(w, w.packed, out_dtype),
                                   w.dequantize(out_dtype, backend="torch").view(-1))


@needs_cuda
def test_launch_hook_takes_the_jit_path():
    """With a Triton launch hook installed (profilers), every launch goes through the JIT, which calls it."""
    from triton import knobs

    w = NF4Weight.quantize(torch.randn(16, 64) * 0.02, blocksize=64).to(DEVICE)
    _dequant(w, w.packed)  # compiled and cached
    calls = []
    saved = knobs.runtime.launch_enter_hook
    if hasattr(saved, "add"):  # a hook chain (Triton >= 3.4)
        saved.add(calls.append)
    else:
        knobs.runtime.launch_enter_hook = calls.append
    try:
        out = _dequant(w, w.packed)
    finally:
        if hasattr(saved, "remove"):
            saved.remove(calls.append)
        knobs.runtime.launch_enter_hook = saved
    assert len(calls) == 1
    assert torch.equal(out, w.dequantize(torch.float32, backend="torch").view(-1))
    assert not launch_mod._hooked(knobs.runtime)


def test_tensor_device_and_device_of():
    """The device a launch goes to is its first tensor's (``-1``: CPU, or no tensor); ``device_of`` switches only
    for a CUDA tensor off the current device (two-GPU behaviour: tests/test_multi_gpu.py)."""
    t = torch.zeros(2, device=DEVICE)
    expected = t.get_device()
    assert launch_mod._tensor_device(None, (3, t, 1.0)) == expected  # no recorded layout: the arguments scanned
    assert launch_mod._tensor_device(None, (3, 1.0)) == -1
    assert launch_mod._tensor_device(((1,), None, None), (3, t, 1.0)) == expected  # tensor positions recorded
    assert launch_mod._tensor_device(((), None, None), (3, 1.0)) == -1
    with launch_mod.device_of(torch.zeros(1)):  # CPU: nothing to switch
        pass
    if HAS_CUDA:
        before = torch.cuda.current_device()
        with launch_mod.device_of(t):
            assert torch.cuda.current_device() == expected
        assert torch.cuda.current_device() == before
