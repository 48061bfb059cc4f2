"""The ``tl.dot`` every kernel here uses: Triton's interpreter computes ``tl.dot`` on bf16 operands wrongly, so
kernels launched under ``TRITON_INTERPRET=1`` with bf16 inputs pass ``DOT_FP32`` and the operands are upcast
(exactly) to fp32 first."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulator); ``INPUT_PRECISION`` applies to fp32 operands on the GPU."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
