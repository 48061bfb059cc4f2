"""Bad input gets a clear error naming the argument (or is handled correctly): the cases a new user met."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import python_ref
from lowrank_kernels import (AdaLoraLinear, LoraLinear, NF4Weight, QLoraLinear, adalora_linear, lora_linear,
                             qlora_linear)
from lowrank_kernels.adalora import active_indices
from lowrank_kernels.autograd import draw_seed, dropout_keep
from tests.conftest import DEVICE
from tests.test_lora_forward import rel_err

N, K, R = 40, 72, 6


def adalora_inputs(dtype=torch.float32):
    x = torch.randn(5, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K**0.5
    A, E, B = torch.randn(R, K), torch.randn(R, 1), torch.randn(N, R)
    return x, w, A, E, B


# ---------------------------------------------------------------------------------------------- NF4 storage
def test_non_contiguous_packed_is_refused():
    w = NF4Weight.quantize(torch.randn(N, K))
    strided = torch.empty(w.packed.numel() * 2, 1, dtype=torch.uint8)[::2]
    strided.copy_(w.packed)
    assert not strided.is_contiguous()
    with pytest.raises(ValueError, match="packed: must be contiguous"):
        NF4Weight(strided, w.absmax, w.shape, w.dtype, w.blocksize, absmax2=w.absmax2, code2=w.code2,
                  offset=w.offset)
    fixed = NF4Weight(strided.contiguous(), w.absmax, w.shape, w.dtype, w.blocksize, absmax2=w.absmax2,
                      code2=w.code2, offset=w.offset)
    assert torch.equal(fixed.dequantize(), w.dequantize())


@pytest.mark.parametrize("value", [np.int64(64), np.int32(128)])
def test_numpy_integer_blocksize(value):
    w = torch.randn(N, K)
    a, b = NF4Weight.quantize(w, blocksize=value), NF4Weight.quantize(w, blocksize=int(value))
    assert type(a.blocksize) is int and torch.equal(a.packed, b.packed) and torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("value", [True, 48, 64.0, "64", np.float32(64)])
def test_bad_blocksize(value):
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        NF4Weight.quantize(torch.randn(N, K), blocksize=value)


def blob_state(payload):
    sd = NF4Weight.quantize(torch.randn(N, K)).state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(payload), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("payload,match", [
    (b"{not json", "not a bitsandbytes quant_state JSON blob"),
    (b"\xff\xfe", "not a bitsandbytes quant_state JSON blob"),
    (b"[1, 2]", "expected a JSON object"),
    (json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}).encode(), "missing field 'shape'"),
    (json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": "72x40"}).encode(),
     "field 'shape' must be a list"),
])
def test_garbled_quant_state_blob(payload, match):
    with pytest.raises(ValueError, match=r"weight\.quant_state\.bitsandbytes__nf4.*" + match):
        NF4Weight.from_state_dict(blob_state(payload))


def test_quant_state_blob_of_wrong_dtype():
    sd = NF4Weight.quantize(torch.randn(N, K)).state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = sd["weight.quant_state.bitsandbytes__nf4"].float()
    with pytest.raises(ValueError, match="expected a 1-D uint8 tensor"):
        NF4Weight.from_state_dict(sd)


# ---------------------------------------------------------------------------------------------- functions
@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn", ["lora", "qlora", "adalora"])
def test_non_finite_scaling(fn, scaling):
    x, w, A, E, B = adalora_inputs()
    with pytest.raises(ValueError, match="scaling: expected a finite number"):
        if fn == "lora":
            lora_linear(x, w, A, B, scaling)
        elif fn == "qlora":
            qlora_linear(x, NF4Weight.quantize(w), A, B, scaling)
        else:
            adalora_linear(x, w, A, E, B, scaling)


def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    x, w, A, E, B = adalora_inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'.*CUDA tensors.*TRITON_INTERPRET=1"):
        lora_linear(x, w, A, B, 2.0, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        NF4Weight.quantize(w).dequantize(backend="triton")


def test_triton_backend_on_meta():
    x = torch.empty(3, K, device="meta")
    with pytest.raises(ValueError, match="backend='triton'.*meta"):
        lora_linear(x, torch.empty(N, K, device="meta"), torch.empty(R, K, device="meta"),
                    torch.empty(N, R, device="meta"), 1.0, backend="triton")


# ---------------------------------------------------------------------------------------------- AdaLoRA ranks
@pytest.mark.parametrize("active,error,match", [
    ([0, 0, 1, 2, 3, 4], ValueError, "sorted and distinct"),      # length r with a duplicate
    ([5, 4, 3, 2, 1, 0], ValueError, "sorted and distinct"),      # length r, a permutation
    ([1, 1], ValueError, "sorted and distinct"),
    ([3, 1], ValueError, "sorted and distinct"),
    ([0, 6], ValueError, r"in \[0, 6\), got values in \[0, 6\]"),
    ([-1, 2], ValueError, r"in \[0, 6\)"),
    ([0, 1, 2, 3, 4, 5, 5], ValueError, "7 indices for r=6"),
])
def test_bad_active_indices(active, error, match):
    x, w, A, E, B = adalora_inputs()
    with pytest.raises(error, match="active: .*" + match):
        adalora_linear(x, w, A, E, B, 2.0, active=torch.tensor(active))


@pytest.mark.parametrize("active,match", [
    (torch.tensor([True, False, True, True, False, True]), "got a bool mask"),
    (torch.tensor([0, 2], dtype=torch.int32), "1-D int64"),
    (torch.tensor([[0, 2]]), "1-D int64"),
    ([0, 2], "expected an int64 tensor"),
])
def test_active_of_wrong_type(active, match):
    x, w, A, E, B = adalora_inputs()
    with pytest.raises(TypeError, match="active: .*" + match):
        adalora_linear(x, w, A, E, B, 2.0, active=active)


@pytest.mark.parametrize("active", [[0, 1, 2, 3, 4, 5], [1, 3, 4], []])
def test_valid_active_matches_reference(active):
    x, w, A, E, B = adalora_inputs(torch.float64)
    idx = torch.tensor(active, dtype=torch.int64)
    mask = torch.zeros(R, dtype=torch.bool)
    mask[idx] = True
    y = adalora_linear(x, w, A.double(), E.double(), B.double(), 2.0, active=idx)
    ref = x @ w.T + 2.0 * (x @ (A.double() * E.double() * mask[:, None]).T) @ B.double().T
    assert rel_err(y, ref) <= 1e-12
    assert torch.equal(adalora_linear(x, w, A.double(), E.double(), B.double(), 2.0,
                                      active=active_indices(mask, "cpu")), y)


def test_active_checked_again_after_in_place_change():
    x, w, A, E, B = adalora_inputs()
    idx = torch.tensor([1, 3])
    adalora_linear(x, w, A, E, B, 2.0, active=idx)
    idx[1] = 1
    with pytest.raises(ValueError, match="sorted and distinct"):
        adalora_linear(x, w, A, E, B, 2.0, active=idx)


# ---------------------------------------------------------------------------------------------- layers
def test_numpy_integer_ranks():
    lin = nn.Linear(K, N)
    assert LoraLinear.from_linear(lin, r=np.int64(4)).r == 4
    layer = QLoraLinear.from_linear(lin, r=np.int32(4), blocksize=np.int64(64))
    assert type(layer.r) is int and layer.nf4.blocksize == 64
    assert AdaLoraLinear.from_linear(lin, init_r=np.int64(5)).r == 5


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_dtypes_for_layers(dtype):
    with pytest.raises(TypeError, match="dtype: expected one of bfloat16"):
        LoraLinear(K, N, dtype=dtype)
    with pytest.raises(TypeError, match="lora_dtype: expected one of bfloat16"):
        LoraLinear(K, N, lora_dtype=dtype)
    with pytest.raises(TypeError, match="lora_dtype: expected one of bfloat16"):
        QLoraLinear.from_linear(nn.Linear(K, N), lora_dtype=dtype)
    with pytest.raises(TypeError, match="lora_dtype: expected one of bfloat16"):
        AdaLoraLinear.from_linear(nn.Linear(K, N), lora_dtype=dtype)
    lin = nn.Linear(K, N)
    lin.weight = nn.Parameter(torch.ones(N, K, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="linear.weight: expected dtype"):
        LoraLinear.from_linear(lin)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_lora_alpha(alpha):
    with pytest.raises(ValueError, match="lora_alpha: expected a finite number"):
        QLoraLinear.from_linear(nn.Linear(K, N), lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha: expected a finite number"):
        AdaLoraLinear.from_linear(nn.Linear(K, N), lora_alpha=alpha)


# ---------------------------------------------------------------------------------------------- NaN and dropout
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_through_dropout_propagates_as_torch_dropout(backend):
    """A NaN (or inf) in a dropped position of x gives NaN in the LoRA branch, as torch's dropout (x * mask)
    does under peft; the torch and Triton paths agree."""
    M = 9
    x = torch.randn(M, K, dtype=torch.float16, device=DEVICE)  # Triton: CUDA, or the interpreter on the CPU
    x[2, 5], x[6, 11] = float("nan"), float("inf")
    w = NF4Weight.quantize(torch.randn(N, K, dtype=torch.float16, device=DEVICE) / K**0.5)
    A, B = torch.randn(R, K, device=DEVICE) / K**0.5, torch.randn(N, R, device=DEVICE)
    p, seed = 0.5, 1234
    torch.manual_seed(seed)
    y = qlora_linear(x, w, A, B, 2.0, dropout=p, backend=backend)
    torch.manual_seed(seed)
    keep = dropout_keep(x.shape, p, draw_seed(x))  # the seed functional draws
    xd = x.double() * keep / (1 - p)  # NaN * 0 = NaN, inf * 0 = NaN
    ref = x.double() @ python_ref.dequantize_nf4(w.packed, python_ref.dequantize_absmax(
        w.absmax, w.absmax2, w.code2, w.offset), w.shape, w.blocksize, torch.float64).T + \
        2.0 * (xd @ A.double().T) @ B.double().T
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[2]).all() and torch.isnan(y[6]).all()
    finite = ~torch.isnan(ref)
    assert rel_err(y[finite], ref[finite]) <= 2e-3
