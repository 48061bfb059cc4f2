"""The CUDA C++ tensor-core decode kernel (``csrc/nf4_mma_gemv.cu`` through ``nf4_gemv(..., cuda=True)``) against
the fp64 oracle, its dispatch rule and fallbacks, and the build helper ``lowrank_kernels.cuda_ext``.

The kernel needs a CUDA GPU (compute capability >= 8) and ``nvcc``; elsewhere only the build-helper tests run.
"""
import warnings

import pytest
import torch

from lowrank_kernels import NF4Weight, cuda_ext
from lowrank_kernels.dispatch import _nf4_state
from lowrank_kernels.kernels import nf4_gemv as gemv_mod
from lowrank_kernels.kernels import nf4_gemv_cuda
from lowrank_kernels.kernels.nf4_gemv import nf4_gemv
from tests.conftest import HAS_CUDA
from tests.test_lora_forward import TOL, oracle_nf4_weight, rel_err
from tests.test_nf4_gemv import SCALING, make_inputs, make_weight, oracle

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
HAS_KERNEL = HAS_CUDA and nf4_gemv_cuda.available(torch.device("cuda"))
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="needs a CUDA GPU (sm >= 80) and nvcc")

# (M, N, K, r, dtype, nested, blocksize, bias, adapter dtype, split_k, warps)
CASES = [
    (1, 300, 512, 16, BF16, True, 64, True, F32, None, None),  # ragged N, default launch
    (2, 77, 768, 8, F16, True, 64, False, F32, 3, 8),  # 3 slices of one group each, rows past N in the warp
    (3, 129, 1024, 1, BF16, True, 128, True, BF16, 2, 4),  # blocksize 128: two scale blocks per group, r = 1
    (8, 1000, 256, 16, BF16, False, 64, False, F32, 1, 2),  # fp32 absmax (not double-quantized), one group
    (9, 511, 2304, 64, F16, True, 256, True, F16, None, 8),  # two n-tiles, M not a multiple of 8, 9 groups
    (13, 130, 1280, 8, BF16, False, 1024, False, F32, 5, 1),  # blocksize > group: one scale for 4 groups
    (16, 64, 4096, 16, BF16, True, 64, True, F32, None, None),  # M = 16, long K
    (4, 4097, 4096, 16, BF16, True, 64, True, F32, None, None),  # the Llama shape plus one row
    (12, 300, 768, 64, BF16, True, 64, True, F32, None, None),  # S: 64 ranks x 2 row chunks, 16 S blocks first
]


def _ids(case):
    M, N, K, r, dtype, nested, bs, bias, adt, split, warps = case
    return (f"{M}x{N}x{K}-r{r}-{str(dtype)[6:]}-{'nested' if nested else 'flat'}-bs{bs}-{'bias' if bias else 'nob'}"
            f"-A{str(adt)[6:]}-split{split}-warps{warps}")


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cuda_kernel_matches_oracle(case):
    M, N, K, r, dtype, nested, bs, bias, adt, split, warps = case
    w = make_weight(N, K, bs, nested, 0.05)
    x, A, B, b = make_inputs(M, N, K, r, dtype, bias, adapter_dtype=adt)
    y, S = nf4_gemv(x, _nf4_state(w), A, B, SCALING, b, cuda=True, split_k=split, cuda_warps=warps)
    assert y.dtype == dtype and y.shape == (M, N) and S.dtype == dtype and S.shape == (M, r)
    y_ref, S_ref = oracle(x, oracle_nf4_weight(w), A, B, b)
    assert rel_err(S, S_ref) <= TOL[dtype]
    assert rel_err(y, y_ref) <= TOL[dtype]


@needs_kernel
def test_cuda_kernel_split_is_deterministic():
    w = make_weight(200, 2048, 64, True, 0.05)
    x, A, B, b = make_inputs(5, 200, 2048, 16, BF16, True)
    y1, _ = nf4_gemv(x, _nf4_state(w), A, B, SCALING, b, cuda=True, split_k=4)
    y2, _ = nf4_gemv(x, _nf4_state(w), A, B, SCALING, b, cuda=True, split_k=4)
    assert torch.equal(y1, y2)


