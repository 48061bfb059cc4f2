"""Host time of the launchers' own Python (the kernel launches replaced by no-ops), on any machine (no GPU needed).

    TRITON_INTERPRET=1 python scripts/host_python_cost.py

Times ``nf4_gemv`` (the decode layer call: validation, config, allocations, launch arguments) and
``nf4_dequantize`` with their Triton launches stubbed out, so it measures only our code and the torch calls it
makes (on CPU tensors: allocation costs differ from CUDA's). Prints the median of 7 rounds of 3000 calls.
"""
import platform
import statistics
import time

import torch
import triton

import lowrank_kernels.kernels.nf4_dequant as dq
import lowrank_kernels.kernels.nf4_gemv as gemv
from lowrank_kernels import NF4Weight
from lowrank_kernels.dispatch import _nf4_state


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us(fn, rounds=7, calls=3000):
    for _ in range(500):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times), min(times)


def main():
    gemv.nf4_gemv_kernel = gemv.nf4_gemv_finish_kernel = _NoLaunch()
    dq.nf4_dequant_words_kernel = dq.nf4_dequant_kernel = _NoLaunch()
    w = NF4Weight.quantize(torch.randn(256, 256))
    st = _nf4_state(w)
    x = torch.randn(1, 256)
    A, B = torch.randn(16, 256), torch.randn(256, 16)
    rows = [("nf4_gemv M=1 (two launches stubbed)", lambda: gemv.nf4_gemv(x, st, A, B, 2.0)),
            ("nf4_dequantize (launch stubbed)", lambda: dq.nf4_dequantize(
                w.packed, w.absmax, w.code, (256, 256), 64, torch.bfloat16, w.absmax2, w.code2, w.offset, 256))]
    print(f"{platform.processor() or platform.machine()}  torch {torch.__version__}  triton {triton.__version__}")
    for name, fn in rows:
        med, best = host_us(fn)
        print(f"{name:40} {med:6.1f} us host per call (min {best:.1f})")


if __name__ == "__main__":
    main()
