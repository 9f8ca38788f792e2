"""Calibrated checkpoints: a model folder (``config.json`` + ``model.safetensors``) plus a manifest.

``quantization.json`` records the format, the adapter, the full recipe, the calibrated
timesteps, the temporal cache layout, a fingerprint of the FP weights it was calibrated
from and the calibration report. Loading rebuilds the same fake-quant structure from the
manifest and loads the state strictly, so outputs are identical. The folder is written
atomically (nothing half written on failure). Only safetensors and JSON are read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_adapters.base import get_adapter
from tfmq_video.calib.cache import TemporalFeatureCache
from tfmq_video.checkpoint import load_into, read_config, read_weights, write_folder
from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.quant.config import RecipeConfig, parse_config
from tfmq_video.quant.model import QuantizedModel, wrap_model

MANIFEST_NAME = "quantization.json"
FORMAT = "tfmq-video/fake-quant/1"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of the FP model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def _cache_layout(qmodel: QuantizedModel) -> dict[str, Any] | None:
    cache = qmodel.temporal_cache
    if not isinstance(cache, TemporalFeatureCache):
        return None
    return {
        "bits": cache.grid.bits,
        "group_size": cache.group_size,
        "features": {name: int(getattr(cache, f"{name}_codes").shape[1]) for name in cache.feature_names},
        "conditions": {name: list(getattr(cache, f"condition_{name}").shape) for name in cache.condition_names},
    }


def save_calibrated(qmodel: QuantizedModel, folder: str | os.PathLike) -> Path:
    """Write the calibrated model and its manifest to ``folder`` (atomically)."""
    if qmodel.recipe is None or qmodel.fingerprint is None:
        raise ConfigError("only models returned by tfmq_video.quantize (or load_calibrated) can be saved")
    manifest = {
        "format": FORMAT,
        "adapter": qmodel.adapter.name,
        "recipe": qmodel.recipe.model_dump(mode="json"),
        "timesteps": qmodel.context.timesteps.tolist(),
        "temporal_cache": _cache_layout(qmodel),
        "fp_fingerprint": qmodel.fingerprint,
        "report": qmodel.report,
    }
    config = qmodel.adapter.model_config(qmodel.model)
    extra = {MANIFEST_NAME: json.dumps(manifest, indent=2, sort_keys=True) + "\n"}
    return write_folder(folder, config, qmodel.state_dict(), extra_files=extra,
                        metadata={"format": FORMAT, "adapter": qmodel.adapter.name})


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a calibrated folder, checked for its format."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a calibrated tfmq-video checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return manifest


def load_calibrated(folder: str | os.PathLike, model: nn.Module | None = None) -> QuantizedModel:
    """Rebuild a calibrated model from ``folder``.

    ``model``: the FP model it was calibrated from (checked by fingerprint); without it, the
    model is rebuilt from ``config.json`` and the saved weights.
    """
    manifest = read_manifest(folder)
    adapter = get_adapter(manifest["adapter"])
    config = read_config(folder)
    recipe: RecipeConfig = parse_config(manifest["recipe"], f"{folder}/{MANIFEST_NAME}")
    if model is None:
        try:
            model = adapter.build_model(config)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{folder}/config.json does not describe a {adapter.name} model: {err}") from err
        fingerprint = manifest["fp_fingerprint"]
    else:
        fingerprint = model_fingerprint(model)
        if fingerprint != manifest["fp_fingerprint"] or adapter.model_config(model) != config:
            raise CheckpointError(
                f"{folder} was calibrated for another model (FP fingerprint {manifest['fp_fingerprint'][:12]}, "
                f"this model {fingerprint[:12]}); calibrate this model or load the checkpoint without a model"
            )
        model = copy.deepcopy(model)
    qmodel = wrap_model(model, adapter, recipe, manifest["timesteps"], initialize=False)
    layout = manifest.get("temporal_cache")
    if layout is not None:
        conditions = {name: torch.zeros(shape) for name, shape in layout["conditions"].items()}
        qmodel.set_temporal_cache(TemporalFeatureCache(
            qmodel.context, layout["features"], conditions, layout["bits"], layout.get("group_size")))
    _freeze_structure(qmodel)
    load_into(qmodel, read_weights(folder), str(folder))
    qmodel.recipe, qmodel.fingerprint, qmodel.report = recipe, fingerprint, manifest.get("report", {})
    return qmodel.eval()


def _freeze_structure(qmodel: QuantizedModel) -> None:
    """Mark every weight quantizer frozen (the codes come from the file)."""
    for _, layer in qmodel.weight_layers():
        if layer.weight_quant is not None:
            layer.weight_quant.frozen.fill_(True)
