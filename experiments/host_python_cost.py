"""Host time of the launchers' own Python (the kernel launches replaced by no-ops), on any machine (no GPU needed).

    TRITON_INTERPRET=1 python experiments/host_python_cost.py

Times ``nf4_gemv`` (the decode layer call: validation, config, allocations, launch arguments) and
``nf4_dequantize`` with their Triton launches stubbed out, so it measures only our code and the torch calls it
makes (on CPU tensors: allocation costs differ from CUDA's), and the call key that ``kernels.launch.launch``
computes for each direct launch (of the arguments those calls pass). Prints the median of 7 rounds of 3000 calls.
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
from lowrank_kernels.kernels.launch import _call_key, _layout


CALLS = {}


def _no_launch(kernel, grid, args, **options):
    CALLS[kernel] = (args, options)  # the last call's arguments (only: keeping them all would keep every output)


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
    gemv.launch = dq.launch = _no_launch
    w = NF4Weight.quantize(torch.randn(256, 256))
    st = _nf4_state(w)
    x = torch.randn(1, 256)
    A, B = torch.randn(16, 256), torch.randn(256, 16)
    rows = [("nf4_gemv M=1 (two launches stubbed)", lambda: gemv.nf4_gemv(x, st, A, B, 2.0)),
            ("nf4_dequantize (launch stubbed)", lambda: dq.nf4_dequantize(
                w.packed, w.absmax, w.code, (256, 256), 64, torch.bfloat16, w.absmax2, w.code2, w.offset, 256))]
    gemv.nf4_gemv(x, st, A, B, 2.0)
    main_args, main_options = CALLS[gemv.nf4_gemv_kernel]
    layout = _layout(gemv.nf4_gemv_kernel, main_args)
    rows.append(("launch key of the nf4_gemv main kernel",
                 lambda: _call_key(layout, main_args, tuple(main_options.items()))))
    print(f"{platform.processor() or platform.machine()}  torch {torch.__version__}  triton {triton.__version__}")
    for name, fn in rows:
        med, best = host_us(fn)
        print(f"{name:40} {med:6.1f} us host per call (min {best:.1f})")


if __name__ == "__main__":
    main()
