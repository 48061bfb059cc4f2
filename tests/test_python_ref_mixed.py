"""The mixed-adapter reference ``python_ref.mixed_lora_forward`` against peft's own mixed batches
(``model(x, adapter_names=[...])``, ``LoraLayer._mixed_batch_forward``) on CPU: a two-layer net with ragged
``nn.Linear`` layers (with / without bias), five adapters of ranks 1..16 (one with rslora, one on one layer only),
``"__base__"`` samples, ragged groups and an unused adapter; outputs in fp64 / fp32 / bf16 model + fp32 adapters,
2-D and 3-D inputs, gradients, the segment form, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import python_ref

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

K, H, N = 40, 24, 13  # fc1: 40 -> 24 with bias, fc2: 24 -> 13 without
# name: (r, lora_alpha, use_rslora, target_modules); "default" is the one get_peft_model creates
ADAPTERS = {
    "default": (2, 4, False, ["fc1", "fc2"]),
    "a1": (1, 3, False, ["fc1", "fc2"]),
    "a4": (4, 8, True, ["fc1", "fc2"]),
    "a8": (8, 16, False, ["fc1", "fc2"]),
    "a16": (16, 8, False, ["fc1", "fc2"]),
    "fc1only": (3, 6, False, ["fc1"]),
}
# 8 samples, not grouped by adapter: a4 used by 3, a1 / a16 / fc1only by 1, two "__base__", a8 and default unused
MIXED = ["a4", "__base__", "a16", "fc1only", "a1", "__base__", "a4", "a4"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(K, H, bias=True)
        self.fc2 = nn.Linear(H, N, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def peft_mixed(dtype=torch.float64):
    """The peft model (eval mode, random nonzero lora_B everywhere, base weights trainable) in ``dtype``; for bf16,
    the base model is bf16 and the adapters stay fp32 (peft's autocast_adapter_dtype)."""
    base = Net().to(dtype)
    items = list(ADAPTERS.items())
    cfg = [LoraConfig(r=r, lora_alpha=a, use_rslora=rs, target_modules=t, lora_dropout=0.25)
           for _, (r, a, rs, t) in items]
    model = get_peft_model(base, cfg[0])
    for (name, _), c in zip(items[1:], cfg[1:]):
        model.add_adapter(name, c)
    if dtype == torch.float64:
        model = model.double()
    with torch.no_grad():
        for layer in (model.base_model.model.fc1, model.base_model.model.fc2):
            for lin in layer.lora_B.values():
                lin.weight.normal_()
            for lin in layer.lora_A.values():
                lin.weight.mul_(torch.rand(()) + 0.5)
    model.requires_grad_(True)
    model.eval()  # peft refuses adapter_names in training mode (so lora_dropout=0.25 never applies)
    return model


def layer_args(layer):
    """(W, bias, adapters, adapter names) of a peft LoRA layer, as the reference takes them."""
    names = list(layer.lora_A.keys())
    adapters = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in names]
    return layer.base_layer.weight, layer.base_layer.bias, adapters, names


def ref_net(model, x, adapter_names):
    """The net run with the reference at both LoRA layers. x is [batch, K] or [batch, seq, K]; peft's names index
    the batch dimension. A layer without one of the adapters gives base output for its rows, as peft's layer does."""
    seq = 1 if x.dim() == 2 else x.shape[1]
    h = x
    for i, layer in enumerate((model.base_model.model.fc1, model.base_model.model.fc2)):
        W, b, adapters, names = layer_args(layer)
        here = [n if n in names else "__base__" for n in adapter_names]
        h = python_ref.mixed_lora_forward(h, W, adapters, python_ref.rows_of(here, names, seq), b)
        if i == 0:
            h = torch.tanh(h)
    return h


def params(model):
    return [p for p in model.parameters()]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("seq", [None, 1, 5])
def test_matches_peft(dtype, tol, seq):
    model = peft_mixed(dtype)
    shape = (len(MIXED), K) if seq is None else (len(MIXED), seq, K)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        y_peft = model(x, adapter_names=MIXED)
        y_ref = ref_net(model, x, MIXED)
        y_plain = model(x)  # "default" only: must differ, or the test would prove nothing
    assert y_ref.shape == y_peft.shape == (*shape[:-1], N) and y_ref.dtype == y_peft.dtype == dtype
    torch.testing.assert_close(y_ref, y_peft, atol=tol, rtol=tol)
    assert (y_plain - y_peft).abs().amax() > 1e-2


