"""Host-side helpers for the kernel launchers, kept cheap because a training step calls the launchers hundreds of
times: ``cdiv`` and ``next_pow2`` give the values of ``triton.cdiv`` and ``triton.next_power_of_2`` as plain Python
(recent Triton wraps those in constexpr-function objects whose call costs a few µs of host time each; a decode
call used nine), and ``INTERPRET`` says whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``,
which must be set before Triton is imported, as the tests do; read once here)."""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for ``n <= 0``, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
