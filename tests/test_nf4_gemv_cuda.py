"""The CUDA C++ tensor-core decode kernel (``csrc/nf4_mma_gemv.cu``, the torch operator
``torch.ops.lowrank_kernels.nf4_mma_gemv``, launched by ``kernels/nf4_mma_gemv.py``) through
``nf4_gemv(..., tune=dict(cuda=True))`` and directly, against the fp64 oracle; its dispatch rule and fallbacks;
``torch.library.opcheck`` of the operator; and the builder ``lowrank_kernels.cuda_ext`` with the operators' schemas
and fake implementations (the merge operator's too).

The kernel needs a CUDA GPU (compute capability >= 8), a CUDA build of PyTorch, nvcc and ninja; elsewhere only
the builder and schema tests run.
"""
import inspect
import logging
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import lowrank_kernels
from lowrank_kernels import NF4Weight, cuda_ext, policy
from lowrank_kernels.kernels import nf4_merge_mma, nf4_mma_gemv
from lowrank_kernels.kernels.nf4_gemv import nf4_gemv
from tests.conftest import HAS_CUDA
from tests.test_lora_forward import TOL, oracle_nf4_weight, rel_err
from tests.test_nf4_gemv import SCALING, make_inputs, make_weight, oracle

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
HAS_KERNEL = HAS_CUDA and nf4_mma_gemv.available(torch.device("cuda"))
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="needs a CUDA GPU (sm >= 80), a CUDA PyTorch, nvcc, ninja")

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


def _cuda(**knobs):
    """``tune`` for nf4_gemv: the CUDA kernel, with the knobs that are set."""
    return dict(cuda=True, **{k: v for k, v in knobs.items() if v is not None})


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cuda_kernel_matches_oracle(case):
    M, N, K, r, dtype, nested, bs, bias, adt, split, warps = case
    w = make_weight(N, K, bs, nested, 0.05)
    x, A, B, b = make_inputs(M, N, K, r, dtype, bias, adapter_dtype=adt)
    y, S = nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda(split_k=split, cuda_warps=warps))
    assert y.dtype == dtype and y.shape == (M, N) and S.dtype == dtype and S.shape == (M, r)
    y_ref, S_ref = oracle(x, oracle_nf4_weight(w), A, B, b)
    assert rel_err(S, S_ref) <= TOL[dtype]
    assert rel_err(y, y_ref) <= TOL[dtype]
    # and the Triton kernels agree
    y_t, _ = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda=False))
    assert rel_err(y, y_t.double()) <= TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("n_split", [1, 3])
def test_partials_are_the_slice_sums(nested, n_split):
    """The launcher alone: each slice of ``ws`` / ``ws_s`` (NaN before) is the product over its K columns (the
    weight's code rounded to x's dtype: TOL; S exactly up to fp32 sums)."""
    M, N, K, r, dtype = 5, 200, 768, 8, BF16
    w = make_weight(N, K, 64, nested, 0.05)
    x, A, _, _ = make_inputs(M, N, K, r, dtype, False, adapter_dtype=F32)
    assert nf4_mma_gemv.supported(x, w)
    k_per_split = K // n_split
    ws = torch.full((n_split, M, N), float("nan"), device="cuda")
    ws_s = torch.full((n_split, M, r), float("nan"), device="cuda")
    nf4_mma_gemv.partials(x, w, A, ws, ws_s, k_per_split, n_split, 4)
    W64, A64 = oracle_nf4_weight(w), A.to(dtype).double()
    for i in range(n_split):
        ks = slice(i * k_per_split, (i + 1) * k_per_split)
        assert rel_err(ws[i], x[:, ks].double() @ W64[:, ks].t()) <= TOL[dtype]
        assert rel_err(ws_s[i], x[:, ks].double() @ A64[:, ks].t()) <= 1e-5


@needs_kernel
def test_cuda_kernel_split_is_deterministic():
    w = make_weight(200, 2048, 64, True, 0.05)
    x, A, B, b = make_inputs(5, 200, 2048, 16, BF16, True)
    y1, _ = nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda(split_k=4))
    y2, _ = nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda(split_k=4))
    assert torch.equal(y1, y2)


