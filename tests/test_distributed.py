"""DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) of converted models: 2 processes on CPU (gloo).

Models: peft LoRA over a dense ``Tiny`` (40 -> 72 -> 40 -> 24), peft QLoRA over bitsandbytes NF4 ``Linear4bit``
layers, and our own ``QLoraLinear`` layers in an ``nn.Sequential``, all with random non-zero ``lora_B``. Each rank
trains on half of one fixed batch; the reference is one process (this pytest process) on the whole batch. Checked:
the all-reduced mean loss, every adapter gradient and the adapters after ``STEPS`` AdamW steps equal the reference
(fp32, relative error <= 1e-5); the frozen NF4 weights keep their bytes, quant_state and dequantized values
(bit-exact) through wrapping and training; the full state dict of the wrapped model has bitsandbytes' and peft's
keys with the unwrapped model's bytes.

FSDP2 and bitsandbytes: ``fully_shard`` turns every parameter it manages into a DTensor, and a ``Params4bit``
loses its ``quant_state`` that way (see ``test_fsdp2_sharding_a_params4bit_drops_its_quant_state``). The recipe
used here: pass the frozen 4-bit weights as ``ignored_params`` to every ``fully_shard`` call (they stay
``Params4bit``, unsharded, replicated on each rank, never all-gathered or reduced); everything else (adapters,
dense frozen weights, biases) is sharded.

All ranks run in two worker processes started once per module (``dist_runs``); every collective has a timeout
and the workers are killed after ``TOTAL_TIMEOUT_S``, so a hang fails the tests instead of blocking.
"""
import functools
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_kernels import QLoraLinear  # noqa: E402
from lowrank_kernels import peft as lk_peft  # noqa: E402
from tests.conftest import HAS_BNB  # noqa: E402
from tests.test_lora_forward import rel_err  # noqa: E402
from tests.test_peft_convert import Tiny, quantized_tiny, runs_our_function  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SEED = 1234
STEPS = 3
LR = 1e-2
BATCH = 8
TOL = 1e-5
TOTAL_TIMEOUT_S = 180  # both workers, all cases, imports included
PG_TIMEOUT_S = 120  # the default process group (barriers between cases)
CASE_TIMEOUT_S = 45  # each case's own process group: a rank stuck in a collective gives up after this

# case -> (model kind, wrapping, lora_dropout)
CASES = {
    "dense-ddp": ("dense", "ddp", 0.0),
    "dense-fsdp2": ("dense", "fsdp2", 0.0),
    "qlora-ddp": ("qlora", "ddp", 0.0),
    "qlora-fsdp2": ("qlora", "fsdp2", 0.0),
    "ours-ddp": ("ours", "ddp", 0.0),
    "ours-fsdp2": ("ours", "fsdp2", 0.0),
    "qlora-dropout-ddp": ("qlora", "ddp", 0.2),
    "qlora-dropout-fsdp2": ("qlora", "fsdp2", 0.2),
    # fully_shard without ignored_params (documents what happens to a Params4bit): peft's layers, then ours
    "peft-qlora-fsdp2-naive": ("peft-qlora", "fsdp2-naive", 0.0),
    "qlora-fsdp2-naive": ("qlora", "fsdp2-naive", 0.0),
}
EQUAL_CASES = [c for c, (_, how, p) in CASES.items() if p == 0.0 and how != "fsdp2-naive"]
NF4_CASES = [c for c, (kind, how, _) in CASES.items() if kind in ("qlora", "ours") and how != "fsdp2-naive"]
DROPOUT_CASES = [c for c, (_, how, p) in CASES.items() if p > 0.0]
TRAINED_CASES = [c for c, (_, how, _) in CASES.items() if how != "fsdp2-naive"]

needs_bnb_for = {c: pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
                 for c, (kind, _, _) in CASES.items() if "qlora" in kind}


def _params(cases):
    """``cases`` as pytest params: bitsandbytes cases skipped without it."""
    return [pytest.param(c, marks=[m for m in (needs_bnb_for.get(c),) if m is not None]) for c in cases]


