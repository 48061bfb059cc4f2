"""Seeded CPU fuzz test: ``NF4Weight``, ``qlora_linear``, ``lora_linear`` and ``adalora_linear`` against python_ref.

Every case is drawn from ``random.Random`` (master seed ``FUZZ_SEED``, overridable from the environment) and carries
its own ``seed`` for its tensors, so a failing case reproduces on its own; a failure message prints the whole case:

    TRITON_INTERPRET=1 python -c "from tests.test_fuzz import *; check_op(find_op_case(123))"
    TRITON_INTERPRET=1 python -c "from tests.test_fuzz import *; check_nf4(find_nf4_case(45))"

Valid inputs are compared with python_ref in fp64. The error measure is ``rel_err``'s norm-wise relative error with
the oracle evaluated on absolute values as the denominator (``|x| @ |W|.T + |s| |S| @ |B|.T + |b|`` and likewise for
each gradient): that is the size of the rounding errors a correct implementation makes, so cancellation in a tiny
output (M = N = 1) cannot fail a correct result, while any wrong term of the size of the others still fails.

Invalid inputs (``test_invalid_input``, one parametrized case each) must raise a TypeError or ValueError whose
message names the offending argument.
"""
import io
import math
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # as tests/conftest.py: the interpreter, set before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import python_ref  # noqa: E402
from lowrank_kernels import NF4Weight, adalora_linear, lora_linear, qlora_linear  # noqa: E402
from lowrank_kernels import nf4 as nf4_mod  # noqa: E402
from lowrank_kernels.autograd import draw_seed, dropout_keep  # noqa: E402
from tests.test_lora_forward import CONFIGS, TOL as _TOL, oracle_nf4_weight, rel_err  # noqa: E402

SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
F64 = torch.float64
TOL = {**_TOL, F64: 1e-10}
DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": F64}
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()

N_NF4 = 320            # NF4Weight quantize / dequantize / state_dict cases
N_PER_OP = 230         # forward + backward cases per op (lora, qlora, adalora)
TRITON_SHARE = 0.13    # share of op cases on backend="triton" (the interpreter on CPU)
CHUNK = 50


def _chunks(cases, prefix):
    return [pytest.param(cases[i:i + CHUNK], id=f"{prefix}-{i // CHUNK}") for i in range(0, len(cases), CHUNK)]


def _run_all(cases, check):
    """Runs every case; fails with the list of failing cases (each printed in full, with its error)."""
    failures = []
    for case in cases:
        try:
            check(case)
        except Exception as e:  # noqa: BLE001 (a crash on a valid input is a failure too)
            failures.append(f"{case}\n    -> {type(e).__name__}: {str(e)[:600]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def _check_close(what, out, ref, absref, tol):
    """``||out - ref|| <= tol * ||absref||`` (exactly 0 where the absolute-value oracle is 0)."""
    out = out.detach()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref).norm().item()
    den = absref.norm().item()
    if den == 0:
        assert err == 0, f"{what}: expected exactly 0 (oracle of absolute values is 0), error {err:.3g}"
        return
    assert err <= tol * den, (f"{what}: error {err / den:.3g} (rel_err {rel_err(out, ref):.3g}) "
                              f"> tol {tol:g}")


