"""Read bandwidth of NF4-decode access patterns (experiments/probe/read_probe.cu): µs per read of a packed [N, K/2]
uint8 weight, CUDA-graph replay over 8 copies. Usage: python experiments/probe/read_probe.py"""
import ctypes
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import copy_bandwidth, time_us  # noqa: E402

src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "read_probe.cu")
lib_path = os.path.join(tempfile.mkdtemp(), "probe.so")
subprocess.run(["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90,code=sm_90",
                "-o", lib_path, src], check=True)
lib = ctypes.CDLL(lib_path)
fn = lib.lk_read_probe
fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
               ctypes.c_void_p]
bw = copy_bandwidth()
print(f"# {torch.cuda.get_device_name()} copy {bw / 1e9:.0f} GB/s; patterns: A 8B/lane 32B/row/instr, "
      f"B 16B/lane 64B/row/instr, C 512B/row/instr, D as B with 512B/row/group")
out = torch.empty(1 << 22, dtype=torch.int32, device="cuda")
for K, N in [(4096, 4096), (4096, 14336), (14336, 4096)]:
    ws = [torch.randint(0, 255, (N * K // 2,), dtype=torch.uint8, device="cuda") for _ in range(8)]
    nbytes = N * K // 2
    t_copy, _ = time_us([lambda w=w: w.clone() for w in ws])
    line = f"{K:>5}->{N:<5} clone {t_copy:6.1f} µs ({200 * nbytes / (t_copy * 1e-6) / bw:3.0f}%)"
    print(line)
    for pat, name in enumerate("ABCD"):
        cells = []
        for split in (1, 2, 4, 8):
            stream = torch.cuda.current_stream().cuda_stream
            t, _ = time_us([lambda w=w, s=split: fn(pat, w.data_ptr(), N, K, s, out.data_ptr(),
                                                    torch.cuda.current_stream().cuda_stream) for w in ws])
            cells.append(f"split {split}: {t:6.1f} µs {100 * nbytes / (t * 1e-6) / bw:3.0f}%")
        print(f"{K:>5}->{N:<5} {name}  " + " | ".join(cells))
