"""QLoRA training on several GPUs with DDP or FSDP2: losses against one GPU, tokens/s, peak memory per GPU, and a
bit-exact check of the NF4 weights through sharding. Start it with torchrun, one process per GPU.

Model: ``LlamaForCausalLM`` with the layer dimensions of a bench/shapes.py model (default ``llama3-8b``; ``tiny``:
hidden 64, vocabulary 256, for CPU), ``--layers`` decoder layers (4), random init from ``--seed`` (nothing
downloaded), ``--dtype`` (bf16) for everything but the adapters (peft keeps them fp32). Every q/k/v/o/gate/up/down
projection is a bitsandbytes ``Linear4bit`` (NF4, double quantization, packed bytes in ``--quant-storage``),
under peft LoRA r=16, alpha 32, no dropout (bench/test_train_step.py's model). ``--provider ours`` converts the
LoRA layers with ``lowrank_kernels.peft.convert``; ``peft-bnb`` leaves them to peft + bitsandbytes. AdamW over
the adapters; no gradient checkpointing.

Wrapping (``--wrap``, comma-separated; after converting): ``none`` (one process, the baseline), ``ddp``
(``DistributedDataParallel``), ``fsdp2`` (``fully_shard`` on every decoder layer, then on the whole model: every
parameter is sharded, the packed NF4 bytes included, as FSDP-QLoRA recipes do), ``fsdp2-replicate`` (the same
with the 4-bit weights as ``ignored_params``: whole on every rank, never gathered; tests/test_distributed.py's
recipe). Sharded, a ``Params4bit`` becomes a ``DTensor`` holding 1/N of the packed bytes and loses bitsandbytes'
``quant_state``; the scales (double-quantized absmax, 1 byte per 64 weights), code tables and offset stay on the
``Linear4bit`` module (``module.quant_state``, set when it was quantized, replicated), which bitsandbytes'
forward and the converted layers read when the weight has none. ``fully_shard`` of a uint8 parameter fails on
torch releases that create the sharded ``nn.Parameter`` requiring grad (pytorch/pytorch#177844; torch 2.11
does): the run is then recorded as refused. ``--quant-storage bfloat16`` (bitsandbytes packs the bytes into a
bf16 tensor, FSDP-QLoRA's way around that) shards for both providers (``NF4Weight`` reads such storage as a uint8
view of its bytes).

Data: each step, ``--global-batch`` sequences of ``--seq`` random tokens (drawn from ``--seed`` and the step
only: the same for any world size), split into equal contiguous slices, one per rank, run ``--micro-batch``
sequences at a time with gradient accumulation. Loss: causal-LM cross-entropy, mean over the global batch's
predicted tokens, with gradients scaled so that N ranks take the steps one process takes on the whole batch
(``train``): the losses agree up to the rounding of differently shaped products and of the reduction.

Recorded (``--out`` JSON, rank 0), per provider x wrapping: the global mean loss and the adapters' gradient norm
at every step (also printed), the step times, tokens/s over the steps after ``--warmup`` (the global batch's
tokens over the slowest rank's time), bytes allocated after wrapping and at the peak of the steps per rank (CUDA;
``None`` on CPU), the packed NF4 bytes in all and per rank, the layers converted, ``--check-exact``'s results;
on top: the arguments, world size, GPUs and versions. ``--baseline ONE.json`` (a one-process result) adds to each
run the largest relative loss difference from, and the tokens/s ratio to, that file's run of the same provider.
A run whose conversion or wrapping is refused gets ``status: "refused"`` and the message; one that fails during
the steps ``"error"`` (exit code 1 once the JSON is written, as for a failed check).

``--check-exact``: before wrapping, every NF4 layer's packed bytes, scales and code tables, its dequantized weight
(``--dtype``: our ``NF4Weight`` for ``ours``, bitsandbytes' ``dequantize_4bit`` for ``peft-bnb``) and its LoRA
layer's output on a fixed input ``[4, in_features]``; after wrapping (FSDP2: between ``unshard()`` and
``reshard()`` of each decoder layer, i.e. through FSDP's own all-gather) the same must be equal byte for byte;
after the steps, the same but the outputs (the adapters have moved).

One GPU (the baseline), then two::

    torchrun --standalone --nproc-per-node 1 scripts/train_multi_gpu.py --wrap none --check-exact --out one.json
    torchrun --standalone --nproc-per-node 2 scripts/train_multi_gpu.py --wrap ddp,fsdp2,fsdp2-replicate \\
        --check-exact --baseline one.json --out two.json

CPU (gloo), the tiny model in fp32::

    torchrun --standalone --nproc-per-node 2 scripts/train_multi_gpu.py --model tiny --dtype float32 --seq 64 \\
        --global-batch 4 --steps 4 --warmup 1 --wrap ddp,fsdp2 --check-exact --out cpu.json
"""
import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import shapes  # noqa: E402
from bench.test_train_step import TARGETS, llama_config  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROBE_ROWS = 4
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations peft triggers
WRAPS = ("none", "ddp", "fsdp2", "fsdp2-replicate")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", choices=sorted(shapes.MODELS) + ["tiny"])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--global-batch", type=int, default=8,
                    help="sequences per step over all ranks, split equally among them (default 8)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward on a rank; gradients accumulate (default: the rank's whole slice)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s (default 5)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--wrap", default="ddp,fsdp2",
                    help=f"comma-separated among {', '.join(WRAPS)} (default ddp,fsdp2)")
    ap.add_argument("--provider", default="ours,peft-bnb",
                    help="comma-separated among ours (converted), peft-bnb (default: both)")
    ap.add_argument("--quant-storage", default="uint8", choices=["uint8", "bfloat16"])
    ap.add_argument("--check-exact", action="store_true",
                    help="check that NF4 bytes, scales, dequantized weights and layer outputs survive wrapping")
    ap.add_argument("--baseline", default=None, help="a one-process result JSON to compare losses and tokens/s with")
    ap.add_argument("--out", default=None, help="result JSON (written by rank 0)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a collective may wait (default 600)")
    args = ap.parse_args(argv)
    args.wrap = args.wrap.split(",")
    args.provider = args.provider.split(",")
    if not set(args.wrap) <= set(WRAPS):
        ap.error(f"--wrap: unknown {sorted(set(args.wrap) - set(WRAPS))}")
    if not set(args.provider) <= {"ours", "peft-bnb"}:
        ap.error(f"--provider: unknown {sorted(set(args.provider) - {'ours', 'peft-bnb'})}")
    if not 0 <= args.warmup < args.steps:
        ap.error("--warmup: must be in [0, --steps)")
    return args


