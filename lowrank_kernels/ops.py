"""The library's entry points as torch operators (``torch.library.custom_op``): a schema, one implementation for
every device (it dispatches by device itself: Triton / CUDA kernels on CUDA, torch on the CPU), a fake
implementation (shapes only: ``torch.compile``'s tracing, the meta device) and, for the layer op, a registered
autograd formula. ``torch.compile`` sees each call as one opaque node, so a compiled model traces with
``fullgraph=True``, dropout included, and runs our kernels.

    lowrank_kernels::dropout_seed(like)                 0-dim int64 seed (random: tagged nondeterministic_seeded)
    lowrank_kernels::dropout_mask(seed, shape, p)       the bool keep-mask of a seed
    lowrank_kernels::lora_linear(x, weight, ...)        (Y [M, N], S [M, r]), differentiable
    lowrank_kernels::lora_linear_backward(dY, ...)      the gradients asked for, in order
    lowrank_kernels::nf4_dequantize(nf4, meta, dtype)   the dequantized NF4 weight
    lowrank_kernels::nf4_matmul(x, nf4, meta, trans_w)  x @ W.T (or x @ W) of an NF4 weight, differentiable in x
    lowrank_kernels::dora_weight_norm(weight, ...)      DoRA's row norms of W + s * B @ A (detached)
    lowrank_kernels::lora_gather(x, y, index, ...)      y plus each row's LoRA term of a mixed-adapter batch
    lowrank_kernels::lora_segments(x, y, index, ...)    the same, rows grouped by adapter (prefill)

Weights travel as ``Tensor[] weight`` + ``int[] nf4_meta``: ``[W]`` and ``[]`` for a dense weight, else
``NF4Weight.op_args()``. ``config`` (tile overrides of the fused Triton GEMM) travels as JSON.

Eager calls skip the dispatcher (``functional`` calls ``autograd.LoraLinearFunction``, the same functions; a
custom operator costs several times an autograd Function's host time); under ``torch.compile`` ``functional``
calls :func:`lora_linear` here. The dropout seed is a tensor drawn by an operator, in program order, from the
generator eager mode draws it from, so for one RNG state compiled and eager models draw the same masks.
"""
import json
from typing import Optional

import torch
from torch import Tensor

from lowrank_kernels import autograd, dispatch
from lowrank_kernels.nf4 import NF4Weight

NAMESPACE = "lowrank_kernels"


def weight_args(weight) -> tuple:
    """``(tensors, nf4_meta)``: a dense weight or an ``NF4Weight`` as operator arguments."""
    return weight.op_args() if isinstance(weight, NF4Weight) else ([weight], [])


def _weight(tensors, nf4_meta):
    return NF4Weight.from_op_args(tensors, nf4_meta) if nf4_meta else tensors[0]


def _config(config: Optional[str]):
    return None if config is None else json.loads(config)


# --------------------------------------------------------------------------------------------- dropout seed
@torch.library.custom_op(f"{NAMESPACE}::dropout_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_seed(like: Tensor) -> Tensor:
    """``autograd.draw_seed(like)``: a fresh 0-dim int64 dropout seed for a call on ``like``'s device."""
    return autograd.draw_seed(like)


@dropout_seed.register_fake
def _(like):
    return torch.empty((), dtype=torch.int64, device=like.device)


def _never_merge_draws():
    """Two calls of ``dropout_seed`` on one tensor are two draws: keep AOTAutograd's common-subexpression pass from
    merging them, as it does not merge torch's own random ops (it knows those from a list; the
    ``nondeterministic_seeded`` tag keeps the op in program order and right under activation checkpointing, but
    that pass does not read it)."""
    try:
        from torch._functorch import compile_utils
    except ImportError:  # pragma: no cover
        return
    packet = torch.ops.lowrank_kernels.dropout_seed
    if isinstance(getattr(compile_utils, "rand_ops", None), list) and packet not in compile_utils.rand_ops:
        compile_utils.rand_ops.append(packet)


_never_merge_draws()


@torch.library.custom_op(f"{NAMESPACE}::dropout_mask", mutates_args=())
def dropout_mask(seed: Tensor, shape: list[int], p: float) -> Tensor:
    """``autograd.dropout_keep(shape, p, seed)``: the bool keep-mask of a seed (a pure function of its value)."""
    return autograd.dropout_keep(shape, p, seed)


@dropout_mask.register_fake
def _(seed, shape, p):
    return torch.empty(shape, dtype=torch.bool, device=seed.device)


def dropout_keep(x: Tensor, p: float) -> Tensor:
    """A fresh bool keep-mask of ``x``'s shape (``P(True) = 1 - p``): under ``torch.compile`` through the
    ``dropout_seed`` and ``dropout_mask`` operators, else their functions directly (the same draws)."""
    if torch.compiler.is_compiling():
        return dropout_mask(dropout_seed(x), list(x.shape), p)
    return autograd.dropout_keep(x.shape, p, autograd.draw_seed(x))


# --------------------------------------------------------------------------------------------- layer forward
@torch.library.custom_op(f"{NAMESPACE}::lora_linear", mutates_args=())
def lora_linear_op(x: Tensor, weight: list[Tensor], nf4_meta: list[int], lora_A: Tensor, lora_B: Tensor,
                   bias: Optional[Tensor], scaling: float, dropout: float, seed: Optional[Tensor], need_S: bool,
                   backend: Optional[str], config: Optional[str]) -> tuple[Tensor, Tensor]:
    """``(Y [M, N], S [M, r])`` of ``autograd.lora_forward`` (``S`` empty ``[0]`` unless ``need_S``); ``x [M, K]``
    in the compute dtype."""
    y, S, _, _ = autograd.lora_forward(x, _weight(weight, nf4_meta), lora_A, lora_B, bias, scaling, dropout, seed,
                                       need_S, backend, _config(config))
    return y, S if need_S else x.new_empty(0)


@lora_linear_op.register_fake
def _(x, weight, nf4_meta, lora_A, lora_B, bias, scaling, dropout, seed, need_S, backend, config):
    M, N = x.shape[0], lora_B.shape[0]
    return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0]) if need_S else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, nf4_meta, lora_A, lora_B, bias, scaling, dropout, seed, need_S, backend, config = inputs
    dense = not nf4_meta
    w_grad = dense and weight[0].requires_grad
    needs = (x.requires_grad, lora_A.requires_grad, lora_B.requires_grad, bias is not None and bias.requires_grad,
             w_grad)
    S = output[1]
    ctx.save_for_backward(x if needs[1] or w_grad else None, lora_A, lora_B, S if needs[2] else None, seed,
                          bias, *weight)
    ctx.args = (nf4_meta, scaling, dropout, backend, config, needs, len(weight))


