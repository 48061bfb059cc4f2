"""Gradients of ``qlora_linear`` / ``lora_linear`` against the fp64 oracle ``python_ref.lora_backward``.

Covers both backends (torch; Triton, through the interpreter on CPU with fp16/fp32 inputs), dropout 0 and > 0
(the mask is regenerated from the seed the call draws from the CPU RNG), r in {1, 8, 16, 64}, ragged shapes,
gradcheck on the fp64 torch path, autocast, gradient checkpointing, frozen inputs and what is saved.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import python_ref
from lowrank_kernels import NF4Weight, lora_linear, qlora_linear
from lowrank_kernels.autograd import draw_seed, dropout_keep
from tests.conftest import DEVICE, HAS_CUDA
from tests.test_lora_forward import CONFIGS, TOL, oracle_nf4_weight, rel_err

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SEED = 1234  # torch.manual_seed before a call fixes the dropout seed it draws


def drawn_keep(shape, p, device):
    """The keep-mask a call made right after ``torch.manual_seed(SEED)`` uses."""
    torch.manual_seed(SEED)
    return dropout_keep(shape, p, draw_seed(torch.empty(0, device=device)))


def make_inputs(M, N, K, r, dtype, bias, lora_dtype=F32, leading=()):
    x = torch.randn(*leading, M, K, device=DEVICE).to(dtype).requires_grad_()
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(lora_dtype).requires_grad_()
    B = torch.randn(N, r, device=DEVICE).to(lora_dtype).requires_grad_()
    b = torch.randn(N, device=DEVICE).to(lora_dtype).requires_grad_() if bias else None
    return x, A, B, b


def oracle_grads(x, W64, A, B, s, b, dy, keep, p):
    mask = None if keep is None else keep.reshape(-1, x.shape[-1]).double() / (1.0 - p)
    x64 = x.detach().double().reshape(-1, x.shape[-1])
    _, S = python_ref.lora_forward(x64, W64, A.detach().double(), B.detach().double(), s, None, mask)
    dx, dA, dB, db = python_ref.lora_backward(dy.double().reshape(-1, W64.shape[0]), x64, W64, A.detach().double(),
                                              B.detach().double(), s, S, mask)
    return dict(x=dx.reshape(x.shape), A=dA, B=dB, b=db if b is not None else None)


def check(fn, weight, W64, M, N, K, r, dtype, bias, p, backend, config=None, leading=()):
    x, A, B, b = make_inputs(M, N, K, r, dtype, bias, leading=leading)
    torch.manual_seed(SEED)
    y = fn(x, weight, A, B, 1.5, b, dropout=p, backend=backend, config=config)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = drawn_keep(x.shape, p, x.device) if p > 0 else None
    ref = oracle_grads(x, W64, A, B, 1.5, b, dy, keep, p)
    got = dict(x=x.grad, A=A.grad, B=B.grad, b=None if b is None else b.grad)
    for name, g in got.items():
        if ref[name] is None:
            continue
        assert g.dtype == {"x": x.dtype}.get(name, A.dtype), name  # each gradient in its parameter's dtype
        assert rel_err(g, ref[name]) <= TOL[dtype], (name, rel_err(g, ref[name]))


# (M, N, K, r, x dtype, blocksize, nested, bias, dropout, config)
NF4_CASES = [
    (33, 40, 96, 8, F32, 64, True, True, 0.0, "tiny"),
    (33, 40, 96, 8, F16, 64, True, True, 0.2, "tiny"),
    (21, 30, 100, 1, F16, 32, True, False, 0.1, "tiny"),  # K % blocksize != 0: blocks straddle rows
    (17, 27, 129, 16, F32, 64, False, True, 0.0, "tiny"),  # odd K
    (5, 45, 64, 64, F16, 64, True, True, 0.3, "split"),  # split-K in forward and dX
    (70, 40, 160, 16, F16, 32, True, True, 0.0, "default"),
]


def _id(c):
    return f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-{str(c[4])[6:]}-bs{c[5]}-{'nested' if c[6] else 'flat'}-p{c[8]}-{c[9]}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", NF4_CASES, ids=_id)
def test_qlora_grads_match_oracle(case, backend):
    M, N, K, r, dtype, bs, nested, bias, p, cfg = case
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=bs, double_quant=nested)
    config = CONFIGS[cfg] if backend == "triton" else None
    check(qlora_linear, w, oracle_nf4_weight(w), M, N, K, r, dtype, bias, p, backend, config)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [(19, 24, 40, 16, F16, True, 0.0), (19, 24, 40, 8, F32, False, 0.25),
                                  (6, 33, 70, 1, F16, True, 0.5)], ids=str)
def test_lora_grads_match_oracle(case, backend):
    M, N, K, r, dtype, bias, p = case
    W = torch.randn(N, K, device=DEVICE)
    config = CONFIGS["tiny"] if backend == "triton" else None
    check(lora_linear, W, W.double(), M, N, K, r, dtype, bias, p, backend, config, leading=(2,))


@pytest.fixture(params=["merged", "one-launch branch", "torch-call branch"])
def default_cuda_path(request, monkeypatch):
    """``backend=None`` takes the CUDA default path (our Triton dequantize kernel, the big GEMM by torch) on CPU
    too, through the interpreter (on a GPU it is that path already): NF4 without dropout with the LoRA update
    merged into the dequantized weight (``policy.MERGE_MIN_M`` 0: at every M), else (the merge off) the
    LoRA branch in one launch at every M, or in torch calls unless there is dropout (``BRANCH_MIN_M``)."""
    from lowrank_kernels import policy

    if not HAS_CUDA:
        choose = policy.choose_backend
        monkeypatch.setattr(policy, "choose_backend",
                            lambda device, backend=None: "triton" if backend is None else choose(device, backend))
    monkeypatch.setattr(policy, "MERGE_MIN_M", 0 if request.param == "merged" else 10**9)
    monkeypatch.setattr(policy, "BRANCH_MIN_M", 0 if request.param == "one-launch branch" else 10**9)


# (M, N, K, r, x dtype, blocksize, bias, dropout): M > 64, or dropout, so that the GEMV path does not take them
DEFAULT_CASES = [(70, 40, 96, 8, F32, 64, True, 0.0), (77, 33, 100, 1, F16, 32, False, 0.2),
                 (65, 45, 64, 64, F16, 64, True, 0.0), (9, 24, 40, 16, F16, 32, True, 0.25)]
if HAS_CUDA:
    DEFAULT_CASES += [(300, 520, 1088, 16, BF16, 64, True, 0.1), (129, 70, 200, 8, BF16, 64, False, 0.0)]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=str)
def test_default_cuda_path_matches_oracle(case, default_cuda_path):
    """Forward and all gradients of the default CUDA path against the fp64 oracle, NF4 and dense weights, fp32
    adapters (read in their own dtype by the LoRA-branch kernel)."""
    M, N, K, r, dtype, bs, bias, p = case
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=bs)
    W = torch.randn(N, K, device=DEVICE)
    for fn, weight, W64 in ((qlora_linear, w, oracle_nf4_weight(w)), (lora_linear, W, W.double())):
        x, A, B, b = make_inputs(M, N, K, r, dtype, bias)
        torch.manual_seed(SEED)
        y = fn(x, weight, A, B, 1.5, b, dropout=p)
        keep = drawn_keep(x.shape, p, x.device) if p > 0 else None
        mask = None if keep is None else keep.double() / (1.0 - p)
        ref, _ = python_ref.lora_forward(x.detach().double(), W64, A.detach().double(), B.detach().double(), 1.5,
                                         None if b is None else b.detach().double(), mask)
        assert y.dtype == dtype and rel_err(y, ref) <= TOL[dtype], (fn.__name__, rel_err(y, ref))
        dy = torch.randn_like(y)
        y.backward(dy)
        refs = oracle_grads(x, W64, A, B, 1.5, b, dy, keep, p)
        for name, g in dict(x=x.grad, A=A.grad, B=B.grad, b=None if b is None else b.grad).items():
            if refs[name] is not None:
                assert g.dtype == (dtype if name == "x" else F32), name
                assert rel_err(g, refs[name]) <= TOL[dtype], (fn.__name__, name, rel_err(g, refs[name]))


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 gradients are checked on the GPU (the interpreter's bf16 dot is wrong)")
@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("r", [1, 16, 64])
def test_qlora_grads_bf16_gpu(backend, p, r):
    M, N, K = 300, 520, 1088
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE) * 0.02)
    check(qlora_linear, w, oracle_nf4_weight(w), M, N, K, r, BF16, True, p, backend)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64_torch_path(p):
    N, K, r, M = 6, 10, 3, 4
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=32)
    x, A, B, b = (t.double().detach().requires_grad_() for t in make_inputs(M, N, K, r, F32, True))

    def f(x, A, B, b):
        torch.manual_seed(SEED)  # the same dropout mask on every evaluation
        return qlora_linear(x, w, A, B, 0.7, b, dropout=p, backend="torch")

    assert torch.autograd.gradcheck(f, (x, A, B, b))
    W = torch.randn(N, K, dtype=F64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, W, A, B: lora_linear(x, W, A, B, 0.7, backend="torch"), (x, W, A, B))


def test_dropout_changes_only_the_lora_branch():
    w = NF4Weight.quantize(torch.randn(16, 32, device=DEVICE))
    x, A, B, _ = make_inputs(8, 16, 32, 4, F32, False)
    base = qlora_linear(x, w, A, B, 0.0, dropout=0.5)  # scaling 0: the LoRA branch vanishes
    assert torch.allclose(base, qlora_linear(x, w, A, B, 0.0, dropout=0.0))
    y1, y2 = qlora_linear(x, w, A, B, 1.0, dropout=0.5), qlora_linear(x, w, A, B, 1.0, dropout=0.5)
    assert not torch.allclose(y1, y2)  # a fresh mask per call


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    w = NF4Weight.quantize(torch.randn(24, 48, device=DEVICE))
    x, A, B, b = make_inputs(10, 24, 48, 8, F32, True)

    def f(x):
        return qlora_linear(torch.tanh(x), w, A, B, 2.0, b, dropout=0.25)

    torch.manual_seed(SEED)
    f(x).square().sum().backward()
    plain = [t.grad.clone() for t in (x, A, B, b)]
    for t in (x, A, B, b):
        t.grad = None
    torch.manual_seed(SEED)
    checkpoint(f, x, use_reentrant=reentrant).square().sum().backward()
    for g, t in zip(plain, (x, A, B, b)):
        assert torch.equal(g, t.grad)  # the recomputed forward drew the same dropout seed


def test_autocast_computes_in_autocast_dtype():
    w = NF4Weight.quantize(torch.randn(24, 64, device=DEVICE))
    x, A, B, b = make_inputs(10, 24, 64, 8, F32, True)
    dtype = BF16 if HAS_CUDA else F16
    with torch.autocast(DEVICE, dtype=dtype):
        y = qlora_linear(x, w, A, B, 2.0, b)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert (x.grad.dtype, A.grad.dtype, b.grad.dtype) == (F32, F32, F32)
    ref = oracle_grads(x, oracle_nf4_weight(w), A, B, 2.0, b, torch.ones_like(y), None, 0.0)
    assert rel_err(x.grad, ref["x"]) <= TOL[dtype] and rel_err(A.grad, ref["A"]) <= TOL[dtype]


def test_frozen_inputs_get_no_gradient():
    w = NF4Weight.quantize(torch.randn(16, 32, device=DEVICE))
    x, A, B, b = make_inputs(5, 16, 32, 4, F32, True)
    A.requires_grad_(False)
    b.requires_grad_(False)
    qlora_linear(x, w, A, B, 1.0, b).sum().backward()
    assert x.grad is not None and B.grad is not None and A.grad is None and b.grad is None
    x2 = x.detach()
    B.grad = None
    qlora_linear(x2, w, A, B, 1.0, b).sum().backward()  # only lora_B trainable
    assert B.grad is not None and x2.grad is None


def test_no_grad_and_inference_mode_save_nothing():
    w = NF4Weight.quantize(torch.randn(16, 32, device=DEVICE))
    x, A, B, b = make_inputs(5, 16, 32, 4, F32, True)
    with torch.no_grad():
        assert qlora_linear(x, w, A, B, 1.0, b, dropout=0.1).grad_fn is None
    with torch.inference_mode():
        y = qlora_linear(x, w, A, B, 1.0, b)
    assert y.grad_fn is None and torch.allclose(y, qlora_linear(x, w, A, B, 1.0, b))


def test_training_after_first_use_under_inference_mode():
    """The kernels' cached beta=0 operand is first created under inference mode here; training afterwards must
    neither fail on an inference tensor nor change the gradients."""
    from lowrank_kernels import dispatch

    w = NF4Weight.quantize(torch.randn(16, 32, device=DEVICE))
    x, A, B, b = make_inputs(5, 16, 32, 4, F32, True)
    dispatch._UNUSED.clear()
    with torch.inference_mode():
        qlora_linear(x.detach(), w, A.detach(), B.detach(), 0.5, b.detach())
    y = qlora_linear(x, w, A, B, 0.5, b)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    ref = python_ref.lora_backward(dy.double(), x.double(), oracle_nf4_weight(w), A.double(),
                                   B.double(), 0.5, x.double() @ A.double().t())
    for got, want in zip(grads, ref[:3]):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_saved_tensors_are_x_S_and_adapters_only(p):
    """No dequantized weight, no dropout mask (its one-element seed instead), no second copy of x is kept for
    backward."""
    M, N, K, r = 64, 48, 96, 8
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE))
    x, A, B, b = make_inputs(M, N, K, r, F32, True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qlora_linear(x, w, A, B, 1.0, b, dropout=p)
    sizes = sorted(t.numel() for t in saved)
    assert sizes == sorted([M * K, r * K, N * r, M * r] + ([1] if p > 0 else [])), sizes
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy


def test_dense_weight_gradient_when_trainable():
    W = torch.randn(12, 20, device=DEVICE, requires_grad=True)
    x, A, B, b = make_inputs(7, 12, 20, 4, F32, True)
    y = lora_linear(x, W, A, B, 1.0, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert rel_err(W.grad, (dy.double().t() @ x.detach().double())) <= 1e-5
