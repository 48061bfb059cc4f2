"""``lowrank_kernels.peft.convert`` inside the training stack users run: ``transformers.Trainer`` with gradient
checkpointing on a tiny Llama (built from a ``LlamaConfig``, nothing downloaded), LoRA and QLoRA (bitsandbytes NF4,
on CPU too), bitsandbytes' paged AdamW (8-bit and 32-bit state), ``save_pretrained``.

Each case trains the converted model next to a deep copy of the very same peft model (same seed, same data) and
compares, step by step, the adapters' gradients (before the optimizer: Adam's first steps move every weight by about
``lr`` whatever the gradient, so final weights alone prove little) and the losses, then the final adapters and the
saved files. The converted layers must really have run our kernels (each loss's autograd graph holds one
``LoraLinearFunction`` node per LoRA layer) and peft's must not. With LoRA dropout the masks of peft and ours differ,
so there the converted model is compared with itself: gradient checkpointing must replay our dropout masks (the same
gradients with and without checkpointing under one RNG seed).

CPU: fp32, tolerances of fp32 rounding. CUDA-only cases (skipped without a GPU): bf16 activations, paged AdamW on the
GPU, bf16 tolerances.
"""
import copy
import dataclasses
import json
import math

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from lowrank_kernels import peft as lk_peft  # noqa: E402
from tests.conftest import HAS_CUDA, needs_bnb  # noqa: E402
from tests.test_lora_forward import rel_err  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers / peft deprecations
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# intermediate 112: not a multiple of 64 (ragged tiles; in NF4, blocks straddle rows)
TINY = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128)
# QLoRA on CPU: bitsandbytes 0.50's native CPU dequantize_4bit (the reference here) is wrong for weights whose
# in_features is a multiple of 16 but not of the block size 64 (down_proj [64, 112]: 20% error; checked against
# the unquantized weight, which lowrank_kernels reproduces); 120 is ragged too and dequantized right by both.
QLORA_TINY = dict(TINY, intermediate_size=120)
# GPU cases: the adapters of the q/o/gate/up/down projections have >= 4096 elements, so that bitsandbytes' 8-bit
# optimizers keep 8-bit state for them (smaller tensors get 32-bit state: ``min_8bit_size``); 696 as 120 above.
GPU_DIMS = dict(hidden_size=256, intermediate_size=696, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512)
N_LORA = 7 * 2  # LoRA layers of these models: 7 projections x 2 decoder layers
STEPS = 4


# ------------------------------------------------------------------------------------------------------ helpers
def tiny_llama(dims=TINY, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(use_cache=False, **dims))


def qlora_llama(path, device="cpu", dtype=torch.float32, dims=QLORA_TINY):
    """The tiny Llama saved to ``path`` and loaded back the way users load QLoRA models: ``from_pretrained`` with a
    ``BitsAndBytesConfig`` (NF4, double quantization, compute in ``dtype``), on ``device``. Skips if bitsandbytes
    cannot load a 4-bit model on ``device`` here."""
    from transformers import BitsAndBytesConfig

    tiny_llama(dims).save_pretrained(path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    try:
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype,
                                                 device_map="cpu" if device == "cpu" else {"": 0})
    except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:  # no bnb backend for this device
        pytest.skip(f"bitsandbytes cannot load a 4-bit model on {device} here: {type(e).__name__}: {e}")
    import bitsandbytes as bnb

    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.device.type == torch.device(device).type
    return model


def lora_pair(base, *, r=8, dropout=0.0, random_B=True):
    """(peft model, converted deep copy of it). ``random_B``: lora_B drawn small and non-zero (peft starts it at
    zero), so that every adapter has a gradient from the first step on."""
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS))
    if random_B:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    ours = copy.deepcopy(model)
    assert lk_peft.convert(ours) == N_LORA
    return model, ours


