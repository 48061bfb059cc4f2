"""``NF4Weight``: a bitsandbytes-compatible NF4 weight (packed nibbles + one or two levels of scales).

The format is bitsandbytes' own, bit for bit (see shared DESIGN.md §3 and ``python_ref/nf4.py``): a checkpoint
written by ``bnb.nn.Linear4bit`` loads here and back, and ``dequantize()`` equals
``bitsandbytes.functional.dequantize_4bit`` exactly.
"""
import json
import math

import torch

import python_ref
from lowrank_kernels import dispatch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: unknown dtype name {name!r}")
    return dtype


class NF4Weight:
    """An NF4-quantized tensor of ``shape`` (usually a linear weight ``[out_features, in_features]``).

    Fields (all on one device):
      packed       uint8 ``[(n + 1) // 2, 1]``, element ``2j`` in the high nibble of byte ``j``
      absmax       fp32 ``[nblocks]`` scales, or uint8 ``[nblocks]`` second-level indices when ``nested``
      code         fp32 ``[16]``, the NF4 code table
      absmax2      fp32 ``[ceil(nblocks / nested_blocksize)]`` (nested only)
      code2        fp32 ``[256]``, the signed dynamic map (nested only)
      offset       fp32 scalar, ``mean`` of the first-level scales (nested only)
    ``dtype`` is the dtype the weight had before quantization, and the default of ``dequantize()``.
    """

    def __init__(self, packed, absmax, shape, dtype, blocksize=64, code=None, absmax2=None, code2=None,
                 offset=None, nested_blocksize=256):
        self.packed = packed
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.code = python_ref.NF4_CODE.to(packed.device) if code is None else code
        self.absmax2 = absmax2
        self.code2 = code2
        self.offset = offset
        self.nested_blocksize = nested_blocksize
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a bf16/fp16/fp32 tensor: nearest NF4 code per element (ties to the lower code)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in DTYPES:
            raise TypeError(f"weight: expected dtype bfloat16, float16 or float32, got {weight.dtype}")
        if weight.numel() == 0:
            raise ValueError("weight: cannot quantize an empty tensor")
        if not torch.isfinite(weight).all():
            raise ValueError("weight: contains inf or NaN, which NF4 cannot represent")
        _check_blocksize(blocksize, "blocksize")
        packed, absmax = python_ref.quantize_nf4(weight.detach(), blocksize)
        if not double_quant:
            return cls(packed, absmax, weight.shape, weight.dtype, blocksize)
        qabsmax, absmax2, code2, offset = python_ref.double_quantize_absmax(absmax, 256)
        return cls(packed, qabsmax, weight.shape, weight.dtype, blocksize, absmax2=absmax2, code2=code2,
                   offset=offset, nested_blocksize=256)

    @classmethod
    def from_bnb(cls, packed, quant_state=None) -> "NF4Weight":
        """From a ``bnb.nn.Params4bit``, or from ``(packed, QuantState)`` as ``bnb.functional.quantize_4bit`` returns.

        Shares storage with the bitsandbytes tensors (no copy).
        """
        if quant_state is None:
            quant_state = getattr(packed, "quant_state", None)
            if quant_state is None:
                raise ValueError("from_bnb: packed has no .quant_state; pass a quantized Params4bit "
                                 "or (packed, quant_state)")
        quant_type = getattr(quant_state, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type: only 'nf4' is supported, got {quant_type!r}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"packed: expected uint8 storage, got {packed.dtype} (quant_storage other than "
                            "uint8 is not supported)")
        data = packed.detach().as_subclass(torch.Tensor)  # a plain tensor view of Params4bit's storage
        if quant_state.shape is None:
            raise ValueError("quant_state.shape: missing")
        nested = quant_state.state2 is not None
        if nested:
            state2 = quant_state.state2
            return cls(data, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize,
                       code=quant_state.code, absmax2=state2.absmax, code2=state2.code,
                       offset=quant_state.offset, nested_blocksize=state2.blocksize)
        return cls(data, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize,
                   code=quant_state.code)

    def to_bnb(self):
        """Returns ``(packed, bitsandbytes.functional.QuantState)`` sharing this object's tensors."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                           quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        return self.packed, state

    # ------------------------------------------------------------------ serialization
    def state_dict(self, key: str = "weight") -> dict:
        """The entries ``bnb.nn.Linear4bit`` writes for its weight, under ``key`` (e.g. ``"weight"``)."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        out = {key: self.packed, f"{key}.absmax": self.absmax, f"{key}.quant_map": self.code}
        if self.nested:
            out[f"{key}.nested_absmax"] = self.absmax2
            out[f"{key}.nested_quant_map"] = self.code2.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.offset.item())
        blob = json.dumps(meta).encode("utf-8")
        out[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict, key: str = "weight", device=None) -> "NF4Weight":
        """Inverse of :meth:`state_dict`; reads a ``bnb.nn.Linear4bit`` checkpoint's weight entries."""
        meta_key = f"{key}.quant_state.bitsandbytes__nf4"
        if meta_key not in state_dict:
            other = [k for k in state_dict if k.startswith(f"{key}.quant_state.")]
            if other:
                raise ValueError(f"state_dict: {other[0]!r} is not NF4; only 'nf4' is supported")
            raise KeyError(f"state_dict: missing {meta_key!r}")
        meta = json.loads(bytes(state_dict[meta_key].cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{meta_key}: quant_type must be 'nf4', got {meta.get('quant_type')!r}")

        def get(name):
            full = key if name is None else f"{key}.{name}"
            if full not in state_dict:
                raise KeyError(f"state_dict: missing {full!r}")
            t = state_dict[full]
            return t if device is None else t.to(device)

        kwargs = {}
        if "nested_offset" in meta:
            if meta.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"{meta_key}: nested_dtype must be 'float32', got {meta['nested_dtype']!r}")
            absmax2 = get("nested_absmax")
            kwargs = dict(absmax2=absmax2, code2=get("nested_quant_map"),
                          offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32,
                                              device=absmax2.device),
                          nested_blocksize=meta["nested_blocksize"])
        return cls(get(None), get("absmax"), meta["shape"], _dtype_from_name(meta["dtype"], meta_key),
                   meta["blocksize"], code=get("quant_map"), **kwargs)

    # ------------------------------------------------------------------ use
    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of every stored tensor together."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device) -> "NF4Weight":
        """A copy on ``device``."""
        moved = {k: t.to(device) for k, t in self._tensors().items()}
        return NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                         nested_blocksize=self.nested_blocksize, **moved)

    def dequantize(self, dtype=None, backend=None) -> torch.Tensor:
        """The tensor ``[*shape]`` in ``dtype`` (default: the original dtype), bit-identical to bitsandbytes.

        ``backend``: ``None`` chooses per device (Triton on CUDA, torch on CPU); ``"torch"`` or ``"triton"`` force one.
        """
        dtype = self.dtype if dtype is None else dtype
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected bfloat16, float16 or float32, got {dtype}")
        return dispatch.nf4_dequantize(self, dtype, backend)

    def __repr__(self):
        level = f"double-quantized (nested blocksize {self.nested_blocksize})" if self.nested else "single-level"
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {level}, "
                f"device={self.device})")

    # ------------------------------------------------------------------ checks
    def _tensors(self) -> dict:
        names = ("packed", "absmax", "code") + (("absmax2", "code2", "offset") if self.nested else ())
        return {k: getattr(self, k) for k in names}

    def _validate(self):
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype: expected bfloat16, float16 or float32, got {self.dtype}")
        _check_blocksize(self.blocksize, "blocksize")
        nested_parts = (self.absmax2 is None, self.code2 is None, self.offset is None)
        if len(set(nested_parts)) != 1:
            raise ValueError("absmax2, code2 and offset: give all three (double quantization) or none")
        for name, t in self._tensors().items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != self.packed.device:
                raise ValueError(f"{name}: on {t.device}, but packed is on {self.packed.device}; "
                                 "all NF4 tensors must be on one device")
        n = self.numel()
        if n == 0:
            raise ValueError(f"shape: {tuple(self.shape)} has no elements")
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed: expected uint8, got {self.packed.dtype}")
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed: {self.packed.numel()} bytes, but shape {tuple(self.shape)} needs "
                             f"{(n + 1) // 2}")
        _expect(self.code, torch.float32, (16,), "code (quant_map)")
        if not torch.equal(self.code.cpu(), python_ref.NF4_CODE):
            raise ValueError("code (quant_map): is not the NF4 code table (fp4 or a custom map is not supported)")
        nblocks = math.ceil(n / self.blocksize)
        if not self.nested:
            _expect(self.absmax, torch.float32, (nblocks,), "absmax")
            return
        _expect(self.absmax, torch.uint8, (nblocks,), "absmax (nested: second-level indices)")
        if not isinstance(self.nested_blocksize, int) or self.nested_blocksize < 1 or \
                self.nested_blocksize & (self.nested_blocksize - 1):
            raise ValueError(f"nested_blocksize: expected a positive power of two, got {self.nested_blocksize!r}")
        _expect(self.absmax2, torch.float32, (math.ceil(nblocks / self.nested_blocksize),), "absmax2 (nested_absmax)")
        _expect(self.code2, torch.float32, (256,), "code2 (nested_quant_map)")
        _expect(self.offset, torch.float32, None, "offset")
        if self.offset.numel() != 1:
            raise ValueError(f"offset: expected one element, got shape {tuple(self.offset.shape)}")
        self.offset = self.offset.reshape(())


def _check_blocksize(blocksize, name):
    if type(blocksize) is not int or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {BLOCKSIZES}, got {blocksize!r}")


def _expect(t, dtype, numel_shape, name):
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype}, got {t.dtype}")
    if numel_shape is not None and t.numel() != numel_shape[0]:
        raise ValueError(f"{name}: expected {numel_shape[0]} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
