"""The mixed-adapter LoRA kernels (``kernels/lora_gather.py``) against the oracle ``python_ref.mixed_lora_forward``
(itself checked against peft's ``adapter_names`` batches): >= 4 adapters of different ranks, rows without adapter,
unused adapters, ragged M / N / K, fp32 adapters on 16-bit activations. CPU: the interpreter (fp32 and fp16)."""
import pytest
import torch
import torch.nn.functional as F

import python_ref
from lowrank_kernels.kernels.lora_gather import K_CHUNK, lora_gather, lora_segments, stack_adapters
from tests.conftest import DEVICE
from tests.test_lora_forward import rel_err

RANKS = [1, 4, 8, 16, 3]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make(M, N, K, dtype, ranks=RANKS):
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    W = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    adapters = [(torch.randn(r, K, device=DEVICE) / K**0.5, torch.randn(N, r, device=DEVICE), 0.5 + i)
                for i, r in enumerate(ranks)]
    index = torch.randint(-1, len(ranks) - 1, (M,), device=DEVICE)  # the last adapter unused
    index[0] = -1
    return x, W, bias, adapters, index


@pytest.mark.parametrize("M,N,K", [(1, 24, 40), (7, 72, 96), (16, 130, 200), (33, 24, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_oracle(M, N, K, dtype, index_dtype):
    x, W, bias, adapters, index = make(M, N, K, dtype)
    base = F.linear(x, W, bias)
    y = lora_gather(x, base, index.to(index_dtype), *stack_adapters(adapters))
    ref = python_ref.mixed_lora_forward(x.double(), W.double(), [(A.double(), B.double(), s) for A, B, s in adapters],
                                        index, bias.double())
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) <= TOL[dtype]
    rows = index < 0
    assert torch.equal(y[rows], base[rows])  # no adapter: the base product, untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_split_over_several_chunks(dtype):
    """K over three shrink chunks, the last one ragged: the partial sums add up to the oracle's products."""
    M, N, K = 5, 24, 2 * K_CHUNK + 77
    x, W, bias, adapters, index = make(M, N, K, dtype)
    base = F.linear(x, W, bias)
    y = lora_gather(x, base, index, *stack_adapters(adapters))
    ref = python_ref.mixed_lora_forward(x.double(), W.double(), [(A.double(), B.double(), s) for A, B, s in adapters],
                                        index, bias.double())
    assert rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_adapters_stacked_in_x_dtype_give_the_same_bits(dtype):
    """The kernels round fp32 adapters to x's dtype as they read them: stacked in that dtype beforehand (what
    ``mixed_lora_linear`` does, half the bytes), the output is bit-identical."""
    x, W, bias, adapters, index = make(7, 72, 96, dtype)
    base = F.linear(x, W, bias)
    assert torch.equal(lora_gather(x, base, index, *stack_adapters(adapters, dtype)),
                       lora_gather(x, base, index, *stack_adapters(adapters)))


@pytest.mark.parametrize("form", ["gather", "segments"])
def test_padding_beyond_each_rank_is_not_read(form):
    """Each adapter is read at its own rank: NaN written into the zero padding of the stacks changes nothing."""
    x, W, bias, adapters, index = make(9, 24, 40, torch.float32)
    base = F.linear(x, W, bias)
    fn = lora_gather if form == "gather" else lora_segments
    A_all, B_all, scal, ranks = stack_adapters(adapters)
    clean = fn(x, base, index, A_all, B_all, scal, ranks)
    for i, r in enumerate(ranks.tolist()):
        A_all[i, r:] = float("nan")
        B_all[i, :, r:] = float("nan")
    assert torch.equal(fn(x, base, index, A_all, B_all, scal, ranks), clean)


@pytest.mark.parametrize("form", ["gather", "segments"])
def test_strided_y_read_and_left_unchanged(form):
    """``y`` in any strides (column-major here) is read, never written: the result is a new tensor, equal to the one
    from a contiguous ``y``; rows without adapter are ``y``'s bits."""
    x, W, bias, adapters, index = make(9, 24, 40, torch.float32)
    fn = lora_gather if form == "gather" else lora_segments
    base = F.linear(x, W, bias)
    strided = base.T.contiguous().T
    before = strided.clone()
    stack = stack_adapters(adapters)
    out = fn(x, strided, index, *stack)
    assert torch.equal(strided, before) and out.is_contiguous()
    assert torch.equal(out, fn(x, base, index, *stack)) and torch.equal(out[index < 0], base[index < 0])


def test_every_row_its_own_adapter():
    """Each row equals the single-adapter LoRA of its adapter (fp32, python_ref.lora_forward)."""
    x, W, bias, adapters, index = make(9, 24, 40, torch.float32)
    y = lora_gather(x, F.linear(x, W, bias), index, *stack_adapters(adapters))
    for m in range(9):
        a = int(index[m])
        if a < 0:
            continue
        A, B, s = adapters[a]
        ref, _ = python_ref.lora_forward(x[m:m + 1].double(), W.double(), A.double(), B.double(), s, bias.double())
        assert rel_err(y[m:m + 1], ref) <= 1e-5


def test_stack_adapters_pads_with_zeros_and_checks_shapes():
    _, _, _, adapters, _ = make(2, 24, 40, torch.float32, ranks=[2, 5])
    A_all, B_all, scal, ranks = stack_adapters(adapters)
    assert A_all.shape == (2, 5, 40) and B_all.shape == (2, 24, 5) and scal.tolist() == [0.5, 1.5]
    assert ranks.dtype == torch.int32 and ranks.tolist() == [2, 5]
    assert torch.equal(A_all[0, 2:], torch.zeros(3, 40, device=DEVICE)) and torch.equal(A_all[0, :2], adapters[0][0])
    assert torch.equal(B_all[0, :, 2:], torch.zeros(24, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"adapters\[1\]"):
        stack_adapters([adapters[0], (adapters[1][0], adapters[1][1][:, :3], 1.0)])
    with pytest.raises(ValueError, match="adapters"):
        stack_adapters([])


@pytest.mark.parametrize("M,N,K", [(1, 24, 40), (45, 72, 96), (100, 130, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_form_matches_oracle(M, N, K, dtype):
    """The prefill form (rows sorted by adapter, tensor-core tiles spanning adapter boundaries)."""
    x, W, bias, adapters, index = make(M, N, K, dtype)
    base = F.linear(x, W, bias)
    y = lora_segments(x, base, index, *stack_adapters(adapters))
    ref = python_ref.mixed_lora_forward(x.double(), W.double(), [(A.double(), B.double(), s) for A, B, s in adapters],
                                        index, bias.double())
    assert y.dtype == dtype and rel_err(y, ref) <= TOL[dtype]
    assert torch.equal(y[index < 0], base[index < 0])
    gathered = lora_gather(x, base, index, *stack_adapters(adapters))
    assert rel_err(y, gathered) <= TOL[dtype]
