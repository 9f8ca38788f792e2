"""Choosing a runtime backend: automatic by default, overridable, with one warning on fallback.

- ``reference``: dequantize and run in float32 (the numerical ground truth; runs anywhere).
- ``cpu``: integer GEMMs with ``torch._int_mm`` (oneDNN, VNNI/AMX) on CPU tensors, with the
  activation quantization and the dequantization epilogue fused by ``torch.compile``.
- ``triton``: the Triton kernels of :mod:`tfmq_video.kernels` on a CUDA device.

``auto`` picks ``triton`` for CUDA and ``cpu`` for CPU; when the pick cannot run here it falls
back to ``reference`` with a single warning. A backend the user forces but that cannot run
raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import logging
import os

import torch

from tfmq_video.errors import ConfigError
from tfmq_video.kernels._triton import HAS_TRITON, TRITON_IMPORT_ERROR, interpreting

log = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "triton")
_warned: set[str] = set()


class BackendUnavailableError(ConfigError):
    """A forced backend cannot run on this machine or device."""


def cpu_compile_enabled() -> bool:
    """Whether the CPU backend fuses its elementwise passes with ``torch.compile`` (``TFMQ_CPU_COMPILE=0`` disables)."""
    return os.environ.get("TFMQ_CPU_COMPILE", "1") != "0"


def backend_problem(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None if it can."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, the model is on {device}"
        if not hasattr(torch, "_int_mm"):
            return f"torch {torch.__version__} has no torch._int_mm"
        return None
    if name == "triton":
        if not HAS_TRITON:
            return f"triton is not installed ({TRITON_IMPORT_ERROR}); pip install 'tfmq-video[kernels]'"
        if device.type != "cuda" and not interpreting():
            return (
                f"the triton backend needs a CUDA device, the model is on {device} (no GPU here? else pass "
                "device='cuda' to load_quantized/build_runtime_model, or move the model to the GPU first)"
            )
        return None
    raise ConfigError(f"unknown backend {name!r}; choose one of {('auto', *BACKENDS)}")


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The backend to use: ``requested`` if it can run (else an error), or the best for ``device`` when 'auto'."""
    device = torch.device(device)
    if requested != "auto":
        problem = backend_problem(requested, device)
        if problem is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {problem}")
        return requested
    preferred = "triton" if device.type == "cuda" else "cpu"
    problem = backend_problem(preferred, device)
    if problem is None:
        return preferred
    warn_once(f"backend {preferred!r} cannot run here ({problem}); falling back to the slow 'reference' backend")
    return "reference"
