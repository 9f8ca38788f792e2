"""The quantized inference runtime: integer Linear layers, quantized attention, backend selection."""

from tfmq_video.runtime.backends import BACKENDS, BackendUnavailableError, resolve_backend
from tfmq_video.runtime.convert import (
    TemporalFeatureCache,
    build_runtime_model,
    compute_temporal_cache,
    set_backend,
)
from tfmq_video.runtime.linear import QuantLinear

__all__ = [
    "BACKENDS", "BackendUnavailableError", "QuantLinear", "TemporalFeatureCache", "build_runtime_model",
    "compute_temporal_cache", "resolve_backend", "set_backend",
]
