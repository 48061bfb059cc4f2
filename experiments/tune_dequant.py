"""Sweep the NF4 dequant kernels' launch knobs on the GPU (CUDA-graph replay), checking each is bit-exact.

    python experiments/tune_dequant.py   -> a table of µs and % of copy bandwidth per (shape, kernel, elements, warps)

Every row times 8 weights dequantized back to back in one CUDA graph, replayed many times
(``triton.testing.do_bench_cudagraph``: the graph's launch latency is spread over all its calls). ``copy (same
bytes)`` is an SM elementwise kernel (``torch.neg``) reading and writing half of the bytes each, timed the same way.
"""
import itertools

import torch
import triton

from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # [out_features, in_features]
COPIES = 8


def main():
    n = 1 << 30
    src, dst = torch.empty(n // 4, device="cuda"), torch.empty(n // 4, device="cuda")
    copy_bw = 2 * n / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    fill_bw = n / (triton.testing.do_bench(lambda: dst.fill_(1.0), return_mode="median") * 1e-3)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device copy {copy_bw / 1e9:.0f} GB/s, write-only fill {fill_bw / 1e9:.0f} GB/s")
    print("shape          kernel  elems warps     µs   %copy")
    for shape in SHAPES:
        ws = [NF4Weight.quantize(torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(COPIES)]
        ref = ws[0].dequantize(backend="torch")
        nbytes = ws[0].nbytes() + ws[0].numel() * 2

        def row(label, ms):
            print(f"{str(shape):14} {label} {ms * 1e3:7.2f} {100 * nbytes / (ms * 1e-3) / copy_bw:6.1f}%")

        pairs = [(torch.randn(nbytes // 4, device="cuda", dtype=torch.bfloat16),
                  torch.empty(nbytes // 4, device="cuda", dtype=torch.bfloat16)) for _ in range(COPIES)]
        row(f"{'copy (same bytes)':24}", triton.testing.do_bench_cudagraph(
            lambda: [torch.neg(a, out=b) for a, b in pairs], return_mode="median") / COPIES)
        for kernel, elems, warps in [("bytes", 2048, 2)] + list(itertools.product(["words"], [1024, 2048, 4096, 8192],
                                                                                      [1, 2, 4, 8])):
            def call(w):
                return nf4_dequantize(w.packed, w.absmax, w.code, (w.numel(),), w.blocksize, torch.bfloat16,
                                      w.absmax2, w.code2, w.offset, w.nested_blocksize,
                                      elements_per_program=elems, num_warps=warps, kernel=kernel)
            assert torch.equal(call(ws[0]).view(shape), ref), (shape, kernel, elems, warps)
            ms = triton.testing.do_bench_cudagraph(lambda: [call(w) for w in ws], return_mode="median") / COPIES
            row(f"{kernel:7} {elems:5} {warps:5}", ms)


if __name__ == "__main__":
    main()
