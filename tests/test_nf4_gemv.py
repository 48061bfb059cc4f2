"""The decode NF4 GEMV kernel (``kernels.nf4_gemv``) against the fp64 oracle, and its dequantized operand bit for bit.

Without CUDA the kernel runs in Triton's interpreter (shapes kept small; there the code lookup is the global-memory
gather, the warp-shuffle lookup needs the GPU). bf16 oracle cases run on the GPU only; the bit-exactness test runs
bf16 everywhere (the interpreter upcasts bf16 dot operands exactly).
"""
import pytest
import torch

import python_ref
from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels.launch import MAX_ELEMENTS
from lowrank_kernels.kernels.nf4_gemv import default_config, nf4_gemv
from tests.conftest import DEVICE, HAS_CUDA
from tests.test_lora_forward import TOL, oracle_nf4_weight, rel_err

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="bf16 oracle cases run on the GPU")

# Knob sets: "fast" (packed words, K % blocksize == 0 and block_k >= 128), "generic" (any K), split-K variants.
KNOBS = {
    "default": {},
    "fast": dict(block_n=16, block_k=128, split_k=1, num_warps=1, num_stages=1),
    "fast_dot": dict(block_n=16, block_k=128, split_k=2, num_warps=1, num_stages=1, fma=False),
    "fast_fma": dict(block_n=32, block_k=256, split_k=2, num_warps=2, num_stages=1, fma=True, max_registers=128),
    "fast_split": dict(block_n=32, block_k=128, split_k=3, num_warps=2, num_stages=1),
    "fast_wide": dict(block_n=16, block_k=256, split_k=2, num_warps=1, num_stages=2),
    "tma_fma": dict(block_n=32, block_k=256, split_k=2, num_warps=2, num_stages=3, fma=True, tma=True),
    "tma_dot": dict(block_n=16, block_k=128, split_k=1, num_warps=1, num_stages=2, fma=False, tma=True),
    "join": dict(block_n=16, block_k=128, split_k=2, num_warps=1, num_stages=1, fma=False, join=True),
    "tma_join": dict(block_n=32, block_k=256, split_k=1, num_warps=2, num_stages=2, fma=False, tma=True, join=True),
    "tma_join_xptr": dict(block_n=16, block_k=128, split_k=2, num_warps=1, num_stages=3, fma=False, tma=True,
                          join=True, x_tma=False),
    "generic": dict(block_n=16, block_k=64, split_k=1, num_warps=1, num_stages=1),
    "generic_split": dict(block_n=16, block_k=32, split_k=4, num_warps=1, num_stages=1),
}


def make_weight(N, K, blocksize, nested, scale=1.0):
    return NF4Weight.quantize(torch.randn(N, K, device=DEVICE) * scale, blocksize=blocksize, double_quant=nested)


SCALING = 1.5


def make_inputs(M, N, K, r, dtype, bias, adapter_dtype=None):
    """x [M, K], lora_A [r, K], lora_B [N, r], bias [N]: random, never zero; the LoRA term is comparable in size
    to the base term. Adapters and bias in ``adapter_dtype`` (default: fp32 for odd N, as peft keeps them, else
    ``dtype``)."""
    adapter_dtype = adapter_dtype or (F32 if N % 2 else dtype)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    A = (torch.randn(r, K, device=DEVICE) / K ** 0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device=DEVICE) * (K / r) ** 0.5 / 2).to(adapter_dtype)
    b = torch.randn(N, device=DEVICE).to(adapter_dtype) if bias else None
    return x, A, B, b


def oracle(x, W64, A, B, b, scaling=SCALING):
    """``(y, S)`` in fp64 from the operands rounded to ``x.dtype`` (as the kernels read them)."""
    S = x.double() @ A.to(x.dtype).double().t()
    y = x.double() @ W64.t() + scaling * S @ B.to(x.dtype).double().t()
    return (y if b is None else y + b.to(x.dtype).double()), S