@needs_kernel
@pytest.mark.parametrize("min_elements", [0, 2**25])
def test_default_dispatch_uses_cuda_kernel_only_in_its_range(min_elements, monkeypatch):
    monkeypatch.setattr(policy, "CUDA_GEMV_MIN_ELEMENTS", min_elements)
    w = make_weight(256, 1024, 64, True, 0.05)
    for M in (*range(1, 18), 24, 32, 33, 48, 64):
        x, A, B, b = make_inputs(M, 256, 1024, 8, BF16, False)
        y = nf4_gemv(x, w, A, B, SCALING, b)[0]
        uses_cuda = policy.CUDA_GEMV_MIN_M <= M <= policy.CUDA_GEMV_MAX_M and 256 * 1024 >= min_elements
        assert torch.equal(y, nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda=uses_cuda))[0]), M
    # Triton knobs keep the Triton kernel
    monkeypatch.setattr(policy, "CUDA_GEMV_MIN_ELEMENTS", 0)
    x, A, B, b = make_inputs(4, 256, 1024, 8, BF16, False)
    y = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(block_n=64))[0]
    assert torch.equal(y, nf4_gemv(x, w, A, B, SCALING, b, tune=dict(block_n=64, cuda=False))[0])


@needs_kernel
def test_cuda_kernel_under_graph_capture():
    w = make_weight(4096, 4096, 64, True, 0.05)
    x, A, B, b = make_inputs(4, 4096, 4096, 16, BF16, False)
    eager = nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda())[0]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda())[0]
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda())[0])
    assert not torch.equal(out, eager)


@needs_kernel
def test_cuda_kernel_strided_x_rows():
    w = make_weight(100, 512, 64, True, 0.05)
    big = torch.randn(6, 1024, device="cuda").to(BF16)
    x = big[:, 256:768]  # row stride 1024, 16-byte aligned rows
    _, A, B, b = make_inputs(6, 100, 512, 8, BF16, True)
    y, _ = nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda())
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
        nf4_gemv(x, w, A, B, SCALING, b, tune=_cuda())
    y, _ = nf4_gemv(x, w, A, B, SCALING, b)  # the default falls back to Triton
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
        y, _ = nf4_gemv(x, w, A, B, SCALING, None, tune=_cuda())
        assert torch.cuda.current_device() == 0
    assert y.device == dev
    assert rel_err(y, oracle(x, oracle_nf4_weight(w), A, B, None)[0]) <= TOL[BF16]


def test_bad_cuda_knobs_raise():
    """Checked before anything else, so also on machines without the kernel."""
    w = make_weight(50, 512, 64, True, 0.05)
    x, A, B, b = make_inputs(4, 50, 512, 8, F16, True)
    with pytest.raises(ValueError, match="cuda_warps must be one of"):
        nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda=True, cuda_warps=3))
    with pytest.raises(ValueError, match="cuda_warps applies to the CUDA kernel"):
        nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda_warps=4))
    with pytest.raises(ValueError, match="block_n, num_warps apply to the Triton kernels"):
        nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda=True, block_n=64, num_warps=2))
    with pytest.raises(ValueError, match="input_precision apply to the Triton kernels"):
        nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda=True, input_precision="ieee"))
    with pytest.raises(TypeError, match="cuda must be"):
        nf4_gemv(x, w, A, B, SCALING, b, tune=dict(cuda="yes"))


# --------------------------------------------------------------------------------------------- the operator (GPU)
def _op_args(w, x, A, ws, ws_s, k_per_split, warps=4):
    return (x, w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, w.blocksize,
            w.nested_blocksize if w.nested else 0, A, ws, ws_s, k_per_split, warps)


@needs_kernel
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_opcheck(nested):
    """torch.library.opcheck: the schema (mutation annotations), the fake implementation, autograd registration
    and AOT dispatch of the operator."""
    M, N, K, r = 3, 100, 512, 8
    w = make_weight(N, K, 64, nested, 0.05)
    x, A, _, _ = make_inputs(M, N, K, r, BF16, False, adapter_dtype=F32)
    ws, ws_s = torch.empty(2, M, N, device="cuda"), torch.empty(2, M, r, device="cuda")
    op = nf4_mma_gemv.op(torch.cuda.current_device())
    assert op is torch.ops.lowrank_kernels.nf4_mma_gemv.default
    torch.library.opcheck(op, _op_args(w, x, A, ws, ws_s, 256))


