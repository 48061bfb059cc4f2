"""scripts/train_multi_gpu.py on CPU (gloo), through ``python -m torch.distributed.run``: the tiny Llama QLoRA model
(2 decoder layers, fp32, 4 sequences of 64 tokens a step, 4 AdamW steps), once in one process (``--wrap none``)
and once in two (``ddp``, ``fsdp2`` with the NF4 bytes sharded, ``fsdp2-replicate``; one sequence per forward,
so gradient accumulation runs too), both providers each time. Checked: every two-process run's per-step loss and
gradient norm equal the one-process run's (fp32, relative error <= TOL), the converted model ran our autograd
function in every layer, the NF4 bytes, scales, dequantized weights and layer outputs are bit-exact through the
wrapping and after the steps (``--check-exact``), FSDP2 holds half of the packed bytes on each rank, and the JSON
has its fields.

The two launches are the module's fixtures, shared by all tests; each is killed after ``LAUNCH_TIMEOUT_S``.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.conftest import HAS_BNB

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed"),
]
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_multi_gpu.py"
STEPS = 4
LAYERS = 2
NF4_LAYERS = 7 * LAYERS  # q, k, v, o, gate, up, down
ARGS = ["--model", "tiny", "--layers", str(LAYERS), "--dtype", "float32", "--seq", "64", "--global-batch", "4",
        "--steps", str(STEPS), "--warmup", "1", "--lr", "1e-3", "--check-exact", "--timeout", "60",
        "--device", "cpu"]  # gloo on the CPU, also on a machine with GPUs (one GPU cannot hold two CUDA ranks)
PROVIDERS = ["ours", "peft-bnb"]
WRAPS = ["ddp", "fsdp2", "fsdp2-replicate"]
# fp32 with the batch split over ranks and micro-batches: the products and the gradient reduction round
# differently, a few 1e-7 relative in losses and gradient norms over the 4 steps. 1e-5 leaves room for other
# CPUs' blocking yet fails on what a wrong split or averaging does: another slice of the random tokens moves
# the loss by ~1e-3 relative (its step-to-step change, asserted below to exceed 100 * TOL), and gradients averaged
# over N where they should be summed (or the reverse) change the gradient norm by a factor N. (At lr 1e-2 Adam's
# first step, ~lr * sign(g), amplifies the rounding of near-zero gradient entries to ~2e-6: hence lr 1e-3.)
TOL = 1e-5
LAUNCH_TIMEOUT_S = 120
# What torch says when fully_shard cannot shard uint8 parameters (pytorch/pytorch#177844, e.g. torch 2.11)
TORCH_REFUSAL = "only Tensors of floating point dtype can require gradients"


def launch(out_dir, nproc, *extra):
    """The result JSON of ``torchrun --nproc-per-node nproc scripts/train_multi_gpu.py ARGS extra``."""
    out = out_dir / f"world{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on the loopback interface only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(SCRIPT), *ARGS, *extra, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{nproc} process(es) did not finish within {LAUNCH_TIMEOUT_S} s\n{(e.stdout or '')[-4000:]}")
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{' '.join(cmd)}\nexit code {proc.returncode}\n{log}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("one"), 1, "--wrap", "none")


@pytest.fixture(scope="module")
def two(tmp_path_factory, one):
    out_dir = tmp_path_factory.mktemp("two")
    baseline = out_dir / "baseline.json"
    baseline.write_text(json.dumps(one))
    return launch(out_dir, 2, "--wrap", ",".join(WRAPS), "--micro-batch", "1", "--baseline", str(baseline))


def run_of(result, provider, wrap):
    """The run of ``provider`` / ``wrap``; skipped with torch's words where fully_shard refused the NF4 bytes."""
    runs = [r for r in result["runs"] if r["provider"] == provider and r["wrap"] == wrap]
    assert len(runs) == 1, [(r["provider"], r["wrap"]) for r in result["runs"]]
    run = runs[0]
    if run["status"] == "refused" and wrap == "fsdp2" and TORCH_REFUSAL in run["error"]:
        pytest.skip(f"torch {torch.__version__} refuses to shard the uint8 NF4 bytes: {run['error']}")
    assert run["status"] == "ok", (provider, wrap, run["status"], run["error"])
    return run


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_two_processes_match_one(one, two, provider, wrap):
    ref, got = run_of(one, provider, "none"), run_of(two, provider, wrap)
    assert len(ref["losses"]) == len(got["losses"]) == STEPS
    assert len(ref["grad_norms"]) == len(got["grad_norms"]) == STEPS
    # the comparison means something: the steps' losses differ by far more than TOL, the gradients are not zero
    assert max(rel(x, ref["losses"][0]) for x in ref["losses"]) > 100 * TOL, ref["losses"]
    assert min(ref["grad_norms"]) > 0, ref["grad_norms"]
    for step in range(STEPS):
        assert rel(got["losses"][step], ref["losses"][step]) <= TOL, (step, got["losses"], ref["losses"])
        assert rel(got["grad_norms"][step], ref["grad_norms"][step]) <= TOL, \
            (step, got["grad_norms"], ref["grad_norms"])
    base = got["baseline"]  # what --baseline computed from the same two files
    assert base["wrap"] == "none" and base["world_size"] == 1 and base["steps_compared"] == STEPS
    assert base["loss_max_rel_diff"] == max(rel(x, y) for x, y in zip(got["losses"], ref["losses"]))
    assert base["tokens_per_s_ratio"] > 0


