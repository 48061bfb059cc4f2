"""``lowrank_kernels.mixed.mixed_lora_linear`` against the oracle ``python_ref.mixed_lora_forward`` (checked against
peft's ``adapter_names`` batches in tests/test_python_ref_mixed.py) and against peft itself: >= 4 adapters of
different ranks, rows without adapter, an unused adapter, ragged rows; dense and NF4 bases; the torch path (with
gradients) and the Triton kernels (CPU: the interpreter); bad indices raise."""
import pytest
import torch

import python_ref
from lowrank_kernels import NF4Weight
from lowrank_kernels.mixed import mixed_lora_linear
from tests.conftest import DEVICE
from tests.test_lora_forward import rel_err

RANKS = [1, 4, 8, 16, 2]
BACKENDS = ["torch", "triton"]


def make(M, N, K, dtype, nf4, leading=()):
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    weight = NF4Weight.quantize(W) if nf4 else W.to(dtype)
    x = torch.randn(*leading, M, K, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    adapters = [(torch.randn(r, K, device=DEVICE) / K**0.5, torch.randn(N, r, device=DEVICE), 0.5 + i)
                for i, r in enumerate(RANKS)]
    rows = x.numel() // K
    index = torch.randint(-1, len(RANKS) - 1, (rows,), device=DEVICE)  # the last adapter unused
    index[0] = -1
    return x, weight, bias, adapters, index


def oracle(x, weight, bias, adapters, index):
    W = weight.dequantize(torch.float32).double() if isinstance(weight, NF4Weight) else weight.double()
    return python_ref.mixed_lora_forward(x.double(), W, [(A.double(), B.double(), s) for A, B, s in adapters], index,
                                         bias.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("M,N,K", [(1, 24, 64), (9, 72, 128), (3, 40, 192), (40, 24, 64)])  # 2 x 40 rows: segments
def test_matches_oracle(backend, nf4, dtype, tol, M, N, K):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.float16 and nf4:
        pytest.skip("interpreter: the fp16 NF4 case is covered on fp32 and on the GPU (keeps CI short)")
    x, weight, bias, adapters, index = make(M, N, K, dtype, nf4, leading=(2,))
    y = mixed_lora_linear(x, weight, adapters, index, bias, backend=backend)
    assert y.dtype == dtype and y.shape == (2, M, N)
    assert rel_err(y, oracle(x, weight, bias, adapters, index)) <= tol


def test_gradients_match_oracle():
    x, weight, bias, adapters, index = make(7, 24, 64, torch.float64, False)
    leaves = [x.clone().requires_grad_()] + [t.double().requires_grad_() for A, B, _ in adapters for t in (A, B)]
    ours_adapters = [(leaves[1 + 2 * i], leaves[2 + 2 * i], s) for i, (_, _, s) in enumerate(adapters)]
    y = mixed_lora_linear(leaves[0], weight, ours_adapters, index, bias, backend="torch")  # fp64: torch only
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_adapters = [(ref_leaves[1 + 2 * i], ref_leaves[2 + 2 * i], s) for i, (_, _, s) in enumerate(adapters)]
    ref = python_ref.mixed_lora_forward(ref_leaves[0], weight, ref_adapters, index, bias)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy, allow_unused=True)
    assert rel_err(y, ref) <= 1e-12
    for g, r in zip(grads, ref_grads):
        assert (g is None and r is None) or rel_err(g, r) <= 1e-12


def test_matches_peft_adapter_names():
    """peft itself: a model with 4 adapters, called with one adapter name per sample ("__base__" included)."""
    peft = pytest.importorskip("peft")
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 24)

        def forward(self, x):
            return self.proj(x)

    names = ["a", "b", "c", "d"]
    model = None
    for name, r in zip(names, [1, 4, 8, 16]):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["proj"])
        if model is None:
            model = peft.get_peft_model(Net().to(DEVICE), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name in names:
            layer.lora_B[name].weight.normal_()
    model.eval()
    per_sample = ["c", "__base__", "a", "c", "d", "c"]
    x = torch.randn(len(per_sample), 5, 64, device=DEVICE)
    y_peft = model(x, adapter_names=per_sample)
    base = layer.get_base_layer()
    adapters = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in names]
    index = python_ref.rows_of(per_sample, names, seq_len=5, device=DEVICE)
    with torch.no_grad():
        y = mixed_lora_linear(x, base.weight, adapters, index, base.bias)
    assert rel_err(y, y_peft) <= 1e-5


@pytest.mark.parametrize("change,exc,match", [
    (dict(adapter_index=torch.tensor([0, 5, 1])), ValueError, "adapter_index"),
    (dict(adapter_index=torch.tensor([0, -2, 1])), ValueError, "adapter_index"),
    (dict(adapter_index=torch.tensor([0, 1])), TypeError, "adapter_index"),
    (dict(adapter_index=torch.tensor([0.0, 1.0, 1.0])), TypeError, "adapter_index"),
    (dict(adapters=[]), TypeError, "adapters"),
    (dict(adapters=[(torch.randn(2, 64), torch.randn(23, 2), 1.0)]), ValueError, r"adapters\[0\]"),
    (dict(adapters=[(torch.randn(2, 64), torch.randn(24, 2), "1")]), TypeError, r"adapters\[0\]"),
    (dict(x=torch.randn(3, 63)), ValueError, "x"),
])
def test_bad_input(change, exc, match):
    x, weight, bias, adapters, _ = make(3, 24, 64, torch.float32, True)
    kw = dict(x=x, weight=weight, adapters=adapters, adapter_index=torch.tensor([0, 1, -1]), bias=bias)
    kw.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    if "adapters" in change and change["adapters"]:
        kw["adapters"] = [(A.to(DEVICE), B.to(DEVICE), s) for A, B, s in change["adapters"]]
    with pytest.raises(exc, match=match):
        mixed_lora_linear(**kw)


