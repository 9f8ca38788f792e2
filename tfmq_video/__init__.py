"""tfmq-video: post-training quantization of video diffusion transformers (TFMQ)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["quantize", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports: ``tfmq_video.quantize`` imports the calibration code on first use."""
    if name == "quantize":
        from tfmq_video.calib.api import quantize

        return quantize
    raise AttributeError(f"module 'tfmq_video' has no attribute {name!r}")
