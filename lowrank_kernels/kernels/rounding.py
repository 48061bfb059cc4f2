"""fp32 -> output dtype conversion with exact round-to-nearest-even, identical on the GPU and in the interpreter.

On the GPU the native conversion (``cvt.rn``) already rounds to nearest even. Triton's interpreter rounds
fp32 -> bf16 half-up instead, so there (``TRITON_INTERPRET=1`` when this module is imported) the bf16
rounding is done on the bit pattern, which gives the GPU's answer.
"""
import os

import triton
import triton.language as tl

_BIT_ROUND_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_fp32_to(x, dtype: tl.constexpr):
    """Round an fp32 tensor to ``dtype`` (bf16, fp16 or fp32), ties to even."""
    if dtype == tl.bfloat16 and _BIT_ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