def adapters(model):
    """The trainable parameters (the LoRA adapters), detached copies, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def nf4_state(model):
    """The frozen 4-bit weights of ``model``: packed bytes and (nested) absmax of each ``Linear4bit``, copies."""
    import bitsandbytes as bnb

    state = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            nested = getattr(qs, "nested", False)
            state[name] = [m.weight.data.clone(), qs.absmax.clone()] + ([qs.state2.absmax.clone()] if nested else [])
    return state


def assert_same_nf4(a, b):
    assert a.keys() == b.keys() and len(a) == N_LORA
    for name in a:
        assert len(a[name]) == len(b[name]) == 3, name  # double quantization: packed, absmax, nested absmax
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a[name], b[name])), name


def our_nodes(t) -> int:
    """How many ``LoraLinearFunction`` nodes the autograd graph of ``t`` holds (cf. ``runs_our_function`` in
    tests/test_peft_convert.py)."""
    seen, todo, count = set(), [t.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__.startswith("LoraLinearFunction")
        todo.extend(f for f, _ in fn.next_functions)
    return count


class Tokens(torch.utils.data.Dataset):
    """``n`` random token sequences (a fixed generator: the same data for every model), labels = inputs."""

    def __init__(self, vocab, n=8, seq=16, seed=2):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordingTrainer(Trainer):
    """A ``Trainer`` that records, for each training step, the loss, how many of our autograd nodes produced it,
    and the adapters' gradients (after backward, before clipping and the optimizer step)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        self.record.append((loss.detach().float().item(), our_nodes(loss)))
        return out

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)  # forward and backward
        self.grads.append({n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})
        return loss


