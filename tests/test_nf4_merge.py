"""The merged NF4 dequantization (``kernels.nf4_merge``: ``W' = round(deq(W) + s * round(B) @ round(A))``) against
an fp64 reference, on ragged shapes, both NF4 layouts, every dtype; on CPU through the Triton interpreter."""
import pytest
import torch

from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels.nf4_merge import nf4_merge
from tests.conftest import DEVICE, HAS_CUDA

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (N, K, r, blocksize, nested, dtype, adapter dtype, block_n, block_k)
CASES = [
    (33, 256, 16, 64, True, F16, F32, 32, 256),  # ragged N, whole word tiles
    (40, 200, 8, 64, False, F32, F32, 16, 128),  # K % blocksize != 0: the generic tile path, masked last tile
    (17, 129, 1, 32, True, F16, F16, 16, 64),  # odd K (rows start on low nibbles), r = 1
    (64, 384, 64, 128, True, BF16, F32, 32, 128),  # r = 64, bf16 (the interpreter upcasts its dot operands)
    (50, 320, 20, 64, False, BF16, BF16, 16, 256),  # r = 20 (padded to 32), partial last K tile
]


def _reference(w, A, B, s, dtype):
    """The fp64 sum of the bit-exact dequantized weight and the rank-r update of the rounded adapters."""
    Ar, Br = A.to(dtype).double(), B.to(dtype).double()
    return w.dequantize(dtype).double() + s * Br @ Ar


def _ulp(t, dtype):
    """One unit in the last place of ``dtype`` at the magnitude of each element of ``t`` (fp64)."""
    fi = torch.finfo(dtype)
    mant = {F16: 10, BF16: 7, F32: 23}[dtype]
    ulp = torch.ldexp(torch.ones_like(t), torch.frexp(t.abs().clamp_min(1e-30))[1] - 1 - mant)
    return ulp.clamp_min(fi.tiny * fi.eps)  # subnormals: a fixed step


def _assert_one_rounding(out, w, A, B, s, dtype):
    """``out`` is ``deq(W) + s * B @ A`` rounded once: within one ulp of the exact value plus the fp32 error of the
    rank-r sum, and visibly not the plain dequantization. Returns the fp64 reference and that bound."""
    assert out.dtype == dtype and out.shape == tuple(w.shape)
    ref = _reference(w, A, B, s, dtype)
    bound = _ulp(ref, dtype) + 2.0**-20 * s * B.to(dtype).double().abs() @ A.to(dtype).double().abs()
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), (err / _ulp(ref, dtype)).max().item()
    assert (out != w.dequantize(dtype)).float().mean() > 0.5
    return ref, bound


@pytest.mark.parametrize("case", CASES, ids=str)
def test_merge_matches_fp64_reference(case):
    N, K, r, bs, nested, dtype, adt, bn, bk = case
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=bs, double_quant=nested)
    A = (torch.randn(r, K, device=DEVICE) * 0.3).to(adt)
    B = (torch.randn(N, r, device=DEVICE) * 0.3).to(adt)
    out = nf4_merge(w, A, B, 0.7, dtype, block_n=bn, block_k=bk)
    _assert_one_rounding(out, w, A, B, 0.7, dtype)


def test_merge_with_zero_update_is_the_dequantized_weight():
    w = NF4Weight.quantize(torch.randn(24, 192, device=DEVICE), blocksize=64)
    A = torch.randn(4, 192, device=DEVICE)
    B = torch.zeros(24, 4, device=DEVICE)
    assert torch.equal(nf4_merge(w, A, B, 2.0, F16), w.dequantize(F16))


@pytest.mark.skipif(not HAS_CUDA, reason="a Llama-sized weight")
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_merge_llama_shape_gpu(dtype):
    w = NF4Weight.quantize(torch.randn(4096, 4096, device=DEVICE) * 0.02, blocksize=64)
    A = torch.randn(16, 4096, device=DEVICE) / 64
    B = torch.randn(4096, 16, device=DEVICE) * 0.01
    ref = _reference(w, A, B, 2.0, dtype)
    err = (nf4_merge(w, A, B, 2.0, dtype).double() - ref).abs()
    fp32_sum = 2.0**-20 * 2.0 * B.to(dtype).double().abs() @ A.to(dtype).double().abs()
    assert bool((err <= _ulp(ref, dtype) + fp32_sum).all())


# (N, K, r, blocksize, nested, dtype, adapter dtype, transposed A, warps)
CUDA_CASES = [
    (33, 256, 16, 64, True, BF16, F32, False, 8),  # ragged N (partial 16-row steps), fp32 adapters cast
    (300, 192, 8, 64, False, F16, F16, True, 2),  # fp32 absmax, A with non-unit stride along K, many blocks
    (529, 320, 20, 128, True, BF16, BF16, False, 4),  # r = 20 (two chunks, zero-padded), a warp past K
    (70, 128, 1, 256, True, F16, F32, False, 1),  # r = 1, blocksize 256
    (100, 512, 32, 64, True, BF16, F32, True, 8),  # r = 32 (two chunks), transposed A
    (17, 64, 24, 64, False, BF16, BF16, False, 8),  # one strip (7 warps past K), r = 24
]


