"""Which call of ``mixed_lora_linear`` breaks a CUDA-graph capture (bench/test_mixed.py): after a first call
(caches filled), a second one under torch.cuda.set_sync_debug_mode("error") raises at any host sync."""
import traceback

import torch

from lowrank_kernels import NF4Weight
from lowrank_kernels.mixed import mixed_lora_linear

N, K, M = 4096, 4096, 16
w = NF4Weight.quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
adapters = [(torch.randn(r, K, device="cuda") * 0.02, torch.randn(N, r, device="cuda") * 0.02, 2.0)
            for r in (8, 16, 24, 32, 40, 48, 56, 64)]
index = (torch.arange(M) % 8).cuda()
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    mixed_lora_linear(x, w, adapters, index)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed_lora_linear(x, w, adapters, index)
        print("no host sync in the second call")
    except Exception:
        traceback.print_exc()
    torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mixed_lora_linear(x, w, adapters, index)
    torch.cuda.current_stream().wait_stream(s)
    try:
        with torch.cuda.graph(g):
            y = mixed_lora_linear(x, w, adapters, index)
        g.replay()
        torch.cuda.synchronize()
        print("captured and replayed")
    except Exception:
        traceback.print_exc()
