"""AdaLoRA rank allocation on flat buffers, and AdaLoRA's orthogonal regularizer (peft semantics, few launches).

Shapes per adapted layer ``l``: ``A [r, K_l]``, ``E [r, 1]``, ``B [N_l, r]``, every layer at ``r = init_r``.
Two flat fp32 buffers (``exp_avg_ipt``, ``exp_avg_unc``) hold one entry per element of every A, E, B, laid out
``[A blocks | E (L·r) | B blocks]`` with layers of equal ``(K, N)`` side by side, so the per-rank means of a
group of G such layers are views ``[G, r, K]`` / ``[G, N, r]`` of the buffer, not a loop over layers.

    importance   I  = |p ⊙ ∇p|                       every element p of every A, E, B (fp32)
    sensitivity  Ī ← β1·Ī + (1 − β1)·I
    uncertainty  Ū ← β2·Ū + (1 − β2)·|I − Ī|
    triplet      S_li = s(E_li) + (mean_k s(A_l[i, k]) + mean_n s(B_l[n, i])),   s = Ī ⊙ Ū
    mask         E_li ← 0  where  S_li ≤ kthvalue(S, L·init_r − budget)          (ties are pruned together)

Budget (peft's cubic schedule; ``b0 = L·init_r``, ``b1 = L·target_r``, ``T = total_step``):
``b0`` while ``step ≤ tinit``, ``b1`` once ``step > T − tfinal``, in between
``int((b0 − b1)·(1 − (step − tinit) / (T − tfinal − tinit))³ + b1)``, masking when ``step % deltaT == 0``.
Statistics are updated while ``step < T − tfinal``; at ``step == T − tfinal`` the final mask is drawn at ``b1``
and the statistics are reset; after that the final mask is re-applied at every step (the optimizer moves
masked entries of E between calls).

Regularizer (peft's ``orth_reg``): ``R = mean over the 2L matrices of ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F``.
"""
import inspect
import operator
import sys
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RankAllocator", "orthogonal_regularization"]


@dataclass(eq=False)
class _Layer:
    name: str           # module path inside the (unwrapped) model
    module: nn.Module
    A: torch.Tensor     # [r, K]
    E: torch.Tensor     # [r, 1]
    B: torch.Tensor     # [N, r]
    suffix: str         # "" for our layers, ".<adapter>" for peft's ParameterDicts

    def param_name(self, which: str) -> str:
        return f"{self.name}.{which}{self.suffix}" if self.name else f"{which}{self.suffix}"


def _unwrap_peft(model, adapter_name):
    """``(inner model, peft config or None)``: names are taken relative to the model peft's allocator sees."""
    peft = sys.modules.get("peft")  # a peft model exists only if peft was imported
    if peft is not None:
        from peft.tuners.tuners_utils import BaseTuner
        tuner = model.base_model if isinstance(model, peft.PeftModel) else model
        if isinstance(tuner, BaseTuner):
            return tuner.model, tuner.peft_config.get(adapter_name)
    return model, None


def _find_layers(model, adapter_name) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = []
    for name, mod in model.named_modules():
        parts = [getattr(mod, attr, None) for attr in ("lora_A", "lora_E", "lora_B")]
        if any(p is None for p in parts):
            continue
        if all(isinstance(p, torch.Tensor) for p in parts):
            A, E, B = parts
            suffix = ""
        elif all(isinstance(p, (nn.ParameterDict, dict)) for p in parts):
            if not all(adapter_name in p for p in parts):
                continue
            A, E, B = (p[adapter_name] for p in parts)
            suffix = f".{adapter_name}"
        else:
            raise TypeError(f"model: module {name!r} has lora_A/lora_E/lora_B of mixed kinds "
                            f"({', '.join(type(p).__name__ for p in parts)}); expected three tensors or three "
                            "ParameterDicts keyed by adapter name")
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or E.numel() != r or E.shape[0] != r:
            raise ValueError(f"model: module {name!r} has inconsistent AdaLoRA shapes lora_A {tuple(A.shape)}, "
                             f"lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)} (expected [r, K], [r, 1], [N, r])")
        layers.append(_Layer(name, mod, A, E, B, suffix))
    if not layers:
        raise ValueError(f"model: no AdaLoRA layers found (modules with lora_A, lora_E, lora_B tensors, or "
                         f"ParameterDicts holding adapter {adapter_name!r})")
    return layers


