"""Host time of one call through a ``torch.library.custom_op`` with a registered autograd formula, against the same
body in an ``autograd.Function`` (and the op without autograd): why eager calls skip the dispatcher (docs/design.md,
"Torch operators"). CPU, tiny tensors, so the time is Python / dispatcher overhead. Run from the repository root:
``python experiments/custom_op_overhead.py``."""
import time

import torch


@torch.library.custom_op("overhead_probe::f", mutates_args=())
def f(x: torch.Tensor, w: list[torch.Tensor], s: float, meta: list[int],
      b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return x.clone(), x.clone()


@f.register_fake
def _(x, w, s, meta, b):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, gy, gs):
    return gy, None, None, None, None


torch.library.register_autograd("overhead_probe::f", _backward, setup_context=_setup)


class Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, s, meta, b):
        return x.clone(), x.clone()

    @staticmethod
    def backward(ctx, gy, gs):
        return gy, None, None, None, None


def per_call_us(fn, n=5000):
    for _ in range(200):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
args = ([w, w, w], 2.0, [1, 2, 3], None)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for name, fn in (("custom op, autograd registered, input requires grad", lambda: f(x, *args)),
                 ("custom op, no input requires grad", lambda: f(x.detach(), *args)),
                 ("autograd.Function", lambda: Function.apply(x, *args))):
    print(f"{name:55s} {per_call_us(fn):7.1f} us per call")