# ------------------------------------------------------------------------------------------------ processes
class Context:
    """This process's place: ``rank``, ``world``, ``device``, ``backend`` (``None``: no process group)."""

    def __init__(self, args):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
        if kind == "cuda":
            torch.cuda.set_device(self.device)
        self.backend = None
        if "RANK" in os.environ:  # started by torchrun
            self.backend = "nccl" if kind == "cuda" else "gloo"
            dist.init_process_group(self.backend, timeout=timedelta(seconds=args.timeout))
        elif args.wrap != ["none"]:
            raise SystemExit("--wrap ddp / fsdp2: start the script with torchrun (--nproc-per-node 1 for one process)")
        if self.world > 1 and "none" in args.wrap:
            raise SystemExit("--wrap none: one process only (each rank would train on its own)")
        if args.global_batch % self.world:
            raise SystemExit(f"--global-batch {args.global_batch}: not divisible by the world size {self.world}")
        self.local_batch = args.global_batch // self.world
        self.micro = args.micro_batch or self.local_batch
        if self.local_batch % self.micro:
            raise SystemExit(f"--micro-batch {self.micro}: does not divide the rank's {self.local_batch} sequences")

    def gather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]``."""
        if self.backend is None:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, t):
        if self.backend is not None:
            dist.all_reduce(t)
        return t

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------------------------- model
def quantize(model, device, dtype, quant_storage):
    """Replaces each ``nn.Linear`` of the decoder layers by an NF4 ``bnb.nn.Linear4bit`` (double quantization,
    compute dtype ``dtype``, packed bytes in ``quant_storage``) holding its weight, as ``from_pretrained`` with a
    ``BitsAndBytesConfig`` does; ``module=`` makes bitsandbytes keep the ``quant_state`` on the layer too."""
    import bitsandbytes as bnb

    for parent in list(model.model.layers.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", compress_statistics=True,
                                  quant_storage=quant_storage, device="meta")
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=quant_storage, module=q)
            if linear.bias is not None:
                q.bias = linear.bias
            setattr(parent, name, q.to(device))  # moving a Params4bit quantizes it
    model.is_loaded_in_4bit = True  # as from_pretrained sets it; peft picks its Linear4bit LoRA layer by it


def build(args, provider, ctx):
    """``(peft model, layers converted, warning text of convert)``: the same bits on every rank and world size."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(ctx.device):
        net = LlamaForCausalLM(llama_config(args.model, args.layers)).to(DTYPES[args.dtype])
    quantize(net, ctx.device, DTYPES[args.dtype], getattr(torch, args.quant_storage))
    model = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    converted, warned = 0, ""
    if provider == "ours":
        from lowrank_kernels.peft import convert

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = convert(model)
        warned = "\n".join(str(w.message) for w in caught if "lowrank_kernels" in str(w.message))
    return model, converted, warned