# (M, N, K, r, dtype, nested, blocksize, bias, knobs)
CASES = [
    (1, 40, 512, 16, F16, True, 64, True, "default"),  # default config (fast path, split-K from default_config)
    (1, 37, 512, 8, F16, True, 64, False, "fast"),  # M = 1 (FMA), ragged N, 4 K steps (register double buffer)
    (1, 37, 512, 8, F16, True, 64, True, "fast_dot"),  # M = 1 on the tensor-core path
    (1, 45, 768, 16, F32, False, 128, True, "fast_fma"),  # FMA, fp32, blocksize 128, 2 scale blocks per step
    (1, 20, 320, 4, F16, True, 32, False, "fast_fma"),  # FMA, masked last step, 8 scale blocks per step
    (3, 26, 512, 8, F16, True, 64, True, "fast_fma"),  # fma=True at M > 1: the tensor-core path runs
    (2, 33, 640, 1, F32, False, 32, True, "fast_split"),  # split 3 over 5 K steps, 4 scale blocks per tile row
    (5, 20, 384, 64, F16, True, 128, True, "fast_split"),  # blocksize 128 (one scale per 16 words)
    (16, 19, 256, 16, F16, False, 64, False, "fast_wide"),  # M = 16 (M_PAD 16), one K step per split
    (16, 24, 320, 8, F32, True, 64, True, "fast"),  # K % block_k != 0: masked last step on the fast path
    (3, 18, 256, 16, F16, True, 256, True, "fast"),  # block_k < blocksize: one scale per tile row
    (5, 23, 129, 8, F16, True, 32, True, "generic"),  # odd K: rows start on low nibbles
    (2, 30, 200, 64, F32, True, 64, False, "generic_split"),  # K % blocksize != 0: blocks straddle rows
    (1, 37, 512, 8, F16, True, 64, True, "tma_fma"),  # TMA word tiles: ragged N (zero-filled rows), FMA
    (1, 20, 320, 4, F32, False, 32, True, "tma_fma"),  # TMA, masked last step (zero-filled columns)
    (5, 20, 384, 64, F16, True, 128, True, "tma_dot"),  # TMA, tensor-core path
    (16, 24, 320, 8, F32, True, 64, True, "tma_dot"),  # TMA, M = 16, K % block_k != 0
    (3, 37, 640, 16, F16, True, 64, True, "join"),  # one dot per step on the joined tile, 5 K steps over 2 slices
    (16, 24, 320, 8, F32, False, 32, False, "join"),  # joined tile, masked last step, 4 scale blocks per row
    (7, 45, 512, 8, F16, True, 128, True, "tma_join"),  # TMA + joined tile, ragged N, x by TMA (zero-filled rows)
    (9, 30, 384, 8, F32, True, 64, False, "tma_join_xptr"),  # TMA words, x by pointer loads
    (1, 17, 96, 1, F16, False, 32, True, "generic_split"),  # K % 64 == 0 but block_k < 128: generic path
    (16, 25, 161, 16, F32, False, 128, True, "default"),  # default config on the generic path
    (4, 21, 256, 100, F16, True, 64, True, "fast"),  # r = 100: two rank chunks of 64
    (40, 24, 256, 8, F16, True, 64, True, "default"),  # M_PAD 64: the largest M the dispatcher sends here
    (33, 20, 130, 16, F32, False, 64, False, "default"),  # M > 32, generic path
    pytest.param((4, 40, 512, 16, BF16, True, 64, True, "fast_split"), marks=needs_cuda),
    pytest.param((64, 4096, 4096, 16, BF16, True, 64, True, "default"), marks=needs_cuda),
    # r = 64 at M = 64 over 8 K slices: the finish kernel's loads once overflowed shared memory when pipelined
    pytest.param((64, 4096, 4096, 64, BF16, True, 64, True, "default"), marks=needs_cuda),
    pytest.param((1, 64, 4096, 16, BF16, True, 64, True, "default"), marks=needs_cuda),
    pytest.param((1, 4097, 4096, 16, BF16, True, 64, True, "default"), marks=needs_cuda),
    pytest.param((1, 1000, 4096, 64, BF16, True, 64, True, "fast_dot"), marks=needs_cuda),
    pytest.param((16, 4096, 4096, 16, BF16, True, 64, False, "default"), marks=needs_cuda),
    pytest.param((7, 1000, 1000, 8, BF16, False, 128, True, "default"), marks=needs_cuda),
    pytest.param((1, 4097, 4096, 16, BF16, True, 64, True, "tma_fma"), marks=needs_cuda),
    pytest.param((16, 4096, 4096, 16, BF16, True, 64, False, "tma_dot"), marks=needs_cuda),
    pytest.param((64, 4096, 4096, 16, BF16, True, 64, True, "join"), marks=needs_cuda),
    pytest.param((16, 1000, 4096, 16, BF16, True, 64, True, "tma_join"), marks=needs_cuda),
]