@needs_kernel
def test_operator_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = make_weight(64, 512, 64, True, 0.05)
    x, A, _, _ = make_inputs(2, 64, 512, 4, BF16, False, adapter_dtype=F32)
    op = nf4_mma_gemv.op(torch.cuda.current_device())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ws, ws_s = torch.empty(1, 2, 64, device="cuda"), torch.empty(1, 2, 4, device="cuda")
        assert op(*_op_args(w, mode.from_tensor(x), A, ws, ws_s, 512)) is None


@needs_kernel
@pytest.mark.parametrize("change", ["x_fp32", "M17", "K_not_256", "ws_shape", "ws_s_shape", "warps3", "split_short",
                                    "nested_partial", "absmax_dtype", "packed_size"])
def test_operator_checks_its_inputs(change):
    """Called directly (not through the launcher's ``supported``), the operator refuses what the kernel cannot
    run with a RuntimeError instead of launching it."""
    M, N, K, r = 3, 64, 512, 4
    w = make_weight(N, K, 64, True, 0.05)
    x, A, _, _ = make_inputs(M, N, K, r, BF16, False, adapter_dtype=F32)
    ws, ws_s = torch.empty(1, M, N, device="cuda"), torch.empty(1, M, r, device="cuda")
    args = list(_op_args(w, x, A, ws, ws_s, 512))
    if change == "x_fp32":
        args[0] = x.float()
    elif change == "M17":
        args[0] = torch.randn(17, K, device="cuda").to(BF16)
    elif change == "K_not_256":
        args[0] = x[:, :320].contiguous()
    elif change == "ws_shape":
        args[10] = torch.empty(1, M, N + 1, device="cuda")
    elif change == "ws_s_shape":
        args[11] = torch.empty(1, M, r + 1, device="cuda")
    elif change == "warps3":
        args[13] = 3
    elif change == "split_short":
        args[12] = 256  # one slice of 256 does not cover K = 512
    elif change == "nested_partial":
        args[4] = None  # code2 missing
    elif change == "absmax_dtype":
        args[2] = w.absmax.float()
    elif change == "packed_size":
        args[1] = w.packed[: w.packed.shape[0] // 2]
    with pytest.raises(RuntimeError, match="nf4_mma_gemv"):
        torch.ops.lowrank_kernels.nf4_mma_gemv(*args)


# ------------------------------------------------------------------------------------- builder (GPU machine)
@needs_kernel
@pytest.mark.parametrize("name", [nf4_mma_gemv.NAME, nf4_merge_mma.NAME])
def test_kernel_builds_and_registers_its_operator(name):
    path = cuda_ext.build(name)
    assert path is not None and str(path).endswith(".so")
    assert hasattr(torch.ops.lowrank_kernels, name)
    archs = cuda_ext.archs()
    major, minor = torch.cuda.get_device_capability()
    assert f"{major}{minor}" in archs
    assert cuda_ext.build_directory(name, archs) in Path(path).parents


@needs_kernel
def test_ninja_tracks_the_headers():
    """The build records the headers each object includes (nvcc's and g++'s depfiles), so that editing
    nf4_common.cuh or nf4_entry.h rebuilds; an unchanged tree has nothing to rebuild."""
    name = nf4_mma_gemv.NAME
    assert cuda_ext.build(name) is not None
    directory = cuda_ext.build_directory(name, cuda_ext.archs())
    ninja = shutil.which("ninja") or str(cuda_ext.ninja_dir() / "ninja")
    deps = subprocess.run([ninja, "-C", str(directory), "-t", "deps"], capture_output=True, text=True,
                          check=True).stdout
    assert "nf4_common.cuh" in deps and "nf4_entry.h" in deps, deps[:2000]
    dry = subprocess.run([ninja, "-C", str(directory), "-n"], capture_output=True, text=True, check=True).stdout
    assert "no work to do" in dry, dry


@needs_kernel
def test_failed_build_warns_and_returns_none(monkeypatch, tmp_path):
    (tmp_path / "broken.cu").write_text("this is not C++\n")
    (tmp_path / "broken_op.cpp").write_text("int lk_broken_unused = 0;\n")
    monkeypatch.setattr(cuda_ext, "CSRC", tmp_path)
    monkeypatch.setenv("LOWRANK_KERNELS_CACHE", str(tmp_path / "cache"))
    cuda_ext.build.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cuda_ext.build("broken") is None
        assert any("could not build csrc/broken.cu" in str(c.message) for c in caught)
    finally:
        cuda_ext.build.cache_clear()


# ---------------------------------------------------------------------------------------- builder (any machine)
def test_sources_ship_inside_the_package():
    """``csrc/`` is part of the package (so an installed wheel has it): every source of both kernels is there."""
    assert cuda_ext.source_dir() == cuda_ext.CSRC
    assert cuda_ext.source_dir().parent == Path(lowrank_kernels.__file__).resolve().parent
    for name in (nf4_mma_gemv.NAME, nf4_merge_mma.NAME):
        assert all(s.is_file() for s in cuda_ext.sources(name)), name
    for header in ("nf4_common.cuh", "nf4_entry.h"):
        assert (cuda_ext.source_dir() / header).is_file()


def test_build_is_none_when_switched_off(monkeypatch):
    monkeypatch.setattr(policy, "USE_CUDA_KERNELS", False)  # what LOWRANK_KERNELS_CUDA=0 sets
    cuda_ext.build.cache_clear()
    try:
        assert cuda_ext.build(nf4_mma_gemv.NAME) is None
        assert "LOWRANK_KERNELS_CUDA=0" in cuda_ext.unavailable_reason()
    finally:
        cuda_ext.build.cache_clear()


def test_build_is_none_without_nvcc(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_nvcc", lambda: None)
    cuda_ext.build.cache_clear()
    try:
        assert cuda_ext.build(nf4_mma_gemv.NAME) is None
        reason = cuda_ext.unavailable_reason()
        assert reason is not None and ("nvcc" in reason or "not a CUDA build" in reason)
    finally:
        cuda_ext.build.cache_clear()


def test_unbuildable_kernels_log_one_line(monkeypatch, caplog):
    """Where the kernels cannot be built, one INFO line on the ``lowrank_kernels`` logger says so and why, once
    per process (not once per kernel or call)."""
    monkeypatch.setattr(policy, "USE_CUDA_KERNELS", False)  # what LOWRANK_KERNELS_CUDA=0 sets
    monkeypatch.setattr(cuda_ext, "_noted", False)
    cuda_ext.build.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="lowrank_kernels"):
            for _ in range(2):
                for name in (nf4_mma_gemv.NAME, nf4_merge_mma.NAME):
                    cuda_ext.build.cache_clear()
                    assert cuda_ext.build(name) is None
        lines = [r for r in caplog.records if r.name == "lowrank_kernels" and "not built" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        assert "LOWRANK_KERNELS_CUDA=0" in lines[0].getMessage()
    finally:
        cuda_ext.build.cache_clear()


def test_launchers_say_unavailable_off_cuda():
    cpu = torch.device("cpu")
    assert not nf4_mma_gemv.available(cpu)
    w = NF4Weight.quantize(torch.randn(16, 256), blocksize=64)
    assert not nf4_mma_gemv.supported(torch.randn(2, 256).to(BF16), w)
    assert not nf4_merge_mma.supported(w, 8, BF16)


# ------------------------------------------------------------ the operators' schemas and fakes (any machine)
def _schema(name: str) -> str:
    """The schema that ``csrc/<name>_op.cpp`` defines (its ``m.def("...")`` string literals joined)."""
    src = (cuda_ext.source_dir() / f"{name}_op.cpp").read_text()
    body = src[src.index("m.def("):]
    return "".join(re.findall(r'"([^"]*)"', body[:body.index(");")]))


@pytest.fixture(scope="module")
def reference_ops():
    """The two schemas of the C++ files, defined in a private namespace with CPU reference implementations (the
    kernels' contracts in torch) and the launchers' fake implementations: what opcheck needs, on any machine."""
    ns = "lowrank_kernels_schema_test"
    lib = torch.library.Library(ns, "FRAGMENT")
    for name in (nf4_mma_gemv.NAME, nf4_merge_mma.NAME):
        lib.define(_schema(name))

    def weight(packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, N, K):
        return NF4Weight(packed, absmax, (N, K), F32, blocksize, code, absmax2, code2, offset,
                         nested_blocksize if absmax2 is not None else 256)

    def gemv(x, packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, lora_A, ws, ws_s,
             k_per_split, warps):
        M, K = x.shape
        W = weight(packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, ws.shape[2], K)
        deq, A = W.dequantize(F32), lora_A.to(x.dtype).float()
        for i in range(ws.shape[0]):
            ks = slice(i * k_per_split, (i + 1) * k_per_split)
            ws[i].copy_(x[:, ks].float() @ deq[:, ks].t())
            ws_s[i].copy_(x[:, ks].float() @ A[:, ks].t())

    def merge(packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, lora_A, lora_B, scaling,
              warps):
        N, K, R = lora_B.shape[0], lora_A.shape[1], lora_A.shape[0]
        W = weight(packed, absmax, absmax2, code2, offset, code, blocksize, nested_blocksize, N, K)
        return (W.dequantize(F32) + scaling * (lora_B[:, :R].float() @ lora_A.float())).to(lora_A.dtype)

    lib.impl(nf4_mma_gemv.NAME, gemv, "CPU")
    lib.impl(nf4_merge_mma.NAME, merge, "CPU")
    torch.library.register_fake(f"{ns}::{nf4_mma_gemv.NAME}", lib=lib)(nf4_mma_gemv._fake)
    torch.library.register_fake(f"{ns}::{nf4_merge_mma.NAME}", lib=lib)(nf4_merge_mma._fake)
    yield getattr(torch.ops, ns)
    lib._destroy()


@pytest.mark.parametrize("module", [nf4_mma_gemv, nf4_merge_mma], ids=lambda m: m.NAME)
def test_schema_matches_the_fake(module):
    schema = torch._C.parse_schema(f"{cuda_ext.NAMESPACE}::{_schema(module.NAME)}")
    assert schema.name == f"{cuda_ext.NAMESPACE}::{module.NAME}"
    assert [a.name for a in schema.arguments] == list(inspect.signature(module._fake).parameters)
    optional = {a.name for a in schema.arguments if isinstance(a.type, torch.OptionalType)}
    assert optional == {"absmax2", "code2", "offset"}
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    if module is nf4_mma_gemv:  # writes the workspaces it is given, returns nothing
        assert written == {"ws", "ws_s"} and len(schema.returns) == 0
    else:  # a new tensor
        assert written == set() and len(schema.returns) == 1


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_opcheck_of_the_schemas_and_fakes(reference_ops, nested):
    """opcheck on the C++ schemas with the launchers' fakes (CPU reference implementations): the mutation
    annotations, the fake outputs' shapes / dtypes / strides, AOT dispatch."""
    w = NF4Weight.quantize(torch.randn(40, 512) * 0.05, blocksize=64, double_quant=nested)
    x, A = torch.randn(3, 512).to(BF16), torch.randn(8, 512)
    ws, ws_s = torch.empty(2, 3, 40), torch.empty(2, 3, 8)
    torch.library.opcheck(reference_ops.nf4_mma_gemv.default, _op_args(w, x, A, ws, ws_s, 256, 8))
    B = torch.nn.functional.pad(torch.randn(40, 8), (0, 8)).to(BF16)
    At = torch.randn(512, 8).to(BF16).t()  # any strides: the output is contiguous anyway
    for lora_A in (A.to(BF16), At):
        torch.library.opcheck(reference_ops.nf4_merge_mma.default,
                              (w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, w.blocksize,
                               w.nested_blocksize if nested else 0, lora_A, B, 0.7, 4))