def _field(new, old):
    """transformers 5 renamed ``gradient_checkpointing*`` to ``activation_checkpointing*`` (the old names are
    deprecated aliases); use whichever this version has."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return new if new in names else old


def train(model, out_dir, *, ckpt=True, reentrant=False, steps=STEPS, lr=1e-2, optim="adamw_torch", cpu=True,
          batch=2, data=None, seed=0):
    """``steps`` Trainer steps on ``model``: returns ``(losses, our node counts, adapter gradients)``, one entry a
    step, and how often the MLP of decoder layer 0 ran. Seeded right before ``train()``, so that two calls with the
    same arguments draw the same RNG numbers (data order, dropout)."""
    kind = _field("activation_checkpointing", "gradient_checkpointing")
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr, optim=optim,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=cpu, dataloader_num_workers=0, seed=seed,
        disable_tqdm=True, **{kind: ckpt, kind + "_kwargs": {"use_reentrant": reentrant}})
    trainer = RecordingTrainer(model=model, args=args,
                               train_dataset=data or Tokens(model.config.vocab_size, n=batch * steps))
    trainer.record, trainer.grads = [], []
    # Counts the calls of one decoder layer's MLP: 2 a step under checkpointing. A pre-hook: the non-reentrant
    # recomputation stops as soon as the last tensor saved for backward is back, before the MLP returns.
    calls = []
    handle = model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        torch.manual_seed(seed)
        trainer.train()
    finally:
        handle.remove()
    assert len(trainer.record) == len(trainer.grads) == steps
    losses, nodes = map(list, zip(*trainer.record))
    return losses, nodes, trainer.grads, len(calls)


def assert_close_losses(ours, theirs, rtol):
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert math.isfinite(a) and abs(a - b) <= rtol * abs(b), f"step {step}: ours {a} vs {b}"


def assert_close_grads(ours, theirs, tol0, tol=None):
    """Per step: the same adapters have gradients, each non-zero and within ``tol0`` at the first step (the very
    same weights), ``tol`` (default ``tol0``) at later ones (relative, per tensor). Later steps start from weights
    that differ by the rounding of the earlier ones, amplified by Adam (about ``lr`` a step whatever the size of
    the gradient)."""
    assert len(ours) == len(theirs) > 0
    for step, (g1, g0) in enumerate(zip(ours, theirs)):
        assert g1.keys() == g0.keys() and len(g0) == 2 * N_LORA, step
        for name in g0:
            assert g0[name].norm() > 0, f"step {step} {name}: zero gradient"
            err = rel_err(g1[name], g0[name].double())
            assert err <= (tol0 if step == 0 or tol is None else tol), f"step {step} {name}: relative error {err:.2e}"


def assert_close_adapters(ours, theirs, tol, start):
    """Same adapter names; each finite, changed since ``start``, and within ``tol`` (relative, per tensor) of
    ``theirs``."""
    assert ours.keys() == theirs.keys() == start.keys() and len(ours) == 2 * N_LORA
    for name in ours:
        assert torch.isfinite(ours[name]).all(), name
        assert not torch.equal(ours[name], start[name]), f"{name} did not change"
        err = rel_err(ours[name], theirs[name].double())
        assert err <= tol, f"{name}: relative error {err:.2e}"


def assert_same_saved_adapters(model, ours, path, tol):
    """``save_pretrained`` of both: the same files, keys, shapes and dtypes; values within ``tol``."""
    safetensors = pytest.importorskip("safetensors.torch")
    model.save_pretrained(path / "peft")
    ours.save_pretrained(path / "ours")
    assert sorted(p.name for p in (path / "peft").iterdir()) == sorted(p.name for p in (path / "ours").iterdir())
    a = safetensors.load_file(path / "peft" / "adapter_model.safetensors")
    b = safetensors.load_file(path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * N_LORA
    assert all("lora_A" in k or "lora_B" in k for k in a)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert rel_err(b[k], a[k].double()) <= tol, k
    configs = [json.loads((path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    for c in configs:  # peft writes this set in hash order
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]


# --------------------------------------------------------------------------------------------- a. LoRA, Trainer
def test_trainer_lora_grad_ckpt_matches_peft(tmp_path):
    model, ours = lora_pair(tiny_llama())
    start = adapters(model)
    assert type(ours.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "PeftLoraLinear"
    losses0, nodes0, grads0, calls0 = train(model, tmp_path / "peft")
    losses1, nodes1, grads1, calls1 = train(ours, tmp_path / "ours")
    assert nodes1 == [N_LORA] * STEPS  # every step of the converted model ran our kernels in every LoRA layer
    assert nodes0 == [0] * STEPS
    assert calls0 == calls1 == 2 * STEPS  # checkpointing on: each decoder layer recomputed in backward
    assert_close_grads(grads1, grads0, 1e-5, 1e-4)
    assert_close_losses(losses1, losses0, 1e-5)
    assert_close_adapters(adapters(ours), adapters(model), 1e-4, start)
    assert_same_saved_adapters(model, ours, tmp_path / "saved", 1e-4)


def _enable_ckpt(model, reentrant):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})


def _loss_and_grads(model, ids, seed):
    """Loss, adapter gradients and our node count of one forward + backward in train mode, the RNG seeded."""
    model.train()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    nodes = our_nodes(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, nodes


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_grad_ckpt_replays_our_dropout_masks(reentrant):
    _, plain = lora_pair(tiny_llama(), dropout=0.1)
    ckpt = copy.deepcopy(plain)
    _enable_ckpt(ckpt, reentrant)
    calls = []
    handle = ckpt.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    loss0, g0, nodes0 = _loss_and_grads(plain, ids, seed=123)
    loss1, g1, _ = _loss_and_grads(ckpt, ids, seed=123)
    handle.remove()
    _, g2, _ = _loss_and_grads(plain, ids, seed=124)  # other masks
    assert nodes0 == N_LORA and calls == [1, 1]  # ours ran; the checkpointed layer ran again in backward
    assert g0.keys() == g1.keys() == g2.keys() and len(g0) == 2 * N_LORA
    assert abs(loss1 - loss0) <= 1e-6 * abs(loss0)
    for name in g0:
        assert rel_err(g1[name], g0[name].double()) <= 1e-5, name  # the recomputation saw the same masks
    # the masks matter: another seed gives other gradients (else the equality above would prove nothing)
    assert min(rel_err(g2[name], g0[name].double()) for name in g0) > 1e-3


def test_trainer_grad_ckpt_with_dropout_same_as_without(tmp_path):
    _, ours = lora_pair(tiny_llama(), dropout=0.1)
    other = copy.deepcopy(ours)
    start = adapters(ours)
    losses0, nodes0, grads0, calls0 = train(ours, tmp_path / "plain", ckpt=False)
    losses1, nodes1, grads1, calls1 = train(other, tmp_path / "ckpt", ckpt=True)
    assert nodes0 == nodes1 == [N_LORA] * STEPS
    assert (calls0, calls1) == (STEPS, 2 * STEPS)
    assert_close_grads(grads1, grads0, 1e-6)  # the same computation (bit for bit here)
    assert_close_losses(losses1, losses0, 1e-6)
    assert_close_adapters(adapters(other), adapters(ours), 1e-6, start)


# -------------------------------------------------------------------------------------------- b. QLoRA, Trainer
@needs_bnb
def test_trainer_qlora_grad_ckpt_matches_peft(tmp_path):
    from peft import prepare_model_for_kbit_training

    base = qlora_llama(tmp_path / "base")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
    model, ours = lora_pair(base)
    assert type(ours.get_base_model().model.layers[0].mlp.down_proj).__name__ == "PeftLoraLinear4bit"
    start, frozen = adapters(model), nf4_state(model)
    assert_same_nf4(nf4_state(ours), frozen)
    losses0, nodes0, grads0, calls0 = train(model, tmp_path / "peft")
    losses1, nodes1, grads1, calls1 = train(ours, tmp_path / "ours")
    assert nodes1 == [N_LORA] * STEPS and nodes0 == [0] * STEPS
    assert calls0 == calls1 == 2 * STEPS
    assert_close_grads(grads1, grads0, 1e-5, 1e-4)
    assert_close_losses(losses1, losses0, 1e-5)
    assert_close_adapters(adapters(ours), adapters(model), 1e-4, start)
    assert_same_nf4(nf4_state(ours), frozen)  # the 4-bit weights never change
    assert_same_nf4(nf4_state(model), frozen)
    assert_same_saved_adapters(model, ours, tmp_path / "saved", 1e-4)


# On CPUs with AVX512-BF16, bitsandbytes' Linear4bit.forward repacks its weight in place for its CPU inference kernel
# the first time it runs in eval mode on an input that needs no gradient (``weight.data`` and ``quant_state``
# replaced; ``quant_state.packing_format_for_cpu = True``). Our view of the weight must survive that.
def _cpu_inference(model, ids):
    """Eval-mode forward without gradients; skips unless bitsandbytes repacked its weights for the CPU."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    base = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack its 4-bit weights for the CPU here (no AVX512-BF16)")
    return logits