def _backward(ctx, grad_y, grad_S):
    x, lora_A, lora_B, S, seed, bias, *weight = ctx.saved_tensors
    nf4_meta, scaling, dropout, backend, config, needs, n_weight = ctx.args
    grads = iter(lora_linear_backward_op(grad_y, x, weight, nf4_meta, lora_A, lora_B, bias, S, scaling, dropout,
                                         seed, list(needs), backend, config))
    dx, dA, dB, db, dw = (next(grads) if need else None for need in needs)
    # list arguments take a list of gradients (an empty one for an empty list: autograd compares the structures)
    return dx, [dw] + [None] * (n_weight - 1), None if nf4_meta else [], dA, dB, db, None, None, None, None, None, \
        None


# --------------------------------------------------------------------------------------------- layer backward
@torch.library.custom_op(f"{NAMESPACE}::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(grad_y: Tensor, x: Optional[Tensor], weight: list[Tensor], nf4_meta: list[int],
                            lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], S: Optional[Tensor],
                            scaling: float, dropout: float, seed: Optional[Tensor], needs: list[bool],
                            backend: Optional[str], config: Optional[str]) -> list[Tensor]:
    """The gradients of ``lora_linear`` that ``needs`` (x, lora_A, lora_B, bias, dense weight) asks for, in that
    order, each in its tensor's dtype (``dX`` in ``grad_y``'s)."""
    w = _weight(weight, nf4_meta)
    dtypes = (lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype, None if nf4_meta else w.dtype)
    grads = autograd.lora_backward(grad_y, x, w, lora_A, lora_B, S, scaling, dropout, seed, needs, backend,
                                   _config(config), dtypes)
    return [g for g, need in zip(grads, needs) if need]


@lora_linear_backward_op.register_fake
def _(grad_y, x, weight, nf4_meta, lora_A, lora_B, bias, S, scaling, dropout, seed, needs, backend, config):
    M, K = grad_y.shape[0], lora_A.shape[1]
    likes = (grad_y.new_empty(M, K), torch.empty_like(lora_A), torch.empty_like(lora_B),
             None if bias is None else torch.empty_like(bias), None if nf4_meta else torch.empty_like(weight[0]))
    return [t for t, need in zip(likes, needs) if need]


torch.library.register_autograd(f"{NAMESPACE}::lora_linear", _backward, setup_context=_setup_context)


def lora_linear(x, weight, lora_A, lora_B, scaling: float, bias, dropout: float, backend, config):
    """``Y [M, N]`` of ``x [M, K]`` (in the compute dtype) through the ``lora_linear`` operator, its dropout seed
    drawn by ``dropout_seed`` (the path of ``functional`` under ``torch.compile``)."""
    tensors, nf4_meta = weight_args(weight)
    seed = dropout_seed(x) if dropout > 0 else None
    need_S = torch.is_grad_enabled() and lora_B.requires_grad
    y, _ = lora_linear_op(x, tensors, nf4_meta, lora_A, lora_B, bias, scaling, dropout, seed, need_S, backend,
                          None if config is None else json.dumps(config, sort_keys=True))
    return y


# --------------------------------------------------------------------------------------------- mixed adapters
@torch.library.custom_op(f"{NAMESPACE}::lora_gather", mutates_args=())
def lora_gather(x: Tensor, y: Tensor, adapter_index: Tensor, A_all: Tensor, B_all: Tensor,
                scalings: Tensor, ranks: Tensor) -> Tensor:
    """``kernels.lora_gather.lora_gather``: ``y`` plus each row's LoRA term of a mixed-adapter batch (no autograd:
    serving; ``mixed_lora_linear`` takes torch products where a gradient is needed)."""
    from lowrank_kernels.kernels.lora_gather import lora_gather as launch_gather

    return launch_gather(x, y, adapter_index, A_all, B_all, scalings, ranks)