def _case_id(case):
    M, N, K, r, dtype, nested, bs, bias, knobs = case
    layout = "nested" if nested else "flat"
    return f"{M}x{N}x{K}-r{r}-{str(dtype)[6:]}-{layout}-bs{bs}-{'bias' if bias else 'nobias'}-{knobs}"


def _check(case, **extra):
    M, N, K, r, dtype, nested, bs, bias, knobs = case
    scale = 0.05 if K >= 1000 else 1.0  # realistic weight scale on the big GPU shapes
    w = make_weight(N, K, bs, nested, scale)
    x, A, B, b = make_inputs(M, N, K, r, dtype, bias)
    out, S = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(**KNOBS[knobs], **extra))
    assert out.dtype == dtype and out.shape == (M, N) and S.dtype == dtype and S.shape == (M, r)
    y_ref, S_ref = oracle(x, oracle_nf4_weight(w), A, B, b)
    assert rel_err(S, S_ref) <= TOL[dtype]
    assert rel_err(out, y_ref) <= TOL[dtype]
    return out


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nf4_gemv_matches_oracle(case):
    _check(case)


@pytest.mark.skipif(not HAS_CUDA, reason="the global-gather lookup is what the interpreter always runs")
@pytest.mark.parametrize("case", [(1, 4096, 4096, 16, BF16, True, 64, True, "default"),
                                  (16, 1000, 1024, 8, F16, False, 32, False, "fast_split")], ids=_case_id)
def test_nf4_gemv_load_lookup_matches_oracle(case):
    _check(case, lookup="load")


