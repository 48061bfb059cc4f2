"""Sweep the NF4 dequant kernel's launch knobs on the GPU (CUDA-graph replay), checking each is bit-exact.

    python scripts/tune_dequant.py   -> a table of µs and % of copy bandwidth per (shape, elements, warps)
"""
import itertools

import torch
import triton

from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # [out_features, in_features]


def main():
    n = 1 << 30
    src, dst = torch.empty(n // 4, device="cuda"), torch.empty(n // 4, device="cuda")
    copy_bw = 2 * n / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    fill_bw = n / (triton.testing.do_bench(lambda: dst.fill_(1.0), return_mode="median") * 1e-3)
    print(f"{torch.cuda.get_device_name()}  copy {copy_bw / 1e9:.0f} GB/s, write-only fill {fill_bw / 1e9:.0f} GB/s")
    print("shape          elems warps   µs    %copy")
    for shape in SHAPES:
        ws = [NF4Weight.quantize(torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
        ref = ws[0].dequantize()
        nbytes = ws[0].nbytes() + ws[0].numel() * 2
        for elems, warps in itertools.product([1024, 2048, 4096, 8192], [1, 2, 4]):
            def call(w):
                return nf4_dequantize(w.packed, w.absmax, w.code, w.numel(), w.blocksize, torch.bfloat16,
                                      w.absmax2, w.code2, w.offset, w.nested_blocksize,
                                      elements_per_program=elems, num_warps=warps)
            assert torch.equal(call(ws[0]).view(shape), ref), (shape, elems, warps)
            ms = triton.testing.do_bench_cudagraph(lambda: [call(w) for w in ws]) / len(ws)
            print(f"{str(shape):14} {elems:5} {warps:5} {ms * 1e3:6.1f} {100 * nbytes / (ms * 1e-3) / copy_bw:6.0f}%")


if __name__ == "__main__":
    main()