@lora_gather.register_fake
def _(x, y, adapter_index, A_all, B_all, scalings, ranks):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{NAMESPACE}::lora_segments", mutates_args=())
def lora_segments(x: Tensor, y: Tensor, adapter_index: Tensor, A_all: Tensor, B_all: Tensor,
                  scalings: Tensor, ranks: Tensor) -> Tensor:
    """``kernels.lora_gather.lora_segments``: as ``lora_gather``, rows grouped by adapter (the prefill form)."""
    from lowrank_kernels.kernels.lora_gather import lora_segments as launch_segments

    return launch_segments(x, y, adapter_index, A_all, B_all, scalings, ranks)


@lora_segments.register_fake
def _(x, y, adapter_index, A_all, B_all, scalings, ranks):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------- NF4 dequantize
@torch.library.custom_op(f"{NAMESPACE}::nf4_dequantize", mutates_args=())
def nf4_dequantize_op(nf4: list[Tensor], nf4_meta: list[int], dtype: torch.dtype, backend: Optional[str]) -> Tensor:
    """``dispatch.nf4_dequantize`` of the ``NF4Weight`` given as ``op_args()``."""
    return dispatch.nf4_dequantize(NF4Weight.from_op_args(nf4, nf4_meta), dtype, backend)


@nf4_dequantize_op.register_fake
def _(nf4, nf4_meta, dtype, backend):
    return nf4[0].new_empty(nf4_meta[3:], dtype=dtype)


def nf4_dequantize(w: NF4Weight, dtype, backend=None) -> Tensor:
    """``w`` dequantized to ``dtype`` through the ``nf4_dequantize`` operator."""
    tensors, meta = w.op_args()
    return nf4_dequantize_op(tensors, meta, dtype, backend)


# --------------------------------------------------------------------------------------------- NF4 product
@torch.library.custom_op(f"{NAMESPACE}::nf4_matmul", mutates_args=())
def nf4_matmul_op(x: Tensor, nf4: list[Tensor], nf4_meta: list[int], trans_w: bool, backend: Optional[str]) -> Tensor:
    """``dispatch.nf4_matmul``: ``x @ W.T`` (``trans_w``: ``x @ W``) of the ``NF4Weight`` given as ``op_args()``."""
    return dispatch.nf4_matmul(x, NF4Weight.from_op_args(nf4, nf4_meta), trans_w, backend)


@nf4_matmul_op.register_fake
def _(x, nf4, nf4_meta, trans_w, backend):
    N, K = nf4_meta[3:]
    return x.new_empty(*x.shape[:-1], K if trans_w else N)


def _nf4_matmul_setup_context(ctx, inputs, output):
    x, nf4, nf4_meta, trans_w, backend = inputs
    ctx.save_for_backward(*nf4)
    ctx.args = (nf4_meta, trans_w, backend)


def _nf4_matmul_backward(ctx, grad_y):
    nf4_meta, trans_w, backend = ctx.args
    nf4 = list(ctx.saved_tensors)
    return nf4_matmul_op(grad_y, nf4, nf4_meta, not trans_w, backend), [None] * len(nf4), None, None, None


torch.library.register_autograd(f"{NAMESPACE}::nf4_matmul", _nf4_matmul_backward,
                                setup_context=_nf4_matmul_setup_context)


def nf4_matmul(x: Tensor, w: NF4Weight, backend=None) -> Tensor:
    """``x [..., K] @ W.T`` through the ``nf4_matmul`` operator, differentiable in ``x`` (the weight is frozen)."""
    tensors, meta = w.op_args()
    return nf4_matmul_op(x, tensors, meta, False, backend)


# --------------------------------------------------------------------------------------------- DoRA weight norm
@torch.library.custom_op(f"{NAMESPACE}::dora_weight_norm", mutates_args=())
def dora_weight_norm_op(weight: list[Tensor], nf4_meta: list[int], lora_A: Tensor, lora_B: Tensor, scaling: float,
                        backend: Optional[str]) -> Tensor:
    """``dora.dora_weight_norm`` of the weight given as :func:`weight_args`: fp32 ``[N]``."""
    from lowrank_kernels import dora

    return dora.dora_weight_norm(_weight(weight, nf4_meta), lora_A, lora_B, scaling, backend)


@dora_weight_norm_op.register_fake
def _(weight, nf4_meta, lora_A, lora_B, scaling, backend):
    return lora_B.new_empty((lora_B.shape[0],), dtype=torch.float32)


def dora_weight_norm(weight, lora_A, lora_B, scaling, backend=None) -> Tensor:
    """DoRA's weight norm through the ``dora_weight_norm`` operator (no gradient flows through it)."""
    tensors, meta = weight_args(weight)
    return dora_weight_norm_op(tensors, meta, lora_A.detach(), lora_B.detach(), float(scaling), backend)
