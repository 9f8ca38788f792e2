"""Where a model runs and moving nested inputs there.

Calibration data (recorded calls, reconstruction rows) is kept on CPU so that its memory is
bounded by the host, not by the accelerator; the calibration stages move what one step needs to
the device of the model they run, with :func:`model_device` and :func:`move`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tfmq_video.errors import ConfigError


def model_device(module: nn.Module | object) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module with neither and
    for a plain callable (e.g. a function wrapping a model)."""
    if not isinstance(module, nn.Module):
        return torch.device("cpu")
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def move(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists and dicts) detached and on ``device``."""
    if torch.is_tensor(value):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {key: move(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move(item, device) for item in value)
    return value


def pick_device(name: str) -> torch.device:
    """A ``--device`` value: ``"auto"`` picks CUDA when present; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available in this torch build ({torch.__version__})")
    return device


def describe_device(device: torch.device) -> str:
    """``device`` in words for a results file: the GPU's name on CUDA, else the device type."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def full_float32(device: torch.device) -> None:
    """On CUDA, switch TF32 off for matrix products and cuDNN convolutions, so that calibration
    and sampling compute in float32 as on the CPU (TF32's 10-bit mantissa adds an error of its own
    to the quantization error being minimized). A process-wide setting; nothing to do elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
