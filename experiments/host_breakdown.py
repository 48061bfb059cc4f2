"""Where the host time of a QLoRA training step goes: whole steps of small Llama models, per-layer differences, and
the host µs of each call our layer makes (CUDA only).

    python experiments/host_breakdown.py [--tokens 128] [--layers 2] [--iters 30] [--profile]

At few tokens the GPU work is short, so each loop is bound by the host: µs per step is what the host spends
enqueueing it. Models (bench/test_train_step.py's ``build``, Llama-3-8B layer dimensions, 7 projections per layer):
``peft+bnb``, the same after ``lowrank_kernels.peft.convert`` (``lowrank_kernels``), and ``frozen bf16`` (the model
unquantized, no adapters, the input embeddings trainable so that backward runs through every layer: the host floor
of everything that is not a LoRA layer, plus a plain ``nn.Linear`` per projection). ``(x - frozen) / projections``
is the host cost of one LoRA projection's forward + backward over a plain ``nn.Linear``'s. Also the host time of
an eager decode call (M = 1 and 16, no grad) of one QLoRA projection, peft+bnb's and ours.
"""
import argparse
import cProfile
import pstats
import time

import torch

from host_timing import host_us


def step_fn(net, ids):
    def step():
        net(input_ids=ids, labels=ids).loss.backward()
        for p in net.parameters():
            p.grad = None
    return step


def models(layers):
    from bench.test_train_step import build, llama_config
    from transformers import LlamaForCausalLM

    yield "peft+bnb", build("llama3-8b", layers, False)
    net = build("llama3-8b", layers, False)
    from lowrank_kernels.peft import convert

    convert(net)
    yield "lowrank_kernels", net
    torch.manual_seed(0)
    with torch.device("cuda"):
        frozen = LlamaForCausalLM(llama_config("llama3-8b", layers)).to(torch.bfloat16)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)
    yield "frozen bf16", frozen


def op_rows(m):
    """(name, fn) for each call of one forward + backward of a 4096 x 4096 layer at M = m, fp32 adapters."""
    from lowrank_kernels import dispatch, qlora_linear
    from lowrank_kernels.autograd import LoraLinearFunction
    from lowrank_kernels.nf4 import NF4Weight

    w = NF4Weight.quantize(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    A = torch.randn(16, 4096, device="cuda", requires_grad=True)
    B = torch.randn(4096, 16, device="cuda", requires_grad=True)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    Ab, Bb = A.detach().bfloat16(), B.detach().bfloat16()
    xd = x.detach()
    S = xd @ Ab.t()
    W = dispatch.nf4_dequantize(w, torch.bfloat16)
    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)

    def fwd_bwd():
        qlora_linear(x, w, A, B, 2.0).backward(g)

    def dense_fwd_bwd():
        lin(x).backward(g)

    def apply_only():
        LoraLinearFunction.apply(x, A, B, None, w, 2.0, 0.0, 0, None, None)

    return [
        ("qlora_linear fwd+bwd (.backward per call)", fwd_bwd),
        ("nn.Linear fwd+bwd (.backward per call)", dense_fwd_bwd),
        ("qlora_linear fwd, no grad", lambda: qlora_linear(xd, w, A.detach(), B.detach(), 2.0)),
        ("qlora_linear fwd, grad (graph built)", lambda: qlora_linear(x, w, A, B, 2.0)),
        ("LoraLinearFunction.apply fwd", apply_only),
        ("dispatch.lora_linear_forward", lambda: dispatch.lora_linear_forward(xd, w, Ab, Bb, 2.0)),
        ("dispatch.lora_linear_backward", lambda: dispatch.lora_linear_backward(
            g, xd, w, Ab, Bb, 2.0, S, needs=(True, True, True, False, False),
            adapter_dtypes=(torch.float32, torch.float32))),
        ("  fp32 -> bf16 .to (16 x 4096)", lambda: A.detach().to(torch.bfloat16)),
        ("  S = x @ A.T (mm)", lambda: xd @ Ab.t()),
        ("  nf4 dequantize (launcher)", lambda: dispatch.nf4_dequantize(w, torch.bfloat16)),
        ("  addmm(S, B.T, beta=0, alpha)", lambda: torch.addmm(dispatch._unused_input(xd), S, Bb.t(), beta=0,
                                                                alpha=2.0)),
        ("  y.addmm_(x, W.T)", lambda: S.new_empty((m, 4096)).addmm_(xd, W.t())),
        ("  mm fp32 out (dA)", lambda: torch.mm(S.t(), xd, out_dtype=torch.float32)),
        ("  torch.empty", lambda: torch.empty((m, 4096), device="cuda", dtype=torch.bfloat16)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="cProfile lowrank_kernels' step (tottime, 40 rows)")
    a = ap.parse_args()
    import triton

    print(f"# experiments/host_breakdown.py on {torch.cuda.get_device_name()}  {time.strftime('%Y-%m-%d')}  "
          f"torch {torch.__version__}  triton {triton.__version__}; {a.layers} layers x 7 projections, "
          f"{a.tokens} tokens")
    ids = torch.randint(0, 32000, (1, a.tokens), device="cuda")
    res = {}
    for name, net in models(a.layers):
        enq, wall = host_us(step_fn(net, ids), a.iters, warmup=5)
        res[name] = enq
        print(f"{name:18} step: host {enq:9.1f} us, wall {wall:9.1f} us")
        if name != "frozen bf16":  # an eager decode call of one projection (q_proj, 4096 x 4096), no grad
            q_proj = net.base_model.model.model.layers[0].self_attn.q_proj
            for m in (1, 16):
                xm = torch.randn(1, m, 4096, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    enq, _ = host_us(lambda: q_proj(xm), 300, warmup=20)
                print(f"{name:18} q_proj decode call M={m:<3}: host {enq:7.1f} us")
        if name == "lowrank_kernels" and a.profile:
            prof = cProfile.Profile()
            step = step_fn(net, ids)
            prof.enable()
            for _ in range(a.iters):
                step()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(40)
        del net
        torch.cuda.empty_cache()
    proj = 7 * a.layers
    for name in ("peft+bnb", "lowrank_kernels"):
        print(f"{name:18} per projection over a frozen nn.Linear: {(res[name] - res['frozen bf16']) / proj:7.1f} us")
    for name, fn in op_rows(a.tokens):
        enq, _ = host_us(fn, 300, warmup=20)
        print(f"{name:44} {enq:7.1f} us host per call")


if __name__ == "__main__":
    main()
