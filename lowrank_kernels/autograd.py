"""The forward and backward of ``qlora_linear`` / ``lora_linear`` through ``dispatch``, their dropout seeds and
masks, and the autograd Function eager calls go through (``lowrank_kernels.ops`` registers the same functions as
torch operators for ``torch.compile``).

    forward   S = Xd @ A.T,  Y = x @ W.T + s * S @ B.T + bias       Xd = x * keep / (1 - p)  (LoRA dropout)
    backward  dS = s * dY @ B,  dX = dY @ W + (dS @ A) * keep / (1 - p),  dA = dS.T @ Xd,  dB = s * dY.T @ S

Saved for backward: ``x`` (only when ``lora_A`` or a dense weight needs a gradient) and ``S [M, r]`` (only
when ``lora_B`` does), plus the adapters as the forward used them (tiny rounded copies, or the tensors). Never
the dequantized weight, never a dropout mask: the mask is rebuilt in backward from its seed, a 0-dim int64 tensor
(:func:`draw_seed`). ``W`` (dense or NF4) gets no gradient unless it is a dense tensor that requires one.
"""
import torch

from lowrank_kernels import dispatch, policy


def draw_seed(like: torch.Tensor) -> torch.Tensor:
    """A dropout seed for a call on ``like``'s device: a 0-dim int64 tensor drawn from torch's default generator
    of that device (CUDA: a device tensor, so drawing it is captured by CUDA graphs and costs no sync; CPU: a CPU
    tensor; meta: an empty one). ``torch.utils.checkpoint`` saves and restores those generators, so a recomputed
    forward draws the same seed."""
    if like.device.type == "cuda":
        return torch.randint(0, 2**62, (), device=like.device)
    if like.device.type == "meta":
        return torch.empty((), dtype=torch.int64, device="meta")
    return torch.randint(0, 2**62, ())


def dropout_keep(shape, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask of ``shape`` (``True`` with probability ``1 - p``) on ``seed``'s device, a pure function of
    ``(shape, p, seed's value)``: on CUDA the Triton kernel ``kernels.dropout_mask`` (it reads the seed in device
    memory), on the CPU torch's ``bernoulli_`` on a generator seeded with it; on meta an empty mask."""
    device = seed.device
    if device.type == "cuda":
        from lowrank_kernels.kernels.dropout_mask import dropout_mask

        return dropout_mask(seed, shape, p)
    if device.type == "meta":
        return torch.empty(shape, dtype=torch.bool, device="meta")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return torch.empty(shape, dtype=torch.bool).bernoulli_(1.0 - p, generator=gen)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout: float, seed, need_S: bool, backend,
                 config):
    """``(Y [M, N], S [M, r] or None, A, B)`` of ``dispatch.lora_linear_forward`` for ``x [M, K]`` (in the compute
    dtype), the dropout mask rebuilt from ``seed`` (``None`` when ``dropout == 0``)."""
    keep = dropout_keep(x.shape, dropout, seed) if dropout > 0 else None
    plan = policy.forward_plan(x, weight, dropout > 0, backend, config)
    return dispatch.lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias, keep, 1.0 / (1.0 - dropout),
                                        plan, config, need_S=need_S)


def lora_backward(grad_y, x, weight, lora_A, lora_B, S, scaling: float, dropout: float, seed, needs, backend,
                  config, dtypes):
    """Gradients ``(dX, dA, dB, db, dW)`` of :func:`lora_forward` (``None`` where ``needs``, the flags of x,
    lora_A, lora_B, bias and a dense weight, is False), each in its dtype of ``dtypes`` (``lora_A``'s,
    ``lora_B``'s, the bias's, the dense weight's; ``dX`` in ``grad_y``'s). ``lora_A``, ``lora_B``: as the
    forward used them, or the tensors given to it (rounded here)."""
    a_dtype, b_dtype, bias_dtype, w_dtype = dtypes
    keep = dropout_keep((grad_y.shape[0], weight.shape[1]), dropout, seed) if dropout > 0 else None
    plan = policy.backward_plan(grad_y, weight, dropout > 0, needs[1], needs[2], backend)
    dx, dA, dB, db, dw = dispatch.lora_linear_backward(
        grad_y, x, weight, lora_A, lora_B, scaling, S, keep, 1.0 / (1.0 - dropout), tuple(needs), plan, config,
        adapter_dtypes=(a_dtype, b_dtype))
    cast = dispatch.cast
    return dx, cast(dA, a_dtype), cast(dB, b_dtype), cast(db, bias_dtype), cast(dw, w_dtype)


class LoraLinearFunction(torch.autograd.Function):
    """``apply(x [M, K], lora_A [r, K], lora_B [N, r], bias [N] | None, weight, scaling, dropout, seed, backend,
    config) -> Y [M, N]``: the eager path (an autograd Function costs a fraction of a custom operator's host time).

    ``x`` sets the compute dtype; ``lora_A``, ``lora_B``, ``bias`` and a dense ``weight`` (``[N, K]``) may have
    any float dtype: they are rounded to ``x.dtype`` for the products, and each gradient comes back in its own
    tensor's dtype (reductions over M accumulate in fp32 on the Triton backend). ``weight`` may also be an
    ``NF4Weight``, which gets no gradient. ``seed``: :func:`draw_seed`'s, or ``None`` without dropout.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, weight, scaling, dropout, seed, backend, config):
        y, S, A, B = lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout, seed, ctx.needs_input_grad[2],
                                  backend, config)
        dense = isinstance(weight, torch.Tensor)
        need_x_saved = ctx.needs_input_grad[1] or (dense and ctx.needs_input_grad[4])
        ctx.save_for_backward(x if need_x_saved else None, A, B,  # as the forward used them (copies not redone)
                              S if ctx.needs_input_grad[2] else None, weight if dense else None, seed)
        ctx.nf4 = None if dense else weight
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype,
                      weight.dtype if dense else None, x.dtype)
        ctx.args = (scaling, dropout, backend, config)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, S, dense_w, seed = ctx.saved_tensors
        scaling, dropout, backend, config = ctx.args
        weight = dense_w if ctx.nf4 is None else ctx.nf4
        grad_y = dispatch.cast(grad_y, ctx.dtypes[4])
        return (*lora_backward(grad_y, x, weight, A, B, S, scaling, dropout, seed, ctx.needs_input_grad[:5], backend,
                               config, ctx.dtypes[:4]), None, None, None, None, None)


class NF4MatmulFunction(torch.autograd.Function):
    """``apply(x [M, K], weight, backend) -> x @ W.T [M, N]`` for an ``NF4Weight`` ``weight [N, K]``, in ``x``'s
    dtype: ``dispatch.nf4_matmul``, whose backward ``dX = dY @ W`` dequantizes the weight again instead of keeping
    the ``[N, K]`` dequantized copy between forward and backward (the eager path of the ``nf4_matmul`` operator)."""

    @staticmethod
    def forward(ctx, x, weight, backend):
        ctx.nf4, ctx.backend = weight, backend
        return dispatch.nf4_matmul(x, weight, False, backend)

    @staticmethod
    def backward(ctx, grad_y):
        return dispatch.nf4_matmul(grad_y, ctx.nf4, True, ctx.backend), None, None