def lora_4bit_layers(model):
    """``[(name, peft LoRA layer, its bitsandbytes Linear4bit)]`` in module order."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    return [(name, m, m.get_base_layer()) for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]


def wrap(model, how, ctx):
    """``model`` wrapped for data parallelism (``none``: itself)."""
    if how == "none":
        return model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    import bitsandbytes as bnb
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    replicate = how == "fsdp2-replicate"
    ignored = {p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)} if replicate else None
    for layer in model.get_base_model().model.layers:  # one all-gather / reduce-scatter group per decoder layer
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    return fully_shard(model, mesh=mesh, ignored_params=ignored)


# ------------------------------------------------------------------------------------------------ exactness
def _copy(t):
    """A CPU copy of the bytes of ``t`` as a flat uint8 tensor (any dtype; a parameter subclass as a plain tensor).
    Always a copy: FSDP2 frees the storage of all-gathered parameters when it reshards."""
    return t.detach().as_subclass(torch.Tensor).reshape(-1).view(torch.uint8).to("cpu", copy=True)


def _quant_state(base):
    """bitsandbytes' ``QuantState`` of ``base``: its weight's, or the one the layer keeps (sharded weights)."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else base.quant_state


def _scales(state):
    """The tensors of a ``QuantState`` that the packed bytes need: absmax (uint8 when nested), code table, and the
    nested absmax, code table and offset."""
    out = {"absmax": state.absmax, "code": state.code}
    if state.state2 is not None:
        out.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=state.offset)
    return out


def nf4_bytes(model):
    """``(packed NF4 bytes of the model, those this rank holds)``: FSDP2 shards hold a part of every weight."""
    total = local = 0
    for _, _, base in lora_4bit_layers(model):
        w = base.weight
        total += w.numel() * w.element_size()
        local += _local(w).numel() * w.element_size()
    return total, local


def _dequantize(packed, state, provider):
    """The dense ``[out, in]`` weight: ours as our kernels read it (``NF4Weight``), peft-bnb as bitsandbytes."""
    packed = packed.detach().as_subclass(torch.Tensor)
    if provider == "ours":
        from lowrank_kernels import NF4Weight

        return NF4Weight.from_bnb(packed, state).dequantize(state.dtype)
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(packed, state)


def nf4_record(layers, provider, probe=True):
    """Per NF4 layer of ``layers`` (``[(index, name, LoRA layer, Linear4bit)]``), CPU copies: packed bytes, scales,
    dequantized weight and, with ``probe``, the LoRA layer's output on the fixed input ``[PROBE_ROWS, in_features]``
    (seeded by the layer's index), all as bytes."""
    out = {}
    with torch.no_grad():
        for i, name, layer, base in layers:
            packed, state = base.weight, _quant_state(base)
            entry = {"packed": _copy(packed), **{k: _copy(v) for k, v in _scales(state).items()},
                     "dequantized": _copy(_dequantize(packed, state, provider))}
            if probe:
                g = torch.Generator().manual_seed(1000 + i)
                x = torch.randn(PROBE_ROWS, base.in_features, generator=g).to(base.compute_dtype).to(packed.device)
                entry["output"] = _copy(layer(x))
            out[name] = entry
    return out


def nf4_layers(model):
    """``[(index, name, peft LoRA layer, its bitsandbytes Linear4bit)]`` in module order."""
    return [(i, *entry) for i, entry in enumerate(lora_4bit_layers(model))]


def nf4_gathered(model, how, provider, probe=True):
    """``nf4_record`` of every NF4 layer as the wrapped model sees it: FSDP2 all-gathers each decoder layer's
    parameters (``unshard()``, FSDP's own all-gather) before its layers are read, and frees them after."""
    layers = nf4_layers(model)
    if not how.startswith("fsdp2"):
        return nf4_record(layers, provider, probe)
    out = {}
    for block in model.get_base_model().model.layers:
        inside = {id(m) for m in block.modules()}
        block.unshard()
        try:
            out.update(nf4_record([entry for entry in layers if id(entry[2]) in inside], provider, probe))
        finally:
            block.reshard()
    return out


