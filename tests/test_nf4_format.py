"""NF4Weight against bitsandbytes itself: quantization, dequantization (bit-exact), QuantState and checkpoints."""
import math

import pytest
import torch

import python_ref
from lowrank_kernels import NF4Weight
from tests.conftest import DEVICE, HAS_CUDA, needs_bnb

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def random_cases(count, max_elems, seed):
    """(out, in, blocksize, dtype) with ragged sizes: odd counts, in % blocksize != 0, tiny and multi-block."""
    g = torch.Generator().manual_seed(seed)
    cases = [(1, 3, 32, torch.float32), (3, 5, 64, torch.bfloat16), (7, 33, 32, torch.float16)]
    while len(cases) < count:
        bs = BLOCKSIZES[int(torch.randint(len(BLOCKSIZES), (1,), generator=g))]
        out_f = int(torch.randint(1, 97, (1,), generator=g))
        in_f = int(torch.randint(1, max(2, max_elems // out_f), (1,), generator=g))
        cases.append((out_f, in_f, bs, DTYPES[len(cases) % 3]))
    return cases


def bnb_quantize(w, blocksize, nested):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)


def bnb_dequantize(packed, state, dtype):
    import bitsandbytes.functional as F

    saved = state.dtype
    state.dtype = dtype
    try:
        return F.dequantize_4bit(packed, state)
    finally:
        state.dtype = saved


@needs_bnb
@pytest.mark.parametrize("case", random_cases(40, 6000, seed=0), ids=str)
def test_quantize_first_level_matches_bnb(case):
    out_f, in_f, bs, dtype = case
    w = torch.randn(out_f, in_f, dtype=dtype) * 3
    packed, state = bnb_quantize(w, bs, nested=False)
    ours = NF4Weight.quantize(w, blocksize=bs, double_quant=False)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)


@needs_bnb
@pytest.mark.parametrize("case", random_cases(12, 200_000, seed=1), ids=str)
def test_double_quant_is_nearest_and_no_worse_than_bnb(case):
    """Second level: same offset and scales as bitsandbytes; our 8-bit index is the true nearest code,
    so its error never exceeds bitsandbytes' (whose search sometimes picks a neighbour)."""
    out_f, in_f, bs, dtype = case
    w = torch.randn(out_f, in_f, dtype=dtype)
    packed, state = bnb_quantize(w, bs, nested=True)
    ours = NF4Weight.quantize(w, blocksize=bs, double_quant=True)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert torch.equal(ours.code2, state.state2.code)
    _, exact = bnb_quantize(w, bs, nested=False)
    target = exact.absmax - state.offset
    err_ours = (python_ref.dequantize_blockwise_8bit(ours.absmax, ours.absmax2, ours.code2, 256) - target).abs()
    err_bnb = (python_ref.dequantize_blockwise_8bit(state.absmax, state.state2.absmax, state.state2.code, 256)
               - target).abs()
    assert (err_ours <= err_bnb).all()


def test_quantize_picks_nearest_code_ties_to_lower():
    code = python_ref.NF4_CODE
    mids = (code[:-1] + code[1:]) / 2
    # one block whose absmax is exactly 1.0, so scaled values are the inputs themselves
    x = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.tensor(2.0)), code])
    x = torch.cat([x, torch.zeros((-x.numel()) % 64)])
    w = NF4Weight.quantize(x.view(1, -1)[:, :64], blocksize=64, double_quant=False)
    idx = torch.stack([w.packed.view(-1) >> 4, w.packed.view(-1) & 15], 1).view(-1)
    expected = torch.cat([torch.tensor([15]), torch.arange(15), torch.arange(1, 16), torch.arange(16)])[:64]
    expected = torch.cat([expected, torch.full((64 - expected.numel(),), 7)])
    assert torch.equal(idx.long(), expected)


# bitsandbytes' AVX512 CPU dequantization kernel rounds differently from its CUDA kernel and its own portable
# reference (seen on the H100 host: 3 of 16k fp16 elements one ulp off); the CUDA test below covers those hosts.
bnb_cpu_exact = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "AVX512",
                                   reason="bitsandbytes' AVX512 CPU dequant kernel is not exact")


