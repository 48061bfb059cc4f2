"""``NF4Weight``: a bitsandbytes-compatible NF4 weight (packed nibbles + one or two levels of scales).

The format is bitsandbytes' own, bit for bit (see shared DESIGN.md §3 and ``python_ref/nf4.py``): a checkpoint
written by ``bnb.nn.Linear4bit`` loads here and back, and ``dequantize()`` equals
``bitsandbytes.functional.dequantize_4bit`` exactly.
"""
import json
import math
import numbers

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import python_ref
from lowrank_kernels import dispatch
from lowrank_kernels.checks import tensor_version

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
        self.code = _nf4_code(packed.device) if code is None else code
        self.absmax2 = absmax2
        self.code2 = code2
        self.offset = offset
        self.nested_blocksize = nested_blocksize
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a bf16/fp16/fp32 tensor: nearest NF4 code per element (ties to the lower code).

        A tensor on the meta device gives an ``NF4Weight`` of meta tensors of the right shapes (no values: for
        ``init_empty_weights``-style loading, filled later by ``load_state_dict``)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in DTYPES:
            raise TypeError(f"weight: expected dtype bfloat16, float16 or float32, got {weight.dtype}")
        if weight.numel() == 0:
            raise ValueError("weight: cannot quantize an empty tensor")
        blocksize = _check_blocksize(blocksize, "blocksize")
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant: expected a bool, got {type(double_quant).__name__}")
        if weight.is_meta:
            return cls.empty(weight.shape, weight.dtype, blocksize, double_quant, device="meta")
        if not torch.isfinite(weight).all():
            raise ValueError("weight: contains inf or NaN, which NF4 cannot represent")
        packed, absmax = python_ref.quantize_nf4(weight.detach(), blocksize)
        if not double_quant:
            return cls(packed, absmax, weight.shape, weight.dtype, blocksize)
        qabsmax, absmax2, code2, offset = python_ref.double_quantize_absmax(absmax, 256)
        return cls(packed, qabsmax, weight.shape, weight.dtype, blocksize, absmax2=absmax2, code2=code2,
                   offset=offset, nested_blocksize=256)

    @classmethod
    def empty(cls, shape, dtype, blocksize: int = 64, double_quant: bool = True, device=None) -> "NF4Weight":
        """An ``NF4Weight`` of ``shape`` with uninitialized storage (``torch.empty``-like; the code tables hold
        their constant values), e.g. on the meta device, to be filled by ``load_state_dict``."""
        shape = torch.Size(shape)
        n = math.prod(shape)
        blocksize = _check_blocksize(blocksize, "blocksize")
        nblocks = math.ceil(n / blocksize)
        packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
        if not double_quant:
            return cls(packed, torch.empty(nblocks, dtype=torch.float32, device=device), shape, dtype, blocksize)
        return cls(packed, torch.empty(nblocks, dtype=torch.uint8, device=device), shape, dtype, blocksize,
                   absmax2=torch.empty(math.ceil(nblocks / 256), dtype=torch.float32, device=device),
                   code2=_dynamic_map(packed.device), offset=torch.empty((), dtype=torch.float32, device=device),
                   nested_blocksize=256)

    @classmethod
    def from_bnb(cls, packed, quant_state=None) -> "NF4Weight":
        """From a ``bnb.nn.Params4bit``, or from ``(packed, QuantState)`` as ``bnb.functional.quantize_4bit`` returns.

        Shares storage with the bitsandbytes tensors (no copy). A weight quantized with another ``quant_storage``
        than uint8 (FSDP-QLoRA recipes store the packed bytes as bfloat16 so that FSDP shards them like the other
        parameters) is read through a uint8 view of the same bytes: bitsandbytes packs them identically.
        """
        if quant_state is None:
            quant_state = getattr(packed, "quant_state", None)
            if quant_state is None:
                raise ValueError("from_bnb: packed has no .quant_state; pass a quantized Params4bit "
                                 "or (packed, quant_state)")
        quant_type = getattr(quant_state, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type: only 'nf4' is supported, got {quant_type!r}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("quant_state: bitsandbytes repacked this weight for its CPU kernel "
                             "(packing_format_for_cpu); its bytes are not in NF4's layout")
        if not isinstance(packed, torch.Tensor) or packed.dtype == torch.bool or packed.is_complex():
            raise TypeError(f"packed: expected a tensor of packed NF4 bytes, got "
                            f"{getattr(packed, 'dtype', type(packed).__name__)}")
        data = packed.detach()
        if not torch.compiler.is_compiling():  # traced, a Params4bit already is a plain tensor (as_subclass is not)
            data = data.as_subclass(torch.Tensor)  # a plain tensor view of Params4bit's storage
        if data.dtype != torch.uint8:  # quant_storage: the same bytes as another dtype
            if not data.is_contiguous():
                raise TypeError(f"packed: {data.dtype} storage (quant_storage) must be contiguous to be read as "
                                "bytes")
            data = data.reshape(-1).view(torch.uint8).reshape(-1, 1)
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
                        nested_offset=None if self.device.type == "meta" else self.offset.item())
        if self.device.type == "meta":  # no values to write (the offset is one): an empty placeholder
            out[f"{key}.quant_state.bitsandbytes__nf4"] = torch.empty(0, dtype=torch.uint8, device="meta")
            return out
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
        blob = state_dict[meta_key]
        if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"state_dict[{meta_key!r}]: expected a 1-D uint8 tensor (bitsandbytes' JSON blob), got "
                             f"{getattr(blob, 'dtype', type(blob).__name__)} {tuple(getattr(blob, 'shape', ()))}")
        if blob.is_meta:
            raise ValueError(f"state_dict[{meta_key!r}]: on the meta device; the quantization metadata it holds "
                             "cannot be read (load a checkpoint with real tensors)")
        try:
            meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"state_dict[{meta_key!r}]: not a bitsandbytes quant_state JSON blob ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"state_dict[{meta_key!r}]: expected a JSON object, got {type(meta).__name__}")
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in meta:
                raise ValueError(f"state_dict[{meta_key!r}]: missing field {field!r}")
        if meta["quant_type"] != "nf4":
            raise ValueError(f"{meta_key}: quant_type must be 'nf4', got {meta['quant_type']!r}")
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"state_dict[{meta_key!r}]: field 'shape' must be a list of non-negative ints, got "
                             f"{shape!r}")

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
            offset, nested_blocksize = meta["nested_offset"], meta.get("nested_blocksize")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)):
                raise ValueError(f"state_dict[{meta_key!r}]: field 'nested_offset' must be a number, got {offset!r}")
            absmax2 = get("nested_absmax")
            kwargs = dict(absmax2=absmax2, code2=get("nested_quant_map"),
                          offset=torch.tensor(float(offset), dtype=torch.float32, device=absmax2.device),
                          nested_blocksize=nested_blocksize)
        return cls(get(None), get("absmax"), shape, _dtype_from_name(meta["dtype"], meta_key),
                   meta["blocksize"], code=get("quant_map"), **kwargs)

    # ------------------------------------------------------------------ state-dict key names
    # The attribute path of every key state_dict writes (``quant_map``, ``nested_absmax``, ``nested_quant_map``,
    # ``quant_state.bitsandbytes__nf4``), as bitsandbytes' ``Params4bit`` has it: torch's distributed state-dict
    # helpers (``get_model_state_dict``) resolve keys by ``getattr`` along them.
    @property
    def quant_map(self) -> torch.Tensor:
        return self.code

    @property
    def nested_absmax(self):
        return self.absmax2

    @property
    def nested_quant_map(self):
        return self.code2

    @property
    def quant_state(self) -> "_StateKey":
        return _StateKey(self)

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
        """A copy on ``device`` (the same object if it is there already). From the meta device there is nothing
        to copy: as for a tensor, that raises; use ``apply`` with ``torch.empty_like`` (``Module.to_empty``)."""
        return self.apply(lambda t: t.to(device))

    def apply(self, fn) -> "NF4Weight":
        """``fn`` applied to every stored tensor as raw bytes, all or nothing: ``fn`` (e.g. ``Module._apply``'s,
        for ``.to()``, ``.cuda()``, ``.to_empty()``, ``.half()``) may move them, never change their values or dtype
        (each tensor goes through ``fn`` as a uint8 view, which dtype casts leave alone). Leaving the meta
        device, the code tables get their constant values back (``to_empty``); the rest stays uninitialized."""
        moved = {}
        for name, t in self._tensors().items():
            raw = t.reshape(-1).view(torch.uint8)
            out = fn(raw)
            if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.shape != raw.shape:
                raise ValueError(f"fn: must keep {name}'s bytes (uint8 {tuple(raw.shape)}), got "
                                 f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
            moved[name] = out.view(t.dtype).reshape(t.shape)
        devices = {t.device for t in moved.values()}
        if len(devices) != 1:
            raise ValueError(f"fn: moved the NF4 tensors to several devices {sorted(map(str, devices))}")
        device = devices.pop()
        if device == self.device and all(moved[k] is t or moved[k].data_ptr() == t.data_ptr()
                                         for k, t in self._tensors().items()):
            return self
        if self.device.type == "meta" and device.type != "meta":
            moved["code"] = _nf4_code(device)
            if self.nested:
                moved["code2"] = _dynamic_map(device)
        return NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                         nested_blocksize=self.nested_blocksize, **moved)

    def op_args(self) -> tuple:
        """``(tensors, meta)``: this weight as arguments of a torch operator (``lowrank_kernels.ops``), whose schema
        takes tensors and ints, not Python objects. ``tensors``: ``[packed, absmax, code]`` plus ``[absmax2, code2,
        offset]`` when nested; ``meta``: ``[blocksize, nested_blocksize, DTYPES index of dtype, *shape]``."""
        meta = [self.blocksize, self.nested_blocksize, DTYPES.index(self.dtype), *self.shape]
        return list(self._tensors().values()), meta

    @classmethod
    def from_op_args(cls, tensors, meta) -> "NF4Weight":
        """The inverse of :meth:`op_args`, without re-validating: the tensors come from a validated weight (the
        checks read the code table, a device sync per call on CUDA). Tensor subclasses come back as plain tensors
        of the same storage: a compiled graph hands the operators bitsandbytes' ``Params4bit`` itself, whose Python
        ``__torch_function__`` would otherwise run for every torch call the kernels' launchers make on it (and
        wrap their results). Wrapper subclasses (DTensor) hold no storage of their own and stay as they are."""
        tensors = [t if type(t) is torch.Tensor or is_traceable_wrapper_subclass(t) else t.as_subclass(torch.Tensor)
                   for t in tensors]
        self = cls.__new__(cls)
        self.packed, self.absmax, self.code = tensors[:3]
        self.absmax2, self.code2, self.offset = tensors[3:] if len(tensors) == 6 else (None, None, None)
        self.blocksize, self.nested_blocksize = meta[0], meta[1]
        self.dtype, self.shape = DTYPES[meta[2]], torch.Size(meta[3:])
        return self

    def with_flat_scales(self) -> "NF4Weight":
        """This weight with double quantization undone once: each block's fp32 scale ``code2[q] * absmax2 + offset``
        (two fp32 roundings, as every kernel rebuilds it) stored as a plain fp32 ``absmax``; the packed nibbles
        shared, not copied. Dequantizes bit-identically (and so computes identical layer outputs), at 4 instead of
        1 byte per block of scales, and saves the kernels the dependent second-level lookup per block: the
        inference form of :func:`lowrank_kernels.prepare_for_inference`. A weight without double quantization is
        returned as is."""
        if not self.nested:
            return self
        with torch.no_grad():
            absmax = python_ref.dequantize_absmax(self.absmax, self.absmax2, self.code2, self.offset,
                                                  self.nested_blocksize)
        return NF4Weight(self.packed, absmax, self.shape, self.dtype, self.blocksize, code=self.code)

    def dequantize(self, dtype=None, backend=None) -> torch.Tensor:
        """The tensor ``[*shape]`` in ``dtype`` (default: the original dtype), bit-identical to bitsandbytes.

        ``backend``: ``None`` chooses per device (Triton on CUDA, torch on CPU); ``"torch"`` or ``"triton"`` force one.
        On the meta device: an empty meta tensor of that shape and dtype.
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
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in DTYPES:
            raise TypeError(f"dtype: expected bfloat16, float16 or float32, got {self.dtype!r}")
        self.blocksize = _check_blocksize(self.blocksize, "blocksize")
        if not isinstance(self.packed, torch.Tensor):
            raise TypeError(f"packed: expected a torch.Tensor, got {type(self.packed).__name__}")
        nested_parts = (self.absmax2 is None, self.code2 is None, self.offset is None)
        if len(set(nested_parts)) != 1:
            raise ValueError("absmax2, code2 and offset: give all three (double quantization) or none")
        for name, t in self._tensors().items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != self.packed.device:
                raise ValueError(f"{name}: on {t.device}, but packed is on {self.packed.device}; "
                                 "all NF4 tensors must be on one device")
        if not all(type(d) is int and d >= 0 for d in self.shape):
            raise ValueError(f"shape: expected non-negative ints, got {tuple(self.shape)}")
        n = self.numel()
        if n == 0:
            raise ValueError(f"shape: {tuple(self.shape)} has no elements")
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed: expected uint8, got {self.packed.dtype}")
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed: {self.packed.numel()} bytes, but shape {tuple(self.shape)} needs "
                             f"{(n + 1) // 2}")
        if not self.packed.is_contiguous():
            raise ValueError("packed: must be contiguous (the kernels read it as one flat byte array; pass "
                             "packed.contiguous())")
        _expect(self.code, torch.float32, (16,), "code (quant_map)")
        # the table's values (a device read; skipped while torch.compile traces: checked where the weight was made)
        if not self.code.is_meta and not torch.compiler.is_compiling() and \
                not torch.equal(self.code.cpu(), python_ref.NF4_CODE):
            raise ValueError("code (quant_map): is not the NF4 code table (fp4 or a custom map is not supported)")
        nblocks = math.ceil(n / self.blocksize)
        if not self.nested:
            _expect(self.absmax, torch.float32, (nblocks,), "absmax")
            return
        _expect(self.absmax, torch.uint8, (nblocks,), "absmax (nested: second-level indices)")
        nested_blocksize = self.nested_blocksize
        if isinstance(nested_blocksize, numbers.Integral) and not isinstance(nested_blocksize, bool):
            nested_blocksize = self.nested_blocksize = int(nested_blocksize)
        if type(nested_blocksize) is not int or nested_blocksize < 1 or nested_blocksize & (nested_blocksize - 1):
            raise ValueError(f"nested_blocksize: expected a positive power of two, got {self.nested_blocksize!r}")
        _expect(self.absmax2, torch.float32, (math.ceil(nblocks / self.nested_blocksize),), "absmax2 (nested_absmax)")
        _expect(self.code2, torch.float32, (256,), "code2 (nested_quant_map)")
        _expect(self.offset, torch.float32, None, "offset")
        if self.offset.numel() != 1:
            raise ValueError(f"offset: expected one element, got shape {tuple(self.offset.shape)}")
        self.offset = self.offset.reshape(())


class _StateKey:
    """``NF4Weight.quant_state``: the path of the ``quant_state.bitsandbytes__nf4`` key (the JSON blob)."""

    def __init__(self, nf4: NF4Weight):
        self._nf4 = nf4

    @property
    def bitsandbytes__nf4(self) -> torch.Tensor:
        return self._nf4.state_dict("w")["w.quant_state.bitsandbytes__nf4"]


def _check_blocksize(blocksize, name) -> int:
    """``blocksize`` as an int (any integral type, e.g. ``numpy.int64``, but not bool), if it is one of BLOCKSIZES."""
    if isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool) and int(blocksize) in BLOCKSIZES:
        return int(blocksize)
    raise ValueError(f"{name}: expected one of {BLOCKSIZES}, got {blocksize!r}")


def _nf4_code(device) -> torch.Tensor:
    """The NF4 code table (fp32 ``[16]``) on ``device``: a constant of the format."""
    return python_ref.NF4_CODE.to(device)


def _dynamic_map(device) -> torch.Tensor:
    """The signed dynamic map of double quantization (fp32 ``[256]``) on ``device``: a constant of the format."""
    return python_ref.dynamic_map_signed().to(device)


def _expect(t, dtype, numel_shape, name):
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype}, got {t.dtype}")
    if numel_shape is not None and t.numel() != numel_shape[0]:
        raise ValueError(f"{name}: expected {numel_shape[0]} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


class FlatScalesCache:
    """A layer's inference form of its NF4 weight (:meth:`NF4Weight.with_flat_scales`), kept while the weight is
    the same and its scales unchanged (their version counters: ``load_state_dict`` copies into them in place), and
    rebuilt otherwise. While ``torch.compile`` traces, the weight is handed on as it is (same results)."""

    def __init__(self):
        self._key, self._flat = None, None

    def __call__(self, weight: NF4Weight) -> NF4Weight:
        if not weight.nested or torch.compiler.is_compiling():
            return weight
        scales = (weight.absmax, weight.absmax2, weight.code2, weight.offset)
        key = (weight.packed.data_ptr(), weight.packed.device,
               *((t.data_ptr(), tensor_version(t)) for t in scales))
        if key != self._key:
            self._key, self._flat = key, weight.with_flat_scales()
        return self._flat

    @staticmethod
    def attach(layer, enabled: bool) -> None:
        """Gives ``layer`` (a module computing over an NF4 weight) a cache of its weight's inference form, or with
        ``enabled=False`` removes it; kept out of the module's parameters, buffers and state_dict."""
        layer.__dict__["_flat_scales"] = FlatScalesCache() if enabled else None

    @staticmethod
    def weight_of(layer, weight):
        """``weight`` in the form ``layer`` computes with: its inference form where :meth:`attach` enabled one,
        else ``weight`` itself (also a dense one)."""
        cache = layer.__dict__.get("_flat_scales")
        return weight if cache is None else cache(weight)
