"""``prepare_for_inference(model)``: the NF4 layers of a model read their weights in an inference form.

Serving decodes a few rows per call, where a layer's time is the time to stream its weight. bitsandbytes' double
quantization stores each block's scale as a uint8 index into a 256-entry table plus a per-256-blocks fp32 scale
and an offset; a decode kernel rebuilds every block's scale from those (two dependent loads) while it streams the
weight. The inference form rebuilds them once: an fp32 scale per block (:meth:`NF4Weight.with_flat_scales`), the
packed nibbles shared. Every kernel computes the same fp32 scale either way, so outputs (and gradients) are
bit-identical. The cost: a kernel reads 4 bytes of scale per block of 64 weights instead of about 1, and the layer
holds those fp32 scales (1/8 of the packed weight's size) beside bitsandbytes' tensors, which stay as they are
(``state_dict`` and ``save_pretrained`` write the same bytes).
"""
from torch import nn

__all__ = ["prepare_for_inference"]


def prepare_for_inference(model: nn.Module, enabled: bool = True) -> int:
    """Sets (or with ``enabled=False`` clears) the inference form of every layer of ``model`` that has one: our
    ``QLoraLinear`` / ``AdaLoraLinear`` over NF4 weights and the converted peft 4-bit layers
    (``lowrank_kernels.peft.convert``). Returns how many layers it set. Layers keep it through ``train()`` /
    ``eval()`` (it changes no result), and rebuild it when their scales are reloaded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    count = 0
    for module in model.modules():
        setter = getattr(module, "set_inference_form", None)
        if callable(setter) and setter(enabled):
            count += 1
    return count
