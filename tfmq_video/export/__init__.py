"""Export of quantized models: int4 packing, RTN records, the checkpoint format and its loader.

Names are resolved lazily (the runtime imports :mod:`tfmq_video.export.packing`, and the
format imports the runtime).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "format", "load_quantized": "format", "save_quantized": "format",
    "weight_bytes_report": "format", "pack_int4": "packing", "unpack_int4": "packing",
    "RTNConfig": "rtn", "rtn_linear_record": "rtn", "rtn_records": "rtn",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfmq_video.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tfmq_video.export.{_EXPORTS[name]}"), name)
