"""Builds and loads the CUDA C++ kernels of ``lowrank_kernels/csrc/`` (shipped inside the package) as PyTorch
operators. Kernel ``<name>`` is ``csrc/<name>.cu`` (the kernels and a plain host entry point, ``csrc/nf4_entry.h``)
and ``csrc/<name>_op.cpp`` (the operator ``torch.ops.lowrank_kernels.<name>``: ``TORCH_LIBRARY_FRAGMENT`` /
``TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m)``; its launcher ``kernels/<name>.py`` registers the fake
implementation). :func:`build` compiles them with :func:`torch.utils.cpp_extension.load` (nvcc, ninja) on first use,
for the compute capabilities of the visible GPUs (``-gencode=arch=compute_XY,code=sm_XY`` each; nvcc flags
``-O3 -std=c++17 -lineinfo``, and the half / bfloat16 operators that PyTorch's extension flags switch off switched
back on, so that the kernels compile as plain nvcc compiles them), and loads the library, which registers the
operators. They launch on PyTorch's current stream (CUDA-graph capture works as for any launch).

The build is cached under ``$LOWRANK_KERNELS_CACHE`` (default: PyTorch's extension folder,
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), one folder per kernel, architectures and toolchain
(PyTorch, CUDA, Python, nvcc versions, extra flags); ninja rebuilds what a changed source or header
(``nf4_common.cuh``, ``nf4_entry.h``) touches. ``LOWRANK_KERNELS_NVCC_FLAGS`` adds nvcc flags (e.g. ``-G`` for
cuda-gdb, or the ``-D`` knobs of ``nf4_merge_mma.cu``); ``LOWRANK_KERNELS_VERBOSE=1`` shows the build.

Where the kernels cannot be built (``LOWRANK_KERNELS_CUDA=0``, a PyTorch without CUDA, no nvcc, no ninja, a GPU
below compute capability 8.0) :func:`op` returns ``None``, the callers keep the Triton kernels, and the first such
call logs why, once per process, at INFO level on the ``lowrank_kernels`` logger (:func:`unavailable_reason` says
it too). A build that fails (a compiler error) warns once per kernel, with the compiler's output.
"""
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
NAMESPACE = "lowrank_kernels"  # torch.ops.lowrank_kernels.<name>
MIN_CAPABILITY = (8, 0)  # mma.m16n8k16 with bf16 operands
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo",
              # PyTorch's extension builder defines these (its own half types need them); the kernels here use
              # only intrinsics, and undoing them keeps the compilation that of a plain nvcc build
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_HALF2_OPERATORS__")
CXX_FLAGS = ("-O3",)

logger = logging.getLogger("lowrank_kernels")
_lock = threading.Lock()
_noted = False  # the "not built" line was logged (once per process)
_loaded = {}  # kernel name -> the library loaded in this process (a second one would register its operator twice)


def source_dir() -> Path:
    """The folder of the CUDA C++ sources (``lowrank_kernels/csrc`` of the installed package)."""
    return CSRC


def sources(name: str) -> list:
    """The source files of kernel ``name``: ``csrc/<name>.cu`` and its operator ``csrc/<name>_op.cpp``."""
    return [CSRC / f"{name}.cu", CSRC / f"{name}_op.cpp"]


def enabled() -> bool:
    """The switch ``LOWRANK_KERNELS_CUDA=0`` (read by ``policy``) is not set."""
    from lowrank_kernels import policy

    return policy.USE_CUDA_KERNELS