def random_cases(count, seed):
    """Ragged random shapes (odd K, K % blocksize != 0, N below one tile) with every knob set and NF4 layout
    (but the TMA ones, which refuse such K: their cases are in ``CASES``)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    cases = []
    while len(cases) < count:
        M = pick([1, 2, 5, 16])
        N = int(torch.randint(1, 70, (1,), generator=g))
        bs = pick([32, 64, 128])
        K = pick([int(torch.randint(1, 300, (1,), generator=g)), bs * int(torch.randint(1, 6, (1,), generator=g))])
        cases.append((M, N, K, pick([1, 8, 16, 64]), pick([F16, F32]), pick([True, False]), bs,
                      pick([True, False]), pick([k for k in KNOBS if not KNOBS[k].get("tma")])))
    return cases


@pytest.mark.parametrize("case", random_cases(14, seed=11), ids=_case_id)
def test_nf4_gemv_random_shapes(case):
    _check(case)


def _exact_weight(N, K, bs, nested):
    """An NF4 weight with large values (bf16 / fp16 rounding matters) and, for ``nested``, a second level of
    ``nested`` blocks (not only bitsandbytes' 256)."""
    w = NF4Weight.quantize(torch.randn(N, K, device=DEVICE) * 5, blocksize=bs, double_quant=False)
    if nested:
        q, absmax2, code2, offset = python_ref.double_quantize_absmax(w.absmax, nested)
        w = NF4Weight(w.packed, q, w.shape, w.dtype, bs, absmax2=absmax2, code2=code2, offset=offset,
                      nested_blocksize=nested)
    return w


@pytest.mark.parametrize("dtype", [F16, F32, BF16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N,K,bs,nested,knobs", [
    (70, 256, 64, 256, "fast_split"),  # fast path, 2 scales per tile row, > 256 first-level blocks
    (70, 256, 64, 256, "join"),  # the joined tile
    (21, 128, 32, 16, "fast"),  # fast path, nested blocksize 16 (not bitsandbytes' 256)
    (30, 96, 32, None, "generic_split"),  # generic path (block_k < 128)
    (19, 37, 32, 16, "generic"),  # odd K: blocks straddle rows, rows start on low nibbles
], ids=lambda v: str(v))
def test_nf4_gemv_operand_is_bit_exact(dtype, N, K, bs, nested, knobs):
    """x = 64-row slices of the identity and a zero LoRA term give columns of deq(W) exactly: the kernel's
    in-register dequantization equals ``dequantize()`` (bitsandbytes' values) bit for bit."""
    w = _exact_weight(N, K, bs, nested)
    ref = w.dequantize(dtype, backend="torch")
    eye = torch.eye(K, device=DEVICE, dtype=dtype)
    A = torch.zeros(4, K, device=DEVICE, dtype=dtype)
    B = torch.randn(N, 4, device=DEVICE).to(dtype)
    precision = "ieee" if dtype == F32 else None  # tf32 splits fp32 operands; ieee products are exact
    for k0 in range(0, K, 64):
        x = eye[k0:k0 + 64]
        out, _ = nf4_gemv(x, w, A, B, 1.0, None, tune=dict(input_precision=precision, **KNOBS[knobs]))
        assert torch.equal(out, ref[:, k0:k0 + 64].t()), k0


def test_nf4_gemv_split_k_is_deterministic_and_matches_single_slice():
    M, N, K, r = 3, 40, 512, 16
    w = make_weight(N, K, 64, True)
    x, A, B, b = make_inputs(M, N, K, r, F32, True)
    knobs = dict(block_n=16, block_k=128, num_warps=1)
    one, s_one = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(split_k=1, input_precision="ieee", **knobs))
    a, s_a = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(split_k=4, input_precision="ieee", **knobs))
    again, s_again = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(split_k=4, input_precision="ieee", **knobs))
    assert torch.equal(a, again) and torch.equal(s_a, s_again)
    assert rel_err(a, one.double()) <= 1e-6 and rel_err(s_a, s_one.double()) <= 1e-6


@pytest.mark.parametrize("fma", [True, False], ids=["fma", "dot"])
def test_nf4_gemv_tma_matches_register_double_buffer(fma):
    """The TMA word tiles give the register-double-buffered kernel's result (fp32, exact products: equal up to
    the summation order of the final row reduction)."""
    N, K, r = 50, 1024, 8
    w = make_weight(N, K, 64, True)
    x, A, B, b = make_inputs(1 if fma else 3, N, K, r, F32, True)
    knobs = dict(block_n=16, block_k=256, split_k=2, num_warps=2, fma=fma, input_precision="ieee")
    y_tma, s_tma = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(tma=True, num_stages=3, **knobs))
    y_reg, s_reg = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(tma=False, **knobs))
    assert torch.equal(s_tma, s_reg)
    assert rel_err(y_tma, y_reg.double()) <= 1e-6


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("M", [1, 16, 64])
def test_nf4_gemv_default_under_graph_capture(M):
    """Warmed up eagerly, then captured in a CUDA graph (the usual order): under capture the default may take other
    kernels (the TMA ones on Hopper, compiled there on first use); the replay matches the eager call and the oracle."""
    N, K, r = 1000, 4096, 16
    w = make_weight(N, K, 64, True, 0.05)
    x, A, B, b = make_inputs(M, N, K, r, BF16, True)
    eager, s_eager = nf4_gemv(x, w, A, B, SCALING, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, S = nf4_gemv(x, w, A, B, SCALING, b)
    graph.replay()
    torch.cuda.synchronize()
    y_ref, S_ref = oracle(x, oracle_nf4_weight(w), A, B, b)
    assert rel_err(out, y_ref) <= TOL[BF16] and rel_err(S, S_ref) <= TOL[BF16]
    assert rel_err(out, eager.double()) <= 1e-2 and rel_err(S, s_eager.double()) <= 1e-2


def test_nf4_gemv_fma_matches_tensor_core_path():
    """M = 1: the CUDA-core FMA variant and the tensor-core variant agree (fp32, exact products; ``S`` is summed
    in different chunks by the two, so it may differ in the last bits)."""
    N, K, r = 50, 1024, 8
    w = make_weight(N, K, 64, True)
    x, A, B, b = make_inputs(1, N, K, r, F32, True)
    knobs = dict(block_n=16, block_k=256, split_k=2, num_warps=2, input_precision="ieee")
    y_fma, s_fma = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(fma=True, **knobs))
    y_dot, s_dot = nf4_gemv(x, w, A, B, SCALING, b, tune=dict(fma=False, **knobs))
    assert rel_err(s_fma, s_dot.double()) <= 1e-6
    assert rel_err(y_fma, y_dot.double()) <= 1e-5