def compare(before, after):
    """``{"layers", "fields", "equal", "mismatches"}``: ``after`` against ``before`` field by field, bytes equal."""
    mismatches = []
    fields = 0
    if before.keys() != after.keys():
        mismatches.append(f"layers differ: {sorted(set(before) ^ set(after))}")
    for name in before.keys() & after.keys():
        for field, want in before[name].items():
            got = after[name].get(field)
            fields += 1
            if got is None or got.shape != want.shape or not torch.equal(got, want):
                mismatches.append(f"{name}.{field}")
    return {"layers": len(before), "fields": fields, "equal": not mismatches, "mismatches": mismatches[:20]}


# ------------------------------------------------------------------------------------------------- training
@functools.cache
def _vocab(model):
    return llama_config(model, 1).vocab_size


def tokens(args, step, ctx):
    """This rank's slice ``[local batch, seq]`` (int64) of step ``step``'s global batch: the global batch depends
    on ``--seed`` and ``step`` only, rank r takes rows ``[r * local, (r + 1) * local)``."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + 1 + step)
    ids = torch.randint(0, _vocab(args.model), (args.global_batch, args.seq), generator=g)
    return ids[ctx.rank * ctx.local_batch:(ctx.rank + 1) * ctx.local_batch].to(ctx.device)


def _local(t):
    """A DTensor's local shard (FSDP2's gradients), any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def our_nodes(loss) -> int:
    """How many nodes of ``loss``'s autograd graph are our ``LoraLinearFunction`` (one per layer that ran our
    kernels; a converted layer that fell back to peft's forward adds none)."""
    from lowrank_kernels.autograd import LoraLinearFunction

    name, seen, todo, count = LoraLinearFunction.__name__ + "Backward", set(), [loss.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == name
        todo.extend(f for f, _ in fn.next_functions)
    return count


def train(args, model, wrapped, how, ctx):
    """``--steps`` AdamW steps: ``{"losses", "grad_norms", "step_s"}`` (per step: the global mean loss, the
    adapters' gradient norm, the step's seconds) and ``our_autograd_nodes`` (``our_nodes`` of the first forward).

    Gradient scaling: one process on the whole batch minimizes ``L = sum of the token losses / T`` (``T``: the
    global batch's predicted tokens, ``global_batch * (seq - 1)``). DDP and FSDP2 *average* the ranks' gradients
    (all-reduce / reduce-scatter, then divide by the world size N), so each rank backpropagates
    ``N * (its token losses' sum) / T``: the average over ranks is then exactly ``dL/dparams``, with any split of
    the tokens among ranks and micro-batches. (Backpropagating each rank's own mean loss would give the same only
    when every rank holds the same number of tokens; summing without the factor N would divide by N once too
    often, which Adam would mostly hide but the recorded gradient norm would not.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = args.global_batch * (args.seq - 1)
    micro_steps = ctx.local_batch // ctx.micro
    losses, norms, times, nodes = [], [], [], None
    for step in range(args.steps):
        ids = tokens(args, step, ctx)
        ctx.sync()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for m in range(micro_steps):
            last = m == micro_steps - 1
            if how.startswith("fsdp2"):
                wrapped.set_requires_gradient_sync(last)  # reduce-scatter once, after the last micro-batch
            with wrapped.no_sync() if how == "ddp" and not last else nullcontext():
                chunk = ids[m * ctx.micro:(m + 1) * ctx.micro]
                logits = wrapped(input_ids=chunk).logits
                token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                               reduction="sum")
                if nodes is None:
                    nodes = our_nodes(token_losses)
                (token_losses * (ctx.world / total)).backward()
            loss_sum += token_losses.detach().double()
        opt.step()
        ctx.sync()
        times.append(time.perf_counter() - start)
        # logging, outside the timed step: global mean loss and gradient norm (gradients still there until zero_grad)
        losses.append((ctx.all_sum(loss_sum) / total).item())
        sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for p in params:
            if p.grad is not None:
                sq += _local(p.grad).double().square().sum()
        if how.startswith("fsdp2"):  # each rank holds a disjoint shard of every gradient
            ctx.all_sum(sq)
        norms.append(sq.sqrt().item())
        opt.zero_grad(set_to_none=True)
        if ctx.rank == 0:
            print(f"  step {step:3d}  loss {losses[-1]:.6f}  grad norm {norms[-1]:.6g}  {times[-1] * 1e3:8.1f} ms",
                  flush=True)
    return {"losses": losses, "grad_norms": norms, "step_s": times, "our_autograd_nodes": nodes}


def run(args, provider, how, ctx):
    """One provider x wrapping: the result entry of the JSON (identical on every rank except ``local``)."""
    res = {"provider": provider, "wrap": how, "status": "ok", "error": None}
    model, res["converted_layers"], warned = build(args, provider, ctx)
    res["nf4_layers"] = len(lora_4bit_layers(model))
    if provider == "ours" and res["converted_layers"] < res["nf4_layers"]:
        return {**res, "status": "refused", "error": f"convert: {warned}"}
    before = nf4_record(nf4_layers(model), provider) if args.check_exact else None
    try:
        wrapped = wrap(model, how, ctx)
    except Exception as e:  # noqa: BLE001 - e.g. fully_shard refusing uint8 parameters: recorded, not fatal
        return {**res, "status": "refused", "error": f"{how}: {type(e).__name__}: {e}"}
    try:
        if args.check_exact:
            res["exact_wrapped"] = compare(before, nf4_gathered(model, how, provider))
        res["nf4_bytes_total"], local = nf4_bytes(model)
        res["nf4_bytes_per_rank"] = ctx.gather(local)
        ctx.sync()
        resident = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        res.update(train(args, model, wrapped, how, ctx))
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
        if args.check_exact:
            no_probe = {n: {k: v for k, v in e.items() if k != "output"} for n, e in before.items()}
            res["exact_trained"] = compare(no_probe, nf4_gathered(model, how, provider, probe=False))
    except Exception as e:  # noqa: BLE001 - recorded; the other runs go on
        import traceback

        traceback.print_exc()
        return {**res, "status": "error", "error": f"{type(e).__name__}: {e}"}
    timed = sum(res["step_s"][args.warmup:])
    slowest = max(ctx.gather(timed))
    res.update(timed_steps=args.steps - args.warmup,
               tokens_per_s=args.global_batch * args.seq * (args.steps - args.warmup) / slowest,
               resident_bytes=ctx.gather(resident), peak_bytes=ctx.gather(peak))
    return res


# --------------------------------------------------------------------------------------------------- report
def versions(ctx):
    import bitsandbytes
    import peft
    import transformers

    import lowrank_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "bitsandbytes": bitsandbytes.__version__, "lowrank_kernels": lowrank_kernels.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def against_baseline(runs, path):
    """Adds ``baseline``: per run, the largest relative loss difference and the tokens/s ratio to the run of the
    same provider in the one-process result ``path`` (its ``none`` run, else its first)."""
    with open(path) as f:
        base = json.load(f)
    for res in runs:
        same = [b for b in base["runs"] if b["provider"] == res["provider"] and b["status"] == "ok"]
        same.sort(key=lambda b: b["wrap"] != "none")
        if res["status"] != "ok" or not same:
            continue
        b = same[0]
        n = min(len(b["losses"]), len(res["losses"]))
        diff = max(abs(x - y) / abs(y) for x, y in zip(res["losses"][:n], b["losses"][:n]))
        res["baseline"] = {"file": os.path.basename(path), "wrap": b["wrap"], "world_size": base["world_size"],
                           "steps_compared": n, "loss_max_rel_diff": diff,
                           "tokens_per_s_ratio": res["tokens_per_s"] / b["tokens_per_s"]}


def main(argv=None):
    args = parse_args(argv)
    ctx = Context(args)
    runs = []
    for provider in args.provider:
        for how in args.wrap:
            if ctx.rank == 0:
                print(f"{provider} / {how}", flush=True)
            res = run(args, provider, how, ctx)
            if res["status"] != "ok" and ctx.rank == 0:
                print(f"  {res['status']}: {res['error']}", flush=True)
            statuses = ctx.gather(res["status"])
            if len(set(statuses)) > 1:  # a rank failed alone: the others' entries are kept, this one says so
                res["status"], res["error"] = "error", f"ranks disagree: {statuses}; rank {ctx.rank}: {res['error']}"
            runs.append(res)
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    failed = [r for r in runs if r["status"] == "error"
              or not all(r.get(k, {"equal": True})["equal"] for k in ("exact_wrapped", "exact_trained"))]
    if args.baseline:
        against_baseline(runs, args.baseline)
    gpus = ctx.gather(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" else None
    if ctx.rank == 0:
        result = {"script": "scripts/train_multi_gpu.py", "args": vars(args), "world_size": ctx.world,
                  "backend": ctx.backend, "device": ctx.device.type, "gpus": gpus,
                  "global_tokens_per_step": args.global_batch * args.seq, "versions": versions(ctx), "runs": runs}
        for res in runs:
            print(f"{res['provider']:9s} {res['wrap']:6s} {res['status']:8s} "
                  + (f"tokens/s {res['tokens_per_s']:.1f}  peak {res['peak_bytes']}" if res["status"] == "ok"
                     else str(res["error"])[:200]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if ctx.backend is not None:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