def _repack_model(path):
    # out_features % 32 == 0: bitsandbytes' CPU repacking asserts it (intermediate 120 would fail in bitsandbytes)
    base = qlora_llama(path, dims=dict(QLORA_TINY, intermediate_size=128))
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model, torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(5))


@needs_bnb
def test_convert_after_bnb_cpu_inference(tmp_path):
    """``convert`` of a QLoRA model that already ran inference on the CPU: converts it (or leaves the repacked
    layers to peft with a warning); either way the outputs stay those of peft."""
    model, ids = _repack_model(tmp_path)
    ref = _cpu_inference(model, ids)
    lk_peft.convert(model)  # may leave layers to peft (with a warning), must not raise
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert rel_err(out, ref.double()) <= 1e-2  # bitsandbytes' CPU inference kernel rounds to bf16 on the way


@needs_bnb
def test_converted_layer_after_peft_fallback_on_cpu(tmp_path):
    """A converted model whose layers ran peft's forward (``disable_adapter()``) in eval mode on the CPU, then ours
    again: bitsandbytes repacked the shared weight in between."""
    model, ids = _repack_model(tmp_path)
    assert lk_peft.convert(model) == N_LORA
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # ours
        with model.disable_adapter():
            _cpu_inference(model, ids)  # peft's forward: bitsandbytes repacks
        out = model(input_ids=ids).logits  # peft's forward while the weight stays repacked (no crash)
    assert rel_err(out, ref.double()) <= 1e-2  # bitsandbytes' CPU inference kernel rounds to bf16 on the way


# ------------------------------------------------------------------------ c. bitsandbytes paged AdamW (QLoRA)
PAGED = ["PagedAdamW8bit", "PagedAdamW32bit"]


