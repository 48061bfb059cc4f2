"""``policy``: the table of what runs for a call, every branch, on CPU (the facts of a CUDA call are given)."""
import pytest
import torch

from lowrank_kernels import NF4Weight, policy
from lowrank_kernels.kernels import nf4_gemv

BIG = policy.MERGE_MAX_ELEMENTS


@pytest.mark.parametrize("facts,path", [
    # (triton, fused, nf4, numel, M, dropout) -> path
    ((False, False, True, 4096**2, 8192, False), "torch"),
    ((False, True, True, 4096**2, 8192, False), "torch"),
    ((True, True, True, 4096**2, 8192, False), "fused"),
    ((True, True, False, 4096**2, 100, True), "fused"),
    ((True, False, True, 4096**2, policy.MERGE_MIN_M, False), "merged"),
    ((True, False, True, BIG, policy.MERGE_MIN_M, False), "merged"),
    ((True, False, True, BIG + 1, policy.BRANCH_MIN_M, False), "branch"),  # over the merge kernels' int32 limit
    ((True, False, True, BIG + 1, policy.MERGE_MIN_M, False), "cublas"),
    ((True, False, True, 4096**2, policy.MERGE_MIN_M - 1, False), "cublas"),
    ((True, False, True, 4096**2, policy.MERGE_MIN_M, True), "branch"),  # dropout: never merged
    ((True, False, True, 4096**2, 65, True), "branch"),
    ((True, False, False, 4096**2, policy.MERGE_MIN_M, False), "cublas"),  # a dense weight is not merged
    ((True, False, False, 4096**2, policy.BRANCH_MIN_M, False), "branch"),
    ((True, False, False, 4096**2, 1, True), "branch"),
])
def test_layer_path_table(facts, path):
    assert policy.layer_path(*facts) == path


@pytest.fixture
def cuda_default(monkeypatch):
    """Plans as on a CUDA device: ``backend=None`` chooses Triton."""
    choose = policy.choose_backend
    monkeypatch.setattr(policy, "choose_backend",
                        lambda device, backend=None: "triton" if backend is None else choose(device, backend))


def nf4(N, K):
    return NF4Weight.quantize(torch.empty(N, K, device="meta"))


@pytest.mark.parametrize("M,weight,dropout,backend,config,expected", [
    (1, "nf4", False, None, None, policy.LayerPlan("gemv")),
    (policy.GEMV_MAX_M, "nf4", False, None, None, policy.LayerPlan("gemv")),
    (policy.GEMV_MAX_M + 1, "nf4", False, None, None, policy.LayerPlan("cublas")),
    (16, "nf4", True, None, None, policy.LayerPlan("branch", masked_kernels=True)),  # dropout: no GEMV
    (16, "nf4", False, None, {"BLOCK_M": 16}, policy.LayerPlan("cublas")),  # a fused-GEMM config: no GEMV
    (16, "nf4", False, "triton", {"BLOCK_M": 16}, policy.LayerPlan("fused")),
    (16, "nf4", False, "triton", None, policy.LayerPlan("gemv")),
    (16, "dense", False, None, None, policy.LayerPlan("cublas")),
    (8192, "nf4", False, None, None, policy.LayerPlan("merged")),
    (8192, "nf4", True, None, None, policy.LayerPlan("branch", masked_kernels=True)),
    (8192, "dense", False, None, None, policy.LayerPlan("branch")),
    (8192, "nf4", False, "torch", None, policy.LayerPlan("torch")),
    (8192, "nf4", True, "torch", None, policy.LayerPlan("torch")),
])
def test_forward_plan(M, weight, dropout, backend, config, expected, cuda_default):
    # a forced Triton backend needs real tensors: CUDA ones, or CPU ones through the interpreter
    device = ("cuda" if torch.cuda.is_available() else "cpu") if backend == "triton" else "meta"
    x = torch.empty(M, 256, device=device)
    w = NF4Weight.empty((300, 256), torch.float32, device=device) if weight == "nf4" else \
        torch.empty(300, 256, device=device)
    assert policy.forward_plan(x, w, dropout, backend, config) == expected


