"""RankAllocator / orthogonal_regularization against peft's AdaLoRA, step by step on the same gradients."""
import copy
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, get_peft_model  # noqa: E402

from lowrank_kernels.rank_allocator import RankAllocator, orthogonal_regularization  # noqa: E402

INIT_R, TARGET_R = 6, 3
SHAPES = {"q": (24, 24), "k": (24, 24), "up": (24, 40), "down": (40, 24)}  # name: (in, out)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (k, n) in SHAPES.items():
            setattr(self, name, nn.Linear(k, n))


class Tiny(nn.Module):
    """Two blocks of ragged linears: 8 adapted layers in 3 shape groups (4 × 24→24, 2 × 24→40, 2 × 40→24)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):  # peft adds its orthogonal regularizer to ``outputs.loss``
        return types.SimpleNamespace(loss=torch.zeros((), dtype=self.blocks[0].q.weight.dtype))


def make_peft(tinit, tfinal, deltaT, total_step, **kw):
    cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                        total_step=total_step, target_modules=list(SHAPES), **kw)
    return get_peft_model(Tiny(), cfg)


def adapter_params(peft_model):
    return {n: p for n, p in peft_model.base_model.model.named_parameters() if ".lora_" in n}


class OurLayer(nn.Module):
    """Stands in for our AdaLoraLinear: plain Parameters and a ``set_rank_mask`` hook."""

    def __init__(self, A, E, B):
        super().__init__()
        self.lora_A, self.lora_E, self.lora_B = (nn.Parameter(t.detach().clone()) for t in (A, E, B))
        self.calls = []

    def set_rank_mask(self, mask):
        assert mask.dtype == torch.bool and mask.shape == (self.lora_E.shape[0],)
        self.calls.append(mask.tolist())


def our_copy(peft_model, dtype=None):
    """Our-layer model with the values of ``peft_model``'s adapters, keyed ``blocks.i.name``."""
    tree = nn.Module()
    tree.blocks = nn.ModuleList()
    for blk in peft_model.base_model.model.blocks:
        b = nn.Module()
        for name in SHAPES:
            m = getattr(blk, name)
            layer = OurLayer(m.lora_A["default"], m.lora_E["default"], m.lora_B["default"])
            if dtype is not None:
                layer.to(dtype)
            setattr(b, name, layer)
        tree.blocks.append(b)
    return tree


def emulate_step(param_sets, step_scale):
    """One 'optimizer step' (noise on A, E, B, which also revives masked E) and fresh gradients, identical in all
    sets; gradient scales differ per layer so that the allocation is uneven."""
    names = list(param_sets[0])
    for n in names:
        p0 = param_sets[0][n]
        layer = n.split(".lora_")[0]
        scale = step_scale.setdefault(layer, float(torch.empty(()).uniform_(0.1, 10.0)))
        noise = 0.01 * torch.randn(p0.shape, dtype=torch.float32)
        grad = scale * torch.randn(p0.shape, dtype=torch.float32)
        for params in param_sets:
            p = params[n]
            with torch.no_grad():
                p.add_(noise.to(p.dtype))
            p.grad = grad.to(p.dtype)


def E_of(params):
    return {n: p.detach() for n, p in params.items() if ".lora_E" in n}


# (tinit, tfinal, deltaT, total_step): cubic phase with sparse masking; deltaT = 1 with tfinal = 0; tinit = 0
SCHEDULES = [(8, 12, 3, 60), (5, 0, 1, 30), (0, 10, 4, 40)]