def test_matches_peft_bf16_model_fp32_adapters():
    """bf16 base model with fp32 adapters: x cast to fp32 for the LoRA branch, its result cast back to bf16, then
    added. Same ops in the same order as peft, so bitwise equal on CPU."""
    model = peft_mixed(torch.bfloat16)
    fc1 = model.base_model.model.fc1
    assert fc1.base_layer.weight.dtype == torch.bfloat16 and fc1.lora_A["a4"].weight.dtype == torch.float32
    x = torch.randn(len(MIXED), 6, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y_peft = model(x, adapter_names=MIXED)
        y_ref = ref_net(model, x, MIXED)
    assert y_ref.dtype == y_peft.dtype == torch.bfloat16
    torch.testing.assert_close(y_ref, y_peft, atol=0, rtol=0)


@pytest.mark.parametrize("trial", range(3))
def test_random_assignments_match_peft(trial):
    """Random per-sample names (any adapter or "__base__", groups of any size), 2-D input: one name per row."""
    model = peft_mixed()
    choices = list(ADAPTERS) + ["__base__"]
    names = [choices[i] for i in torch.randint(len(choices), (11,)).tolist()]
    x = torch.randn(11, K, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ref_net(model, x, names), model(x, adapter_names=names), atol=1e-12, rtol=1e-12)


def test_gradients_match_peft():
    """peft's mixed path is differentiable in eval mode: the gradients of x and of every parameter agree (the
    unused adapters get none from either)."""
    model = peft_mixed()
    x = torch.randn(len(MIXED), 3, K, dtype=torch.float64)
    dy = torch.randn(len(MIXED), 3, N, dtype=torch.float64)

    xp = x.clone().requires_grad_()
    model(xp, adapter_names=MIXED).backward(dy)
    g_peft = [xp.grad] + [p.grad for p in params(model)]

    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    ref_net(model, xr, MIXED).backward(dy)
    g_ref = [xr.grad] + [p.grad for p in params(model)]

    named = ["x"] + [n for n, _ in model.named_parameters()]
    assert any("a16" in n for n, g in zip(named, g_ref) if g is not None)
    for name, a, b in zip(named, g_ref, g_peft):
        used = any(f".{n}." in name for n in set(MIXED)) or "base_layer" in name or name == "x"
        assert (a is None) == (b is None) == (not used), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_gradcheck():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A1, B1 = torch.randn(1, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, 1, dtype=torch.float64,
                                                                                     requires_grad=True)
    A3, B3 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64,
                                                                                     requires_grad=True)
    idx = torch.tensor([1, -1, 0, 1, 1, -1])

    def f(x, W, b, A1, B1, A3, B3):
        return python_ref.mixed_lora_forward(x, W, [(A1, B1, 0.7), (A3, B3, 2.0)], idx, b)

    assert torch.autograd.gradcheck(f, (x, W, b, A1, B1, A3, B3))


def random_adapters(ranks, Kd, Nd, dtype=torch.float64):
    return [(torch.randn(r, Kd, dtype=dtype), torch.randn(Nd, r, dtype=dtype), float(torch.rand(()) * 3))
            for r in ranks]


def test_rows_equal_single_adapter_lora():
    """Each row is the single-adapter LoRA layer (``python_ref.lora_forward``) of its own adapter, or the base."""
    x, W, b = torch.randn(2, 9, K, dtype=torch.float64), torch.randn(H, K, dtype=torch.float64), torch.randn(H)
    b = b.double()
    adapters = random_adapters([1, 4, 8, 16], K, H)
    idx = torch.randint(-1, 4, (18,))
    y = python_ref.mixed_lora_forward(x, W, adapters, idx, b).reshape(18, H)
    x2 = x.reshape(18, K)
    for m in range(18):
        a = int(idx[m])
        want = F.linear(x2[m], W, b) if a < 0 else python_ref.lora_forward(x2[m:m + 1], W, *adapters[a][:2],
                                                                           adapters[a][2], b)[0][0]
        torch.testing.assert_close(y[m], want, atol=1e-12, rtol=1e-12)


def test_rows_of():
    idx = python_ref.rows_of(["b", "__base__", "a", "b"], ["a", "b"], seq_len=3)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 1, 1, -1, -1, -1, 0, 0, 0, 1, 1, 1]
    assert python_ref.rows_of([], ["a"]).tolist() == []


def test_segments_equal_index_form():
    x = torch.randn(20, K, dtype=torch.float64)
    W = torch.randn(H, K, dtype=torch.float64)
    adapters = random_adapters([1, 4, 8], K, H)
    idx = torch.randint(-1, 3, (20,))
    segs = python_ref.segments_of(idx)
    assert all(a >= 0 and s < e for s, e, a in segs)
    assert sum(e - s for s, e, _ in segs) == int((idx >= 0).sum())
    y = python_ref.mixed_lora_forward(x, W, adapters, idx)
    torch.testing.assert_close(python_ref.mixed_lora_forward_segments(x, W, adapters, segs), y, atol=0, rtol=0)
    # sorted serving layout with a gap (rows 12..14: base) and an empty segment
    segs = [(0, 5, 2), (5, 5, 0), (5, 12, 0), (15, 20, 1)]
    want = torch.tensor([2] * 5 + [0] * 7 + [-1] * 3 + [1] * 5)
    torch.testing.assert_close(python_ref.mixed_lora_forward_segments(x, W, adapters, segs),
                               python_ref.mixed_lora_forward(x, W, adapters, want), atol=0, rtol=0)


