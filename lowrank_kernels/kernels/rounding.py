"""fp32 -> output dtype conversion with exact round-to-nearest-even, identical on the GPU and in the interpreter.

Triton's interpreter rounds fp32 -> bf16 half-up, not to nearest even; doing the bf16 rounding on the bit
pattern gives the same answer everywhere (and costs a few integer ops in memory-bound kernels).
"""
import triton
import triton.language as tl


@triton.jit
def round_fp32_to(x, dtype: tl.constexpr):
    """Round an fp32 tensor to ``dtype`` (bf16, fp16 or fp32), ties to even; NaN stays NaN."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