@needs_bnb
@bnb_cpu_exact
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "single"])
@pytest.mark.parametrize("case", random_cases(16, 40_000, seed=2), ids=str)
def test_dequantize_torch_bit_identical_to_bnb(case, nested):
    out_f, in_f, bs, dtype = case
    packed, state = bnb_quantize(torch.randn(out_f, in_f, dtype=dtype), bs, nested)
    w = NF4Weight.from_bnb(packed, state)
    for out_dtype in DTYPES:
        ours = w.dequantize(out_dtype, backend="torch")
        ref = bnb_dequantize(packed, state, out_dtype)
        if packed.shape[0] == 1:  # bitsandbytes returns the transpose for a single packed byte
            ref = ref.t()
        assert ours.dtype == out_dtype and ours.shape == (out_f, in_f)
        assert torch.equal(ours, ref), (out_dtype, (ours != ref).sum())


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "single"])
@pytest.mark.parametrize("case", random_cases(10, 3000, seed=3), ids=str)
def test_dequantize_triton_bit_identical_to_reference(case, nested):
    """The Triton kernel (interpreter on CPU) against python_ref, every output dtype."""
    out_f, in_f, bs, dtype = case
    w = NF4Weight.quantize(torch.randn(out_f, in_f, dtype=dtype) * 0.02, blocksize=bs, double_quant=nested)
    w = w.to(DEVICE)
    for out_dtype in DTYPES:
        ref = w.dequantize(out_dtype, backend="torch")
        ours = w.dequantize(out_dtype, backend="triton")
        assert torch.equal(ours, ref), (out_dtype, (ours != ref).sum())


def _launch(w, out_dtype, kernel, packed=None):
    from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize

    if packed is not None:
        w = NF4Weight(packed, w.absmax, w.shape, w.dtype, w.blocksize, absmax2=w.absmax2, code2=w.code2,
                      offset=w.offset, nested_blocksize=w.nested_blocksize)
    return nf4_dequantize(w, out_dtype, tune=dict(kernel=kernel)).view(-1)


# n % 8 == 0 (the word kernel applies) with rows that straddle blocks, partial last blocks, every blocksize
WORD_CASES = [(3, 40, 32), (5, 24, 64), (1, 8, 32), (9, 56, 128), (2, 1000, 256), (7, 104, 512), (3, 344, 1024),
              (1, 2056, 2048), (2, 4100, 4096), (16, 64, 64)]


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "single"])
@pytest.mark.parametrize("case", WORD_CASES, ids=str)
def test_dequantize_word_and_byte_kernels_bit_identical(case, nested):
    """Both Triton kernels (interpreter on CPU) against python_ref, forced, every output dtype."""
    out_f, in_f, bs = case
    w = NF4Weight.quantize(torch.randn(out_f, in_f) * 0.02, blocksize=bs, double_quant=nested).to(DEVICE)
    for out_dtype in DTYPES:
        ref = w.dequantize(out_dtype, backend="torch").view(-1)
        for kernel in ("words", "bytes"):
            ours = _launch(w, out_dtype, kernel)
            assert torch.equal(ours, ref), (kernel, out_dtype, (ours != ref).sum())


def test_dequantize_word_kernel_preconditions():
    w = NF4Weight.quantize(torch.randn(3, 36), blocksize=32).to(DEVICE)  # 108 elements: not whole words
    with pytest.raises(ValueError, match="n % 8 == 0"):
        _launch(w, torch.float32, "words")
    with pytest.raises(ValueError, match="kernel must be one of"):
        _launch(w, torch.float32, "fastest")
    assert torch.equal(_launch(w, torch.float32, "auto"), w.dequantize(torch.float32, backend="torch").view(-1))
    # packed bytes that are not 4-byte aligned: "words" refuses, "auto" takes the byte kernel
    w = NF4Weight.quantize(torch.randn(4, 64), blocksize=64).to(DEVICE)
    storage = torch.empty(w.packed.numel() + 1, dtype=torch.uint8, device=DEVICE)
    shifted = storage[1:]
    shifted.copy_(w.packed.view(-1))
    with pytest.raises(ValueError, match="4-byte"):
        _launch(w, torch.float32, "words", packed=shifted)
    assert torch.equal(_launch(w, torch.float32, "auto", packed=shifted),
                       w.dequantize(torch.float32, backend="torch").view(-1))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@needs_bnb
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 4099), (333, 4097), (14336, 64), (1, 1)], ids=str)
@pytest.mark.parametrize("bs", [64, 128, 4096])
def test_dequantize_cuda_bit_identical_to_bnb_cuda(shape, bs):
    for nested in (True, False):
        packed, state = bnb_quantize(torch.randn(*shape, device="cuda", dtype=torch.bfloat16), bs, nested)
        w = NF4Weight.from_bnb(packed, state)
        for out_dtype in DTYPES:
            ref = bnb_dequantize(packed, state, out_dtype)
            if packed.shape[0] == 1:
                ref = ref.t()
            assert torch.equal(w.dequantize(out_dtype), ref)