def _cuda_kernel_available():
    """The CUDA merge kernel (csrc/nf4_merge_mma.cu, kernels/nf4_merge_mma.py) runs here (built on first use)."""
    if not HAS_CUDA:
        return False
    from lowrank_kernels.kernels import nf4_merge_mma

    w = NF4Weight.quantize(torch.randn(16, 64, device=DEVICE), blocksize=64)
    return nf4_merge_mma.supported(w, 16, BF16)


needs_cuda_merge = pytest.mark.skipif(
    not _cuda_kernel_available(), reason="the CUDA merge kernel needs a GPU (sm >= 80), a CUDA PyTorch, nvcc, ninja")


@needs_cuda_merge
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_merge_matches_fp64_reference(case):
    from lowrank_kernels.kernels import nf4_merge_mma

    N, K, r, bs, nested, dtype, adt, trans_a, warps = case
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=bs, double_quant=nested)
    A = (torch.randn(K, r, device=DEVICE) * 0.3).to(adt).t() if trans_a else \
        (torch.randn(r, K, device=DEVICE) * 0.3).to(adt)
    B = (torch.randn(N, r, device=DEVICE) * 0.3).to(adt)
    assert nf4_merge_mma.supported(w, r, dtype)
    out = nf4_merge_mma.merge(w, A, B, 0.7, dtype, warps=warps)
    ref, bound = _assert_one_rounding(out, w, A, B, 0.7, dtype)
    assert out.is_contiguous()
    # the default entry point takes it, and the Triton kernel agrees within twice the bound
    assert torch.equal(nf4_merge(w, A, B, 0.7, dtype), out)
    tri = nf4_merge(w, A, B, 0.7, dtype, cuda=False)
    assert bool(((tri.double() - out.double()).abs() <= 2 * bound).all())


@needs_cuda_merge
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_cuda_merge_opcheck(nested):
    """torch.library.opcheck of torch.ops.lowrank_kernels.nf4_merge_mma: schema, fake implementation (shape, dtype,
    strides of W'), autograd registration, AOT dispatch."""
    from lowrank_kernels.kernels import nf4_merge_mma

    w = NF4Weight.quantize(torch.randn(48, 192, device=DEVICE), blocksize=64, double_quant=nested)
    B = torch.nn.functional.pad(torch.randn(48, 8, device=DEVICE), (0, 8)).to(BF16)
    op = nf4_merge_mma.op(torch.cuda.current_device())
    assert op is torch.ops.lowrank_kernels.nf4_merge_mma.default
    for A in (torch.randn(8, 192, device=DEVICE).to(BF16), torch.randn(192, 8, device=DEVICE).to(BF16).t()):
        torch.library.opcheck(op, (w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, w.blocksize,
                                   w.nested_blocksize if nested else 0, A, B, 0.7, 4))


@needs_cuda_merge
@pytest.mark.parametrize("change", ["fp32", "B_unpadded", "r40", "K_not_64", "warps9", "packed_size"])
def test_cuda_merge_operator_checks_its_inputs(change):
    """Called directly, the operator refuses what the kernel cannot run (RuntimeError) instead of launching it."""
    w = NF4Weight.quantize(torch.randn(32, 128, device=DEVICE), blocksize=64)
    A = torch.randn(8, 128, device=DEVICE).to(BF16)
    B = torch.nn.functional.pad(torch.randn(32, 8, device=DEVICE), (0, 8)).to(BF16)
    args = [w.packed, w.absmax, None, None, None, w.code, 64, 0, A, B, 1.0, 4]
    if change == "fp32":
        args[8], args[9] = A.float(), B.float()
    elif change == "B_unpadded":
        args[9] = B[:, :8].contiguous()
    elif change == "r40":
        args[8] = torch.randn(40, 128, device=DEVICE).to(BF16)
        args[9] = torch.zeros(32, 48, device=DEVICE).to(BF16)
    elif change == "K_not_64":
        args[8] = A[:, :96].contiguous()
    elif change == "warps9":
        args[11] = 9
    elif change == "packed_size":
        args[0] = w.packed[:10]
    with pytest.raises(RuntimeError, match="nf4_merge_mma"):
        torch.ops.lowrank_kernels.nf4_merge_mma(*args)


def test_cuda_merge_refuses_what_it_does_not_support():
    w = NF4Weight.quantize(torch.randn(16, 96, device=DEVICE), blocksize=32)  # K % 64 != 0, blocksize 32
    A, B = torch.randn(4, 96, device=DEVICE), torch.randn(16, 4, device=DEVICE)
    with pytest.raises(ValueError, match="cuda=True"):
        nf4_merge(w, A, B, 1.0, F16, cuda=True)
    w = NF4Weight.quantize(torch.randn(16, 128, device=DEVICE), blocksize=64)
    A, B = torch.randn(64, 128, device=DEVICE), torch.randn(16, 64, device=DEVICE)  # r = 64
    with pytest.raises(ValueError, match="cuda=True"):
        nf4_merge(w, A, B, 1.0, BF16, cuda=True)


