"""Fused (Q)LoRA forward (``qlora_linear``, ``lora_linear``) against the fp64 oracle ``python_ref.lora_forward``.

Without CUDA the Triton backend runs in the interpreter (shapes kept small); bf16 Triton cases there go
through the interpreter's fp32-upcast dot, so bf16 is really checked on the GPU.
"""
import pytest
import torch

import python_ref
from lowrank_kernels import NF4Weight, lora_linear, qlora_linear
from lowrank_kernels.kernels.lora_matmul import resolve_config, default_config
from tests.conftest import DEVICE, HAS_CUDA

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# Explicit tile configs: many tiles and K iterations on small shapes (the interpreter is slow).
CONFIGS = {
    "default": None,  # large-M (NF4 16-bit: 256x128x64) for M > 64, small-M (BLOCK_M 16..64, auto split-K) otherwise
    "tiny": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SPLIT_K=1, num_warps=1, num_stages=2),
    "wideK": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=1, num_warps=4, num_stages=2),
    "split": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=3, num_warps=1, num_stages=2),
}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_lora(N, K, r, dtype, bias, lora_dtype=torch.float32):
    """Random (never zero) x-independent LoRA tensors; the LoRA term is comparable in size to the base term."""
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(lora_dtype)
    B = torch.randn(N, r, device=DEVICE).to(lora_dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    return A, B, b


def oracle_nf4_weight(w: NF4Weight) -> torch.Tensor:
    """The NF4 weight in fp64, dequantized by python_ref (the fp32 values, exactly)."""
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, tuple(w.shape), w.blocksize, torch.float64)


def oracle(x, W64, A, B, scaling, b):
    y, _ = python_ref.lora_forward(x.double(), W64, A.double(), B.double(), scaling,
                                   None if b is None else b.double())
    return y


# (M, N, K, r, dtype, nested, blocksize, bias, config)
NF4_CASES = [
    (100, 70, 192, 16, F16, True, 64, True, "default"),  # large-M, K % blocksize == 0
    (130, 70, 200, 8, F32, True, 32, False, "default"),  # 2 M tiles, rows straddle blocks, >256 blocks
    (77, 45, 129, 64, F16, True, 32, True, "default"),  # odd K: rows start on low nibbles
    (3, 50, 640, 1, F16, True, 64, True, "default"),  # small-M, auto split-K, >256 blocks
    (40, 29, 1001, 16, F32, True, 128, False, "default"),  # small-M, odd K, auto split-K
    (1, 19, 96, 8, F16, False, 32, True, "default"),  # M == 1
    (37, 41, 160, 16, F16, True, 64, True, "tiny"),  # 3x3 tiles (GROUP_M swizzle), 5 K steps, BLOCK_K < bs
    (37, 41, 161, 8, F32, True, 32, False, "tiny"),  # odd K, per-element scales
    (20, 24, 256, 64, F16, True, 32, True, "wideK"),  # 4 scales per tile row
    (20, 24, 320, 16, F16, False, 64, False, "wideK"),  # 2 scales per tile row, partial last K tile
    (9, 30, 250, 8, F16, True, 64, True, "split"),  # split-K 3 + reduction pass with bias
    (9, 30, 256, 1, F32, True, 256, True, "split"),  # split-K, BLOCK_K < bs
    (50, 40, 192, 16, BF16, True, 64, True, "default"),
    (300, 130, 256, 16, F16, True, 64, True, "default"),  # large-M default: 256x128 NF4 tiles, ragged M and N
    (257, 129, 128, 8, BF16, False, 128, False, "default"),
    (4, 40, 130, 8, BF16, False, 64, True, "split"),
]


def _case_id(case):
    M, N, K, r, dtype, nested, bs, bias, cfg = case
    layout = "nested" if nested else "flat"
    return f"{M}x{N}x{K}-r{r}-{str(dtype)[6:]}-{layout}-bs{bs}-{'bias' if bias else 'nobias'}-{cfg}"