@pytest.mark.skipif(not HAS_CUDA, reason="programmatic dependent launch is a GPU launch mode")
@pytest.mark.parametrize("M", [1, 16])
def test_nf4_gemv_pdl_launch_matches_plain_launch(M, monkeypatch):
    """The finish kernel launched early (PDL, waiting on the main kernel) gives bit-identical results to the
    plainly serialized launch; on Hopper or newer the PDL path must actually be taken."""
    from lowrank_kernels import policy

    N, K, r = 200, 512, 16
    w = make_weight(N, K, 64, True)
    x, A, B, b = make_inputs(M, N, K, r, BF16, True, adapter_dtype=F32)
    out = {}
    for flag in (True, False):
        monkeypatch.setattr(policy, "USE_PDL", flag)
        plan = policy.gemv_plan(x, w)
        if flag and torch.cuda.get_device_capability()[0] >= 9:
            assert plan.pdl, "PDL should be available on this GPU and Triton"
        assert flag or not plan.pdl
        out[flag] = nf4_gemv(x, w, A, B, SCALING, b, plan=plan)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    y_ref, S_ref = oracle(x, oracle_nf4_weight(w), A, B, b)
    assert rel_err(out[True][0], y_ref) <= TOL[BF16]


def test_nf4_gemv_strided_operands():
    """x strided in K, lora_l a column slice, lora_r a transposed view: any strides."""
    M, N, K, r = 4, 24, 256, 8
    w = make_weight(N, K, 64, True)
    x = torch.randn(M, 2 * K, device=DEVICE).to(F16)[:, ::2]
    A = (torch.randn(2 * r, K, device=DEVICE) / K ** 0.5)[::2]  # row stride 2K
    B = torch.randn(r, N, device=DEVICE).t()  # column-major view
    b = torch.randn(2 * N, device=DEVICE)[::2]
    for knobs in ("fast_split", "fast_fma"):
        out, S = nf4_gemv(x[:1] if knobs == "fast_fma" else x, w, A, B, SCALING, b, tune=KNOBS[knobs])
        y_ref, S_ref = oracle(x[:out.shape[0]], oracle_nf4_weight(w), A, B, b)
        assert rel_err(out, y_ref) <= TOL[F16] and rel_err(S, S_ref) <= TOL[F16]


def test_nf4_gemv_empty_batch():
    w = make_weight(8, 64, 64, True)
    out, S = nf4_gemv(torch.randn(0, 64, device=DEVICE).to(F16), w, torch.randn(4, 64, device=DEVICE),
                      torch.randn(8, 4, device=DEVICE), SCALING)
    assert out.shape == (0, 8) and S.shape == (0, 4)