@pytest.mark.parametrize("M,dropout,need_A,need_B,expected", [
    (8192, False, True, True, policy.LayerPlan("merged", dual=True, fp32_sums=True)),
    (8192, False, True, False, policy.LayerPlan("merged", fp32_sums=True)),
    (8192, False, False, True, policy.LayerPlan("merged", fp32_sums=True)),
    (8192, True, True, True, policy.LayerPlan("branch", masked_kernels=True, fp32_sums=True)),
    (100, False, True, True, policy.LayerPlan("cublas", fp32_sums=True)),
    (16, False, True, True, policy.LayerPlan("cublas", fp32_sums=True)),  # no GEMV in the backward
])
def test_backward_plan(M, dropout, need_A, need_B, expected, cuda_default):
    dy = torch.empty(M, 300, device="meta")
    assert policy.backward_plan(dy, nf4(300, 256), dropout, need_A, need_B) == expected


def test_backward_plan_on_cpu_is_torch():
    dy = torch.empty(8192, 300, device="meta")
    assert policy.backward_plan(dy, nf4(300, 256), False, True, True) == policy.LayerPlan("torch")


H100 = policy.DeviceFacts("cuda", 9, 132)
A100 = policy.DeviceFacts("cuda", 8, 108)


def gemv_facts(M=1, N=4096, K=4096, dtype=torch.bfloat16, blocksize=64, device=H100, interpreting=False,
               capturing=False, cuda_kernel_fits=True, tma_descriptors=True, words_aligned=True):
    return policy.GemvFacts(M, N, K, dtype, blocksize, device, interpreting, capturing, cuda_kernel_fits,
                            tma_descriptors, words_aligned)


def test_gemv_cuda_kernel_where_it_measured_faster():
    plan = policy.plan_gemv(gemv_facts(M=4, N=14336))
    assert plan.cuda and plan.config is None
    assert not policy.plan_gemv(gemv_facts(M=1, N=14336)).cuda  # M = 1: Triton
    assert not policy.plan_gemv(gemv_facts(M=17, N=14336)).cuda  # above CUDA_GEMV_MAX_M
    assert not policy.plan_gemv(gemv_facts(M=4, N=1024, K=1024)).cuda  # a small weight
    assert not policy.plan_gemv(gemv_facts(M=4, N=14336, cuda_kernel_fits=False)).cuda
    assert not policy.plan_gemv(gemv_facts(M=4, N=14336), dict(block_n=64)).cuda  # a Triton knob passed
    assert policy.plan_gemv(gemv_facts(M=1, N=1024, K=1024), dict(cuda=True, cuda_warps=4)) == \
        policy.GemvPlan(True, None, True, "tf32", 4, None)
    with pytest.raises(ValueError, match="cuda=True needs"):
        policy.plan_gemv(gemv_facts(cuda_kernel_fits=False), dict(cuda=True))
    with pytest.raises(ValueError, match="block_n apply to the Triton kernels"):
        policy.plan_gemv(gemv_facts(), dict(cuda=True, block_n=64))
    with pytest.raises(ValueError, match="cuda_warps applies to the CUDA kernel"):
        policy.plan_gemv(gemv_facts(), dict(cuda_warps=4))
    with pytest.raises(ValueError, match="unknown keys"):
        policy.plan_gemv(gemv_facts(), dict(blockn=64))


def test_gemv_tma_only_under_graph_capture_on_hopper():
    assert not policy.plan_gemv(gemv_facts()).config["tma"]  # eager
    assert policy.plan_gemv(gemv_facts(capturing=True)).config["tma"]
    assert not policy.plan_gemv(gemv_facts(capturing=True, tma_descriptors=False)).config["tma"]
    assert not policy.plan_gemv(gemv_facts(capturing=True, K=4096 + 32)).config["tma"]  # K % blocksize != 0
    assert not policy.plan_gemv(gemv_facts(M=4, capturing=True, cuda_kernel_fits=False)).config["tma"]  # 2..8
    forced = policy.plan_gemv(gemv_facts(), dict(tma=True))
    assert forced.config["tma"]
    # TMA asked for with a tile it cannot take: refused; from the default with such a tile: dropped
    with pytest.raises(ValueError, match="tma=True needs"):
        policy.plan_gemv(gemv_facts(), dict(tma=True, block_k=64))
    assert not policy.plan_gemv(gemv_facts(capturing=True), dict(block_k=64)).config["tma"]
    assert not policy.plan_gemv(gemv_facts(capturing=True, words_aligned=False)).config["tma"]