def _check_qlora_triton(case):
    M, N, K, r, dtype, nested, bs, bias, cfg = case
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=bs, double_quant=nested)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    A, B, b = make_lora(N, K, r, dtype, bias)
    out = qlora_linear(x, w, A, B, 2.0, b, backend="triton", config=CONFIGS[cfg])
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, oracle(x, oracle_nf4_weight(w), A, B, 2.0, b)) <= TOL[dtype]


@pytest.mark.parametrize("case", NF4_CASES, ids=_case_id)
def test_qlora_triton_matches_oracle(case):
    _check_qlora_triton(case)


@pytest.mark.parametrize("dtype", [F16, F32, BF16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N,K,bs,nested,cfg", [
    (70, 129, 32, 256, "default"),  # odd K, >256 blocks (second-level scale index 1)
    (40, 128, 64, None, "default"),  # aligned, one scale per tile row
    (24, 128, 32, 256, "wideK"),  # aligned, 4 scales per tile row
    (21, 100, 1024, 256, "tiny"),  # one block spans many rows
    (30, 70, 32, 16, "split"),  # nested blocksize 16 (not bitsandbytes' 256), blocks straddle rows
], ids=lambda v: str(v))
def test_qlora_triton_weight_is_bit_exact(dtype, N, K, bs, nested, cfg):
    """With X = I and scaling 0, Y = deq(W).T exactly: the in-register dequantization equals dequantize()."""
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE) * 5, blocksize=bs, double_quant=False)
    if nested:
        q, absmax2, code2, offset = python_ref.double_quantize_absmax(w.absmax, nested)
        w = NF4Weight(w.packed, q, w.shape, w.dtype, bs, absmax2=absmax2, code2=code2, offset=offset,
                      nested_blocksize=nested)
    x = torch.eye(K, device=DEVICE, dtype=dtype)
    A, B, _ = make_lora(N, K, 4, dtype, False)
    # fp32: the default tf32x3 dot splits each operand into two TF32 parts and is not exact; ieee is.
    config = {**(CONFIGS[cfg] or {}), **({"input_precision": "ieee"} if dtype == F32 else {})}
    out = qlora_linear(x, w, A, B, 0.0, backend="triton", config=config)
    assert torch.equal(out, w.dequantize(dtype, backend="torch").t())


