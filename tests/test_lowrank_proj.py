"""The skinny LoRA products (``kernels.lowrank_proj``) against fp64 torch, with and without a dropout mask."""
import pytest
import torch

from lowrank_kernels.kernels.lowrank_proj import lowrank_dual, lowrank_project, lowrank_reduce
from tests.conftest import DEVICE
from tests.test_lora_forward import TOL, rel_err

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, F32] if DEVICE == "cpu" else [F16, BF16, F32]  # the interpreter's bf16 dot is upcast; GPU checks bf16


def dropped(a, keep, scale):
    return a.double() if keep is None else (a * scale) * keep  # rounded once, as the kernels do


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,r", [(1, 40, 1), (37, 200, 8), (70, 129, 16), (5, 64, 64)])
@pytest.mark.parametrize("dropout", [False, True])
def test_project(M, K, r, dtype, dropout):
    a = torch.randn(M, K, device=DEVICE).to(dtype)
    p = torch.randn(K, r, device=DEVICE).to(dtype).t()  # a transposed (non-contiguous) operand
    keep = torch.rand(M, K, device=DEVICE) > 0.3 if dropout else None
    out = lowrank_project(a, p, alpha=1.5, keep=keep, keep_scale=1 / 0.7)
    ref = 1.5 * dropped(a, keep, 1 / 0.7).double() @ p.double().t()
    assert out.dtype == dtype and out.shape == (M, r)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(1, 40, 30, 1), (37, 200, 70, 8), (70, 129, 300, 16), (5, 64, 33, 64)])
@pytest.mark.parametrize("mask", [None, "a", "y"])
def test_project_expand(M, K, N, r, dtype, mask):
    """S and the LoRA term in one launch, adapters and bias in fp32 (rounded to ``a.dtype`` as read), the mask on
    the input (forward dropout) or on the output (the dX term)."""
    a = torch.randn(M, K, device=DEVICE).to(dtype)
    p = torch.randn(K, r, device=DEVICE).t()  # fp32, transposed
    e = torch.randn(N, r, device=DEVICE)
    bias = torch.randn(N, device=DEVICE) if mask != "y" else None
    keep = None if mask is None else torch.rand(*((M, N) if mask == "y" else (M, K)), device=DEVICE) > 0.3
    y, S = lowrank_project(a, p, alpha=0.5, keep=keep, keep_scale=1 / 0.7, expand=e, alpha_y=1.5, bias=bias,
                           keep_y=mask == "y")
    S_ref = 0.5 * dropped(a, keep if mask == "a" else None, 1 / 0.7).double() @ p.to(dtype).double().t()
    assert S.dtype == dtype and S.shape == (M, r) and rel_err(S, S_ref) <= TOL[dtype]
    y_ref = 1.5 * S.double() @ e.to(dtype).double().t()
    if bias is not None:
        y_ref = y_ref + bias.to(dtype).double()
    if mask == "y":
        y_ref = y_ref * keep.double() / 0.7
    assert y.dtype == dtype and y.shape == (M, N) and rel_err(y, y_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,r,split", [(300, 50, 16, None), (300, 50, 16, 3), (33, 130, 1, None),
                                         (129, 64, 64, 2), (1, 20, 8, None)])
@pytest.mark.parametrize("dropout", [False, True])
def test_reduce(M, K, r, split, dtype, dropout):
    a = torch.randn(M, K, device=DEVICE).to(dtype)
    l = torch.randn(M, r, device=DEVICE).to(dtype)
    keep = torch.rand(M, K, device=DEVICE) > 0.5 if dropout else None
    out = lowrank_reduce(l, a, alpha=0.5, keep=keep, keep_scale=2.0, split_m=split)
    ref = 0.5 * l.double().t() @ dropped(a, keep, 2.0).double()
    assert out.dtype == F32 and out.shape == (r, K)
    assert rel_err(out, ref) <= 1e-5 if dtype == F32 else rel_err(out, ref) <= TOL[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,r,split,tile", [(300, 50, 16, None, None), (300, 70, 16, 3, (16, 32)),
                                              (33, 130, 1, None, None), (129, 64, 64, 2, None),
                                              (70, 300, 5, None, (32, 64)), (1, 20, 8, None, None)])
def test_dual(M, N, r, split, tile, dtype):
    """dS = s * dY @ B and dB = s * dY.T @ S from one pass over dY: B in fp32 (rounded as read), S and dY
    transposed (non-contiguous), dB in fp32 and in dY's dtype."""
    dy = torch.randn(N, M, device=DEVICE).to(dtype).t()
    b = torch.randn(N, r, device=DEVICE)
    s = torch.randn(r, M, device=DEVICE).to(dtype).t()
    knobs = {} if tile is None else dict(block_m=tile[0], block_n=tile[1], num_warps=4)
    for db_dtype in (F32, dtype):
        ds, db = lowrank_dual(dy, b, s, 0.5, db_dtype=db_dtype, split_m=split, **knobs)
        ds_ref = 0.5 * dy.double() @ b.to(dtype).double()
        db_ref = 0.5 * dy.double().t() @ s.double()
        assert ds.dtype == dtype and ds.shape == (M, r) and rel_err(ds, ds_ref) <= TOL[dtype]
        assert db.dtype == db_dtype and db.shape == (N, r)
        assert rel_err(db, db_ref) <= (1e-5 if db_dtype == F32 else TOL[dtype])
    again = lowrank_dual(dy, b, s, 0.5, split_m=split, **knobs)  # fixed-order sums: bit-reproducible
    assert all(torch.equal(u, v) for u, v in zip(again, lowrank_dual(dy, b, s, 0.5, split_m=split, **knobs)))


def test_empty_and_bad_input():
    assert lowrank_project(torch.randn(0, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)).shape == (0, 4)
    assert torch.count_nonzero(lowrank_reduce(torch.randn(0, 4, device=DEVICE), torch.randn(0, 8, device=DEVICE))) == 0
    with pytest.raises(ValueError, match="keep"):
        lowrank_project(torch.randn(4, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE),
                        keep=torch.ones(4, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="keep"):  # the mask on y has y's shape
        lowrank_project(torch.randn(4, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE),
                        keep=torch.ones(4, 8, dtype=torch.bool, device=DEVICE), expand=torch.randn(5, 2,
                                                                                                   device=DEVICE),
                        keep_y=True)
    with pytest.raises(ValueError, match="rank"):
        lowrank_project(torch.randn(4, 8, device=DEVICE), torch.randn(300, 8, device=DEVICE))
    ds, db = lowrank_dual(torch.randn(0, 8, device=DEVICE), torch.randn(8, 4, device=DEVICE),
                          torch.randn(0, 4, device=DEVICE))
    assert ds.shape == (0, 4) and db.shape == (8, 4) and torch.count_nonzero(db) == 0
