"""Bad input to NF4Weight gets a clear error naming the argument; nothing is silently reinterpreted."""
import pytest
import torch

from lowrank_kernels import NF4Weight
from tests.conftest import needs_bnb


@pytest.fixture
def w():
    return NF4Weight.quantize(torch.randn(10, 70), blocksize=64)


def rebuild(w, **changes):
    fields = dict(packed=w.packed, absmax=w.absmax, shape=w.shape, dtype=w.dtype, blocksize=w.blocksize,
                  code=w.code, absmax2=w.absmax2, code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize)
    fields.update(changes)
    return NF4Weight(**fields)


@pytest.mark.parametrize("bad", [16, 48, 8192, 64.0, True, "64"])
def test_unsupported_blocksize(bad):
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight.quantize(torch.randn(4, 64), blocksize=bad)


def test_quantize_rejects_bad_weights():
    with pytest.raises(TypeError, match="weight"):
        NF4Weight.quantize(torch.randint(0, 5, (4, 64)))
    with pytest.raises(TypeError, match="weight"):
        NF4Weight.quantize([[1.0, 2.0]])
    with pytest.raises(ValueError, match="weight"):
        NF4Weight.quantize(torch.empty(0, 64))
    with pytest.raises(ValueError, match="inf or NaN"):
        NF4Weight.quantize(torch.tensor([[1.0, float("nan")]]))


def test_packed_dtype_and_size(w):
    with pytest.raises(TypeError, match="packed: expected uint8"):
        rebuild(w, packed=w.packed.to(torch.int16))
    with pytest.raises(ValueError, match="packed: 349 bytes"):
        rebuild(w, packed=w.packed[:-1])
    with pytest.raises(ValueError, match="packed"):
        rebuild(w, shape=(10, 71))


def test_scales_must_agree_with_shape(w):
    with pytest.raises(ValueError, match="absmax"):
        rebuild(w, absmax=w.absmax[:-1])
    with pytest.raises(TypeError, match="absmax"):
        rebuild(w, absmax=w.absmax.float())  # nested indices must be uint8, not already-dequantized scales
    with pytest.raises(ValueError, match="absmax2"):
        rebuild(w, absmax2=torch.cat([w.absmax2, w.absmax2]))
    with pytest.raises(ValueError, match="code2"):
        rebuild(w, code2=w.code2[:128])
    with pytest.raises(ValueError, match="give all three"):
        rebuild(w, offset=None)
    with pytest.raises(ValueError, match="nested_blocksize"):
        rebuild(w, nested_blocksize=100)
    with pytest.raises(TypeError, match="dtype"):
        rebuild(w, dtype=torch.int8)


def test_fp4_or_custom_code_is_refused(w):
    with pytest.raises(ValueError, match="not the NF4 code table"):
        rebuild(w, code=torch.linspace(-1, 1, 16))


def test_mismatched_devices(w):
    meta = w.absmax2.to("meta")
    with pytest.raises(ValueError, match="absmax2: on meta"):
        rebuild(w, absmax2=meta)


def test_dequantize_arguments(w):
    with pytest.raises(TypeError, match="dtype"):
        w.dequantize(torch.float64)
    with pytest.raises(ValueError, match="backend"):
        w.dequantize(backend="cuda")


def test_from_state_dict_errors(w):
    sd = w.state_dict()
    with pytest.raises(KeyError, match="weight.quant_state.bitsandbytes__nf4"):
        NF4Weight.from_state_dict({k: v for k, v in sd.items() if "quant_state" not in k})
    with pytest.raises(KeyError, match="weight.nested_absmax"):
        NF4Weight.from_state_dict({k: v for k, v in sd.items() if k != "weight.nested_absmax"})
    fp4 = {k.replace("nf4", "fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="only 'nf4'"):
        NF4Weight.from_state_dict(fp4)


@needs_bnb
def test_from_bnb_errors():
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type"):
        NF4Weight.from_bnb(packed, state)
    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    with pytest.raises(ValueError, match="no .quant_state"):
        NF4Weight.from_bnb(packed)
    state.shape = torch.Size([8, 66])  # fields that disagree with the packed data
    with pytest.raises(ValueError, match="packed"):
        NF4Weight.from_bnb(packed, state)
    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="nf4", quant_storage=torch.bfloat16)
    with pytest.raises(TypeError, match="contiguous"):  # other storage is read as bytes: only where contiguous
        NF4Weight.from_bnb(torch.cat([packed, packed], 1)[:, :1], state)
    with pytest.raises(TypeError, match="packed"):
        NF4Weight.from_bnb(packed.bool(), state)