@needs_bnb
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "single"])
def test_to_bnb_round_trip(nested):
    w = NF4Weight.quantize(torch.randn(37, 129, dtype=torch.float16), blocksize=32, double_quant=nested)
    packed, state = w.to_bnb()
    assert torch.equal(bnb_dequantize(packed, state, torch.float16), w.dequantize())
    back = NF4Weight.from_bnb(packed, state)
    assert torch.equal(back.dequantize(torch.float32), w.dequantize(torch.float32))


@needs_bnb
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_from_bnb_reads_other_quant_storage_as_bytes(storage):
    """bitsandbytes' ``quant_storage``: the packed bytes of a uint8 quantization, held as another dtype. Read as a
    uint8 view of the same storage (no copy, no float arithmetic on the bytes): dequantized bit-identically."""
    import bitsandbytes.functional as F

    w = torch.randn(24, 128, dtype=torch.bfloat16)
    ref_packed, ref_state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=storage)
    assert packed.dtype == storage
    got = NF4Weight.from_bnb(packed, state)
    assert got.packed.dtype == torch.uint8 and got.packed.data_ptr() == packed.data_ptr()
    assert torch.equal(got.packed, ref_packed)
    assert torch.equal(got.dequantize(), NF4Weight.from_bnb(ref_packed, ref_state).dequantize())


def _bnb_linear(in_f, out_f, nested, dtype=torch.bfloat16):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, compress_statistics=nested,
                            quant_type="nf4").to(dtype)
    return lin.to(DEVICE)  # moving a Linear4bit quantizes its weight


@needs_bnb
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "single"])
def test_state_dict_matches_linear4bit_both_ways(nested):
    lin = _bnb_linear(70, 33, nested)
    sd = lin.state_dict()
    w = NF4Weight.from_bnb(lin.weight)
    ours = w.state_dict("weight")
    assert set(ours) == set(sd) - {"bias"}
    for k, v in ours.items():
        assert torch.equal(v.cpu(), sd[k].cpu()), k
    loaded = NF4Weight.from_state_dict(sd, "weight")
    assert torch.equal(loaded.dequantize(), w.dequantize())
    # ours -> bitsandbytes, the way checkpoint loaders rebuild a Params4bit
    from bitsandbytes.nn import Params4bit

    own = NF4Weight.quantize(torch.randn(33, 70, dtype=torch.bfloat16), double_quant=nested).to(DEVICE)
    own_sd = own.state_dict("weight")
    stats = {k.removeprefix("weight."): v for k, v in own_sd.items() if k != "weight"}
    param = Params4bit.from_prequantized(own_sd["weight"], stats, device=DEVICE)
    assert torch.equal(bnb_dequantize(param.data, param.quant_state, torch.bfloat16), own.dequantize())


def test_state_dict_round_trip_and_device_move():
    w = NF4Weight.quantize(torch.randn(19, 45), blocksize=64)
    sd = {f"layer.{k}": v for k, v in w.state_dict("weight").items()}
    back = NF4Weight.from_state_dict(sd, "layer.weight", device=DEVICE)
    assert back.device.type == DEVICE and back.shape == w.shape and back.dtype == torch.float32
    assert torch.equal(back.dequantize().cpu(), w.dequantize())


def test_quantization_error_is_small():
    w = torch.randn(64, 256)
    rel = (NF4Weight.quantize(w).dequantize() - w).norm() / w.norm()
    assert 0.05 < rel < 0.12  # NF4 on Gaussian data loses about 9%: a broken code table lands far outside


def test_nbytes_and_repr():
    w = NF4Weight.quantize(torch.randn(128, 128), blocksize=64)
    nblocks = 128 * 128 // 64
    assert w.nbytes() == 128 * 64 + nblocks + 16 * 4 + math.ceil(nblocks / 256) * 4 + 256 * 4 + 4
    assert "NF4Weight(shape=(128, 128)" in repr(w)
