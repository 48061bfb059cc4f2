"""NF4 code lookup for packed 32-bit words: the 8 nibbles of a word to their fp32 code values, in element order.

A word holds elements ``8w ... 8w + 7`` of the flat NF4 stream (little-endian; element ``2j`` is the high nibble of
byte ``j``). On the GPU the lookup is a warp shuffle (inline PTX, one shift and one ``shfl`` per element); the
interpreter, which cannot run inline PTX, and ``SHFL=False`` use a global-memory gather of the 16-entry table.
"""
import triton
import triton.language as tl

from lowrank_kernels.kernels.rounding import round_fp32_to

# NF4 code lookup by warp shuffle. Input $8: a packed word; its elements 0..7 sit in nibbles [4:8), [0:4), [12:16),
# [8:12), [20:24), [16:20), [28:32), [24:28) (element 2j is the high nibble of byte j). Input $9: the address of the
# fp32 code table; each lane loads code[lane % 16] (ptxas keeps one such load per loop iteration for all blocks).
# shfl.sync.idx with c = 0x101f (segment mask 0x10, as CUDA's __shfl_sync(..., width=16) encodes it) reads lane
# (lane & 16) | (b & 15): the bits of b above the nibble are ignored, so no masking. Outputs $0..$7: code[element
# 0..7]. All 32 lanes execute it (the kernel has no divergent control flow around it), and the result does not
# depend on which lane holds which element, so Triton may place it in any layout.
_SHFL_LOOKUP_ASM = tl.constexpr("""
{
.reg .b32 ln, tb, s;
.reg .b64 ad;
mov.u32 ln, %laneid;
and.b32 ln, ln, 15;
mul.wide.u32 ad, ln, 4;
add.s64 ad, ad, $9;
ld.global.nc.b32 tb, [ad];
shr.u32 s, $8, 4;
shfl.sync.idx.b32 $0, tb, s, 0x101f, -1;
shfl.sync.idx.b32 $1, tb, $8, 0x101f, -1;
shr.u32 s, $8, 12;
shfl.sync.idx.b32 $2, tb, s, 0x101f, -1;
shr.u32 s, $8, 8;
shfl.sync.idx.b32 $3, tb, s, 0x101f, -1;
shr.u32 s, $8, 20;
shfl.sync.idx.b32 $4, tb, s, 0x101f, -1;
shr.u32 s, $8, 16;
shfl.sync.idx.b32 $5, tb, s, 0x101f, -1;
shr.u32 s, $8, 28;
shfl.sync.idx.b32 $6, tb, s, 0x101f, -1;
shr.u32 s, $8, 24;
shfl.sync.idx.b32 $7, tb, s, 0x101f, -1;
}
""")


@triton.jit
def _nib_load(nibs, byte: tl.constexpr, code_ptr):
    """``code[nibble]`` for the nibble in byte ``byte`` of each word of ``nibs`` (global-memory gather)."""
    if byte == 0:
        nib = nibs & 0xFF
    elif byte == 3:
        nib = nibs >> 24
    else:
        nib = (nibs >> (8 * byte)) & 0xFF
    return tl.load(code_ptr + nib)


@triton.jit
def nf4_word_codes(w, code_ptr, SHFL: tl.constexpr):
    """``code[nibble]`` (fp32) for the 8 nibble positions of every packed word of ``w``: 8 tensors shaped like
    ``w``, element ``e`` of each word in the ``e``-th."""
    if SHFL:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            asm=_SHFL_LOOKUP_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,l",
            args=[w, code_ptr.to(tl.int64)], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        hi = (w >> 4) & 0x0F0F0F0F  # elements 0, 2, 4, 6, one per byte
        lo = w & 0x0F0F0F0F  # elements 1, 3, 5, 7
        c0 = _nib_load(hi, 0, code_ptr)
        c1 = _nib_load(lo, 0, code_ptr)
        c2 = _nib_load(hi, 1, code_ptr)
        c3 = _nib_load(lo, 1, code_ptr)
        c4 = _nib_load(hi, 2, code_ptr)
        c5 = _nib_load(lo, 2, code_ptr)
        c6 = _nib_load(hi, 3, code_ptr)
        c7 = _nib_load(lo, 3, code_ptr)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def nf4_word_values(w, am, code_ptr, dtype: tl.constexpr, SHFL: tl.constexpr):
    """The 8 elements of every packed word of ``w`` dequantized, ``round_to_dtype(fp32(code[nibble] * am))``
    (``am``: fp32 scales broadcastable to ``w``), in element order: shape ``[*w.shape, 2, 2, 2]``, element
    ``4i + 2j + l`` of a word at ``[..., i, j, l]`` (reshape the last four axes to ``8 * w.shape[-1]``)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_word_codes(w, code_ptr, SHFL)
    d0, d1, d2, d3 = round_fp32_to(c0 * am, dtype), round_fp32_to(c1 * am, dtype), round_fp32_to(c2 * am, dtype), \
        round_fp32_to(c3 * am, dtype)
    d4, d5, d6, d7 = round_fp32_to(c4 * am, dtype), round_fp32_to(c5 * am, dtype), round_fp32_to(c6 * am, dtype), \
        round_fp32_to(c7 * am, dtype)
    # tl.join appends the new axis last
    return tl.join(tl.join(tl.join(d0, d4), tl.join(d2, d6)), tl.join(tl.join(d1, d5), tl.join(d3, d7)))