# ------------------------------------------------------------------------------------------ models (any process)
def build(kind, dropout=0.0):
    """``(model, number of layers convert() converted)``, the same bits in every process (seeded)."""
    torch.manual_seed(SEED)
    if kind == "ours":
        model = nn.Sequential(
            QLoraLinear.from_linear(nn.Linear(40, 72), r=4, lora_alpha=8, lora_dropout=dropout), nn.ReLU(),
            QLoraLinear.from_linear(nn.Linear(72, 40, bias=False), r=4, lora_alpha=8, lora_dropout=dropout),
            nn.Linear(40, 24).requires_grad_(False))
        converted = None
    else:
        base = Tiny() if kind == "dense" else quantized_tiny("cpu", owned=True)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                lora_dropout=dropout))
        converted = 0 if kind.startswith("peft-") else lk_peft.convert(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model, converted


def batch():
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(BATCH, 40, generator=g), torch.randn(BATCH, 24, generator=g)


def frozen_4bit(model):
    """The recipe's ``ignored_params``: every bitsandbytes 4-bit weight."""
    import bitsandbytes as bnb

    return {p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)}


def wrap(model, how, group):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, process_group=group)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, "cpu")
    ignored = frozen_4bit(model) if how == "fsdp2" and HAS_BNB else None
    for m in model.modules():  # one FSDP group per LoRA layer, then the root
        if isinstance(m, (peft.tuners.lora.LoraLayer, QLoraLinear)):
            fully_shard(m, mesh=mesh, ignored_params=ignored)
    return fully_shard(model, mesh=mesh, ignored_params=ignored)


def _full(t):
    """A plain tensor with the same bytes (a DTensor gathered); the dtype never changes."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().as_subclass(torch.Tensor).clone()


def full_state_dict(wrapped, how, dcp=True):
    """DDP: ``module.state_dict()``. FSDP2: ``get_model_state_dict(full_state_dict=True)`` (``dcp``), or the
    module's own ``state_dict()`` with every DTensor gathered (``full_tensor()``), which works for any module."""
    if how == "ddp":
        sd = wrapped.module.state_dict()
    elif dcp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    else:
        sd = wrapped.state_dict()
    return {k: _full(v) for k, v in sd.items()}


def dcp_state_dict(wrapped, how):
    """``(full state dict, None)`` from ``get_model_state_dict`` (FSDP2 cases), or ``(None, error text)``."""
    try:
        return full_state_dict(wrapped, how, dcp=True), None
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        return None, f"{type(e).__name__}: {e}"


def _bnb():
    import bitsandbytes

    return bitsandbytes


def nf4_snapshot(model):
    """Per NF4 layer: packed bytes (uint8, never through a float dtype), scales, code tables, offset, the
    dequantized weight (bitsandbytes' own dequantize for bitsandbytes layers), the weight's type."""
    snap = {}
    for name, m in model.named_modules():
        if isinstance(m, QLoraLinear):
            w = m.nf4
            entry = dict(type=type(w).__name__, packed=w.packed, absmax=w.absmax, code=w.code,
                         nested_absmax=w.absmax2, nested_code=w.code2, offset=w.offset,
                         dequantized=w.dequantize(torch.float32), requires_grad=False, grad_is_none=True)
        elif HAS_BNB and isinstance(m, _bnb().nn.Linear4bit):
            bnb = _bnb()
            w = m.weight
            qs = w.quant_state
            packed = w.detach().as_subclass(torch.Tensor)
            entry = dict(type=type(w).__name__, packed=packed, absmax=qs.absmax, code=qs.code,
                         nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, offset=qs.offset,
                         dequantized=bnb.functional.dequantize_4bit(packed, qs), requires_grad=w.requires_grad,
                         grad_is_none=w.grad is None)
        else:
            continue
        snap[name] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
    return snap


def train(model, inner, x, t, group=None):
    """``STEPS`` AdamW steps on the adapters of ``inner`` (``model`` is it, or its wrapper): the (all-reduced)
    losses, the first step's adapter gradients, the adapters after the steps, whether our autograd ran."""
    world = 1 if group is None else dist.get_world_size(group)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=0.0)
    out = {"losses": [], "ran_ours": []}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        y = model(x)
        out["ran_ours"].append(runs_our_function(y))
        loss = F.mse_loss(y, t)
        loss.backward()
        loss = loss.detach().clone()
        if group is not None:
            dist.all_reduce(loss, group=group)
            loss /= world
        out["losses"].append(loss.item())
        if step == 0:
            out["grads"] = {n: _full(p.grad) for n, p in named if p.grad is not None}
        opt.step()
    out["adapters"] = {n: _full(p) for n, p in named}
    return out


