"""The autograd Function behind ``qlora_linear`` / ``lora_linear``: forward and backward through ``dispatch``.

    forward   S = Xd @ A.T,  Y = x @ W.T + s * S @ B.T + bias       Xd = x * keep / (1 - p)  (LoRA dropout)
    backward  dS = s * dY @ B,  dX = dY @ W + (dS @ A) * keep / (1 - p),  dA = dS.T @ Xd,  dB = s * dY.T @ S

Saved for backward: ``x`` (only when ``lora_A`` or a dense weight needs a gradient) and ``S [M, r]`` (only
when ``lora_B`` does), plus the adapters as the forward used them (tiny rounded copies, or the tensors). Never
the dequantized weight, never a dropout mask: the mask is regenerated in backward from a seed. ``W`` (dense or
NF4) gets no gradient unless it is a dense tensor that requires one.
"""
import torch

from lowrank_kernels import dispatch, policy


def dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """Bool keep-mask (``True`` with probability ``1 - p``), a pure function of ``(shape, p, seed, device)``
    (on the meta device: an empty one)."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=gen)


class LoraLinearFunction(torch.autograd.Function):
    """``apply(x [M, K], lora_A [r, K], lora_B [N, r], bias [N] | None, weight, scaling, dropout, seed, plan,
    backend, config) -> Y [M, N]``; ``plan``: the forward's ``policy.LayerPlan`` (the backward makes its own).

    ``x`` sets the compute dtype; ``lora_A``, ``lora_B``, ``bias`` and a dense ``weight`` (``[N, K]``) may have
    any float dtype: they are rounded to ``x.dtype`` for the products, and each gradient comes back in its own
    tensor's dtype (reductions over M accumulate in fp32 on the Triton backend). ``weight`` may also be an
    ``NF4Weight``, which gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, weight, scaling, dropout, seed, plan, backend, config):
        keep = dropout_keep(x.shape, dropout, seed, x.device) if dropout > 0 else None
        keep_scale = 1.0 / (1.0 - dropout)
        y, S, A, B = dispatch.lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias, keep, keep_scale,
                                                  plan, config, need_S=ctx.needs_input_grad[2])
        dense = isinstance(weight, torch.Tensor)
        need_x_saved = ctx.needs_input_grad[1] or (dense and ctx.needs_input_grad[4])
        ctx.save_for_backward(x if need_x_saved else None, A, B,  # as the forward used them (copies not redone)
                              S if ctx.needs_input_grad[2] else None, weight if dense else None)
        ctx.nf4 = None if dense else weight
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype, x.dtype)
        ctx.args = (scaling, dropout, seed, keep_scale, backend, config, x.shape)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, S, dense_w = ctx.saved_tensors
        scaling, dropout, seed, keep_scale, backend, config, x_shape = ctx.args
        weight = dense_w if ctx.nf4 is None else ctx.nf4
        needs = tuple(ctx.needs_input_grad[:5])
        keep = dropout_keep(x_shape, dropout, seed, grad_y.device) if dropout > 0 else None
        a_dtype, b_dtype, bias_dtype, x_dtype = ctx.dtypes
        grad_y = dispatch.cast(grad_y, x_dtype)
        plan = policy.backward_plan(grad_y, weight, dropout > 0, needs[1], needs[2], backend)
        dx, dA, dB, db, dw = dispatch.lora_linear_backward(
            grad_y, x, weight, A, B, scaling, S, keep, keep_scale, needs, plan, config,
            adapter_dtypes=(a_dtype, b_dtype))
        cast = dispatch.cast
        return (dx, cast(dA, a_dtype), cast(dB, b_dtype), cast(db, bias_dtype),
                cast(dw, None if dense_w is None else dense_w.dtype), None, None, None, None, None, None)
