"""lowrank_kernels: fused kernels for LoRA / QLoRA / AdaLoRA fine-tuning on NVIDIA GPUs."""
from lowrank_kernels.nf4 import NF4Weight
from lowrank_kernels.functional import lora_linear, qlora_linear
from lowrank_kernels.layers import LoraLinear, QLoraLinear
from lowrank_kernels.adalora import AdaLoraLinear, adalora_linear, pack_mask, unpack_mask
from lowrank_kernels.rank_allocator import RankAllocator, orthogonal_regularization
from lowrank_kernels.dora import dora_linear
from lowrank_kernels.inference import prepare_for_inference

__version__ = "0.1.0"
__all__ = ["NF4Weight", "lora_linear", "qlora_linear", "LoraLinear", "QLoraLinear", "AdaLoraLinear",
           "adalora_linear", "pack_mask", "unpack_mask", "RankAllocator", "orthogonal_regularization", "dora_linear",
           "prepare_for_inference"]