def test_gemv_pdl():
    assert policy.plan_gemv(gemv_facts(M=16)).pdl == nf4_gemv.HAS_GDC
    assert not policy.plan_gemv(gemv_facts(M=17, cuda_kernel_fits=False)).pdl  # above PDL_MAX_M
    assert not policy.plan_gemv(gemv_facts(device=A100)).pdl  # before Hopper
    assert not policy.plan_gemv(gemv_facts(N=64 * 133)).pdl  # a finish grid of more than one wave
    assert not policy.plan_gemv(gemv_facts(interpreting=True)).pdl


def test_gemv_pdl_switch(monkeypatch):
    monkeypatch.setattr(policy, "USE_PDL", False)
    assert not policy.plan_gemv(gemv_facts()).pdl


def test_gemv_triton_config_and_precision():
    plan = policy.plan_gemv(gemv_facts(K=4096 + 32, blocksize=64, cuda_kernel_fits=False))
    assert plan.config["block_k"] == nf4_gemv.GENERIC_BLOCK_K  # K % blocksize != 0: the generic path's tile
    assert policy.plan_gemv(gemv_facts()).config == nf4_gemv.default_config(1, 4096, 4096, torch.bfloat16, 132)
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # a module with a property-like attribute: monkeypatch cannot restore it
        matmul.allow_tf32 = False
        assert policy.plan_gemv(gemv_facts(dtype=torch.float32)).precision == "ieee"
        assert policy.plan_gemv(gemv_facts(dtype=torch.float32), dict(input_precision="tf32x3")).precision == \
            "tf32x3"
        matmul.allow_tf32 = True
        assert policy.plan_gemv(gemv_facts(dtype=torch.float32)).precision == "tf32"
    finally:
        matmul.allow_tf32 = before


def test_merge_kernel_choice(monkeypatch):
    from lowrank_kernels.kernels import nf4_merge_mma

    w = nf4(64, 128)
    monkeypatch.setattr(nf4_merge_mma, "supported", lambda nf4, r, dtype: True)
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    assert policy.merge_on_cuda_kernel(w, 16, torch.bfloat16)
    assert not policy.merge_on_cuda_kernel(w, 16, torch.bfloat16, cuda=False)
    monkeypatch.setattr(policy, "USE_CUDA_KERNELS", False)
    assert not policy.merge_on_cuda_kernel(w, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="cuda=True"):
        policy.merge_on_cuda_kernel(w, 16, torch.bfloat16, cuda=True)


def test_backend_choice():
    assert policy.choose_backend(torch.device("cpu")) == "torch"
    assert policy.choose_backend(torch.device("cuda", 0)) == "triton"
    assert policy.choose_backend(torch.device("meta"), "torch") == "torch"
    with pytest.raises(ValueError, match="backend: expected one of"):
        policy.choose_backend(torch.device("cpu"), "cuda")


def test_mixed_path():
    x = torch.empty(8, 16)
    assert policy.mixed_path(x, "torch") == "torch"
    assert policy.mixed_path(x.double(), "triton") == "torch"
    assert policy.mixed_path(x, "triton", grad=True) == "torch"
    if policy.interpreting():
        assert policy.mixed_path(x, "triton") == "gather"
        assert policy.mixed_path(torch.empty(policy.MIXED_GATHER_MAX_M + 1, 16), "triton") == "segment"


def test_dora_norm_kernel_choice():
    """DoRA's norm: the one-pass Triton kernel on the Triton backend, torch for fp64 and on the torch backend."""
    W, A, B = torch.empty(24, 64), torch.empty(4, 64), torch.empty(24, 4)
    assert not policy.dora_norm_on_triton(W, A, B, "torch")
    if policy.interpreting():
        assert policy.dora_norm_on_triton(W, A, B, "triton")
        assert policy.dora_norm_on_triton(W.bfloat16(), A, B.half(), "triton")
        assert not policy.dora_norm_on_triton(W.double(), A, B, "triton")
        assert not policy.dora_norm_on_triton(W, A.double(), B, "triton")


def test_dora_scale_kernel_choice():
    """DoRA's column scale: the Triton kernels on the Triton backend (not fp64), torch ops elsewhere."""
    L = torch.empty(8, 24)
    assert not policy.dora_scale_on_triton(L, "torch")
    if policy.interpreting():
        assert policy.dora_scale_on_triton(L, "triton")
        assert policy.dora_scale_on_triton(L.bfloat16(), "triton")
        assert not policy.dora_scale_on_triton(L.double(), "triton")