def test_default_config_is_sane():
    for M, N, K in [(1, 4096, 4096), (16, 14336, 4096), (4, 4096, 14336), (1, 8, 64)]:
        cfg = default_config(M, N, K)
        assert set(cfg) == {"block_n", "block_k", "split_k", "num_warps", "num_stages", "lookup", "fma",
                            "max_registers", "tma", "join", "x_tma"}
        assert 1 <= cfg["split_k"] <= 8 and cfg["block_k"] >= 128
    assert default_config(1, 4096, 4096)["split_k"] > 1  # 64 row blocks alone cannot fill 132 SMs
    assert default_config(1, 8, 64)["split_k"] == 1  # never more slices than K steps allow
    assert default_config(4, 4096, 4096, dtype=F32)["block_k"] == 128  # fp32 dot operands: 256 would spill
    assert default_config(1, 4096, 4096)["fma"] and not default_config(2, 4096, 4096)["fma"]
    for M, N in [(1, 4096), (1, 14336), (9, 4096), (16, 14336), (64, 4096), (64, 14336)]:
        cfg = default_config(M, N, 4096, tma=True)  # Hopper: TMA ring, joined tile at M > 1
        assert cfg["tma"] and cfg["num_stages"] > 1 and cfg["join"] == (M > 1) and cfg["fma"] == (M == 1)
        assert cfg["block_n"] <= 256 and cfg["block_k"] <= 2048
    assert default_config(4, 4096, 4096, tma=True) == default_config(4, 4096, 4096)  # 2 <= M <= 8: no TMA
    assert not default_config(16, 4096, 4096)["tma"]


def _bad_inputs():
    w = make_weight(8, 64, 64, True)
    return dict(x=torch.randn(2, 64, device=DEVICE).to(F16), nf4=w,
                lora_A=torch.randn(4, 64, device=DEVICE), lora_B=torch.randn(8, 4, device=DEVICE), scaling=SCALING,
                bias=None)


@pytest.mark.parametrize("change,knobs,exc,name", [
    (dict(x=torch.randn(2, 63, device=DEVICE).to(F16)), {}, ValueError, "nf4"),
    (dict(x=torch.randn(65, 64, device=DEVICE).to(F16)), {}, ValueError, "x"),
    (dict(x=torch.randn(2, 64, device=DEVICE, dtype=torch.float64)), {}, TypeError, "x"),
    (dict(lora_A=torch.randn(4, 63, device=DEVICE)), {}, ValueError, "lora_A"),
    (dict(lora_A=torch.randn(64, device=DEVICE)), {}, ValueError, "lora_A"),
    (dict(lora_B=torch.randn(7, 4, device=DEVICE)), {}, ValueError, "lora_B"),
    (dict(lora_B=torch.randn(8, 4, device=DEVICE, dtype=torch.float64)), {}, TypeError, "lora_B"),
    (dict(lora_A=torch.randint(0, 3, (4, 64), device=DEVICE)), {}, TypeError, "lora_A"),
    (dict(bias=torch.randn(7, device=DEVICE).to(F16)), {}, ValueError, "bias"),
    (dict(scaling="2"), {}, TypeError, "scaling"),
    ({}, dict(fma=1), ValueError, "fma"),
    ({}, dict(tma="yes"), ValueError, "tma"),
    ({}, dict(join=0), ValueError, "join"),
    ({}, dict(tma=True, block_k=64), ValueError, "tma=True needs"),  # TMA needs the packed-word path
    ({}, dict(max_registers=8), ValueError, "max_registers"),
    ({}, dict(block_n=24), ValueError, "block_n"),
    ({}, dict(block_k=16), ValueError, "block_k"),
    ({}, dict(split_k=0), ValueError, "split_k"),
    ({}, dict(lookup="table"), ValueError, "lookup"),
])
def test_nf4_gemv_rejects_bad_input(change, knobs, exc, name):
    args = {**_bad_inputs(), **change}
    with pytest.raises(exc, match=name):
        nf4_gemv(**args, tune=knobs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_nf4_gemv_rejects_operands_on_another_device():
    args = {**_bad_inputs(), "lora_B": torch.randn(8, 4)}
    with pytest.raises(ValueError, match="lora_B"):
        nf4_gemv(**args)


def test_nf4_gemv_rejects_weights_past_int32_indexing():
    """N*K past the int32 flat-index limit is refused (before any launch), naming the weight."""
    args = _bad_inputs()

    class Big:  # only the shape is read before the check
        shape = (MAX_ELEMENTS // 64 + 1, 64)
        packed = args["nf4"].packed

    big = Big()
    with pytest.raises(ValueError, match="weight"):
        nf4_gemv(args["x"], big, args["lora_A"], args["lora_B"], SCALING)
