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

        return launch(n=w.numel(), out_dtype=dtype, **_nf4_state(w))
    absmax = w.absmax
    if w.nested:
        absmax = python_ref.dequantize_absmax(w.absmax, w.absmax2, w.code2, w.offset, w.nested_blocksize)
    return python_ref.dequantize_nf4(w.packed, absmax, (w.numel(),), w.blocksize, dtype)


# The fused Triton GEMM is opt-in (backend="triton") until it beats dequantize + cuBLAS: on the H100 it is
# 3.7-4.7x dense bf16 at M <= 64 and 27-40x at M >= 256, where dequantize + cuBLAS is 1.26-2.98x
# (bench/results/bench-h100.md). The default on CUDA is therefore the unfused path.
FUSED_BY_DEFAULT = False


def _fused(device, backend) -> bool:
    chosen = choose_backend(device, backend)
    return chosen == "triton" and (backend == "triton" or FUSED_BY_DEFAULT)


def _nf4_state(w) -> dict:
    state = dict(packed=w.packed, absmax=w.absmax, code=w.code, blocksize=w.blocksize)
    if w.nested:
        state.update(absmax2=w.absmax2, code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize)
    return state


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None, backend=None, config=None):
    """``(Y [M, N], S [M, r])``: ``Y = x @ weight.T + scaling * S @ lora_B.T + bias``, ``S = x @ lora_A.T``.

    ``x [M, K]``; ``weight`` a dense ``[N, K]`` tensor; ``lora_A``, ``lora_B`` and ``bias`` already in
    ``x.dtype`` (inputs validated by the caller). All products in ``x.dtype`` with fp32 accumulation.
    ``config``: Triton tile overrides (see ``kernels.lora_matmul.default_config``); ignored by torch.
    """
    if _fused(x.device, backend):
        from lowrank_kernels.kernels.lora_matmul import lora_matmul

        return lora_matmul(x, lora_A, lora_B, scaling, bias, weight=weight, config=config)
    return python_ref.lora_forward(x, weight.to(x.dtype), lora_A, lora_B, scaling, bias)


def qlora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None, backend=None, config=None):
    """As :func:`lora_linear_forward` with ``weight`` an ``NF4Weight``, dequantized to ``x.dtype``.

    The Triton path dequantizes tiles in registers inside the GEMM; the torch path dequantizes the whole weight.
    """
    if _fused(x.device, backend):
        from lowrank_kernels.kernels.lora_matmul import lora_matmul

        return lora_matmul(x, lora_A, lora_B, scaling, bias, nf4=_nf4_state(weight), config=config)
    # unfused: one bit-exact dequant (Triton kernel on CUDA unless "torch" is forced), then cuBLAS / torch GEMMs
    w = nf4_dequantize(weight, x.dtype, backend).view(weight.shape)
    return python_ref.lora_forward(x, w, lora_A, lora_B, scaling, bias)