@pytest.mark.parametrize("tinit,tfinal,deltaT,total_step", SCHEDULES)
def test_matches_peft_every_step(tinit, tfinal, deltaT, total_step):
    ref = make_peft(tinit, tfinal, deltaT, total_step)
    mine = copy.deepcopy(ref)
    ours = RankAllocator(mine, INIT_R, TARGET_R, tinit, tfinal, deltaT, total_step=total_step)
    pa, pb = adapter_params(ref), adapter_params(mine)
    alloc = ref.base_model.rankallocator
    cfg_ref, cfg_mine = ref.peft_config["default"], mine.peft_config["default"]
    assert ours.init_bgt == alloc.init_bgt and ours.target_bgt == alloc.target_bgt
    scales, n_alloc, pruned_unevenly = {}, 0, False
    for step in range(total_step + 4):
        emulate_step([pa, pb], scales)
        ref_budget, ref_mask_ind = alloc.budget_schedule(step)
        ref.base_model.update_and_allocate(step)
        budget, pattern = ours.update_and_allocate(step)

        assert budget == ref_budget, step
        for n, e in E_of(pa).items():  # masked_fill_ on the same values: equal bit for bit, zeros included
            assert torch.equal(e, E_of(pb)[n]), (step, n)
        allocates = step == total_step - tfinal or (step < total_step - tfinal and ref_mask_ind)
        if allocates:
            n_alloc += 1
            assert pattern == cfg_ref.rank_pattern, step
            counts = {sum(v) for v in pattern.values()}
            pruned_unevenly |= len(counts) > 1
        else:
            assert pattern is None, step
        assert ours.rank_pattern == cfg_ref.rank_pattern == cfg_mine.rank_pattern, step
        stats = ours.named_statistics()
        assert set(stats) == set(pa)
        for n, (ipt, unc) in stats.items():
            if n in alloc.exp_avg_ipt:  # the same ops in the same order: bitwise
                assert torch.equal(ipt, alloc.exp_avg_ipt[n]), (step, n)
                assert torch.equal(unc, alloc.exp_avg_unc[n]), (step, n)
            else:  # peft reset its dicts at total_step - tfinal
                assert step >= total_step - tfinal and not ipt.any() and not unc.any()
    assert n_alloc >= 3 and pruned_unevenly
    final = cfg_ref.rank_pattern
    assert sum(map(sum, final.values())) <= ours.target_bgt
    assert set(final) == {f"blocks.{i}.{n}.lora_E.default" for i in range(2) for n in SHAPES}


def test_our_layers_and_hook():
    """The nn.Parameter path (our layers) equals peft; ``set_rank_mask`` fires exactly when a layer's mask changes."""
    tinit, tfinal, deltaT, total_step = 4, 6, 2, 30
    ref = make_peft(tinit, tfinal, deltaT, total_step)
    tree = our_copy(ref)
    ours = RankAllocator(tree, INIT_R, TARGET_R, tinit, tfinal, deltaT, total_step=total_step)
    pa = adapter_params(ref)
    pb = {n.replace(".default", ""): p for n, p in tree.named_parameters()}
    pb = {n + ".default": pb[n] for n in (k.replace(".default", "") for k in pa)}  # same keys, same order
    layers = {f"blocks.{i}.{n}": getattr(tree.blocks[i], n) for i in range(2) for n in SHAPES}
    expected_calls = {k: [] for k in layers}
    prev = {k: [True] * INIT_R for k in layers}
    scales = {}
    for step in range(total_step + 3):
        emulate_step([pa, pb], scales)
        ref.base_model.update_and_allocate(step)
        _, pattern = ours.update_and_allocate(step)
        for n, e in E_of(pa).items():
            assert torch.equal(e, E_of(pb)[n]), (step, n)
        if pattern is not None:
            assert pattern == {k.replace(".default", ""): v for k, v in ref.peft_config["default"].rank_pattern.items()}
            for k in layers:
                if pattern[f"{k}.lora_E"] != prev[k]:
                    expected_calls[k].append(pattern[f"{k}.lora_E"])
                    prev[k] = pattern[f"{k}.lora_E"]
    assert any(expected_calls.values())
    assert {k: l.calls for k, l in layers.items()} == expected_calls


def test_bf16_parameters_use_fp32_statistics():
    """bf16 adapters: statistics and masks equal an fp32 run on the upcast values (products of bf16 are exact)."""
    ref = make_peft(2, 3, 1, 16)
    t16, t32 = our_copy(ref, torch.bfloat16), our_copy(ref, torch.bfloat16).float()
    a16 = RankAllocator(t16, INIT_R, TARGET_R, 2, 3, 1, total_step=16)
    a32 = RankAllocator(t32, INIT_R, TARGET_R, 2, 3, 1, total_step=16)
    p16, p32 = dict(t16.named_parameters()), dict(t32.named_parameters())
    scales = {}
    for step in range(18):
        emulate_step([p16, p32], scales)
        with torch.no_grad():  # keep the fp32 copy on bf16 values and gradients
            for n in p32:
                p32[n].copy_(p16[n].float())
                p32[n].grad = p16[n].grad.float()
        assert a16.update_and_allocate(step) == a32.update_and_allocate(step)
        assert a16.exp_avg_ipt.dtype == torch.float32
        assert torch.equal(a16.exp_avg_ipt, a32.exp_avg_ipt) and torch.equal(a16.exp_avg_unc, a32.exp_avg_unc)
        for n in p16:
            if "lora_E" in n:
                assert p16[n].dtype == torch.bfloat16
                assert torch.equal(p16[n].float(), p32[n]), (step, n)


def test_budget_schedule_matches_peft():
    for tinit, tfinal, deltaT, total_step in SCHEDULES + [(0, 0, 1, 7), (3, 50, 5, 200), (100, 1, 7, 1000)]:
        ref = make_peft(tinit, tfinal, deltaT, total_step)
        ours = RankAllocator(ref, INIT_R, TARGET_R, tinit, tfinal, deltaT, total_step=total_step)
        for step in range(-1, total_step + 3):
            assert ours.budget_schedule(step) == ref.base_model.rankallocator.budget_schedule(step), step


