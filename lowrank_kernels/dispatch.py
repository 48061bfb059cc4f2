"""The one place that chooses a backend (Triton on CUDA, pure torch elsewhere) for every op.

Callers pass format objects and plain tensors; this module unpacks them for the kernel launchers.
``backend=None`` picks by device; ``"torch"`` or ``"triton"`` force one (``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before Triton is imported, as the tests do).
"""
import python_ref

BACKENDS = ("torch", "triton")


def choose_backend(device, backend=None) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    return backend


def nf4_dequantize(w, dtype, backend=None):
    """Flat ``[n]`` tensor of ``dtype`` holding the dequantized NF4 weight ``w`` (an ``NF4Weight``)."""
    if choose_backend(w.device, backend) == "triton":
        from lowrank_kernels.kernels.nf4_dequant import nf4_dequantize as launch

        if w.nested:
            return launch(w.packed, w.absmax, w.code, w.numel(), w.blocksize, dtype, w.absmax2, w.code2,
                          w.offset, w.nested_blocksize)
        return launch(w.packed, w.absmax, w.code, w.numel(), w.blocksize, dtype)
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, (w.numel(),), w.blocksize, dtype)