# ------------------------------------------------------------------------------------------------ the workers
def run_case(case, rank, world, group):
    kind, how, dropout = CASES[case]
    model, converted = build(kind, dropout)
    res = {"converted": converted, "before": nf4_snapshot(model),
           "sd_before": {k: _full(v) for k, v in model.state_dict().items()}}
    x, t = batch()
    half = BATCH // world
    xs, ts = x[rank * half:(rank + 1) * half], t[rank * half:(rank + 1) * half]
    wrapped = wrap(model, how, group)
    if how == "fsdp2-naive":
        w = model.base_model.model.up.base_layer.weight
        res.update(weight_type=type(w).__name__, weight_has_quant_state=getattr(w, "quant_state", None) is not None,
                   weight_full=_full(w), sd_wrapped_keys=sorted(full_state_dict(wrapped, how)))
        try:
            res.update(train(wrapped, model, xs, ts, group))
            res["train_error"] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            res["train_error"] = f"{type(e).__name__}: {e}"
        return res
    res["param_types"] = {n: type(p).__name__ for n, p in model.named_parameters()}
    res["wrapped"] = nf4_snapshot(model)
    res["sd_wrapped"] = full_state_dict(wrapped, how, dcp=False)
    res.update(train(wrapped, model, xs, ts, group))
    res["after"] = nf4_snapshot(model)
    res["sd_after"] = full_state_dict(wrapped, how, dcp=False)
    if how == "fsdp2":
        res["sd_dcp"], res["sd_dcp_error"] = dcp_state_dict(wrapped, how)
    return res


def _worker(rank, world, port, out_dir):
    rank, world, port, out_dir = int(rank), int(world), int(port), Path(out_dir)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=PG_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    results = {}
    for case, (kind, _, _) in CASES.items():
        if "qlora" in kind and not HAS_BNB:
            continue
        print(f"rank {rank}: {case}", flush=True)  # in the test's failure message if the workers time out
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=CASE_TIMEOUT_S))
        try:
            results[case] = {"ok": True, **run_case(case, rank, world, group)}
        except Exception as e:  # noqa: BLE001 - reported by the tests of this case
            results[case] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        dist.barrier()  # (the case's group stays alive: the device meshes built on it may be cached by torch)
        torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """``{case: [rank 0's results, rank 1's results]}`` from one run of two worker processes."""
    out = tmp_path_factory.mktemp("dist")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=PG_TIMEOUT_S))  # a free port, held by this process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on the loopback interface only
    code = f"import sys; from {__name__} import _worker; _worker(*sys.argv[1:])"
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(rank), str(WORLD), str(store.port), str(out)],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=TOTAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        timed_out = [p for p in procs if p.poll() is None]
        for p in timed_out:
            p.kill()
        for p in procs:
            p.wait()
        for log in logs:
            log.close()
        del store
    text = "\n".join(f"--- rank {r} (exit code {p.returncode}):\n" + (out / f"rank{r}.log").read_text()[-4000:]
                     for r, p in enumerate(procs))
    if timed_out:
        pytest.fail(f"the workers did not finish within {TOTAL_TIMEOUT_S} s\n{text}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a worker failed\n{text}")
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {case: [r[case] for r in per_rank] for case in per_rank[0]}


def ranks_of(dist_runs, case):
    if case not in dist_runs:
        pytest.fail(f"{case}: not run")
    ranks = dist_runs[case]
    for r, res in enumerate(ranks):
        if not res["ok"]:
            pytest.fail(f"{case}, rank {r}: {res['error']}\n{res['traceback']}")
    return ranks


def naive_ranks(dist_runs, case):
    """The ranks of an ``fsdp2-naive`` case, or ``None`` where ``fully_shard`` refused the uint8 ``Params4bit``
    outright on every rank (torch 2.11 does: it makes the shard a Parameter that requires grad), a loud failure
    instead of the silent loss of quant_state these tests document for torch 2.13."""
    ranks = dist_runs.get(case, [])
    if ranks and all(not r["ok"] and "only Tensors of floating point dtype can require gradients" in r["error"]
                     for r in ranks):
        return None
    return ranks_of(dist_runs, case)