# ------------------------------------------------------------------------------------------------ peft convert
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "bnb-nf4"])
def test_converted_layers_run_adapter_names_batches(quantized, monkeypatch):
    """A converted peft model with 4 adapters (ranks 1-16; one of them on ``up`` only) called with
    ``adapter_names``: equal to peft's per-adapter loop, without running it."""
    peft = pytest.importorskip("peft")
    import copy

    from lowrank_kernels import peft as lk_peft
    from tests.test_peft_convert import Tiny, quantized_tiny

    if quantized:
        if DEVICE == "cpu":
            pytest.skip("bitsandbytes repacks 4-bit weights for its CPU kernel in eval mode (peft's forward runs "
                        "then, and its kernel refuses these shapes): the 4-bit case runs on CUDA")
        pytest.importorskip("bitsandbytes")
        base = quantized_tiny()
    else:
        base = Tiny().to(DEVICE)
    names, ranks = ["a", "b", "c", "d"], [1, 4, 8, 16]
    model = None
    for name, r in zip(names, ranks):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["up"] if name == "d" else ["up", "down"])
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.1)
    model.eval()
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == 2
    per_sample = ["c", "__base__", "a", "d", "c", "b", "c"]
    x = torch.randn(len(per_sample), 3, 40, device=DEVICE)
    with torch.no_grad():
        y_peft = model(x, adapter_names=per_sample)
        from peft.tuners.lora.layer import LoraLayer

        def refuse(*args, **kwargs):
            raise AssertionError("peft's mixed-batch loop ran in a converted layer")

        monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", refuse)
        y = ours(x, adapter_names=per_sample)
    assert rel_err(y, y_peft) <= 1e-5
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(x, adapter_names=per_sample[:-1])


def test_converted_layers_reuse_the_row_index():
    """Every layer of a forward, and every call with the same requests, reuses one device index (built once, on the
    host, then copied): a decode step copies nothing per layer call. Built under inference mode, it is a normal
    tensor (usable by a later training call)."""
    from lowrank_kernels.peft import row_index

    names, used = ("c", "__base__", "a"), ("a", "c")
    with torch.inference_mode():
        first = row_index(names, used, 2, torch.device(DEVICE))
    assert not first.is_inference() and first.device.type == torch.device(DEVICE).type
    assert first is row_index(names, used, 2, torch.device(DEVICE))
    assert first.tolist() == [1, 1, -1, -1, 0, 0]
    assert row_index(names, used, 1, torch.device(DEVICE)).tolist() == [1, -1, 0]


def test_index_values_read_once_per_version():
    """A device index is read (a sync) once per version, so a CUDA graph can replay a call on the same tensor; an
    in-place change to a bad value is caught at the next call."""
    x, weight, bias, adapters, index = make(4, 24, 64, torch.float32, False)
    mixed_lora_linear(x, weight, adapters, index, bias)
    with torch.no_grad():
        index[1] = len(adapters)
    with pytest.raises(ValueError, match="adapter_index"):
        mixed_lora_linear(x, weight, adapters, index, bias)


def test_stacked_adapters_follow_in_place_updates():
    """The stacked adapters are reused across calls and rebuilt when an adapter changes in place."""
    x, weight, bias, adapters, index = make(5, 24, 64, torch.float32, False)
    index[1:] = 0
    first = mixed_lora_linear(x, weight, adapters, index, bias, backend="triton")
    with torch.no_grad():
        adapters[0][1].mul_(2.0)
    second = mixed_lora_linear(x, weight, adapters, index, bias, backend="triton")
    assert not torch.allclose(first[1:], second[1:])
    assert rel_err(second, oracle(x, weight, bias, adapters, index)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    """Serving under torch.compile: the gather kernels are the ``lowrank_kernels::lora_gather`` operator."""
    x, weight, bias, adapters, index = make(6, 24, 64, torch.float32, True)
    fn = torch.compile(lambda x: mixed_lora_linear(x, weight, adapters, index, bias, backend=backend), fullgraph=True,
                       backend="aot_eager")
    with torch.no_grad():
        assert rel_err(fn(x), mixed_lora_linear(x, weight, adapters, index, bias, backend=backend)) <= 1e-6


@pytest.mark.parametrize("op", ["lora_gather", "lora_segments"])
def test_opcheck_mixed_operators(op):
    from lowrank_kernels.kernels.lora_gather import stack_adapters

    x, weight, bias, adapters, index = make(5, 24, 64, torch.float32, False)
    y = torch.randn(5, 24, device=DEVICE)
    torch.library.opcheck(getattr(torch.ops.lowrank_kernels, op).default, (x, y, index, *stack_adapters(adapters)))
