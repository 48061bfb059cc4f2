"""Host-side helpers for the kernel launchers, kept cheap because a training step calls the launchers hundreds of
times and an eager decode step once per layer per token.

``cdiv`` and ``next_pow2`` give the values of ``triton.cdiv`` and ``triton.next_power_of_2`` as plain Python
(recent Triton wraps those in constexpr-function objects whose call costs a few µs of host time each; a decode
call used nine). ``INTERPRET`` says whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``,
which must be set before Triton is imported, as the tests do; read once here). ``MAX_ELEMENTS`` and
``num_sms`` are the limits and device facts every launcher shares. ``launch`` is ``kernel[grid](...)``
without Triton's per-call argument binding once a call signature has been seen.
"""
import contextlib
import functools
import operator
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Flat element indices (n * K + k) are int32 inside the kernels; this leaves room for a tile's overhang.
MAX_ELEMENTS = 2**31 - 2**16


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; elsewhere an H100's 132 (it only shapes an interpreted
    grid)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for ``n <= 0``, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


_COMPILED = {}  # kernel -> {call key: CompiledKernel}
_LAYOUT = {}  # kernel -> (positions of its tensor arguments, getter of those, getter of the others)
_MAX_KEYS = 256  # per kernel; past it the kernel's cache starts over (shapes that vary without bound)
_RUNTIME = None  # (get_current_device, get_current_stream, knobs.runtime), bound at the first launch


def _runtime():
    global _RUNTIME
    if _RUNTIME is None:
        from triton import knobs
        from triton.runtime import driver

        _RUNTIME = (driver.active.get_current_device, driver.active.get_current_stream, knobs.runtime)
    return _RUNTIME


def _hooked(knobs) -> bool:
    """A launch hook is installed: a hook chain (Triton >= 3.4's default, empty) with calls, or a function."""
    return any(h is not None and getattr(h, "calls", True) for h in (knobs.launch_enter_hook, knobs.launch_exit_hook))


def _getter(positions):
    """``args -> tuple of args[i] for i in positions`` (an ``itemgetter``, which returns a bare item for one)."""
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions) if positions else (lambda args: ())


def _layout(kernel, args):
    """Which of ``args`` are tensors: fixed per kernel (our launchers pass a dummy tensor, never ``None``, where
    a pointer is unused). Checked against ``args`` whenever a call misses the cache."""
    tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    layout = _LAYOUT.get(kernel)
    if layout is None:
        others = tuple(i for i in range(len(args)) if i not in tensors)
        layout = _LAYOUT[kernel] = (tensors, _getter(tensors), _getter(others))
    elif layout[0] != tensors:
        raise TypeError(f"launch: {kernel.fn.__name__} got tensors at positions {tensors}, earlier at {layout[0]}")
    return layout


def _call_key(layout, args, options):
    """What Triton's JIT specializes ``args`` on, and more: each tensor's dtype and its address modulo 16 (Triton
    specializes pointers on 16-byte alignment), every other argument's value (ints are specialized on ``== 1``,
    ``% 16 == 0`` and their range: the value implies all three; floats are not, so a new float value only costs
    one more pass through the JIT), and ``options``."""
    _, tensors, others = layout
    ts = tensors(args)
    return others(args), tuple([t.data_ptr() & 15 for t in ts]), tuple([t.dtype for t in ts]), options


def _check_arity(kernel, args):
    """The direct launch passes ``args`` positionally to the compiled kernel: all of them must be there."""
    if len(args) != len(kernel.arg_names):
        raise TypeError(f"launch: {kernel.fn.__name__} takes {len(kernel.arg_names)} arguments "
                        f"({', '.join(kernel.arg_names)}), got {len(args)}")


def _tensor_device(layout, args) -> int:
    """The CUDA device index of the first tensor of ``args`` (-1 for a CPU tensor or none); ``layout``: the
    kernel's recorded ``_LAYOUT`` entry, or ``None`` (then ``args`` are scanned)."""
    if layout is not None:
        return args[layout[0][0]].get_device() if layout[0] else -1
    return next((a.get_device() for a in args if isinstance(a, torch.Tensor)), -1)


def device_of(t: torch.Tensor):
    """A context in which Triton's JIT launches on ``t``'s CUDA device (it launches on the current one): for the
    launches that cannot go through :func:`launch` (tensor descriptors, keyword constexprs)."""
    index = t.get_device()
    if index < 0 or INTERPRET or index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def launch(kernel, grid, args, **options):
    """``kernel[grid](*args, **options)``; ``args``: every parameter of ``kernel`` in order, constexprs and
    defaulted ones included: tensors (always at the same positions for a kernel, all on one device), ints,
    floats, bools, strings (no ``None``, no tensor descriptors). The launch goes to the tensors' device (on that
    device's current stream), whichever device is current, as a torch operation would.

    The first call with a given key (:func:`_call_key`, the current device) goes through Triton's JIT, which
    compiles or finds the kernel; later ones launch that compiled kernel directly, as the JIT would, without its
    argument binding and specialization: about half the host time per launch (``docs/perf-log.md``). The interpreter, and any launch while a Triton launch hook is
    installed (profilers), always takes the JIT path.
    """
    if INTERPRET:
        _check_arity(kernel, args)
        kernel[grid](*args, **options)
        return
    get_device, get_stream, runtime_knobs = _runtime()
    device = get_device()
    layout = _LAYOUT.get(kernel)
    tensor_device = _tensor_device(layout, args)
    if tensor_device != device and tensor_device >= 0:  # Triton launches on the current device
        with torch.cuda.device(tensor_device):
            launch(kernel, grid, args, **options)
        return
    if _hooked(runtime_knobs):
        _check_arity(kernel, args)
        kernel[grid](*args, **options)
        return
    options_key = tuple(options.items())
    cache = _COMPILED.setdefault(kernel, {})
    compiled = None if layout is None else cache.get((device, _call_key(layout, args, options_key)))
    if compiled is None:
        _check_arity(kernel, args)
        key = (device, _call_key(_layout(kernel, args), args, options_key))
        compiled = kernel[grid](*args, **options)
        if len(cache) >= _MAX_KEYS:
            cache.clear()
        cache[key] = compiled
        return
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, get_stream(device),
                 compiled.function, compiled.packed_metadata, None, None, None, *args)