def test_equal_ranks_prune_nothing():
    """init_r == target_r: nothing is pruned (peft's kthvalue(k=0) raises instead)."""
    ref = make_peft(1, 1, 1, 6)
    tree = our_copy(ref)
    ours = RankAllocator(tree, INIT_R, INIT_R, 1, 1, 1, total_step=6)
    params = dict(tree.named_parameters())
    for step in range(8):
        emulate_step([params], {})
        assert ours.update_and_allocate(step)[0] == ours.init_bgt
    assert all(all(v) for v in ours.rank_pattern.values())
    assert not any(l.calls for l in tree.modules() if isinstance(l, OurLayer))


def test_state_dict_round_trip():
    ref = make_peft(1, 2, 1, 10)
    tree = our_copy(ref)
    ours = RankAllocator(tree, INIT_R, TARGET_R, 1, 2, 1, total_step=10)
    params = dict(tree.named_parameters())
    for step in range(5):
        emulate_step([params], {})
        ours.update_and_allocate(step)
    state = ours.state_dict()
    tree2 = copy.deepcopy(tree)
    for l in tree2.modules():
        if isinstance(l, OurLayer):
            l.calls.clear()
    other = RankAllocator(tree2, INIT_R, TARGET_R, 1, 2, 1, total_step=10)
    other.load_state_dict(state)
    assert other.rank_pattern == ours.rank_pattern
    assert torch.equal(other.exp_avg_unc, ours.exp_avg_unc)
    assert any(l.calls for l in tree2.modules() if isinstance(l, OurLayer))


# ---------------------------------------------------------------------- orthogonal regularization
def test_orthogonal_regularization_matches_peft_fp64():
    ref = make_peft(1, 1, 1, 10, orth_reg_weight=1.0).double()
    with torch.no_grad():
        for n, p in adapter_params(ref).items():
            p.normal_(0, 0.3)
    peft_value = ref.base_model(torch.zeros(1)).loss  # peft's forward: 0 + 1.0 * its regularizer
    ours = orthogonal_regularization(ref)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, peft_value, rtol=1e-12, atol=0)
    # the same through the inner model, an allocator, and a straightforward loop
    torch.testing.assert_close(orthogonal_regularization(ref.base_model.model), peft_value, rtol=1e-12, atol=0)
    alloc = RankAllocator(ref, INIT_R, TARGET_R, 1, 1, 1, total_step=10)
    torch.testing.assert_close(alloc.orthogonal_regularization(), peft_value, rtol=1e-12, atol=0)
    terms = []
    for n, p in adapter_params(ref).items():
        if ".lora_A" in n:
            terms.append(torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0], dtype=p.dtype)))
        elif ".lora_B" in n:
            terms.append(torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1], dtype=p.dtype)))
    assert len(terms) == 16
    torch.testing.assert_close(ours, sum(terms) / len(terms), rtol=1e-12, atol=0)


def test_orthogonal_regularization_gradcheck():
    shapes = [(3, 5, 4), (3, 5, 4), (3, 2, 6)]  # (r, K, N)
    tensors = []
    for r, K, N in shapes:
        tensors += [torch.randn(r, K, dtype=torch.float64), torch.randn(r, 1, dtype=torch.float64),
                    torch.randn(N, r, dtype=torch.float64)]

    def fn(*ts):
        tree = nn.Module()
        tree.layers = nn.ModuleList()
        for i in range(len(shapes)):
            m = nn.Module()
            m.lora_A, m.lora_E, m.lora_B = ts[3 * i:3 * i + 3]  # plain tensors: not registered, still found
            tree.layers.append(m)
        return orthogonal_regularization(tree)

    inputs = tuple(t.requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(fn, inputs)


def test_orthogonal_regularization_bf16_in_fp32():
    ref = make_peft(1, 1, 1, 10)
    t16 = our_copy(ref, torch.bfloat16)
    t32 = our_copy(ref, torch.bfloat16).float()
    v16 = orthogonal_regularization(t16)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, orthogonal_regularization(t32))


