"""Host time per call of the dequant launch paths and of small aten ops (GPU work kept tiny).

    python experiments/host_launch_cost.py
"""
import traceback

import torch
import triton

from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels.nf4_dequant import nf4_dequant_words_kernel, nf4_dequantize

from host_timing import host_us


def main():
    w = NF4Weight.quantize(torch.randn(512, 512, device="cuda", dtype=torch.bfloat16))
    n = w.numel()
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    grid = (triton.cdiv(n // 64, 32),)
    args = (w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, out, n // 8)
    meta = dict(BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256, ROWS=32, SHFL=True)
    kernel = nf4_dequant_words_kernel[grid](*args, **meta, num_warps=4, enable_fp_fusion=False)
    ref = w.dequantize(backend="torch").view(-1)
    assert torch.equal(out, ref)
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    f = torch.randn(16, 256, device="cuda")
    rows = [
        ("NF4Weight.dequantize()", lambda: w.dequantize()),
        ("kernels.nf4_dequantize (launcher)", lambda: nf4_dequantize(
            w.packed, w.absmax, w.code, (n,), 64, torch.bfloat16, w.absmax2, w.code2, w.offset, 256)),
        ("JIT launch kernel[grid](...)", lambda: nf4_dequant_words_kernel[grid](
            *args, **meta, num_warps=4, enable_fp_fusion=False)),
        ("torch.mm 256x256 bf16", lambda: torch.mm(a, a)),
        ("torch.addmm 256x256 bf16, alpha", lambda: torch.addmm(a, a, a, beta=0, alpha=2.0)),
        ("fp32 -> bf16 .to (16x256)", lambda: f.to(torch.bfloat16)),
        ("torch.empty 1 MB", lambda: torch.empty(n, device="cuda", dtype=torch.bfloat16)),
    ]
    # the decode layer call (two launches), with and without the TMA descriptors (built per call)
    from lowrank_kernels.dispatch import _nf4_state
    from lowrank_kernels.kernels.nf4_gemv import nf4_gemv

    wd = NF4Weight.quantize(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    st = _nf4_state(wd)
    A, B = torch.randn(16, 4096, device="cuda"), torch.randn(4096, 16, device="cuda")
    for m in (1, 16):
        xm = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        rows.append((f"nf4_gemv M={m} default (eager)", lambda xm=xm: nf4_gemv(xm, st, A, B, 2.0)))
        rows.append((f"nf4_gemv M={m} tma=True", lambda xm=xm: nf4_gemv(xm, st, A, B, 2.0, tma=True, num_stages=3)))
        rows.append((f"nf4_gemv M={m} tma=True, x_tma=False", lambda xm=xm: nf4_gemv(
            xm, st, A, B, 2.0, tma=True, num_stages=3, x_tma=False)))
    try:
        runner = kernel[(grid[0], 1, 1)]  # the runner indexes all three grid dimensions
        out.zero_()
        runner(*args, *meta.values())
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
        rows.append(("CompiledKernel[grid](all args)", lambda: runner(*args, *meta.values())))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"direct launch (all args) failed: {type(e).__name__}: {e}")
        traceback.print_exc()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for name, fn in rows:
        print(f"{name:40} {host_us(fn, 3000, warmup=100)[0]:7.1f} us host per call")


if __name__ == "__main__":
    main()
