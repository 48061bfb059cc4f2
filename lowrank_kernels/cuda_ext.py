"""Builds and loads the CUDA C++ kernels of ``csrc/``: ``nvcc`` compiles a source file into a shared library for
the current GPU's architecture on first use (a few seconds), cached under ``$LOWRANK_KERNELS_CACHE`` (default
``~/.cache/lowrank_kernels``) by a hash of the source and the headers of ``csrc/``, the nvcc version and the
architecture; the kernels are called through ``ctypes`` on PyTorch's current stream (so CUDA-graph capture works
as for any launch).

``LOWRANK_KERNELS_NVCC_FLAGS`` adds nvcc flags (e.g. ``-G`` for cuda-gdb). Without ``nvcc`` (looked up as
``$CUDA_HOME/bin/nvcc``, then on ``PATH``), or with ``LOWRANK_KERNELS_CUDA=0``, :func:`library` returns ``None``
and the dispatcher keeps the Triton kernels. A failed build warns once.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (str(Path("/usr/local/cuda/bin/nvcc"))
                                    if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def enabled() -> bool:
    return os.environ.get("LOWRANK_KERNELS_CUDA", "1") != "0"


@functools.lru_cache(maxsize=None)
def library(name: str, capability: tuple):
    """The ``ctypes.CDLL`` of ``csrc/<name>.cu`` built for compute ``capability`` (e.g. ``(9, 0)``), or ``None``
    when it cannot be built here."""
    src = CSRC / f"{name}.cu"
    nvcc = _nvcc()
    if not enabled() or nvcc is None or not src.is_file():
        return None
    arch = f"{capability[0]}{capability[1]}"
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        flags = os.environ.get("LOWRANK_KERNELS_NVCC_FLAGS", "").split()
        headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.cuh")))  # what the sources include
        key = hashlib.sha256(src.read_bytes() + headers + version.encode() + arch.encode()
                             + " ".join(flags).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("LOWRANK_KERNELS_CACHE", Path.home() / ".cache" / "lowrank_kernels"))
        lib = cache / f"{name}-sm{arch}-{key}.so"
        if not lib.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / lib.name
                cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo",
                       f"-gencode=arch=compute_{arch},code=sm_{arch}", *flags, "-o", str(out), str(src)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
                os.replace(out, lib)  # atomic: concurrent builders race harmlessly
        return ctypes.CDLL(str(lib))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"lowrank_kernels: could not build csrc/{name}.cu ({e}); using the Triton kernels instead")
        return None


def function(name: str, symbol: str, argtypes, device_index: int):
    """The host entry point ``symbol`` of ``csrc/<name>.cu`` (``argtypes``, returning a ``cudaError_t`` as int) for
    CUDA device ``device_index`` (callers cache it), or ``None``: compute capability below 8.0 (the kernels here
    use mma.m16n8k16 with bf16 operands) or no build (:func:`library`)."""
    import torch

    cap = torch.cuda.get_device_capability(device_index)
    lib = library(name, cap) if cap[0] >= 8 else None
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn
