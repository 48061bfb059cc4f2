"""nn.Module plumbing for a base weight held as an ``NF4Weight`` attribute (not a Parameter): move it with the
module, and (de)serialize it under bitsandbytes' keys (``weight``, ``weight.absmax``, ...)."""
from lowrank_kernels.nf4 import NF4Weight


def moved(nf4: NF4Weight, fn) -> NF4Weight:
    """``nf4`` as ``Module._apply``'s ``fn`` leaves it: moved (``.to()``, ``.cuda()``, ``.to_empty()``), never cast
    (dtype casts leave NF4 bytes untouched). Call it before ``super()._apply``: if it raises, nothing has moved."""
    return nf4.apply(fn)


def save(nf4: NF4Weight, destination, prefix, keep_vars):
    for key, value in nf4.state_dict(prefix + "weight").items():
        destination[key] = value if keep_vars else value.detach()


def load(nf4: NF4Weight, state_dict, prefix, local_metadata, missing_keys, error_msgs):
    """``(the NF4Weight to keep, the rest of state_dict)``: reads ``prefix + "weight*"`` onto ``nf4``'s device, or
    keeps the checkpoint's tensors as they are under ``load_state_dict(assign=True)`` (how a model built on the
    meta device gets its storage), reporting a missing, unreadable or wrongly shaped weight the way
    ``Module.load_state_dict`` does."""
    keys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
    rest = {k: v for k, v in state_dict.items() if k not in keys}
    if prefix + "weight" not in state_dict:
        missing_keys.append(prefix + "weight")
        return nf4, rest
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    try:
        loaded = NF4Weight.from_state_dict({k: state_dict[k] for k in keys}, prefix + "weight",
                                           device=None if assign else nf4.device)
    except (KeyError, TypeError, ValueError) as e:
        error_msgs.append(f"{prefix}weight: {e}")
        return nf4, rest
    if tuple(loaded.shape) != tuple(nf4.shape):
        error_msgs.append(f"{prefix}weight: shape {tuple(loaded.shape)} in the checkpoint, {tuple(nf4.shape)} in "
                          "the layer")
        return nf4, rest
    return loaded, rest