def paged_adamw_curves(path, device, dtype, optimizer, *, dims, r, steps, lr=5e-3, **opt_kwargs):
    """QLoRA model (``dims``, NF4, compute and activations in ``dtype``) on ``device``, peft's and converted, each
    trained ``steps`` steps on one fixed batch with ``bitsandbytes.optim.<optimizer>(**opt_kwargs)``. Returns
    ``(runs, start adapters, start NF4 state)``; ``runs``: per model (peft's first) a dict of the model, its
    optimizer, the losses and the adapters' gradients of each step."""
    import bitsandbytes as bnb

    model, ours = lora_pair(qlora_llama(path, device, dtype, dims), r=r)
    start, frozen = adapters(model), nf4_state(model)
    ids = torch.randint(0, dims["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(4)).to(device)
    runs = []
    for m in (model, ours):
        m.train()
        opt = getattr(bnb.optim, optimizer)([p for p in m.parameters() if p.requires_grad], lr=lr, **opt_kwargs)
        run = dict(model=m, opt=opt, losses=[], grads=[], nodes=[])
        for _ in range(steps):
            loss = m(input_ids=ids, labels=ids).loss
            run["nodes"].append(our_nodes(loss))
            loss.backward()
            run["grads"].append({n: p.grad.detach().float().clone() for n, p in m.named_parameters()
                                 if p.requires_grad and p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
            run["losses"].append(loss.item())
        runs.append(run)
    return runs, start, frozen


def check_paged_adamw(path, device, dtype, optimizer, *, loss_tol, grad_tol, adapter_tol, steps=5, **kwargs):
    (theirs, ours), start, frozen = paged_adamw_curves(path, device, dtype, optimizer, steps=steps, **kwargs)
    assert ours["nodes"] == [N_LORA] * steps and theirs["nodes"] == [0] * steps
    losses0, losses1 = theirs["losses"], ours["losses"]
    assert all(math.isfinite(v) for v in losses0 + losses1), (losses0, losses1)
    # the loss curves: close, and moved by the training much more than the tolerance (so the comparison means
    # something): one fixed batch, memorized
    assert losses0[-1] < losses0[0] - 10 * loss_tol, losses0
    for step, (a, b) in enumerate(zip(losses1, losses0)):
        assert abs(a - b) <= loss_tol, f"step {step}: ours {a} vs peft {b}"
    assert_close_grads(ours["grads"][:1], theirs["grads"][:1], grad_tol)  # step 0: the very same weights
    assert_close_adapters(adapters(ours["model"]), adapters(theirs["model"]), adapter_tol, start)
    assert_same_nf4(nf4_state(theirs["model"]), frozen)  # bit for bit: no optimizer touched the frozen weights
    assert_same_nf4(nf4_state(ours["model"]), frozen)
    if "8bit" in optimizer:  # 8-bit state really used (for the adapters of >= min_8bit_size elements)
        for run in (theirs, ours):
            states = [s for s in run["opt"].state.values() if torch.is_tensor(s.get("state1"))]
            assert len(states) == 2 * N_LORA
            assert any(s["state1"].dtype == torch.uint8 for s in states)


@needs_bnb
@pytest.mark.parametrize("optimizer", PAGED)
def test_paged_adamw_qlora_cpu_fp32(tmp_path, optimizer):
    """bitsandbytes' CPU backend runs the paged optimizers too (nothing to page without a GPU): fp32 tolerances.
    The tiny model, with ``min_8bit_size=0`` (8-bit state for every adapter, however small)."""
    check_paged_adamw(tmp_path, "cpu", torch.float32, optimizer, loss_tol=1e-4, grad_tol=1e-5, adapter_tol=2e-3,
                      dims=QLORA_TINY, r=8, min_8bit_size=0)


@needs_cuda
@needs_bnb
@pytest.mark.parametrize("optimizer", PAGED)
def test_paged_adamw_qlora_cuda_bf16(tmp_path, optimizer):
    # Tolerances (ours rounds the LoRA branch to bf16, peft computes it in fp32): on an H100 (torch 2.11,
    # bitsandbytes 0.50.2) the loss curves differed by up to 9.5e-3 (the curve falls by 1.15 in 5 steps), the first
    # gradients by 1.6e-2, the final adapters by 4.2e-2 (relative); a wrong kernel gives errors of order 1.
    check_paged_adamw(tmp_path, "cuda", torch.bfloat16, optimizer, loss_tol=3e-2, grad_tol=6e-2,
                      adapter_tol=1.5e-1, dims=GPU_DIMS, r=16)


@needs_cuda
@needs_bnb
def test_trainer_paged_adamw_8bit_qlora_cuda_bf16(tmp_path):
    """Trainer with ``optim="paged_adamw_8bit"`` and gradient checkpointing, bf16 NF4 model on the GPU (no
    ``prepare_model_for_kbit_training``: it would cast the bf16 embeddings and norms, hence the activations, to
    fp32)."""
    model, ours = lora_pair(qlora_llama(tmp_path / "base", "cuda", torch.bfloat16, GPU_DIMS), r=16)
    start, frozen = adapters(model), nf4_state(model)
    data = Tokens(GPU_DIMS["vocab_size"], n=2 * STEPS, seq=64)
    kwargs = dict(optim="paged_adamw_8bit", cpu=False, lr=5e-3, data=data)
    losses0, nodes0, grads0, calls0 = train(model, tmp_path / "peft", **kwargs)
    losses1, nodes1, grads1, calls1 = train(ours, tmp_path / "ours", **kwargs)
    assert nodes1 == [N_LORA] * STEPS and nodes0 == [0] * STEPS
    assert calls0 == calls1 == 2 * STEPS
    assert all(math.isfinite(v) for v in losses0 + losses1), (losses0, losses1)
    for step, (a, b) in enumerate(zip(losses1, losses0)):  # H100: up to 2.6e-4
        assert abs(a - b) <= 3e-2, f"step {step}: ours {a} vs peft {b}"
    assert_close_grads(grads1[:1], grads0[:1], 6e-2)  # H100: 1.6e-2; see test_paged_adamw_qlora_cuda_bf16
    assert_close_adapters(adapters(ours), adapters(model), 1.5e-1, start)  # H100: 3.5e-2
    assert_same_nf4(nf4_state(model), frozen)
    assert_same_nf4(nf4_state(ours), frozen)
