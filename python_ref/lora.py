"""LoRA / QLoRA linear layer: forward and backward formulas (shared DESIGN.md §4).

Shapes: ``x [M, K]`` (leading dims are flattened), base weight ``W [N, K]`` (for QLoRA, ``W = deq(NF4)``),
``A [r, K]``, ``B [N, r]``, scaling ``s``. Dropout acts on the LoRA branch only:
``Xd = x * dropout_mask`` where the mask holds 0 or ``1 / (1 - p)`` (``None`` means no dropout).

    forward   S  = Xd @ A.T                       [M, r]
              Y  = x @ W.T + s * S @ B.T + bias   [M, N]
    backward  dS = s * dY @ B                     [M, r]
              dX = dY @ W + (dS @ A) * mask       [M, K]
              dA = dS.T @ Xd                      [r, K]
              dB = s * dY.T @ S                   [N, r]
              db = dY.sum(0)                      [N]

All arithmetic happens in the dtype of the inputs: pass fp64 tensors to get the oracle.
"""
import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def lora_forward(x, weight, lora_A, lora_B, scaling: float, bias=None, dropout_mask=None):
    """Returns ``(Y [..., N], S [M, r])``."""
    x2 = _flat(x)
    xd = x2 if dropout_mask is None else x2 * _flat(dropout_mask)
    S = xd @ lora_A.t()
    y = x2 @ weight.t() + scaling * (S @ lora_B.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0]), S


def lora_backward(grad_y, x, weight, lora_A, lora_B, scaling: float, S, dropout_mask=None):
    """Returns ``(dX [..., K], dA [r, K], dB [N, r], db [N])`` for the forward above."""
    dy = _flat(grad_y)
    x2 = _flat(x)
    mask = None if dropout_mask is None else _flat(dropout_mask)
    xd = x2 if mask is None else x2 * mask
    dS = scaling * (dy @ lora_B)
    dS_A = dS @ lora_A
    dx = dy @ weight + (dS_A if mask is None else dS_A * mask)
    dA = dS.t() @ xd
    dB = scaling * (dy.t() @ S)
    db = dy.sum(0)
    return dx.reshape(x.shape), dA, dB, db