@pytest.mark.parametrize("wrap", ["none"] + WRAPS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_converted_layers_run_our_kernels(one, two, provider, wrap):
    run = run_of(one if wrap == "none" else two, provider, wrap)
    assert run["nf4_layers"] == NF4_LAYERS
    expected = NF4_LAYERS if provider == "ours" else 0
    assert run["converted_layers"] == expected
    assert run["our_autograd_nodes"] == expected  # one LoraLinearFunction node per converted layer, none for peft


@pytest.mark.parametrize("wrap", ["none"] + WRAPS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nf4_bit_exact_through_sharding(one, two, provider, wrap):
    run = run_of(one if wrap == "none" else two, provider, wrap)
    wrapped, trained = run["exact_wrapped"], run["exact_trained"]
    # per layer: packed bytes, absmax, code, nested absmax, nested code, offset, dequantized weight (+ output)
    assert wrapped["layers"] == trained["layers"] == NF4_LAYERS
    assert wrapped["fields"] == 8 * NF4_LAYERS and trained["fields"] == 7 * NF4_LAYERS
    assert wrapped["equal"] and not wrapped["mismatches"], wrapped
    assert trained["equal"] and not trained["mismatches"], trained
    total, per_rank = run["nf4_bytes_total"], run["nf4_bytes_per_rank"]
    assert total > 0
    if wrap == "fsdp2":  # the packed bytes are sharded: each rank holds half of them
        assert per_rank == [total // 2] * 2, (total, per_rank)
    else:
        assert per_rank == [total] * (1 if wrap == "none" else 2), (total, per_rank)


def test_json_fields(one, two):
    for result, world in ((one, 1), (two, 2)):
        assert result["script"] == "scripts/train_multi_gpu.py"
        assert result["world_size"] == world and result["backend"] == "gloo" and result["device"] == "cpu"
        assert result["gpus"] is None
        assert result["global_tokens_per_step"] == 4 * 64
        assert result["args"]["steps"] == STEPS and result["args"]["check_exact"] is True
        versions = result["versions"]
        assert versions["torch"] == torch.__version__
        assert {"cuda", "transformers", "peft", "bitsandbytes", "lowrank_kernels", "git_commit"} <= versions.keys()
        wraps = ["none"] if world == 1 else WRAPS
        assert [(r["provider"], r["wrap"]) for r in result["runs"]] == [(p, w) for p in PROVIDERS for w in wraps]
        for run in result["runs"]:
            if run["status"] != "ok":
                continue
            assert len(run["step_s"]) == STEPS and all(t > 0 for t in run["step_s"])
            assert run["timed_steps"] == STEPS - 1
            assert run["tokens_per_s"] > 0
            assert run["resident_bytes"] == [None] * world and run["peak_bytes"] == [None] * world  # CPU: none


def test_bf16_quant_storage_shards_and_matches_one_process(tmp_path):
    """FSDP-QLoRA's storage (``--quant-storage bfloat16``: the packed bytes in a bf16 tensor, which torch releases
    refusing uint8 parameters shard): converted layers read it as bytes; under FSDP2 each rank holds half of it,
    the bytes survive the all-gather bit-exactly, and the losses equal one process's."""
    storage = ("--quant-storage", "bfloat16", "--provider", "ours")
    ref = run_of(launch(tmp_path, 1, "--wrap", "none", *storage), "ours", "none")
    got = run_of(launch(tmp_path, 2, "--wrap", "fsdp2", *storage), "ours", "fsdp2")
    assert got["converted_layers"] == got["our_autograd_nodes"] == NF4_LAYERS
    assert got["exact_wrapped"]["equal"] and got["exact_trained"]["equal"], (got["exact_wrapped"],
                                                                             got["exact_trained"])
    assert got["nf4_bytes_per_rank"] == [got["nf4_bytes_total"] // 2] * 2
    assert max(rel(x, ref["losses"][0]) for x in ref["losses"]) > 100 * TOL, ref["losses"]
    for a, b in zip(got["losses"], ref["losses"]):
        assert rel(a, b) <= TOL, (got["losses"], ref["losses"])
