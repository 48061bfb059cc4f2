"""NF4 4-bit blockwise quantization with optional double quantization (bitsandbytes format).

Format (see shared DESIGN.md §3): a tensor of ``n`` elements is flattened row-major and cut into
blocks of ``blocksize`` consecutive elements. ``absmax[b] = max |x|`` over block ``b`` (fp32).
Element ``e`` stores the 4-bit index of the NF4 code nearest to ``x[e] * (1 / absmax[b])``
(ties go to the lower code). Byte ``j`` holds element ``2j`` in its high nibble and ``2j+1`` in its
low nibble; the packed tensor is uint8 of shape ``[(n + 1) // 2, 1]``.

Double quantization stores ``absmax - offset`` (``offset = mean(absmax)``) as uint8 indices into a
256-entry signed dynamic map, blockwise with its own fp32 scales ``absmax2``.

Dequantization, with exactly two fp32 roundings and no fused multiply-add:
    am[b] = fp32(fp32(code2[q[b]] * absmax2[b // nested_blocksize]) + offset)
    w[e]  = round_to_nearest_even_to_dtype(fp32(NF4_CODE[nibble(e)] * am[e // blocksize]))
"""
import math

import torch

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)


_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0


def dynamic_map_signed() -> torch.Tensor:
    """The 256-entry signed dynamic 8-bit map (fp32, sorted) used for double quantization.

    For exponent ``i`` in 0..6 there are ``2**i`` fraction values: the midpoints of
    ``linspace(0.1, 1, 2**i + 1)``, scaled by ``10**(i - 6)``, with both signs; plus 0 and 1.
    All arithmetic in fp32, as bitsandbytes builds it.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` (fp32 midpoints; a tie goes to the lower code)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def _blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    nblocks = math.ceil(x.numel() / blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x.abs()
    return padded.view(nblocks, blocksize).amax(dim=1)


def _scale_per_element(absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    return absmax.repeat_interleave(blocksize)[:n]


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise absmax quantization of a flat fp32 tensor to uint8 indices into ``code``.

    Returns ``(q uint8 [n], absmax fp32 [ceil(n / blocksize)])``.
    """
    x = x.reshape(-1).float()
    absmax = _blockwise_absmax(x, blocksize)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (x * _scale_per_element(inv, x.numel(), blocksize)).clamp(-1, 1)
    return _nearest_code(scaled, code.float()).to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Inverse of :func:`quantize_blockwise_8bit`: ``code[q] * absmax[i // blocksize]`` in fp32."""
    q = q.reshape(-1).long()
    return code.float()[q] * _scale_per_element(absmax.float(), q.numel(), blocksize)


def double_quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = 256):
    """Second quantization level. Returns ``(qabsmax uint8, absmax2 fp32, code2 fp32 [256], offset fp32 [])``."""
    offset = absmax.mean()
    code2 = dynamic_map_signed().to(absmax.device)
    q, absmax2 = quantize_blockwise_8bit(absmax - offset, code2, nested_blocksize)
    return q, absmax2, code2, offset


def dequantize_absmax(qabsmax, absmax2, code2, offset, nested_blocksize: int = 256) -> torch.Tensor:
    """``fp32(fp32(code2[q] * absmax2[b // nested_blocksize]) + offset)``: two separate fp32 roundings."""
    return dequantize_blockwise_8bit(qabsmax, absmax2, code2, nested_blocksize) + offset.float()


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64):
    """NF4-quantize any float tensor. Returns ``(packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)])``."""
    x = weight.reshape(-1).float()
    n = x.numel()
    absmax = _blockwise_absmax(x, blocksize)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (x * _scale_per_element(inv, n, blocksize)).clamp(-1, 1)
    idx = _nearest_code(scaled, NF4_CODE.to(x.device)).to(torch.uint8)
    if n % 2:  # the unused low nibble of the last byte holds the code of 0.0, as bitsandbytes writes it
        idx = torch.cat([idx, idx.new_full((1,), _ZERO_INDEX)])
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed.unsqueeze(1), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int, dtype: torch.dtype):
    """``round_to(dtype, NF4_CODE[nibble(e)] * absmax[e // blocksize])`` reshaped to ``shape``."""
    n = math.prod(shape)
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(flat.device)[idx] * _scale_per_element(absmax.float(), n, blocksize)
    return values.to(dtype).reshape(shape)
