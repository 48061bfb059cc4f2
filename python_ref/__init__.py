"""Pure-PyTorch reference implementations: slow, obviously correct, the oracle for every test.

Nothing here imports Triton. ``lowrank_kernels`` also uses these functions as its CPU (torch) backend.
"""
from python_ref.nf4 import (
    NF4_CODE,
    dequantize_absmax,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    double_quantize_absmax,
    dynamic_map_signed,
    quantize_blockwise_8bit,
    quantize_nf4,
)
from python_ref.lora import lora_backward, lora_forward
from python_ref.adalora import adalora_forward
from python_ref.dora import dora_forward, dora_weight_norm
from python_ref.mixed import mixed_lora_forward, mixed_lora_forward_segments, rows_of, segments_of

__all__ = [
    "NF4_CODE",
    "dequantize_absmax",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "double_quantize_absmax",
    "dynamic_map_signed",
    "quantize_blockwise_8bit",
    "quantize_nf4",
    "lora_forward",
    "lora_backward",
    "adalora_forward",
    "dora_forward",
    "dora_weight_norm",
    "mixed_lora_forward",
    "mixed_lora_forward_segments",
    "rows_of",
    "segments_of",
]
