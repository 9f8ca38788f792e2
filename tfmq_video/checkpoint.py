"""Model folders in the diffusers style: ``config.json`` + ``model.safetensors`` (or shards).

Only safetensors is read; nothing is ever unpickled. Folders are written atomically:
into a temporary sibling folder first, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eval_video._files import give_default_modes
from tfmq_video.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_config(folder: str | os.PathLike) -> dict:
    """Parse ``folder/config.json``; raise :class:`CheckpointError` naming the file if absent or invalid."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist (expected a folder with {CONFIG_NAME})")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a model folder needs {CONFIG_NAME} beside its weights")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); re-download or re-export it") from err


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of ``model.safetensors`` or of the shards listed in its index."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_safetensors(folder / shard))
        return state
    raise CheckpointError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {INDEX_NAME}")


def expected_tensors(module: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes of what ``module.state_dict()`` holds (works on the meta device)."""
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and mis-shaped tensor."""
    expected = expected_tensors(module)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{name}: file {tuple(state[name].shape)} vs model {tuple(shape)}"
        for name, shape in expected.items()
        if name in state and state[name].shape != shape
    )
    if not (missing or extra or misshaped):
        return
    lines = [f"{source} does not fit {type(module).__name__}:"]
    for title, items in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    lines.append("Check that the folder holds this model family and that its config.json matches the weights.")
    raise CheckpointError("\n".join(lines))


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly check, then copy ``state`` into ``module`` (keeping the module's dtype)."""
    check_state_dict(module, state, source)
    module.load_state_dict(dict(state), strict=True)
    return module


def atomic_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then move it into place.

    An interrupted write leaves the previous ``folder`` (if any) untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        give_default_modes(tmp)
        if folder.exists():
            backup = folder.with_name(folder.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            folder.rename(backup)
            tmp.rename(folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_folder(
    folder: str | os.PathLike,
    config: dict,
    state: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ extra text files) atomically; return the folder."""

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=dict(metadata or {}))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_folder(folder, write)