@needs_kernel
@pytest.mark.parametrize("min_elements", [0, 2**25])
def test_default_dispatch_uses_cuda_kernel_only_in_its_range(min_elements, monkeypatch):
    monkeypatch.setattr(gemv_mod, "CUDA_MIN_ELEMENTS", min_elements)
    w = _nf4_state(make_weight(256, 1024, 64, True, 0.05))
    for M in (*range(1, 18), 24, 32, 33, 48, 64):
        x, A, B, b = make_inputs(M, 256, 1024, 8, BF16, False)
        y = nf4_gemv(x, w, A, B, SCALING, b)[0]
        uses_cuda = gemv_mod.CUDA_MIN_M <= M <= gemv_mod.CUDA_MAX_M and 256 * 1024 >= min_elements
        assert torch.equal(y, nf4_gemv(x, w, A, B, SCALING, b, cuda=uses_cuda)[0]), M
    # Triton knobs keep the Triton kernel
    monkeypatch.setattr(gemv_mod, "CUDA_MIN_ELEMENTS", 0)
    x, A, B, b = make_inputs(4, 256, 1024, 8, BF16, False)
    y = nf4_gemv(x, w, A, B, SCALING, b, block_n=64)[0]
    assert torch.equal(y, nf4_gemv(x, w, A, B, SCALING, b, block_n=64, cuda=False)[0])


@needs_kernel
def test_cuda_kernel_under_graph_capture():
    w = _nf4_state(make_weight(4096, 4096, 64, True, 0.05))
    x, A, B, b = make_inputs(4, 4096, 4096, 16, BF16, False)
    eager = nf4_gemv(x, w, A, B, SCALING, b, cuda=True)[0]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = nf4_gemv(x, w, A, B, SCALING, b, cuda=True)[0]
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, nf4_gemv(x, w, A, B, SCALING, b, cuda=True)[0])
    assert not torch.equal(out, eager)


@needs_kernel
def test_cuda_kernel_strided_x_rows():
    w = make_weight(100, 512, 64, True, 0.05)
    big = torch.randn(6, 1024, device="cuda").to(BF16)
    x = big[:, 256:768]  # row stride 1024, 16-byte aligned rows
    _, A, B, b = make_inputs(6, 100, 512, 8, BF16, True)
    y, _ = nf4_gemv(x, _nf4_state(w), A, B, SCALING, b, cuda=True)
    assert rel_err(y, oracle(x, oracle_nf4_weight(w), A, B, b)[0]) <= TOL[BF16]


@needs_kernel
@pytest.mark.parametrize("change", ["K320", "M17", "fp32", "bs32", "x_unaligned"])
def test_unsupported_calls_fall_back_or_raise(change):
    M, K, bs, dtype = 4, 512, 64, BF16
    if change == "K320":
        K = 320
    elif change == "M17":
        M = 17
    elif change == "fp32":
        dtype = F32
    elif change == "bs32":
        bs = 32
    w = make_weight(50, K, bs, True, 0.05)
    x, A, B, b = make_inputs(M, 50, K, 8, dtype, True)
    if change == "x_unaligned":  # rows 2-byte aligned only
        x = torch.randn(M, K + 1, device="cuda").to(dtype)[:, 1:]
    with pytest.raises(ValueError, match="cuda=True"):
        nf4_gemv(x, _nf4_state(w), A, B, SCALING, b, cuda=True)
    y, _ = nf4_gemv(x, _nf4_state(w), A, B, SCALING, b)  # the default falls back to Triton
    assert rel_err(y, oracle(x, oracle_nf4_weight(w), A, B, b)[0]) <= TOL[dtype]


