"""Argument checks shared by the layers and functions: each raises a ``TypeError`` / ``ValueError`` that names the
argument and what was expected, and returns the value in the type the code uses."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_rank(r, name) -> int:
    """``r`` as an int if it is a positive integral number (``numpy.int64`` included, bool not)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{name}: expected a positive int, got {r!r}")
    return int(r)


def check_finite(value, name) -> float:
    """``value`` if it is a finite real number (not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return value


def check_float_dtype(dtype, name):
    """Raises unless ``dtype`` is ``None`` or one of FLOAT_DTYPES (the layers' parameters are trained in it)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected one of bfloat16, float16, float32, float64 (or None), got {dtype!r}")


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s version counter (in-place writes bump it), -1 for an inference tensor (which has none): the key of
    the caches that read a tensor's values once per version."""
    return -1 if t.is_inference() else t._version