def _check_int(value, what, minimum=0):
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{what}: must be >= {minimum}, got {value}")
    return value


@dataclass(eq=False)
class _Group:
    """Layers with equal ``(K, N)``; slices into the flat buffer and into the rank vector."""
    G: int
    K: int
    N: int
    a0: int
    b0: int
    r0: int


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based rank masking (peft's ``RankAllocator`` and
    ``AdaLoraModel.update_and_allocate``), with every layer's statistics in two flat fp32 buffers.

    ``model``: any module tree holding AdaLoRA layers (modules with ``lora_A``, ``lora_E``, ``lora_B`` given as
    tensors, or as ParameterDicts holding ``adapter_name``, as peft's ``SVDLinear``), or a peft ``PeftModel`` /
    ``AdaLoraModel``; then names are taken relative to its base model, as peft's, and its config's
    ``rank_pattern`` is kept up to date as peft does. Call ``update_and_allocate(step)`` every step after
    ``optimizer.step()`` and before ``zero_grad()``. A layer with a ``set_rank_mask(mask)`` method gets the
    bool mask ``[r]`` (True = kept) of its ranks each time it changes; masked E entries are zeroed either way.
    The allocator binds the Parameters it finds at construction.
    """

    def __init__(self, model, init_r, target_r, tinit, tfinal, deltaT, beta1=0.85, beta2=0.85, total_step=None,
                 adapter_name="default"):
        self.init_r = _check_int(init_r, "init_r")
        self.target_r = _check_int(target_r, "target_r")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r: must be <= init_r={self.init_r}, got {self.target_r}")
        self.tinit = _check_int(tinit, "tinit")
        self.tfinal = _check_int(tfinal, "tfinal")
        self.deltaT = _check_int(deltaT, "deltaT", minimum=1)
        for what, beta in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)):
                raise TypeError(f"{what}: expected a float, got {type(beta).__name__}")
            if not 0.0 < beta < 1.0:
                raise ValueError(f"{what}: must lie in (0, 1), got {beta}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.set_total_step(total_step)
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name: expected a str, got {type(adapter_name).__name__}")
        self.adapter_name = adapter_name

        inner, self._peft_config = _unwrap_peft(model, adapter_name)
        found = _find_layers(inner, adapter_name)
        for layer in found:
            if layer.A.shape[0] != self.init_r:
                raise ValueError(f"init_r: is {self.init_r} but layer {layer.name!r} has rank {layer.A.shape[0]}")
        devices = {p.device for layer in found for p in (layer.A, layer.E, layer.B)}
        if len(devices) != 1:
            raise ValueError(f"model: AdaLoRA parameters lie on several devices {sorted(map(str, devices))}")
        device = devices.pop()

        # Group layers of equal (K, N), in order of first appearance; the rank vector follows this order.
        by_shape = {}
        for layer in found:
            by_shape.setdefault((layer.A.shape[1], layer.B.shape[0]), []).append(layer)
        r = self.init_r
        self._layers = [layer for members in by_shape.values() for layer in members]
        self._groups = []
        n_a = sum(len(m) * r * K for (K, _), m in by_shape.items())
        a0, b0, r0 = 0, n_a + len(found) * r, 0
        for (K, N), members in by_shape.items():
            G = len(members)
            self._groups.append(_Group(G, K, N, a0, b0, r0))
            a0, b0, r0 = a0 + G * r * K, b0 + G * N * r, r0 + G * r
        self._e0 = n_a
        self._numel = b0
        self.num_layers = len(self._layers)
        self.init_bgt = self.num_layers * r
        self.target_bgt = self.num_layers * self.target_r

        # Parameters in buffer order, their peft names, and per-layer bookkeeping.
        L = self._layers
        self._params = [l.A for l in L] + [l.E for l in L] + [l.B for l in L]
        self._param_names = ([l.param_name("lora_A") for l in L] + [l.param_name("lora_E") for l in L]
                             + [l.param_name("lora_B") for l in L])
        self._E_keys = [l.param_name("lora_E") for l in L]
        self._hooks = [getattr(l.module, "set_rank_mask", None) for l in L]
        self._fast_hooks = [h is not None and {"words", "active"} <= set(inspect.signature(h).parameters)
                            for h in self._hooks]
        self._hooks = [h if callable(h) else None for h in self._hooks]

        f32 = dict(dtype=torch.float32, device=device)
        self.exp_avg_ipt = torch.zeros(self._numel, **f32)
        self.exp_avg_unc = torch.zeros(self._numel, **f32)
        self._scratch = torch.empty(self._numel, **f32)
        self._grads = torch.empty(self._numel, **f32)
        self._mean_A = torch.empty(self.init_bgt, **f32)
        self._mean_B = torch.empty(self.init_bgt, **f32)
        self._masked = None          # bool [L·r] on device, True = pruned; None until the first allocation
        self._pattern_rows = None    # the same as nested lists, one per layer
        self._rank_pattern = None

    # ------------------------------------------------------------------ schedule
    def set_total_step(self, total_step):
        """Sets ``total_step`` (peft requires ``tinit < total_step - tfinal``, a non-empty budgeting phase)."""
        if total_step is None:
            raise ValueError("total_step: is required (AdaLoRA's schedule needs it), got None")
        total_step = _check_int(total_step, "total_step", minimum=1)
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(f"tinit, tfinal, total_step: need tinit < total_step - tfinal (a budgeting phase), "
                             f"got tinit={self.tinit}, tfinal={self.tfinal}, total_step={total_step}")
        self.total_step = total_step

    def budget_schedule(self, step: int):
        """``(budget, mask_ind)`` at ``step``: peft's cubic schedule, the same numbers."""
        step = operator.index(step)
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    # ------------------------------------------------------------------ state
    @property
    def rank_pattern(self):
        """``{lora_E parameter name: [kept] * r}`` of the latest allocation (peft's keys and values), or None."""
        return None if self._rank_pattern is None else {k: list(v) for k, v in self._rank_pattern.items()}

    def reset_ipt(self):
        self.exp_avg_ipt.zero_()
        self.exp_avg_unc.zero_()

    def named_statistics(self) -> dict:
        """``{parameter name: (exp_avg_ipt, exp_avg_unc)}``, views of the flat buffers shaped like the parameter."""
        out, off = {}, 0
        for n, p in zip(self._param_names, self._params):
            k = p.numel()
            out[n] = (self.exp_avg_ipt[off:off + k].view(p.shape), self.exp_avg_unc[off:off + k].view(p.shape))
            off += k
        return out

    def state_dict(self) -> dict:
        return {"exp_avg_ipt": self.exp_avg_ipt.clone(), "exp_avg_unc": self.exp_avg_unc.clone(),
                "masked": None if self._masked is None else self._masked.clone()}

    def load_state_dict(self, state: dict):
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            t = state[key]
            if not isinstance(t, torch.Tensor) or t.shape != (self._numel,):
                raise ValueError(f"state[{key!r}]: expected a tensor of shape ({self._numel},)")
            getattr(self, key).copy_(t)
        masked = state.get("masked")
        if masked is not None:
            if not isinstance(masked, torch.Tensor) or masked.shape != (self.init_bgt,):
                raise ValueError(f"state['masked']: expected a bool tensor of shape ({self.init_bgt},)")
            with torch.no_grad():
                self._set_mask(masked.to(device=self.exp_avg_ipt.device, dtype=torch.bool))

    # ------------------------------------------------------------------ one step
    def update_and_allocate(self, step: int):
        """Returns ``(budget, rank_pattern)``, ``rank_pattern`` None unless a new allocation was made this step.

        ``step < T - tfinal``: update the statistics, then mask to the budget when the schedule says so;
        ``step == T - tfinal``: final mask at the target budget, statistics reset;
        ``step > T - tfinal``: re-apply the final mask (peft's ``mask_using_rank_pattern``).
        """
        step = _check_int(step, "step", minimum=-(1 << 62))
        self._follow_device()
        final = self.total_step - self.tfinal
        budget, mask_ind = self.budget_schedule(step)
        with torch.no_grad():
            if step < final:
                self._update_ipt()
                if not mask_ind:
                    return budget, None
                pattern = self._mask_to_budget(budget)
                if self._peft_config is not None and pattern:
                    self._peft_config.rank_pattern = pattern
                return budget, pattern
            if step == final:
                pattern = self._mask_to_budget(budget)
                if self._peft_config is not None:
                    self._peft_config.rank_pattern = pattern
                self.reset_ipt()
                return budget, pattern
            if self._masked is None:
                raise RuntimeError(f"update_and_allocate: step {step} lies in the final phase but no rank pattern was "
                                   f"ever allocated (step total_step - tfinal = {final} was skipped)")
            self._write_E(self._masked)
            return budget, None

    def _follow_device(self):
        dev = self._params[0].device
        if dev != self.exp_avg_ipt.device:
            for key in ("exp_avg_ipt", "exp_avg_unc", "_scratch", "_grads", "_mean_A", "_mean_B", "_masked"):
                t = getattr(self, key)
                if t is not None:
                    setattr(self, key, t.to(dev))

    def _update_ipt(self):
        grads = []
        for n, p in zip(self._param_names, self._params):
            if p.grad is None:
                raise TypeError(f"update_and_allocate: {n}.grad is None; call it after loss.backward() and before "
                                "zero_grad() (peft fails here too)")
            grads.append(p.grad.reshape(-1))
        ipt = torch.cat([p.reshape(-1) for p in self._params], out=self._scratch)
        ipt.mul_(torch.cat(grads, out=self._grads)).abs_()      # |p * grad|, fp32
        # The same operations as peft, in the same order, so the buffers match its dicts bit for bit.
        tmp = torch.mul(ipt, 1 - self.beta1, out=self._grads)
        self.exp_avg_ipt.mul_(self.beta1).add_(tmp)
        torch.sub(ipt, self.exp_avg_ipt, out=tmp).abs_().mul_(1 - self.beta2)
        self.exp_avg_unc.mul_(self.beta2).add_(tmp)

    def _triplet_scores(self) -> torch.Tensor:
        s = torch.mul(self.exp_avg_ipt, self.exp_avg_unc, out=self._scratch)
        r = self.init_r
        for g in self._groups:
            rows = slice(g.r0, g.r0 + g.G * r)
            torch.mean(s[g.a0:g.a0 + g.G * r * g.K].view(g.G, r, g.K), dim=2, out=self._mean_A[rows].view(g.G, r))
            torch.mean(s[g.b0:g.b0 + g.G * g.N * r].view(g.G, g.N, r), dim=1, out=self._mean_B[rows].view(g.G, r))
        return s[self._e0:self._e0 + self.init_bgt] + (self._mean_A + self._mean_B)

    def _mask_to_budget(self, budget: int) -> dict:
        scores = self._triplet_scores()
        k = self.init_bgt - budget
        if k > 0:
            masked = scores <= torch.kthvalue(scores, k).values
        else:  # nothing to prune (init_r == target_r); peft's kthvalue(k=0) would raise here
            masked = torch.zeros_like(scores, dtype=torch.bool)
        return self._set_mask(masked)

    def _set_mask(self, masked: torch.Tensor) -> dict:
        self._write_E(masked)
        kept = ~masked
        kept_cpu = kept.view(self.num_layers, self.init_r).cpu()    # the one host sync
        rows = kept_cpu.tolist()
        previous = self._pattern_rows
        changed = [i for i, hook in enumerate(self._hooks)
                   if hook is not None and rows[i] != (previous[i] if previous is not None else [True] * self.init_r)]
        if changed:
            self._install_masks(changed, kept.view(self.num_layers, self.init_r), kept_cpu, rows)
        self._masked, self._pattern_rows = masked, rows
        self._rank_pattern = dict(zip(self._E_keys, rows))
        return self.rank_pattern

    def _install_masks(self, changed, kept, kept_cpu, rows):
        """Calls the changed layers' ``set_rank_mask`` hooks: their packed words and active indices are made in
        one batch (a pack on the device, one asynchronous host-to-device copy of all indices), no further sync."""
        from lowrank_kernels.adalora import pack_mask

        device = kept.device
        index = torch.tensor(changed, dtype=torch.int64).to(device, non_blocking=True)
        words = pack_mask(kept.index_select(0, index))
        actives = [[j for j, k in enumerate(rows[i]) if k] for i in changed]
        flat = torch.tensor([j for a in actives for j in a], dtype=torch.int64).to(device, non_blocking=True)
        for i, w, a in zip(changed, words, flat.split([len(a) for a in actives])):
            if self._fast_hooks[i]:
                self._hooks[i](kept_cpu[i], words=w, active=a)
            else:
                self._hooks[i](kept[i])

    def _write_E(self, masked: torch.Tensor):
        """``E.masked_fill_(mask, 0)`` for every layer: one gather, one fill, one multi-tensor copy."""
        Es = [l.E for l in self._layers]
        flat = torch.cat([e.reshape(-1) for e in Es]).masked_fill_(masked, 0.0)
        torch._foreach_copy_(Es, [v.view(e.shape) for v, e in zip(flat.split(self.init_r), Es)])

    # ------------------------------------------------------------------ regularizer
    def orthogonal_regularization(self) -> torch.Tensor:
        """``orthogonal_regularization`` over this allocator's layers (no module walk)."""
        return _orth_reg([l.A for l in self._layers], [l.B for l in self._layers])


def _orth_reg(As, Bs) -> torch.Tensor:
    norms = []
    for mats, left in ((As, True), (Bs, False)):
        groups = {}
        for m in mats:
            groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(m)
        for ms in groups.values():
            x = torch.stack(ms)
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            r = x.shape[1] if left else x.shape[2]
            eye = torch.eye(r, dtype=x.dtype, device=x.device).expand(x.shape[0], r, r)
            cov_minus_eye = torch.baddbmm(eye, x, x.mT, beta=-1) if left else torch.baddbmm(eye, x.mT, x, beta=-1)
            norms.append(torch.linalg.vector_norm(cov_minus_eye, dim=(1, 2)))
    return torch.cat(norms).mean()


def orthogonal_regularization(model, adapter_name: str = "default") -> torch.Tensor:
    """peft's AdaLoRA orthogonal regularizer, ``mean over layers and {A, B} of ‖A·Aᵀ − I‖_F, ‖Bᵀ·B − I‖_F``.

    Differentiable; a few launches per distinct matrix shape (stack, batched matmul, norm), not per layer.
    Half-precision adapters are evaluated in fp32 (peft stays in the parameter dtype). Multiply by
    ``orth_reg_weight`` and add to the loss, as peft's ``AdaLoraModel.forward`` does.
    """
    inner, _ = _unwrap_peft(model, adapter_name)
    layers = _find_layers(inner, adapter_name)
    return _orth_reg([l.A for l in layers], [l.B for l in layers])