@needs_kernel
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_kernel_on_another_device_than_the_current_one():
    dev = torch.device("cuda", 1)
    w = NF4Weight.quantize(torch.randn(300, 1024, device=dev) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(4, 1024, device=dev).to(BF16)
    A = torch.randn(8, 1024, device=dev) / 32
    B = torch.randn(300, 8, device=dev)
    with torch.cuda.device(0):
        y, _ = nf4_gemv(x, _nf4_state(w), A, B, SCALING, None, cuda=True)
        assert torch.cuda.current_device() == 0
    assert y.device == dev
    assert rel_err(y, oracle(x, oracle_nf4_weight(w), A, B, None)[0]) <= TOL[BF16]


def test_bad_cuda_knobs_raise():
    """Checked before anything else, so also on machines without the kernel."""
    w = _nf4_state(make_weight(50, 512, 64, True, 0.05))
    x, A, B, b = make_inputs(4, 50, 512, 8, F16, True)
    with pytest.raises(ValueError, match="cuda_warps must be one of"):
        nf4_gemv(x, w, A, B, SCALING, b, cuda=True, cuda_warps=3)
    with pytest.raises(ValueError, match="cuda_warps applies to the CUDA kernel"):
        nf4_gemv(x, w, A, B, SCALING, b, cuda_warps=4)
    with pytest.raises(ValueError, match="block_n, num_warps apply to the Triton kernels"):
        nf4_gemv(x, w, A, B, SCALING, b, cuda=True, block_n=64, num_warps=2)
    with pytest.raises(ValueError, match="input_precision apply to the Triton kernels"):
        nf4_gemv(x, w, A, B, SCALING, b, cuda=True, input_precision="ieee")
    with pytest.raises(TypeError, match="cuda must be"):
        nf4_gemv(x, w, A, B, SCALING, b, cuda="yes")


# --------------------------------------------------------------------------------------- build helper (any machine)
def test_library_is_none_when_switched_off(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_CUDA", "0")
    cuda_ext.library.cache_clear()
    try:
        assert cuda_ext.library("nf4_mma_gemv", (9, 0)) is None
    finally:
        cuda_ext.library.cache_clear()


def test_library_is_none_without_nvcc(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_nvcc", lambda: None)
    cuda_ext.library.cache_clear()
    try:
        assert cuda_ext.library("nf4_mma_gemv", (9, 0)) is None
    finally:
        cuda_ext.library.cache_clear()


@pytest.mark.skipif(cuda_ext._nvcc() is None, reason="needs nvcc")
def test_failed_build_warns_and_returns_none(monkeypatch, tmp_path):
    (tmp_path / "broken.cu").write_text("this is not C++\n")
    monkeypatch.setattr(cuda_ext, "CSRC", tmp_path)
    monkeypatch.setenv("LOWRANK_KERNELS_CACHE", str(tmp_path / "cache"))
    cuda_ext.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cuda_ext.library("broken", (9, 0)) is None
        assert any("could not build csrc/broken.cu" in str(c.message) for c in caught)
    finally:
        cuda_ext.library.cache_clear()


@pytest.mark.skipif(cuda_ext._nvcc() is None, reason="needs nvcc")
def test_kernel_source_builds(monkeypatch, tmp_path):
    """The shipped source compiles for sm_90 (also on a machine without a GPU, where nvcc is installed)."""
    monkeypatch.setenv("LOWRANK_KERNELS_CACHE", str(tmp_path))
    cuda_ext.library.cache_clear()
    try:
        lib = cuda_ext.library("nf4_mma_gemv", (9, 0))
        assert lib is not None and hasattr(lib, "lk_nf4_mma_gemv")
    finally:
        cuda_ext.library.cache_clear()


@pytest.mark.skipif(cuda_ext._nvcc() is None, reason="needs nvcc")
def test_header_change_rebuilds(monkeypatch, tmp_path):
    """A library is cached by its source and the headers of csrc/ too: editing a header builds a new one."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "k.cu").write_text('#include "h.cuh"\nextern "C" int lk_value() { return VALUE; }\n')
    monkeypatch.setattr(cuda_ext, "CSRC", src)
    monkeypatch.setenv("LOWRANK_KERNELS_CACHE", str(tmp_path / "cache"))
    values = []
    try:
        for v in (1, 2):
            (src / "h.cuh").write_text(f"#define VALUE {v}\n")
            cuda_ext.library.cache_clear()
            values.append(cuda_ext.library("k", (9, 0)).lk_value())
    finally:
        cuda_ext.library.cache_clear()
    assert values == [1, 2]
    assert len(list((tmp_path / "cache").glob("k-sm90-*.so"))) == 2