def test_all_base_and_no_adapters():
    x, W, b = torch.randn(7, K), torch.randn(H, K), torch.randn(H)
    want = F.linear(x, W, b)
    torch.testing.assert_close(python_ref.mixed_lora_forward(x, W, [], torch.full((7,), -1), b), want)
    adapters = random_adapters([4], K, H, torch.float32)
    torch.testing.assert_close(python_ref.mixed_lora_forward(x, W, adapters, torch.full((7,), -1), b), want)


def test_bad_inputs():
    x, W, b = torch.randn(2, 3, K), torch.randn(H, K), torch.randn(H)
    adapters = random_adapters([1, 4], K, H, torch.float32)
    idx = torch.zeros(6, dtype=torch.int64)
    f = python_ref.mixed_lora_forward
    with pytest.raises(IndexError, match=r"adapter_index values must be in \[-1, 2\).*\[0, 2\]"):
        f(x, W, adapters, torch.tensor([0, 1, 2, 0, 0, 0]), b)
    with pytest.raises(IndexError, match="adapter_index"):
        f(x, W, adapters, torch.tensor([0, -2, 1, 0, 0, 0]), b)
    with pytest.raises(TypeError, match="adapter_index must be int64 or int32"):
        f(x, W, adapters, idx.float(), b)
    with pytest.raises(TypeError, match="adapter_index must be int64 or int32"):
        f(x, W, adapters, idx.bool(), b)
    with pytest.raises(TypeError, match="adapter_index must be"):
        f(x, W, adapters, [0] * 6, b)
    with pytest.raises(ValueError, match=r"adapter_index must be \[M=6\].*rows_of"):
        f(x, W, adapters, torch.zeros(2, dtype=torch.int64), b)  # one per sample: use rows_of
    with pytest.raises(ValueError, match=r"adapter_index must be \[M=6\]"):
        f(x, W, adapters, idx.reshape(2, 3), b)
    with pytest.raises(ValueError, match=r"W must be \[N, K=40\]"):
        f(x, W.t(), adapters, idx, b)
    with pytest.raises(TypeError, match="W dtype"):
        f(x, W.double(), adapters, idx, b)
    with pytest.raises(ValueError, match=r"bias must be None or \[N=24\]"):
        f(x, W, adapters, idx, b[:5])
    bad_A = [adapters[0], (torch.randn(4, K + 1), adapters[1][1], 1.0)]
    with pytest.raises(ValueError, match=r"adapters\[1\] lora_A must be \[r, K=40\]"):
        f(x, W, bad_A, idx, b)
    bad_B = [adapters[0], (adapters[1][0], torch.randn(H, 3), 1.0)]
    with pytest.raises(ValueError, match=r"adapters\[1\] lora_B must be \[N=24, r=4\]"):
        f(x, W, bad_B, idx, b)
    bad_N = [(adapters[0][0], torch.randn(H + 1, 1), 1.0)]
    with pytest.raises(ValueError, match=r"adapters\[0\] lora_B must be \[N=24, r=1\]"):
        f(x, W, bad_N, idx, b)
    with pytest.raises(TypeError, match=r"adapters\[0\] lora_A / lora_B must share"):
        f(x, W, [(adapters[0][0], adapters[0][1].double(), 1.0)], idx, b)
    with pytest.raises(TypeError, match=r"adapters\[0\] must be a tuple"):
        f(x, W, [adapters[0][:2]], idx, b)
    with pytest.raises(TypeError, match=r"adapters\[0\] scaling"):
        f(x, W, [(adapters[0][0], adapters[0][1], torch.tensor(1.0))], idx, b)

    with pytest.raises(ValueError, match="not in names.*zz"):
        python_ref.rows_of(["a", "zz"], ["a"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        python_ref.rows_of("a", ["a"])
    with pytest.raises(ValueError, match="seq_len"):
        python_ref.rows_of(["a"], ["a"], seq_len=0)

    g = python_ref.mixed_lora_forward_segments
    with pytest.raises(ValueError, match="overlaps"):
        g(x, W, adapters, [(0, 3, 0), (2, 4, 1)], b)
    with pytest.raises(ValueError, match=r"segments\[0\].*M=6"):
        g(x, W, adapters, [(0, 7, 0)], b)
    with pytest.raises(IndexError, match=r"segments\[1\] adapter 2"):
        g(x, W, adapters, [(0, 1, 0), (1, 2, 2)], b)


def test_peft_rejects_what_we_reject():
    """Sanity of the conventions against peft: names index dim 0 (a per-row list for 3-D x is refused) and an
    unknown name is refused."""
    model = peft_mixed()
    x = torch.randn(2, 3, K, dtype=torch.float64)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(x, adapter_names=["a1"] * 6)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(x, adapter_names=["a1", "zz"])
