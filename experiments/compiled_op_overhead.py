"""Host time of 28 tiny linear layers (fwd+bwd) called through (a) a plain product, (b) a torch.library.custom_op
with register_autograd (how lowrank_kernels::lora_linear is registered), (c) an autograd.Function around ops defined
with torch.library.Library (no Python autograd kernel), eager and under inductor, CPU. Result:
bench/results/compiled-op-overhead-cpu.txt.

    python experiments/compiled_op_overhead.py
"""
import time, torch
from torch import Tensor

@torch.library.custom_op("exp::mm_a", mutates_args=())
def mm_a(x: Tensor, w: Tensor) -> Tensor:
    return x @ w.t()
@mm_a.register_fake
def _(x, w): return x.new_empty(x.shape[0], w.shape[0])
@torch.library.custom_op("exp::mm_a_bwd", mutates_args=())
def mm_a_bwd(g: Tensor, x: Tensor, w: Tensor) -> list[Tensor]:
    return [g @ w, g.t() @ x]
@mm_a_bwd.register_fake
def _(g, x, w): return [x.new_empty(x.shape), w.new_empty(w.shape)]
def setup(ctx, inputs, output): ctx.save_for_backward(*inputs)
def bwd(ctx, g):
    x, w = ctx.saved_tensors
    dx, dw = mm_a_bwd(g, x, w)
    return dx, dw
mm_a.register_autograd(bwd, setup_context=setup)

lib = torch.library.Library("exp2", "DEF")
lib.define("mm_b(Tensor x, Tensor w) -> Tensor")
lib.define("mm_b_bwd(Tensor g, Tensor x, Tensor w) -> Tensor[]")
lib.impl("mm_b", lambda x, w: x @ w.t(), "CompositeExplicitAutograd")
lib.impl("mm_b_bwd", lambda g, x, w: [g @ w, g.t() @ x], "CompositeExplicitAutograd")
torch.library.register_fake("exp2::mm_b", lambda x, w: x.new_empty(x.shape[0], w.shape[0]), lib=lib)
torch.library.register_fake("exp2::mm_b_bwd", lambda g, x, w: [x.new_empty(x.shape), w.new_empty(w.shape)], lib=lib)
class MMB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.ops.exp2.mm_b(x, w)
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx, dw = torch.ops.exp2.mm_b_bwd(g, x, w)
        return dx, dw

def model(f, x, ws):
    for w in ws: x = torch.tanh(f(x, w))
    return x.sum()
x = torch.randn(4, 16, requires_grad=True)
ws = [torch.randn(16, 16, requires_grad=True) for _ in range(28)]
for name, f in (("plain", lambda x, w: x @ w.t()), ("custom_op+register_autograd", mm_a), ("Function+Library op", MMB.apply)):
    for backend in ("eager", "inductor"):
        fn = (lambda x: model(f, x, ws)) if backend == "eager" else torch.compile(lambda x: model(f, x, ws), backend=backend, fullgraph=True)
        for _ in range(5): fn(x).backward()
        t = time.perf_counter(); n = 200
        for _ in range(n): fn(x).backward()
        print(f"{name:30s} {backend:9s} {(time.perf_counter()-t)/n*1e6:8.0f} us / fwd+bwd of 28 layers")