def _nvcc():
    """The nvcc that PyTorch's extension builder will run (``$CUDA_HOME/bin/nvcc``), or ``None``."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home) / "bin" / "nvcc" if home else None
    return str(nvcc) if nvcc is not None and nvcc.is_file() else None


def ninja_dir():
    """The folder of a ``ninja`` that is not on ``PATH`` (the venv's, or the ``ninja`` package's), or ``None``."""
    for d in (Path(sys.executable).parent, _ninja_package_dir()):
        if d is not None and (d / "ninja").is_file():
            return d
    return None


def _ninja_package_dir():
    try:
        import ninja
    except ImportError:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    return Path(bin_dir) if bin_dir else None


def unavailable_reason():
    """Why the CUDA C++ kernels cannot be built in this process, or ``None`` when they can (a GPU's compute
    capability and the build itself are checked later, by :func:`op` and :func:`build`)."""
    if not enabled():
        return "switched off by LOWRANK_KERNELS_CUDA=0"
    import torch

    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is not a CUDA build"
    try:
        nvcc = _nvcc()
    except Exception as e:  # torch.utils.cpp_extension imports setuptools (missing, or at odds with distutils)
        return f"torch.utils.cpp_extension cannot be imported ({type(e).__name__}: {e})"
    if nvcc is None:
        return "no CUDA toolkit: nvcc not found (set CUDA_HOME, or put nvcc on PATH)"
    if shutil.which("ninja") is None and ninja_dir() is None:
        return "ninja not found (pip install ninja)"
    return None


def _note(reason: str) -> None:
    global _noted
    if not _noted:
        _noted = True
        logger.info("lowrank_kernels: the CUDA C++ kernels (csrc/) are not built: %s; the Triton kernels run "
                    "instead", reason)


def archs() -> tuple:
    """The distinct compute capabilities >= 8.0 of the visible GPUs, e.g. ``("90",)``."""
    import torch

    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return tuple(f"{a}{b}" for a, b in sorted(c for c in caps if c >= MIN_CAPABILITY))


def _user_flags() -> list:
    return os.environ.get("LOWRANK_KERNELS_NVCC_FLAGS", "").split()


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build_directory(name: str, archs: tuple) -> Path:
    """Where kernel ``name`` for ``archs`` is built: ``$LOWRANK_KERNELS_CACHE``, else PyTorch's extension root,
    then a folder per kernel, architectures and toolchain (so that a new PyTorch, CUDA, nvcc or flags never reuse
    objects built with the old ones)."""
    import torch
    from torch.utils import cpp_extension

    root = (os.environ.get("LOWRANK_KERNELS_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
            or cpp_extension.get_default_build_root())
    nvcc = _nvcc() or ""
    key = "\n".join([torch.__version__, str(torch.version.cuda), sys.version, nvcc, _nvcc_version(nvcc),
                     " ".join(_user_flags())])
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(root) / f"{_ext_name(name, archs)}-{tag}"


def _ext_name(name: str, archs: tuple) -> str:
    return f"{NAMESPACE}_{name}_sm{'_'.join(archs)}"


@functools.lru_cache(maxsize=None)
def build(name: str):
    """Build (cached on disk) and load kernel ``name``, which registers its operator
    ``torch.ops.lowrank_kernels.<name>``. The path of the loaded library, or ``None``: not buildable here (logged
    once, :func:`unavailable_reason`) or the build failed (warns). A process loads one library per kernel: once one
    is loaded, later calls (after ``build.cache_clear()``, other flags) return it."""
    reason = unavailable_reason()
    capabilities = () if reason else archs()
    if reason is None and not capabilities:
        reason = f"no visible GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    missing = [str(s) for s in sources(name) if not s.is_file()]
    if reason is None and missing:
        reason = f"sources missing: {', '.join(missing)}"
    if reason is not None:
        _note(reason)
        return None
    from torch.utils import cpp_extension

    flags = [*NVCC_FLAGS, *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in capabilities), *_user_flags()]
    with _lock:  # cpp_extension.load is not thread-safe (its version table); other processes: its file lock
        if name in _loaded:
            return _loaded[name]
        directory = build_directory(name, capabilities)
        ninja = ninja_dir() if shutil.which("ninja") is None else None
        path = os.environ.get("PATH", "")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if ninja is not None:
                os.environ["PATH"] = f"{ninja}{os.pathsep}{path}"
            _loaded[name] = cpp_extension.load(
                name=_ext_name(name, capabilities), sources=[str(s) for s in sources(name)], extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=flags, build_directory=str(directory), with_cuda=True, is_python_module=False,
                verbose=os.environ.get("LOWRANK_KERNELS_VERBOSE", "0") not in ("", "0"))
            return _loaded[name]
        except Exception as e:  # a compiler error (RuntimeError with the build log), a load or registration error
            text = str(e)
            warnings.warn(f"lowrank_kernels: could not build csrc/{name}.cu in {directory} "
                          f"({type(e).__name__}: {text[-6000:]}); the Triton kernels run instead", stacklevel=2)
            return None
        finally:
            if ninja is not None:
                os.environ["PATH"] = path


@functools.lru_cache(maxsize=None)
def op(name: str, device_index: int, fake=None):
    """The operator ``torch.ops.lowrank_kernels.<name>.default`` for CUDA device ``device_index``, built on first
    use (:func:`build`), with ``fake`` (its implementation on fake / meta tensors) registered, or ``None``: compute
    capability below 8.0 (the kernels use mma.m16n8k16 with bf16 operands) or no build. Cached per device."""
    import torch

    cap = torch.cuda.get_device_capability(device_index)
    if cap < MIN_CAPABILITY:
        _note(f"cuda:{device_index} has compute capability {cap[0]}.{cap[1]} < "
              f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
        return None
    if build(name) is None:
        return None
    if fake is not None:
        register_fake(f"{NAMESPACE}::{name}", fake)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def device_index(device) -> int:
    """The index of a CUDA ``device`` (the current device for a bare ``"cuda"``)."""
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def register_fake(qualname: str, fn) -> None:
    """``torch.library.register_fake(qualname)(fn)``, once: a second registration (a reloaded launcher module)
    keeps the first."""
    import torch

    try:
        torch.library.register_fake(qualname)(fn)
    except RuntimeError as e:
        if "already has" not in str(e) and "already registered" not in str(e):
            raise