def random_cases(count, seed):
    """Ragged random shapes: any M, N, K (odd, K % blocksize != 0, K < BLOCK_K), every r, config and NF4 layout."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    cases = []
    while len(cases) < count:
        M = pick([1, 2, 5, 16, 17, 33, 64, 65, 100, 129])
        N, K = (int(v) for v in torch.randint(1, 90, (2,), generator=g))
        K = K * pick([1, 3])
        cases.append((M, N, K, pick([1, 8, 16, 64]), pick([F16, F32]), pick([True, False]),
                      pick([32, 64, 128]), pick([True, False]), pick(list(CONFIGS))))
    return cases


@pytest.mark.parametrize("case", random_cases(24, seed=7), ids=_case_id)
def test_qlora_triton_random_shapes(case):
    _check_qlora_triton(case)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_fp32_input_precision_override(precision):
    N, K, r = 40, 96, 16
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=64)
    A, B, b = make_lora(N, K, r, F32, True)
    for M in (5, 70):  # small-M and large-M default tiles for this precision
        x = torch.randn(M, K, device=DEVICE)
        out = qlora_linear(x, w, A, B, 2.0, b, backend="triton", config=dict(input_precision=precision))
        assert rel_err(out, oracle(x, oracle_nf4_weight(w), A, B, 2.0, b)) <= TOL[F32]


@pytest.mark.parametrize("case", [
    (7, 33, 65, 8, F16, True, 64, True),
    (70, 20, 128, 16, BF16, True, 64, False),
    (5, 20, 99, 1, F32, False, 32, True),
], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-{str(c[4])[6:]}")
def test_qlora_torch_backend_matches_oracle(case):
    M, N, K, r, dtype, nested, bs, bias = case
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=bs, double_quant=nested)
    x = torch.randn(2, M, K, device=DEVICE).to(dtype)
    A, B, b = make_lora(N, K, r, dtype, bias)
    out = qlora_linear(x, w, A, B, 0.5, b, backend="torch")
    assert out.dtype == dtype and out.shape == (2, M, N)
    ref = oracle(x, oracle_nf4_weight(w), A, B, 0.5, b).reshape(2, M, N)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_qlora_leading_dims_and_noncontiguous_x(backend):
    N, K, r = 24, 96, 8
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE), blocksize=64)
    big = torch.randn(2, 3, 2 * K, device=DEVICE).to(F16)
    x = big[..., ::2]  # strided in K
    A, B, b = make_lora(N, K, r, F16, True)
    out = qlora_linear(x, w, A, B, 1.5, b, backend=backend, config=CONFIGS["tiny"] if backend == "triton" else None)
    assert out.shape == (2, 3, N)
    ref = oracle(x, oracle_nf4_weight(w), A, B, 1.5, b).reshape(2, 3, N)
    assert rel_err(out, ref) <= TOL[F16]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    w = NF4Weight.quantize(torch.randn(8, 32, device=DEVICE))
    A, B, _ = make_lora(8, 32, 4, F16, False)
    out = qlora_linear(torch.randn(0, 32, device=DEVICE).to(F16), w, A, B, 1.0, backend=backend)
    assert out.shape == (0, 8)


# (M, N, K, r, x dtype, W dtype, W transposed view, bias, config)
DENSE_CASES = [
    (70, 40, 100, 16, F16, F16, False, True, "default"),
    (5, 33, 77, 8, F16, F32, False, False, "default"),  # W rounded to x's dtype in registers, split-K
    (20, 24, 64, 64, F32, F32, True, True, "tiny"),  # W a non-contiguous (transposed) view
    (9, 30, 250, 1, F32, F16, False, True, "split"),
    (66, 30, 64, 16, BF16, BF16, False, True, "default"),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-{str(c[4])[6:]}-{c[8]}")
def test_lora_triton_matches_oracle(case):
    M, N, K, r, dtype, wdtype, transposed, bias, cfg = case
    W = torch.randn(K, N, device=DEVICE).to(wdtype).t() if transposed else torch.randn(N, K, device=DEVICE).to(wdtype)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    A, B, b = make_lora(N, K, r, dtype, bias)
    out = lora_linear(x, W, A, B, 2.0, b, backend="triton", config=CONFIGS[cfg])
    assert out.dtype == dtype
    ref = oracle(x, W.double(), A, B, 2.0, b)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_lora_torch_backend_matches_oracle(dtype):
    M, N, K, r = 12, 20, 48, 8
    W = torch.randn(N, K, device=DEVICE).to(dtype)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    A, B, b = make_lora(N, K, r, dtype, True)
    out = lora_linear(x, W, A, B, 2.0, b, backend="torch")
    assert rel_err(out, oracle(x, W.double(), A, B, 2.0, b)) <= TOL[dtype]


def test_default_config_variants():
    small = default_config(16, 4096, 4096, F16, nf4=True)
    assert (small["BLOCK_M"], small["SPLIT_K"]) == (16, None)  # SPLIT_K None: chosen by the launcher
    large = default_config(4096, 4096, 4096, BF16, nf4=True)
    assert (large["BLOCK_M"], large["BLOCK_N"], large["SPLIT_K"]) == (256, 128, 1)  # NF4: fewer W dequantizations
    assert default_config(4096, 4096, 4096, BF16, nf4=False)["BLOCK_M"] == 128
    assert default_config(4096, 4096, 4096, F32, nf4=True)["BLOCK_M"] == 128  # fp32 operands: registers
    assert resolve_config(16, 4096, 4096, F16, True, True, torch.device("cpu"), None)["SPLIT_K"] > 1


@pytest.mark.skipif(not HAS_CUDA, reason="realistic shapes need a GPU")
@pytest.mark.parametrize("M", [1, 16, 64, 65, 512])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_qlora_gpu_realistic_shapes(M, dtype):
    N, K, r = 1024, 4096, 16
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE) * 0.02, blocksize=64)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    A, B, b = make_lora(N, K, r, dtype, True)
    B = B * 0.02
    out = qlora_linear(x, w, A, B, 2.0, b)
    assert rel_err(out, oracle(x, oracle_nf4_weight(w), A, B, 2.0, b)) <= TOL[dtype]


# ------------------------------------------------------------------------------------------------ bad input
def _good():
    N, K, r = 8, 32, 4
    w = NF4Weight.quantize(torch.randn(N, K))
    return dict(x=torch.randn(3, K), weight=w, lora_A=torch.randn(r, K), lora_B=torch.randn(N, r), scaling=1.0,
                bias=torch.randn(N))


def _triton_ready(args):
    """``args`` where ``backend="triton"`` can run: on CUDA where there is one (CPU tensors take the Triton backend
    only through the interpreter)."""
    return {k: v.to(DEVICE) if isinstance(v, (torch.Tensor, NF4Weight)) else v for k, v in args.items()}


@pytest.mark.parametrize("change,exc,name", [
    (dict(x=[[1.0]]), TypeError, "x"),
    (dict(x=torch.ones(3, 32, dtype=torch.int32)), TypeError, "x"),
    (dict(x=torch.randn(3, 32, dtype=torch.float64), backend="triton"), TypeError, "x"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(dropout="0.1"), TypeError, "dropout"),
    (dict(x=torch.randn(3, 31)), ValueError, "x"),
    (dict(weight=torch.randn(8, 32)), TypeError, "weight"),
    (dict(lora_A=torch.randn(4, 31)), ValueError, "lora_A"),
    (dict(lora_A=torch.randn(0, 32)), ValueError, "lora_A"),
    (dict(lora_A=torch.randn(4, 32, 1)), ValueError, "lora_A"),
    (dict(lora_A=torch.ones(4, 32, dtype=torch.int64)), TypeError, "lora_A"),
    (dict(lora_B=torch.randn(8, 5)), ValueError, "lora_B"),
    (dict(lora_B=torch.randn(7, 4)), ValueError, "lora_B"),
    (dict(lora_B="B"), TypeError, "lora_B"),
    (dict(bias=torch.randn(7)), ValueError, "bias"),
    (dict(bias=torch.randn(1, 8)), ValueError, "bias"),
    (dict(scaling="2"), TypeError, "scaling"),
    (dict(scaling=True), TypeError, "scaling"),
    (dict(lora_A=torch.randn(4, 32, device="meta")), ValueError, "lora_A"),
    (dict(bias=torch.randn(8, device="meta")), ValueError, "bias"),
])
def test_qlora_bad_input(change, exc, name):
    args = {**_good(), **change}
    if args.get("backend") == "triton":
        args = _triton_ready(args)
    with pytest.raises(exc, match=name):
        qlora_linear(**args)


def test_bad_backend_and_config():
    args = _triton_ready(_good())
    with pytest.raises(ValueError, match="backend"):
        qlora_linear(**args, backend="cuda")
    with pytest.raises(ValueError, match="config"):
        qlora_linear(**args, backend="triton", config=dict(BLOCK_Q=16))
    with pytest.raises(ValueError, match="BLOCK_K"):
        qlora_linear(**args, backend="triton", config=dict(BLOCK_K=24))


def test_lora_bad_weight():
    args = _good()
    nf4 = args.pop("weight")
    with pytest.raises(TypeError, match="qlora_linear"):
        lora_linear(weight=nf4, **args)
    with pytest.raises(ValueError, match="weight"):
        lora_linear(weight=torch.randn(8, 32, 1), **args)
    with pytest.raises(TypeError, match="weight"):
        lora_linear(weight=torch.ones(8, 32, dtype=torch.int8), **args)
    with pytest.raises(ValueError, match="x"):
        lora_linear(weight=torch.randn(8, 31), **args)


def test_default_dispatch_is_the_unfused_path():
    """backend=None runs dequantize + GEMMs (the fused kernel is opt-in until it is faster)."""
    w = NF4Weight.quantize(torch.randn(24, 40) * 0.1, blocksize=32).to(DEVICE)
    x = torch.randn(5, 40, device=DEVICE)
    A = torch.randn(4, 40, device=DEVICE)
    B = torch.randn(24, 4, device=DEVICE)
    expected = x @ w.dequantize(torch.float32).t() + 0.5 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(qlora_linear(x, w, A, B, 0.5), expected, rtol=1e-5, atol=1e-5)
