"""Read and write STDiT3 checkpoint folders (``config.json`` + ``model.safetensors``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from tfmq_video.checkpoint import load_into, read_config, read_weights, write_folder
from tfmq_video.errors import CheckpointError


def load_stdit3(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> STDiT3:
    """Build an :class:`STDiT3` from a local folder, checking every tensor name and shape.

    Works for the published Open-Sora 1.2 folder and for the bundled toy model alike.
    """
    raw = read_config(folder)
    try:
        config = STDiT3Config.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {err}") from err
    with torch.device("meta"):
        model = STDiT3(config)
    state = read_weights(folder)
    model = model.to_empty(device="cpu")
    # Non-persistent buffers are not in the file: recompute them on the real device.
    model.pos_embed.inv_freq = model.pos_embed.inverse_frequencies(config.hidden_size)
    load_into(model, state, str(folder))
    return model.to(device=device, dtype=dtype).eval()


def save_stdit3(model: STDiT3, folder: str | os.PathLike) -> Path:
    """Write ``model`` as an upstream-compatible folder (float32 tensors unless the model is lower)."""
    return write_folder(folder, model.config.to_dict(), model.state_dict())