def _factor(rng, M, ndims):
    """``M`` as a product of ``ndims`` leading dims (random split)."""
    dims = [M]
    while len(dims) < ndims:
        last = dims.pop()
        divisors = [d for d in range(1, last + 1) if last % d == 0]
        d = rng.choice(divisors)
        dims += [d, last // d]
    rng.shuffle(dims)
    return tuple(dims)


def _lay(t, layout):
    """The values of ``t`` in a tensor of the given memory layout (a view where non-contiguous)."""
    if layout == "contig":
        return t.contiguous()
    if layout == "transposed":  # stored with the dims reversed, viewed back
        perm = tuple(reversed(range(t.dim())))
        return t.permute(perm).contiguous().permute(perm)
    if layout == "strided":  # every other element of the last dim
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":  # contiguous, at a storage offset
        flat = t.new_zeros(t.numel() + 3)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    if layout == "expanded":  # every row the first one (stride 0 in the leading dims)
        row = t.reshape(-1, t.shape[-1])[:1].clone()
        return row.reshape((1,) * (t.dim() - 1) + (t.shape[-1],)).expand(t.shape)
    raise AssertionError(layout)


def _randn(g, shape, dtype, layout="contig", scale=1.0):
    return _lay((torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype), layout)


# ================================================================================================ NF4 cases
def nf4_cases(seed=SEED, count=N_NF4):
    rng = random.Random(f"nf4-{seed}")
    cases = []
    for i in range(count):
        bs = rng.choice(nf4_mod.BLOCKSIZES)
        dtype = rng.choice(["bfloat16", "float16", "float32"])
        size = rng.choice(["tiny", "small", "block", "medium", "large"])
        if size == "tiny":
            n = rng.randint(1, 5)
        elif size == "block":  # around a multiple of the blocksize
            n = max(1, bs * rng.randint(1, 3) + rng.choice([-1, 0, 1]))
        elif size == "small":
            n = rng.randint(6, 600)
        elif size == "medium":
            n = rng.randint(600, 6000)
        else:  # more than 256 blocks for the small blocksizes: a second nested block
            n = rng.randint(8200, 20000)
        ndim = rng.choice([1, 2, 2, 3])
        shape = _factor(rng, n, ndim)
        if ndim > 1 and rng.random() < 0.3 and n < 4000:  # ragged: drop the factorisation, take any dims
            shape = tuple(rng.randint(1, 40) for _ in range(ndim))
        dist = rng.choice(["normal", "normal", "uniform", "scaled", "sparse", "constant", "outliers"] +
                          (["ties"] if dtype == "float32" else []))
        cases.append(dict(id=i, shape=shape, dtype=dtype, blocksize=bs, double_quant=rng.random() < 0.6, dist=dist,
                          scale=10.0 ** rng.randint(-3, 3) if dtype != "float16" else 10.0 ** rng.randint(-2, 2),
                          layout=rng.choice(["contig", "contig", "transposed", "strided"]),
                          other_dtype=rng.choice(["bfloat16", "float16", "float32"]),
                          triton=(rng.random() < 0.15) and INTERPRETER and math.prod(shape) <= 3000,
                          key=rng.choice(["weight", "model.layers.3.mlp.up_proj.weight", "w"]),
                          save=rng.random() < 0.15, seed=rng.randrange(2**31)))
    return cases


def find_nf4_case(i, seed=SEED):
    return nf4_cases(seed)[i]


_MIDPOINTS = ((python_ref.NF4_CODE[:-1] + python_ref.NF4_CODE[1:]) / 2)  # fp32, as the quantizer's


def _nf4_values(case, g):
    shape, dtype = case["shape"], DT[case["dtype"]]
    n = math.prod(shape)
    dist, s = case["dist"], case["scale"]
    if dist == "normal":
        v = torch.randn(n, generator=g, dtype=F64)
    elif dist == "uniform":
        v = torch.rand(n, generator=g, dtype=F64) * 2 - 1
    elif dist == "scaled":
        v = torch.randn(n, generator=g, dtype=F64) * s
    elif dist == "sparse":  # mostly zeros, some all-zero blocks
        v = torch.randn(n, generator=g, dtype=F64) * (torch.rand(n, generator=g, dtype=F64) < 0.2)
    elif dist == "constant":
        v = torch.full((n,), float(torch.randn((), generator=g, dtype=F64)) * s)
    elif dist == "outliers":
        v = torch.randn(n, generator=g, dtype=F64)
        hot = torch.randint(0, n, (max(1, n // 50),), generator=g)
        v[hot] *= 100.0
    elif dist == "ties":  # fp32: every element an exact code midpoint of a block whose absmax is exactly 1
        v = _MIDPOINTS.double()[torch.randint(0, 15, (n,), generator=g)]
        v[:: case["blocksize"]] = 1.0
    else:
        raise AssertionError(dist)
    return _lay(v.to(dtype).reshape(shape), case["layout"])


def _decode_nibbles(packed, n):
    """Independent of python_ref: element ``2j`` in the high nibble of byte ``j``, ``2j+1`` in the low one."""
    p = packed.reshape(-1).long()
    idx = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return idx[:n], idx[n:]


def check_nf4(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype, bs, dq = DT[case["dtype"]], case["blocksize"], case["double_quant"]
    t = _nf4_values(case, g)
    shape, n = tuple(t.shape), t.numel()
    w = NF4Weight.quantize(t, blocksize=bs, double_quant=dq)

    # --- the fields, against python_ref (and the documented layout)
    assert tuple(w.shape) == shape and w.dtype == dtype and w.blocksize == bs and w.nested == dq
    assert w.packed.dtype == torch.uint8 and tuple(w.packed.shape) == ((n + 1) // 2, 1)
    packed_ref, absmax_ref = python_ref.quantize_nf4(t.contiguous(), bs)
    assert torch.equal(w.packed, packed_ref), "packed differs from python_ref.quantize_nf4"
    nblocks = math.ceil(n / bs)
    if dq:
        q, absmax2, code2, offset = python_ref.double_quantize_absmax(absmax_ref, 256)
        assert w.nested_blocksize == 256 and w.absmax.dtype == torch.uint8
        for name, got, want in (("absmax", w.absmax, q), ("absmax2", w.absmax2, absmax2), ("code2", w.code2, code2),
                                ("offset", w.offset.reshape(()), offset.reshape(()))):
            assert torch.equal(got, want), f"{name} differs from python_ref.double_quantize_absmax"
    else:
        assert torch.equal(w.absmax, absmax_ref), "absmax differs from python_ref.quantize_nf4"

    # --- independent checks of the format: absmax per block, nearest code per element, tie rule, padding nibble
    x = t.detach().reshape(-1).double()
    pad = torch.zeros(nblocks * bs, dtype=F64)
    pad[:n] = x.abs()
    am_true = pad.view(nblocks, bs).amax(1)  # the fp32 block maxima, exactly
    idx, tail = _decode_nibbles(w.packed, n)
    assert tail.tolist() == ([7] if n % 2 else []), f"padding nibble {tail.tolist()} (expected the code of 0.0)"
    if dq:
        qa = w.absmax.long()
        am = (w.code2[qa] * w.absmax2[torch.arange(nblocks) // w.nested_blocksize]) + w.offset  # fp32, 2 roundings
        assert abs(w.offset.item() - am_true.mean().item()) <= 1e-6 * am_true.abs().max().item() + 1e-30
        dev = (am_true - w.offset.double()).abs()
        bound = 0.00705 * w.absmax2.double()[torch.arange(nblocks) // 256] + 1e-6 * am_true + 1e-30
        assert ((am.double() - am_true).abs() <= bound).all(), "double-quantized absmax off by more than half a gap"
        assert torch.allclose(w.absmax2.double(), torch.stack([c.max() for c in dev.split(256)]), rtol=1e-6, atol=0)
    else:
        am = w.absmax
        assert torch.equal(am.double(), am_true), "absmax is not the blockwise max |w|"
    am_e = am_true.repeat_interleave(bs)[:n]
    scaled = torch.where(am_e > 0, x / am_e.clamp(min=1e-300), torch.zeros_like(x))
    dist = (scaled[:, None] - python_ref.NF4_CODE.double()[None, :]).abs()
    chosen = dist.gather(1, idx[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all(), "an element is not quantized to the nearest NF4 code"
    if case["dist"] == "ties":
        mid = torch.isin(x, _MIDPOINTS.double())
        lower = torch.bucketize(x[mid], _MIDPOINTS.double())  # index i of midpoint i: the lower of the two codes
        assert torch.equal(idx[mid], lower), "a tie did not go to the lower code"

    # --- dequantize: bit-exact, in the original and another dtype, on both backends
    expected = {}
    for name in {case["dtype"], case["other_dtype"]}:
        dt = DT[name]
        expected[dt] = (python_ref.NF4_CODE[idx] * am.float().repeat_interleave(bs)[:n]).to(dt).reshape(shape)
    d = w.dequantize()
    assert d.dtype == dtype and tuple(d.shape) == shape
    assert torch.equal(d, expected[dtype]), "dequantize() is not code[nibble] * absmax rounded once"
    d2 = w.dequantize(DT[case["other_dtype"]])
    assert torch.equal(d2, expected[DT[case["other_dtype"]]]), f"dequantize({case['other_dtype']}) differs"
    err = (d.double().reshape(-1) - x).abs()
    bound = 0.1520 * am_e + (am.double().repeat_interleave(bs)[:n] - am_e).abs() + 2 ** -7 * x.abs() + 1e-30
    assert (err <= bound).all(), "quantization error larger than half the widest NF4 gap"
    if case["triton"]:
        for dt in (torch.float16, torch.float32):
            want = (python_ref.NF4_CODE[idx] * am.float().repeat_interleave(bs)[:n]).to(dt).reshape(shape)
            assert torch.equal(w.dequantize(dt, backend="triton"), want), f"triton dequantize({dt}) differs"

    # --- state_dict round trip (optionally through torch.save / torch.load)
    key = case["key"]
    sd = w.state_dict(key)
    want_keys = {key, f"{key}.absmax", f"{key}.quant_map", f"{key}.quant_state.bitsandbytes__nf4"}
    if dq:
        want_keys |= {f"{key}.nested_absmax", f"{key}.nested_quant_map"}
    assert set(sd) == want_keys, sorted(sd)
    if case["save"]:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    w2 = NF4Weight.from_state_dict(sd, key)
    assert tuple(w2.shape) == shape and w2.dtype == dtype and w2.blocksize == bs and w2.nested == dq
    for name in ("packed", "absmax", "code") + (("absmax2", "code2", "offset") if dq else ()):
        assert torch.equal(getattr(w2, name).reshape(-1), getattr(w, name).reshape(-1)), \
            f"state_dict round trip: {name}"
    if dq:
        assert w2.nested_blocksize == w.nested_blocksize
    assert torch.equal(w2.dequantize(), d)


@pytest.mark.parametrize("cases", _chunks(nf4_cases(), "nf4"))
def test_nf4_fuzz(cases):
    _run_all(cases, check_nf4)


# ================================================================================================ op cases
OPS = ("lora", "qlora", "adalora")


def _op_case(rng, op, backend, cid):
    tri = backend == "triton"
    x_dtypes = ["float16", "float32"] if tri else ["bfloat16", "float16", "float32", "float64"]
    adapter_dtypes = ["float16", "float32"] if tri else ["bfloat16", "float16", "float32", "float64"]
    dtype = rng.choice(x_dtypes)
    M = 1 if rng.random() < 0.15 else rng.choice([rng.randint(2, 8), rng.randint(1, 70), rng.randint(9, 70)]
                                                  if not tri else [rng.randint(2, 16), rng.randint(1, 70)])
    lead = _factor(rng, M, rng.choice([1, 1, 2, 3]))
    N = rng.randint(1, 24 if tri else 96)
    K = rng.randint(1, 48 if tri else 160)
    r = rng.choice([1, rng.randint(2, 8), rng.randint(1, 40), rng.randint(1, 40)])
    u = rng.random()
    lora_dtype = "float32" if u < 0.5 else dtype if u < 0.75 or dtype not in adapter_dtypes else \
        rng.choice(adapter_dtypes)
    scaling = rng.choice([rng.uniform(-4, 4), rng.uniform(-4, 4), -1.0, 0.5, 2.0, -0.3,
                          rng.choice([0.0, 1e-3, -1e-3, 8.0])])
    case = dict(id=cid, op=op, backend=backend, dtype=dtype, lead=lead, M=M, N=N, K=K, r=r,
                bias=rng.random() < 0.6, scaling=scaling,
                scaling_type=rng.choice(["float"] * 6 + ["int", "np.float32"]),
                dropout=0.0 if rng.random() < 0.55 else rng.choice([0.1, 0.5, round(rng.uniform(0.01, 0.95), 3)]),
                x_layout=rng.choice(["contig"] * 3 + ["transposed", "strided", "offset", "expanded"]),
                A_layout=rng.choice(["contig", "contig", "transposed", "strided", "offset"]),
                B_layout=rng.choice(["contig", "contig", "transposed", "strided", "offset"]),
                bias_layout=rng.choice(["contig", "strided"]),
                lora_dtype=lora_dtype, bias_dtype=rng.choice([lora_dtype, dtype]),
                needs=dict(x=rng.random() < 0.85, A=rng.random() < 0.85, B=rng.random() < 0.85,
                           bias=rng.random() < 0.85),
                config=rng.choice([None, None, "tiny", "wideK", "split"] + (["ieee"] if dtype == "float32" else []))
                if tri else None,
                wscale=rng.choice([1.0, 1.0, 0.05, 10.0]), seed=rng.randrange(2**31))
    if case["scaling_type"] == "int":
        case["scaling"] = float(rng.choice([-2, -1, 0, 1, 3]))
    elif case["scaling_type"] == "np.float32":
        case["scaling"] = float(np.float32(case["scaling"]))
    base = op if op != "adalora" else rng.choice(["lora", "qlora"])
    case["base"] = base
    if base == "lora":
        case.update(w_dtype=rng.choice(x_dtypes),
                    w_layout=rng.choice(["contig", "contig", "transposed", "strided"]),
                    w_grad=op == "lora" and rng.random() < 0.2)
    else:
        case.update(blocksize=rng.choice(nf4_mod.BLOCKSIZES), double_quant=rng.random() < 0.6,
                    nf4_dtype=rng.choice(["bfloat16", "float16", "float32"]))
    if op == "adalora":
        kind = rng.choice(["none", "all", "subset", "subset", "subset", "empty"])
        active = None if kind == "none" else list(range(r)) if kind == "all" else [] if kind == "empty" else \
            sorted(rng.sample(range(r), rng.randint(1, max(1, r - 1))))
        case.update(active=active, alpha=rng.choice([rng.uniform(-16, 16), 8.0, 32.0, -4.0]),
                    ranknum=float(rng.randint(1, r)), E_layout=rng.choice(["contig", "strided"]),
                    E_zero=rng.random() < 0.1)
        case["needs"]["E"] = rng.random() < 0.85
        del case["scaling"], case["scaling_type"]
    return case


def op_cases(seed=SEED, per_op=N_PER_OP):
    rng = random.Random(f"ops-{seed}")
    cases = []
    for op in OPS:
        for _ in range(per_op):
            u = rng.random()  # drawn either way: the same case ids with or without the interpreter
            backend = "triton" if INTERPRETER and u < TRITON_SHARE else "torch"
            cases.append(_op_case(rng, op, backend, len(cases)))
    return cases


def find_op_case(i, seed=SEED):
    return op_cases(seed)[i]


def _keep_mask(case, M, K):
    """The dropout keep-mask the call made right after ``torch.manual_seed(case['seed'])`` draws."""
    torch.manual_seed(case["seed"])
    return dropout_keep((M, K), case["dropout"], draw_seed(torch.empty(0)))


def check_op(case):
    g = torch.Generator().manual_seed(case["seed"])
    op, M, N, K, r, p = case["op"], case["M"], case["N"], case["K"], case["r"], case["dropout"]
    dtype, ld, bd = DT[case["dtype"]], DT[case["lora_dtype"]], DT[case["bias_dtype"]]
    needs = case["needs"]
    x = _randn(g, (*case["lead"], K), dtype, case["x_layout"]).requires_grad_(needs["x"])
    A = _randn(g, (r, K), ld, case["A_layout"], 1 / K**0.5).requires_grad_(needs["A"])
    B = _randn(g, (N, r), ld, case["B_layout"]).requires_grad_(needs["B"])
    b = _randn(g, (N,), bd, case["bias_layout"]).requires_grad_(needs["bias"]) if case["bias"] else None
    if case["base"] == "lora":
        W = _randn(g, (N, K), DT[case["w_dtype"]], case["w_layout"], case["wscale"]).requires_grad_(case["w_grad"])
        W64 = W.detach().double()
    else:
        src = _randn(g, (N, K), DT[case["nf4_dtype"]], "contig", case["wscale"])
        W = NF4Weight.quantize(src, blocksize=case["blocksize"], double_quant=case["double_quant"])
        W64 = oracle_nf4_weight(W)
    E = active = None
    if op == "adalora":
        E = _randn(g, (r, 1), ld, case["E_layout"])
        if case["E_zero"]:  # some exactly-zero singular values
            E = E.detach().masked_fill(torch.rand(r, 1, generator=g) < 0.5, 0.0)
        E.requires_grad_(needs["E"])
        active = None if case["active"] is None else torch.tensor(case["active"], dtype=torch.int64)
        scaling = case["alpha"] / (case["ranknum"] + 1e-5)
    else:
        scaling = case["scaling"]
        scaling = {"float": float, "int": int, "np.float32": np.float32}[case["scaling_type"]](scaling)
    backend, config = case["backend"], case["config"]
    if config is not None:
        config = dict(input_precision="ieee") if config == "ieee" else CONFIGS[config]
    kw = dict(dropout=p, backend=backend, config=config)

    torch.manual_seed(case["seed"])  # fixes the dropout seed the call draws
    if op == "lora":
        y = lora_linear(x, W, A, B, scaling, b, **kw)
    elif op == "qlora":
        y = qlora_linear(x, W, A, B, scaling, b, **kw)
    else:
        y = adalora_linear(x, W, A, E, B, scaling, b, active=active, **kw)
    assert y.dtype == dtype, f"output dtype {y.dtype}"
    assert tuple(y.shape) == (*case["lead"], N), f"output shape {tuple(y.shape)}"

    # --- the fp64 oracle (and the same on absolute values: the scale of admissible rounding errors)
    s = float(scaling)
    x64 = x.detach().double().reshape(M, K)
    A64, B64 = A.detach().double(), B.detach().double()
    b64 = None if b is None else b.detach().double()
    rank_on = torch.ones(r, dtype=torch.bool)
    if op == "adalora":
        if active is not None:
            rank_on = torch.zeros(r, dtype=torch.bool)
            rank_on[active] = True
        E_eff = E.detach().double() * rank_on[:, None]
        # A * E is formed in the adapters' dtype (as peft's SVDLinear does), then rounded to x's dtype
        A_eff = (A.detach() * E.detach()).double() * rank_on[:, None]
    else:
        A_eff = A64
    lora_on = bool(rank_on.any())
    keep = _keep_mask(case, M, K) if p > 0 and lora_on else None
    mask = None if keep is None else keep.double() / (1.0 - p)
    y_ref, S = python_ref.lora_forward(x64, W64, A_eff, B64, s, b64, mask)
    y_abs, S_abs = python_ref.lora_forward(x64.abs(), W64.abs(), A_eff.abs(), B64.abs(), abs(s),
                                           None if b64 is None else b64.abs(), mask)
    if op == "adalora" and p == 0:  # the oracle's formula is peft's, as python_ref writes it
        ada = python_ref.adalora_forward(x.detach().double(), W64, A64, E.detach().double(), B64, case["alpha"],
                                         case["ranknum"], b64, None if active is None else rank_on)
        y_unrounded, _ = python_ref.lora_forward(x64, W64, A64 * E_eff, B64, s, b64)
        assert torch.allclose(ada.reshape(M, N), y_unrounded, rtol=1e-12, atol=1e-12 * y_abs.max().item())
    tol = TOL[dtype]
    _check_close("y", y.reshape(M, N), y_ref, y_abs, tol)

    if not y.requires_grad:
        dense_w = W if case["base"] == "lora" else None
        assert not any(t is not None and t.requires_grad for t in (x, A, B, b, E, dense_w)), "output lost its graph"
        return
    dy = torch.randn(y.shape, generator=g, dtype=F64).to(dtype)
    y.backward(dy)
    dy64 = dy.double().reshape(M, N)
    dx, dA, dB, db = python_ref.lora_backward(dy64, x64, W64, A_eff, B64, s, S, mask)
    dxa, dAa, dBa, dba = python_ref.lora_backward(dy64.abs(), x64.abs(), W64.abs(), A_eff.abs(), B64.abs(), abs(s),
                                                  S_abs, mask)
    refs = dict(x=(x, dx.reshape(x.shape), dxa.reshape(x.shape)), bias=(b, db, dba))
    if op == "adalora":  # chain rule through A_eff = A * (E * on), B_eff = B * on
        on = rank_on.double()
        refs.update(A=(A, dA * E_eff, dAa * E_eff.abs()),
                    E=(E, (dA * A64).sum(1, keepdim=True) * on[:, None], (dAa * A64.abs()).sum(1, keepdim=True)
                       * on[:, None]),
                    B=(B, dB * on, dBa * on))
    else:
        refs.update(A=(A, dA, dAa), B=(B, dB, dBa))
    if case["base"] == "lora" and case.get("w_grad"):
        refs["weight"] = (W, dy64.t() @ x64, dy64.abs().t() @ x64.abs())
    for name, (t, ref, ref_abs) in refs.items():
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None, f"{name}: frozen, but got a gradient"
            continue
        assert t.grad is not None, f"{name}: no gradient"
        assert t.grad.dtype == t.dtype, f"{name}.grad dtype {t.grad.dtype}, expected {t.dtype}"
        assert t.grad.shape == t.shape, f"{name}.grad shape {tuple(t.grad.shape)}"
        _check_close(f"d{name}", t.grad, ref, ref_abs, max(tol, TOL[t.dtype]))
        if op == "adalora" and name in ("A", "E"):
            assert (t.grad[~rank_on] == 0).all(), f"d{name}: pruned ranks not exactly zero"
        if op == "adalora" and name == "B":
            assert (t.grad[:, ~rank_on] == 0).all(), "dB: pruned ranks not exactly zero"


_OP_CASES = op_cases()


@pytest.mark.parametrize("cases", [c for op in OPS for backend in ("torch", "triton") for c in _chunks(
    [case for case in _OP_CASES if case["op"] == op and case["backend"] == backend], f"{op}-{backend}")])
def test_op_fuzz(cases):
    _run_all(cases, check_op)


# ------------------------------------------------------------------------------------------------ dropout statistics
def dropout_cases(seed=SEED):
    rng = random.Random(f"dropout-{seed}")
    out = []
    for op in OPS:
        for backend in ("torch", "triton") if INTERPRETER else ("torch",):
            for _ in range(4):
                p = rng.choice([0.05, 0.5, 0.9, round(rng.uniform(0.01, 0.95), 3)])
                out.append(dict(op=op, backend=backend, p=p,
                                M=rng.randint(1500, 3000) if backend == "torch" else rng.randint(300, 500),
                                N=rng.randint(1, 4), r=rng.randint(1, 4), s=rng.choice([-1.5, 0.75, 2.0]),
                                seed=rng.randrange(2**31)))
    return out


def check_dropout_statistics(case):
    """Train mode end to end: with ``K = 1``, ``x = 1``, ``W = 0``, ``A = B = 1`` each row of ``y`` is
    ``s * r * keep / (1 - p)``: the mask the call used, visible. Its kept share must be ``1 - p`` (5 sigma), the
    values exactly that, ``dX`` must use the same mask, a second call must draw a new one; eval mode none."""
    op, M, N, r, p, s = case["op"], case["M"], case["N"], case["r"], case["p"], case["s"]
    x = torch.ones(M, 1, requires_grad=True)
    A, B = torch.ones(r, 1, requires_grad=True), torch.ones(N, r, requires_grad=True)
    W = torch.zeros(N, 1) if op == "lora" else NF4Weight.quantize(torch.zeros(N, 1), blocksize=64)
    args = dict(dropout=p, backend=case["backend"])

    def call(p_):
        a = dict(args, dropout=p_)
        if op == "adalora":
            return adalora_linear(x, W, A, torch.ones(r, 1), B, s, **a)
        return (lora_linear if op == "lora" else qlora_linear)(x, W, A, B, s, **a)

    torch.manual_seed(case["seed"])
    y = call(p)
    unit = s * r / (1 - p)
    kept = (y[:, 0] != 0)
    assert torch.allclose(y, kept[:, None].float() * unit, rtol=1e-6, atol=0), "dropout values not 0 or s*r/(1-p)"
    assert (y == y[:, :1]).all(), "one mask per row of x (K = 1)"
    frac, sigma = kept.float().mean().item(), math.sqrt(p * (1 - p) / M)
    assert abs(frac - (1 - p)) <= 5 * sigma, f"kept share {frac:.4f}, expected {1 - p:.4f} +- {5 * sigma:.4f}"
    y.sum().backward()
    assert torch.allclose(x.grad[:, 0], kept.float() * unit * N, rtol=1e-6, atol=0), "dX used another mask"
    y2 = call(p)
    assert not torch.equal(y2, y) or p < 0.02, "a second call drew the same mask"
    y0 = call(0.0)
    assert torch.allclose(y0, torch.full_like(y0, s * r), rtol=1e-6, atol=0), "eval mode (dropout=0) changed values"


@pytest.mark.parametrize("case", dropout_cases(), ids=lambda c: f"{c['op']}-{c['backend']}-p{c['p']}-M{c['M']}")
def test_dropout_statistics(case):
    check_dropout_statistics(case)


# ================================================================================================ invalid input
def _valid_args(rng, op):
    """Random valid arguments of ``op`` (keyword form); adalora with ``active`` None or a nonempty subset."""
    N, K, r, M = rng.randint(1, 12), rng.randint(2, 40), rng.randint(1, 8), rng.randint(1, 6)
    kw = dict(x=torch.randn(M, K), lora_A=torch.randn(r, K) / K**0.5, lora_B=torch.randn(N, r),
              scaling=rng.uniform(-2, 2), bias=torch.randn(N) if rng.random() < 0.7 else None)
    if op == "qlora" or (op == "adalora" and rng.random() < 0.5):
        kw["weight"] = NF4Weight.quantize(torch.randn(N, K), blocksize=rng.choice(nf4_mod.BLOCKSIZES),
                                          double_quant=rng.random() < 0.5)
    else:
        kw["weight"] = torch.randn(N, K)
    if op == "adalora":
        kw["lora_E"] = torch.randn(r, 1)
        kw["active"] = None if r == 1 or rng.random() < 0.4 else \
            torch.tensor(sorted(rng.sample(range(r), rng.randint(1, r - 1))), dtype=torch.int64)
    return kw


FN = dict(lora=lora_linear, qlora=qlora_linear, adalora=adalora_linear)


def _dims(kw):
    N, K = kw["weight"].shape
    return N, K, kw["lora_A"].shape[0]


# Each defect: (ops it applies to, argument the message must name, function(rng, op, kw) changing kw in place)
def _set(**changes):
    return lambda rng, op, kw: kw.update(changes)


def _x_int(rng, op, kw):
    dtype = rng.choice([torch.int32, torch.int64, torch.uint8, torch.int16, torch.bool])
    kw["x"] = torch.ones(kw["x"].shape, dtype=dtype)


def _active_ge_2(rng, op, kw):
    """adalora with r >= 2 (so that index sets can be wrong)."""
    if kw["lora_A"].shape[0] < 2:
        r, K, N = 2 + rng.randint(0, 5), kw["lora_A"].shape[1], kw["weight"].shape[0]
        kw.update(lora_A=torch.randn(r, K) / K**0.5, lora_E=torch.randn(r, 1), lora_B=torch.randn(N, r))
    return kw["lora_A"].shape[0]


def _active(builder):
    def f(rng, op, kw):
        r = _active_ge_2(rng, op, kw)
        kw["active"] = builder(rng, r)
    return f


def _dupes_short(rng, r):
    """Length < r with a repeated index (r >= 3), or ``[i, i]`` for r == 2 (length == r: see the full-length kind)."""
    i = rng.randrange(r)
    extra = sorted(rng.sample([j for j in range(r) if j != i], rng.randint(0, max(0, r - 3))))
    return torch.tensor(sorted([i, i] + extra), dtype=torch.int64)


def _dupes_full(rng, r):
    """Exactly r indices (the count of all ranks), one of them twice."""
    idx = list(range(r))
    j = rng.randrange(1, r)
    idx[j] = idx[j - 1]
    return torch.tensor(idx, dtype=torch.int64)


def _unsorted_short(rng, r):
    sub = rng.sample(range(r), rng.randint(2, r)) if r > 2 else [1, 0]
    sub = sub[: max(2, min(len(sub), r - 1))]
    if sub == sorted(sub):
        sub.reverse()
    return torch.tensor(sub, dtype=torch.int64)


def _unsorted_full(rng, r):
    perm = list(range(r))
    while perm == sorted(perm):
        rng.shuffle(perm)
    return torch.tensor(perm, dtype=torch.int64)


def _out_of_range(rng, r):
    sub = sorted(rng.sample(range(r), rng.randint(0, r - 1)))
    return torch.tensor(sorted(sub + [r + rng.randint(0, 3)]), dtype=torch.int64)


def _out_of_range_full(rng, r):
    return torch.tensor(list(range(r - 1)) + [r + rng.randint(0, 3)], dtype=torch.int64)


def _negative(rng, r):
    return torch.tensor([-1] + sorted(rng.sample(range(r), rng.randint(0, r - 2))), dtype=torch.int64)


def _too_long(rng, r):
    return torch.arange(r + rng.randint(1, 3))


def _bool_mask(rng, r):
    m = torch.rand(r) < 0.5
    m[0], m[-1] = True, False
    return m


INVALID_OP_KINDS = {
    # x
    "x-last-dim": (OPS, "x", lambda rng, op, kw: kw.update(x=torch.randn(kw["x"].shape[0], _dims(kw)[1] +
                                                                      rng.randint(1, 3)))),
    "x-0d": (OPS, "x", _set(x=torch.tensor(1.0))),
    "x-int": (OPS, "x", _x_int),
    "x-complex": (OPS, "x", lambda rng, op, kw: kw.update(x=kw["x"].to(torch.complex64))),
    "x-list": (OPS, "x", lambda rng, op, kw: kw.update(x=kw["x"].tolist())),
    "x-fp64-triton": (OPS, "x", lambda rng, op, kw: kw.update(x=kw["x"].double(), backend="triton")),
    # lora_A / lora_B / bias shapes and dtypes
    "lora_A-wrong-K": (OPS, "lora_A", lambda rng, op, kw: kw.update(
        lora_A=torch.randn(_dims(kw)[2], _dims(kw)[1] + rng.choice([-1, 1, 2])))),
    "lora_A-1d": (OPS, "lora_A", lambda rng, op, kw: kw.update(lora_A=kw["lora_A"][0])),
    "lora_A-3d": (OPS, "lora_A", lambda rng, op, kw: kw.update(lora_A=kw["lora_A"][None])),
    "lora_A-int": (OPS, "lora_A", lambda rng, op, kw: kw.update(lora_A=torch.ones(kw["lora_A"].shape,
                                                                                  dtype=torch.int64))),
    "lora_A-list": (OPS, "lora_A", lambda rng, op, kw: kw.update(lora_A=kw["lora_A"].tolist())),
    "lora_B-wrong-N": (OPS, "lora_B", lambda rng, op, kw: kw.update(lora_B=torch.randn(_dims(kw)[0] + 1,
                                                                                       _dims(kw)[2]))),
    "lora_B-wrong-r": (OPS, "lora_B", lambda rng, op, kw: kw.update(lora_B=torch.randn(_dims(kw)[0],
                                                                                       _dims(kw)[2] + 1))),
    "lora_B-1d": (OPS, "lora_B", lambda rng, op, kw: kw.update(lora_B=kw["lora_B"].reshape(-1))),
    "lora_B-int": (OPS, "lora_B", lambda rng, op, kw: kw.update(lora_B=torch.ones(kw["lora_B"].shape,
                                                                                  dtype=torch.int32))),
    "bias-wrong-len": (OPS, "bias", lambda rng, op, kw: kw.update(bias=torch.randn(_dims(kw)[0] + rng.choice([1, 2])))),
    "bias-2d": (OPS, "bias", lambda rng, op, kw: kw.update(bias=torch.randn(1, _dims(kw)[0]))),
    "bias-int": (OPS, "bias", lambda rng, op, kw: kw.update(bias=torch.ones(_dims(kw)[0], dtype=torch.int64))),
    # weight
    "weight-int": (("lora",), "weight", lambda rng, op, kw: kw.update(weight=torch.ones(_dims(kw)[:2],
                                                                                       dtype=torch.int8))),
    "weight-1d": (("lora",), "weight", lambda rng, op, kw: kw.update(weight=kw["weight"].reshape(-1))),
    "weight-nf4-to-lora": (("lora",), "weight", lambda rng, op, kw: kw.update(
        weight=NF4Weight.quantize(kw["weight"]))),
    "weight-dense-to-qlora": (("qlora",), "weight", lambda rng, op, kw: kw.update(weight=kw["weight"].dequantize())),
    "weight-3d-nf4": (("qlora",), "weight", lambda rng, op, kw: kw.update(
        weight=NF4Weight.quantize(torch.randn(1, *_dims(kw)[:2])))),
    # scaling
    "scaling-nan": (OPS, "scaling", _set(scaling=float("nan"))),
    "scaling-inf": (OPS, "scaling", lambda rng, op, kw: kw.update(scaling=rng.choice([float("inf"), -float("inf")]))),
    "scaling-np-nan": (OPS, "scaling", _set(scaling=np.float64("nan"))),
    "scaling-str": (OPS, "scaling", _set(scaling="2.0")),
    "scaling-none": (OPS, "scaling", _set(scaling=None)),
    "scaling-bool": (OPS, "scaling", _set(scaling=True)),
    "scaling-complex": (OPS, "scaling", _set(scaling=1 + 2j)),
    # dropout
    "dropout-one": (OPS, "dropout", _set(dropout=1.0)),
    "dropout-above-one": (OPS, "dropout", lambda rng, op, kw: kw.update(dropout=rng.uniform(1.01, 3))),
    "dropout-negative": (OPS, "dropout", lambda rng, op, kw: kw.update(dropout=-rng.uniform(0.01, 1))),
    "dropout-nan": (OPS, "dropout", _set(dropout=float("nan"))),
    "dropout-inf": (OPS, "dropout", _set(dropout=float("inf"))),
    "dropout-bool": (OPS, "dropout", _set(dropout=True)),
    "dropout-str": (OPS, "dropout", _set(dropout="0.1")),
    # devices (meta: the only other device on a CPU machine)
    "meta-lora_A": (OPS, "lora_A", lambda rng, op, kw: kw.update(lora_A=kw["lora_A"].to("meta"))),
    "meta-lora_B": (OPS, "lora_B", lambda rng, op, kw: kw.update(lora_B=kw["lora_B"].to("meta"))),
    "meta-bias": (OPS, "bias", lambda rng, op, kw: kw.update(bias=torch.randn(_dims(kw)[0], device="meta"))),
    "meta-weight": (("lora",), "weight", lambda rng, op, kw: kw.update(weight=kw["weight"].to("meta"))),
    # backend / config
    "backend-bad": (OPS, "backend", lambda rng, op, kw: kw.update(backend=rng.choice(["cuda", "Triton", "", 1]))),
    "config-bad": (OPS, "config", _set(backend="triton", config=dict(BLOCK_Q=16))),
    # adalora: lora_E
    "lora_E-1d": (("adalora",), "lora_E", lambda rng, op, kw: kw.update(lora_E=kw["lora_E"].reshape(-1))),
    "lora_E-wrong-r": (("adalora",), "lora_E", lambda rng, op, kw: kw.update(lora_E=torch.randn(_dims(kw)[2] + 1, 1))),
    "lora_E-2-cols": (("adalora",), "lora_E", lambda rng, op, kw: kw.update(lora_E=torch.randn(_dims(kw)[2], 2))),
    "lora_E-int": (("adalora",), "lora_E", lambda rng, op, kw: kw.update(lora_E=torch.ones(_dims(kw)[2], 1,
                                                                                          dtype=torch.int64))),
    "lora_E-list": (("adalora",), "lora_E", lambda rng, op, kw: kw.update(lora_E=kw["lora_E"].tolist())),
    "meta-lora_E": (("adalora",), "lora_E", lambda rng, op, kw: kw.update(lora_E=kw["lora_E"].to("meta"))),
    # adalora: active
    "active-duplicates": (("adalora",), "active", _active(_dupes_short)),
    "active-duplicates-full-length": (("adalora",), "active", _active(_dupes_full)),
    "active-unsorted": (("adalora",), "active", _active(_unsorted_short)),
    "active-unsorted-full-length": (("adalora",), "active", _active(_unsorted_full)),
    "active-out-of-range": (("adalora",), "active", _active(_out_of_range)),
    "active-out-of-range-full-length": (("adalora",), "active", _active(_out_of_range_full)),
    "active-negative": (("adalora",), "active", _active(_negative)),
    "active-too-long": (("adalora",), "active", _active(_too_long)),
    "active-bool-mask": (("adalora",), "active", _active(_bool_mask)),
    "active-float": (("adalora",), "active", _active(lambda rng, r: torch.arange(r - 1, dtype=torch.float32))),
    "active-int32": (("adalora",), "active", _active(lambda rng, r: torch.arange(r - 1, dtype=torch.int32))),
    "active-2d": (("adalora",), "active", _active(lambda rng, r: torch.arange(r - 1)[None])),
    "active-list": (("adalora",), "active", _active(lambda rng, r: list(range(r - 1)))),
    "active-meta": (("adalora",), "active", _active(lambda rng, r: torch.arange(r - 1, device="meta"))),
}


def _empty_active(defect):
    """adalora with no active rank (the base-only path) and ``defect``: the arguments are still checked."""
    def f(rng, op, kw):
        kw["active"] = torch.zeros(0, dtype=torch.int64)
        INVALID_OP_KINDS[defect][2](rng, op, kw)
    return f


for _d in ("x-last-dim", "x-int", "lora_B-wrong-N", "bias-wrong-len", "scaling-nan", "dropout-one", "dropout-str",
           "meta-bias", "backend-bad", "x-fp64-triton"):
    INVALID_OP_KINDS[f"empty-active-{_d}"] = (("adalora",), INVALID_OP_KINDS[_d][1], _empty_active(_d))


def _nf4_fixture(rng, nested=None):
    N, K = rng.randint(2, 20), rng.randint(2, 70)
    return NF4Weight.quantize(torch.randn(N, K), blocksize=rng.choice(nf4_mod.BLOCKSIZES),
                              double_quant=rng.random() < 0.5 if nested is None else nested)


def _rebuild(w, **changes):
    fields = dict(packed=w.packed, absmax=w.absmax, shape=w.shape, dtype=w.dtype, blocksize=w.blocksize, code=w.code,
                  absmax2=w.absmax2, code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize)
    fields.update(changes)
    return lambda: NF4Weight(**fields)


def _quantize(rng, weight=None, **kw):
    weight = torch.randn(rng.randint(1, 10), rng.randint(1, 70)) if weight is None else weight
    return lambda: NF4Weight.quantize(weight, **kw)


def _noncontig_packed(rng):
    w = _nf4_fixture(rng)
    while w.packed.shape[0] < 2:
        w = _nf4_fixture(rng)
    if rng.random() < 0.5:  # [nbytes, 1] with a row stride of 2
        packed = torch.cat([w.packed, torch.zeros_like(w.packed)], 1)[:, :1]
    else:  # 1-D, every other byte
        packed = torch.stack([w.packed.reshape(-1), torch.zeros_like(w.packed.reshape(-1))], 1).reshape(-1)[::2]
    assert torch.equal(packed.reshape(-1), w.packed.reshape(-1)) and not packed.is_contiguous()
    return _rebuild(w, packed=packed)


def _negative_shape(rng):
    w = _nf4_fixture(rng)
    N, K = w.shape
    return _rebuild(w, shape=(-N, -K))


INVALID_NF4_KINDS = {
    "quantize-blocksize-bool": ("blocksize", lambda rng: _quantize(rng, blocksize=rng.choice([True, False]))),
    "quantize-blocksize-float": ("blocksize", lambda rng: _quantize(
        rng, blocksize=float(rng.choice(nf4_mod.BLOCKSIZES)))),
    "quantize-blocksize-unsupported": ("blocksize", lambda rng: _quantize(
        rng, blocksize=rng.choice([0, -64, 16, 48, 100, 8192]))),
    "quantize-blocksize-str": ("blocksize", lambda rng: _quantize(rng, blocksize="64")),
    "quantize-weight-int": ("weight", lambda rng: _quantize(rng, torch.randint(-5, 5, (3, rng.randint(1, 70))))),
    "quantize-weight-fp64": ("weight", lambda rng: _quantize(rng, torch.randn(3, rng.randint(1, 70), dtype=F64))),
    "quantize-weight-nan": ("weight", lambda rng: _quantize(
        rng, torch.randn(3, 40).index_fill_(1, torch.tensor([rng.randrange(40)]), float("nan")))),
    "quantize-weight-inf": ("weight", lambda rng: _quantize(
        rng, torch.randn(3, 40).index_fill_(1, torch.tensor([rng.randrange(40)]), -float("inf")))),
    "quantize-weight-empty": ("weight", lambda rng: _quantize(rng, torch.empty(rng.choice([(0,), (0, 64), (4, 0)])))),
    "quantize-weight-list": ("weight", lambda rng: _quantize(rng, [[1.0, 2.0]])),
    "nf4-packed-noncontig": ("packed", _noncontig_packed),
    "nf4-packed-int16": ("packed", lambda rng: (lambda w: _rebuild(w, packed=w.packed.to(torch.int16)))(
        _nf4_fixture(rng))),
    "nf4-packed-wrong-size": ("packed", lambda rng: (lambda w: _rebuild(w, packed=w.packed[:-1]))(_nf4_fixture(rng))),
    "nf4-shape-mismatch": ("packed|shape", lambda rng: (lambda w: _rebuild(
        w, shape=(w.shape[0] + 1, w.shape[1])))(_nf4_fixture(rng))),
    "nf4-shape-negative": ("shape", _negative_shape),
    "nf4-absmax-wrong-len": ("absmax", lambda rng: (lambda w: _rebuild(w, absmax=torch.cat([w.absmax, w.absmax[:1]])))(
        _nf4_fixture(rng))),
    "nf4-absmax-meta": ("absmax", lambda rng: (lambda w: _rebuild(w, absmax=w.absmax.to("meta")))(_nf4_fixture(rng))),
    "nf4-blocksize-bool": ("blocksize", lambda rng: (lambda w: _rebuild(w, blocksize=True))(_nf4_fixture(rng))),
    "nf4-nested_blocksize-bool": ("nested_blocksize", lambda rng: (lambda w: _rebuild(w, nested_blocksize=True))(
        _nf4_fixture(rng, nested=True))),
    "nf4-nested_blocksize-not-pow2": ("nested_blocksize", lambda rng: (lambda w: _rebuild(w, nested_blocksize=100))(
        _nf4_fixture(rng, nested=True))),
    "nf4-dtype-int8": ("dtype", lambda rng: (lambda w: _rebuild(w, dtype=torch.int8))(_nf4_fixture(rng))),
    "nf4-dtype-str": ("dtype", lambda rng: (lambda w: _rebuild(w, dtype="float16"))(_nf4_fixture(rng))),
    "nf4-dequantize-dtype-int": ("dtype", lambda rng: (lambda w: lambda: w.dequantize(torch.int32))(_nf4_fixture(rng))),
    "nf4-dequantize-dtype-fp64": ("dtype", lambda rng: (lambda w: lambda: w.dequantize(F64))(_nf4_fixture(rng))),
    "nf4-dequantize-backend": ("backend", lambda rng: (lambda w: lambda: w.dequantize(backend="cuda"))(
        _nf4_fixture(rng))),
}


def invalid_cases(seed=SEED):
    """``(id, kind, op, variant seed)``: 3 random variants of each op defect, 2 of each NF4 defect."""
    rng = random.Random(f"invalid-{seed}")
    out = []
    for kind, (ops, _, _) in INVALID_OP_KINDS.items():
        for i in range(3):
            op = ops[i % len(ops)] if len(ops) > 1 else ops[0]
            out.append((f"{kind}-{op}-{i}", kind, op, rng.randrange(2**31)))
    for kind in INVALID_NF4_KINDS:
        for i in range(2):
            out.append((f"{kind}-{i}", kind, None, rng.randrange(2**31)))
    return out


@pytest.mark.parametrize("kind,op,vseed", [pytest.param(*c[1:], id=c[0]) for c in invalid_cases()])
def test_invalid_input(kind, op, vseed):
    rng = random.Random(vseed)
    if op is None:
        name, make = INVALID_NF4_KINDS[kind]
        thunk = make(rng)
    else:
        _, name, defect = INVALID_OP_KINDS[kind]
        kw = _valid_args(rng, op)
        FN[op](**kw)  # the arguments are valid before the defect
        defect(rng, op, kw)
        if kw.get("backend") == "triton" and not INTERPRETER:
            pytest.skip("these CPU cases reach the Triton backend only through Triton's interpreter")
        thunk = lambda: FN[op](**kw)  # noqa: E731
    with pytest.raises((TypeError, ValueError), match=rf"\b({name})\b"):
        thunk()


def test_case_counts():
    """The fuzz keeps its size (>= 1000 random cases) and its share of interpreter cases."""
    ops = _OP_CASES
    n_triton = sum(c["backend"] == "triton" for c in ops)
    total = len(nf4_cases()) + len(ops) + len(dropout_cases()) + len(invalid_cases())
    assert total >= 1000, total
    if INTERPRETER:
        assert 0.08 <= n_triton / len(ops) <= 0.18, n_triton