def test_policy_limit_is_the_kernels():
    from lowrank_kernels import policy
    from lowrank_kernels.kernels import launch

    assert policy.MERGE_MAX_ELEMENTS == launch.MAX_ELEMENTS


@pytest.mark.parametrize("limit", [10**9, 100], ids=["merged", "over the limit"])
def test_dispatch_merges_only_where_it_may(limit, monkeypatch):
    """At M >= MERGE_MIN_M without dropout the default CUDA path (forced here on CPU through the interpreter)
    merges; a weight over MERGE_MAX_ELEMENTS, or dropout, takes the unmerged path. Both match the oracle."""
    import lowrank_kernels.kernels.nf4_merge as merge_mod
    from lowrank_kernels import policy, qlora_linear
    from tests.test_lora_forward import TOL, oracle_nf4_weight, rel_err

    if not HAS_CUDA:
        choose = policy.choose_backend
        monkeypatch.setattr(policy, "choose_backend",
                            lambda device, backend=None: "triton" if backend is None else choose(device, backend))
    monkeypatch.setattr(policy, "MERGE_MIN_M", 64)
    monkeypatch.setattr(policy, "MERGE_MAX_ELEMENTS", limit)
    calls = []
    real = merge_mod.nf4_merge
    monkeypatch.setattr(merge_mod, "nf4_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = NF4Weight.quantize(torch.randn(30, 128, device=DEVICE), blocksize=64)
    x = torch.randn(70, 128, device=DEVICE, requires_grad=True)
    A = (torch.randn(4, 128, device=DEVICE) / 12).requires_grad_()
    B = torch.randn(30, 4, device=DEVICE).requires_grad_()
    for p in (0.0, 0.1):
        calls.clear()
        y = qlora_linear(x, w, A, B, 1.5, dropout=p)
        y.sum().backward()
        assert len(calls) == (2 if limit > 30 * 128 and p == 0 else 0), (limit, p)
        if p == 0:
            ref = x.double() @ oracle_nf4_weight(w).t() + 1.5 * (x.double() @ A.double().t()) @ B.double().t()
            assert rel_err(y, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("grads", ["inference", "x and A only"])
def test_merged_path_skips_S_where_unneeded(grads, monkeypatch):
    """The merged forward computes ``S = x @ A.T`` (a pass over x) only when lora_B needs a gradient: not under
    ``torch.no_grad()``, not when lora_B is frozen. Outputs and the gradients asked for still match the oracle."""
    from lowrank_kernels import dispatch, policy, qlora_linear
    from tests.test_lora_forward import TOL, oracle_nf4_weight, rel_err

    if not HAS_CUDA:
        choose = policy.choose_backend
        monkeypatch.setattr(policy, "choose_backend",
                            lambda device, backend=None: "triton" if backend is None else choose(device, backend))
    monkeypatch.setattr(policy, "MERGE_MIN_M", 64)
    linears = []
    real_linear = dispatch.F.linear
    monkeypatch.setattr(dispatch.F, "linear", lambda x, w, b=None: linears.append(w.shape) or real_linear(x, w, b))
    w = NF4Weight.quantize(torch.randn(30, 128, device=DEVICE), blocksize=64)
    x = torch.randn(70, 128, device=DEVICE, requires_grad=grads != "inference")
    A = (torch.randn(4, 128, device=DEVICE) / 12).requires_grad_(grads != "inference")
    B = torch.randn(30, 4, device=DEVICE)
    with torch.no_grad() if grads == "inference" else torch.enable_grad():
        y = qlora_linear(x, w, A, B, 1.5)
    assert linears == [(30, 128)]  # the GEMM with the merged weight, no S = x @ A.T
    xd, Ad = x.detach().double(), A.detach().double()
    ref = xd @ oracle_nf4_weight(w).t() + 1.5 * (xd @ Ad.t()) @ B.double().t()
    assert rel_err(y, ref) <= TOL[torch.float32]
    if grads != "inference":
        g = torch.randn_like(y)
        y.backward(g)
        gd = g.double()
        dS = 1.5 * gd @ B.double()
        assert rel_err(x.grad, gd @ (oracle_nf4_weight(w) + 1.5 * B.double() @ Ad)) <= TOL[torch.float32]
        assert rel_err(A.grad, dS.t() @ xd) <= TOL[torch.float32]


@needs_cuda_merge
@pytest.mark.parametrize("warps", [0, 9, 2.0])
def test_cuda_merge_rejects_bad_warps(warps):
    from lowrank_kernels.kernels import nf4_merge_mma

    w = NF4Weight.quantize(torch.randn(16, 64, device=DEVICE), blocksize=64)
    with pytest.raises(ValueError, match="warps"):
        nf4_merge_mma.merge(w, torch.randn(4, 64, device=DEVICE), torch.randn(16, 4, device=DEVICE), 1.0, BF16,
                            warps=warps)
