"""Whether triton is installed, without importing it.

Triton reads ``TRITON_INTERPRET`` when it is first imported (its own library functions are
decorated then), so nothing here imports it: the kernel modules do, and the runtime imports
them only when the triton backend (or INT8 attention) is used.
"""

from __future__ import annotations

import importlib.util
import os

from tfmq_video.errors import ConfigError

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_IMPORT_ERROR = "" if HAS_TRITON else "No module named 'triton'"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def require_triton() -> None:
    """Raise a clear error when a Triton launcher is called without triton installed."""
    if not HAS_TRITON:
        raise ConfigError(f"this kernel needs triton ({TRITON_IMPORT_ERROR}); pip install 'tfmq-video[kernels]'")