# ---------------------------------------------------------------------- launches
def _is_alias(func) -> bool:
    return any(ret.alias_info is not None and not ret.alias_info.is_write for ret in func._schema.returns)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_alias(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _op_counts(n_blocks):
    tree = nn.Module()
    tree.blocks = nn.ModuleList()
    for _ in range(n_blocks):
        b = nn.Module()
        for name, (k, n) in SHAPES.items():
            layer = OurLayer(torch.randn(INIT_R, k), torch.randn(INIT_R, 1), torch.randn(n, INIT_R))
            del layer.calls
            layer.set_rank_mask = None  # no hook: count only the allocator's own ops
            setattr(b, name, layer)
        tree.blocks.append(b)
    ours = RankAllocator(tree, INIT_R, TARGET_R, 1, 2, 2, total_step=8)
    params = dict(tree.named_parameters())
    counts = {}
    for step, kind in [(0, "stats"), (2, "stats+mask"), (3, "stats"), (6, "final"), (7, "after")]:
        for p in params.values():
            p.grad = torch.randn_like(p)
        with _CountOps() as c:
            ours.update_and_allocate(step)
        counts[kind] = c.ops
    return counts


def test_op_count_does_not_grow_with_layers():
    """Non-aliasing aten ops per step (≈ kernel launches on CUDA) for 8 and 32 layers in 3 shape groups."""
    small, large = _op_counts(2), _op_counts(8)
    assert small == large
    # stats: 2 gathers + 10 elementwise; mask: scores 1 + 2 means per shape group + 2 adds + kthvalue + le +
    # not + E write-back 3 (gather, masked_fill_, _foreach_copy_); the host copy of the mask is free on CPU
    assert len(small["stats"]) == 12 and len(small["after"]) == 3
    assert len(small["stats+mask"]) == 12 + 1 + 2 * 3 + 2 + 3 + 3
    assert len(small["final"]) == len(small["stats+mask"]) - 12 + 2  # no stats update, reset: 2 zero_


# ---------------------------------------------------------------------- errors
@pytest.fixture
def peft_model():
    return make_peft(2, 2, 1, 10)


def test_errors(peft_model):
    args = dict(init_r=INIT_R, target_r=TARGET_R, tinit=2, tfinal=2, deltaT=1, total_step=10)
    with pytest.raises(ValueError, match="model: no AdaLoRA layers"):
        RankAllocator(nn.Sequential(nn.Linear(3, 3)), **args)
    with pytest.raises(ValueError, match="model: no AdaLoRA layers"):
        RankAllocator(peft_model, **args, adapter_name="other")
    with pytest.raises(TypeError, match="model"):
        RankAllocator("not a model", **args)
    with pytest.raises(ValueError, match="target_r"):
        RankAllocator(peft_model, **{**args, "target_r": INIT_R + 1})
    with pytest.raises(ValueError, match="init_r"):
        RankAllocator(peft_model, **{**args, "init_r": INIT_R + 1, "target_r": 1})
    with pytest.raises(ValueError, match="tinit, tfinal, total_step"):
        RankAllocator(peft_model, **{**args, "tinit": 5, "tfinal": 5})
    with pytest.raises(ValueError, match="total_step"):
        RankAllocator(peft_model, **{**args, "total_step": None})
    with pytest.raises(ValueError, match="deltaT"):
        RankAllocator(peft_model, **{**args, "deltaT": 0})
    for beta in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="beta1"):
            RankAllocator(peft_model, **args, beta1=beta)
        with pytest.raises(ValueError, match="beta2"):
            RankAllocator(peft_model, **args, beta2=beta)
    with pytest.raises(TypeError, match="beta1"):
        RankAllocator(peft_model, **args, beta1="0.85")
    with pytest.raises(TypeError, match="tinit"):
        RankAllocator(peft_model, **{**args, "tinit": 2.5})
    with pytest.raises(ValueError, match="model"):
        orthogonal_regularization(nn.Linear(2, 2))

    mixed = nn.Module()
    mixed.lora_A, mixed.lora_E = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2, 1))
    mixed.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(4, 2))})
    with pytest.raises(TypeError, match="mixed kinds"):
        RankAllocator(mixed, **{**args, "init_r": 2, "target_r": 1})
    bad = nn.Module()
    bad.lora_A, bad.lora_E, bad.lora_B = (nn.Parameter(torch.randn(*s)) for s in ((2, 3), (2, 1), (4, 3)))
    with pytest.raises(ValueError, match="inconsistent AdaLoRA shapes"):
        RankAllocator(bad, **{**args, "init_r": 2, "target_r": 1})


def test_grad_none_and_skipped_final(peft_model):
    ours = RankAllocator(peft_model, INIT_R, TARGET_R, 2, 2, 1, total_step=10)
    with pytest.raises(TypeError, match=r"lora_A\.default\.grad is None"):
        ours.update_and_allocate(0)  # peft: TypeError from ``p * None``
    ours = RankAllocator(peft_model, INIT_R, TARGET_R, 2, 2, 1, total_step=10)
    with pytest.raises(RuntimeError, match="no rank pattern"):
        ours.update_and_allocate(9)  # final phase, never allocated (peft fails on rank_pattern None)