@functools.cache
def reference(kind):
    """One process, the whole batch, the same steps."""
    model, converted = build(kind)
    before = {k: _full(v) for k, v in model.state_dict().items()}
    x, t = batch()
    return {"converted": converted, "sd_before": before, **train(model, model, x, t)}


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a, b) -> bool:
    """Same dtype, shape and bytes (floats compared as integers: NaN patterns and -0.0 count)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()])
    return torch.equal(a, b)


def is_adapter(key):
    return "lora_A" in key or "lora_B" in key


@pytest.mark.parametrize("case", _params(EQUAL_CASES))
def test_loss_grads_and_steps_match_one_process(dist_runs, case):
    kind = CASES[case][0]
    ranks = ranks_of(dist_runs, case)
    ref = reference(kind)
    sharded = {"ddp": set(), "fsdp2": {"DTensor"}}[CASES[case][1]]
    expected_converted = None if kind == "ours" else 2
    assert ref["converted"] == expected_converted
    for r, res in enumerate(ranks):
        assert res["converted"] == expected_converted, (r, res["converted"])
        assert all(res["ran_ours"]), f"rank {r}: our autograd function did not run: {res['ran_ours']}"
        adapter_types = {t for n, t in res["param_types"].items() if is_adapter(n)}
        assert adapter_types == (sharded or {"Parameter"}), adapter_types  # FSDP2: sharded; DDP: as they were
        # every rank starts from the reference's bits
        assert res["sd_before"].keys() == ref["sd_before"].keys()
        assert all(same_bits(res["sd_before"][k], ref["sd_before"][k]) for k in ref["sd_before"]), r
        assert len(res["losses"]) == STEPS
        for step, (got, want) in enumerate(zip(res["losses"], ref["losses"])):
            assert abs(got - want) <= TOL * abs(want), (r, step, got, want)
        assert res["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) == 4  # lora_A, lora_B of 2 layers
        for name, want in ref["grads"].items():
            assert want.norm() > 0, name
            assert res["grads"][name].dtype == torch.float32 and rel_err(res["grads"][name], want.double()) <= TOL, \
                (r, name, rel_err(res["grads"][name], want.double()))
        for name, want in ref["adapters"].items():
            assert not torch.equal(want, ref["sd_before"][name]), name  # the steps moved it
            assert rel_err(res["adapters"][name], want.double()) <= TOL, (r, name)
    for name in ranks[0]["adapters"]:  # the ranks agree exactly
        assert torch.equal(ranks[0]["adapters"][name], ranks[1]["adapters"][name]), name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


NF4_FIELDS = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset", "dequantized")


@pytest.mark.parametrize("case", _params(NF4_CASES))
def test_frozen_nf4_weights_stay_bit_exact(dist_runs, case):
    kind, how, _ = CASES[case]
    ranks = ranks_of(dist_runs, case)
    expected_type = "NF4Weight" if kind == "ours" else "Params4bit"
    for r, res in enumerate(ranks):
        before = res["before"]
        assert len(before) == 2, before.keys()
        for layer, b in before.items():
            assert b["type"] == expected_type and b["packed"].dtype == torch.uint8
            assert b["absmax"].dtype == torch.uint8  # double quantization: first-level scales are indices
            for when in ("wrapped", "after"):
                now = res[when][layer]
                assert now["type"] == expected_type, (r, when, layer, now["type"])
                assert now["requires_grad"] is False and now["grad_is_none"], (r, when, layer)
                for field in NF4_FIELDS:
                    assert same_bits(now[field], b[field]), (r, when, layer, field)
    for layer in ranks[0]["before"]:  # and every rank holds the same bits
        for field in NF4_FIELDS:
            assert same_bits(ranks[0]["after"][layer][field], ranks[1]["after"][layer][field]), (layer, field)


def _expected_keys(kind):
    if kind == "ours":
        layers = ["0.", "2."]
    else:
        layers = ["base_model.model.up.", "base_model.model.down."]
    keys = []
    for layer in layers:
        w = layer + ("weight" if kind == "ours" else "base_layer.weight")
        if kind != "dense":
            keys += [w, w + ".absmax", w + ".quant_map", w + ".nested_absmax", w + ".nested_quant_map",
                     w + ".quant_state.bitsandbytes__nf4"]
        else:
            keys += [w]
        adapter = "" if kind == "ours" else ".default"
        keys += [layer + f"lora_A{adapter}.weight", layer + f"lora_B{adapter}.weight"]
    return keys


@pytest.mark.parametrize("case", _params(TRAINED_CASES))
def test_state_dict_keeps_keys_and_bytes(dist_runs, case):
    kind = CASES[case][0]
    ranks = ranks_of(dist_runs, case)
    for r, res in enumerate(ranks):
        before, wrapped, after = res["sd_before"], res["sd_wrapped"], res["sd_after"]
        assert set(_expected_keys(kind)) <= set(before), set(_expected_keys(kind)) - set(before)
        assert wrapped.keys() == before.keys(), (r, set(wrapped) ^ set(before))
        assert after.keys() == before.keys(), (r, set(after) ^ set(before))
        for k in before:
            assert same_bits(wrapped[k], before[k]), (r, k)
            if is_adapter(k):
                assert not same_bits(after[k], before[k]), (r, k)  # trained
                assert same_bits(after[k], res["adapters"][k]), (r, k)
            else:
                assert same_bits(after[k], before[k]), (r, k)  # frozen: the same bytes after the steps
        if kind != "dense":
            packed = [k for k in before if k.endswith("weight") and before[k].dtype == torch.uint8]
            assert len(packed) == 2, packed


@pytest.mark.parametrize("case", _params([c for c in TRAINED_CASES if CASES[c][1] == "fsdp2"]))
def test_fsdp2_get_model_state_dict(dist_runs, case):
    """``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True)`` of the FSDP2 model
    after training: the same keys and bytes as the gathered ``state_dict()`` checked above."""
    for r, res in enumerate(ranks_of(dist_runs, case)):
        assert res["sd_dcp_error"] is None, (r, res["sd_dcp_error"])
        assert res["sd_dcp"].keys() == res["sd_after"].keys(), (r, set(res["sd_dcp"]) ^ set(res["sd_after"]))
        for k, v in res["sd_after"].items():
            assert same_bits(res["sd_dcp"][k], v), (r, k)


@pytest.mark.parametrize("case", _params(DROPOUT_CASES))
def test_dropout_trains(dist_runs, case):
    ranks = ranks_of(dist_runs, case)
    for r, res in enumerate(ranks):
        assert res["converted"] == 2 and all(res["ran_ours"])
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        assert len(res["grads"]) == 4
        for name, g in res["grads"].items():
            assert torch.isfinite(g).all() and g.norm() > 0, (r, name)
            assert not torch.equal(res["adapters"][name], res["sd_before"][name]), (r, name)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_fsdp2_sharding_a_params4bit_drops_its_quant_state(dist_runs):
    """What ``fully_shard`` without ``ignored_params`` does to a bitsandbytes weight (torch 2.13, bitsandbytes
    0.50): the packed bytes are sharded and gather back intact, but the parameter becomes a ``DTensor`` without
    ``quant_state``, and the full state dict loses bitsandbytes' quant_state keys. peft's unconverted layers still
    run (bitsandbytes' ``Linear4bit.forward`` restores the quant_state from ``module.quant_state``, which
    transformers sets). Hence the recipe: the 4-bit weights as ``ignored_params``."""
    for res in naive_ranks(dist_runs, "peft-qlora-fsdp2-naive") or []:
        assert res["weight_type"] == "DTensor" and not res["weight_has_quant_state"]
        assert same_bits(res["weight_full"], res["before"]["base_model.model.up.base_layer"]["packed"])
        assert res["sd_wrapped_keys"] != sorted(res["sd_before"])
        assert "base_model.model.up.base_layer.weight" in res["sd_wrapped_keys"]
        assert "base_model.model.up.base_layer.weight.absmax" not in res["sd_wrapped_keys"]
        assert res["train_error"] is None, res["train_error"]  # peft + bitsandbytes: runs


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_fsdp2_sharded_params4bit_converted_runs_like_peft(dist_runs):
    """A converted model whose ``Params4bit`` were sharded without ``ignored_params`` (their ``quant_state`` lost)
    runs as peft's layers do: the quant_state comes from the layer, as in bitsandbytes' own forward."""
    for res in naive_ranks(dist_runs, "qlora-fsdp2-naive") or []:
        assert res["converted"] == 2
        assert res["weight_type"] == "DTensor" and not res["weight_has_quant_state"]
        assert res["train_error"] is None, res["train_error"]
