"""Host cost of a training step, eager against torch.compile (aot_eager, inductor), peft against converted: a tiny
4-layer Llama (hidden 64, LoRA r=8 on every projection, fp32, CPU), so that host time dominates. Result:
bench/results/compiled-host-cpu.txt.

    python experiments/compiled_host_cpu.py
"""
import time, torch, warnings
warnings.filterwarnings("ignore")
from transformers import LlamaConfig, LlamaForCausalLM
import peft
from lowrank_kernels.peft import convert
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
def build(conv):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256, use_cache=False)
    net = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    if conv: assert convert(net) > 0
    return net
ids = torch.randint(0, 256, (1, 32))
for conv in (False, True):
    for mode in ("eager", "aot_eager", "inductor"):
        net = build(conv)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        fwd = net if mode == "eager" else torch.compile(net, backend=mode)
        def step():
            fwd(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        for _ in range(5): step()
        t = time.perf_counter(); n = 30
        for _ in range(n): step()
        print(f"{'ours' if conv else 'peft':5s} {mode:10s} {(time.perf_counter() - t) / n * 1e3:7.2f} ms/step")
