"""``quantize(model, adapter, calibration, config)``: the TFMQ calibration pipeline in one call.

Stages, each reading its own part of the recipe:
1. wrap the model per the adapter and ``quant`` (weights initialized by ``quant.weight.init``);
2. activation ranges from one pass over the recorded calls (static, or per timestep under FSC);
3. temporal maintenance of the TIB (TIAR, FSC, cache, selection: ``tib``);
4. block reconstruction of the transformer blocks (``reconstruction``);
5. every remaining weight frozen to integer codes.
The FP ``model`` is left untouched; the result is a new :class:`QuantizedModel`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn

from dit_adapters.base import DiTAdapter, get_adapter
from tfmq_video.calib.checkpoint import model_fingerprint
from tfmq_video.calib.observe import observe_activations
from tfmq_video.calib.reconstruction import reconstruct_blocks
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.calib.temporal import maintain_temporal_features, record_final_errors
from tfmq_video.calib.tib import TemporalInformationBlock
from tfmq_video.devices import model_device
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import RecipeConfig, parse_config
from tfmq_video.quant.model import QuantizedModel, wrap_model

log = logging.getLogger(__name__)


def resolve_recipe(config: RecipeConfig | dict[str, Any]) -> RecipeConfig:
    """A validated recipe from a recipe or a plain mapping."""
    return config if isinstance(config, RecipeConfig) else parse_config(config)


def freeze_all(qmodel: QuantizedModel) -> None:
    """Freeze every weight quantizer not frozen yet (round to nearest with its current scale)."""
    for _, layer in qmodel.weight_layers():
        if layer.weight_quant is not None and not bool(layer.weight_quant.frozen):
            layer.weight_quant.freeze(layer.weight)


def quantize(
    model: nn.Module,
    adapter: DiTAdapter | str,
    calibration: CalibrationSet,
    config: RecipeConfig | dict[str, Any],
) -> QuantizedModel:
    """Calibrate a fake-quant copy of ``model`` on ``calibration`` per ``config`` (see module docstring).

    ``qmodel.report`` holds seconds per stage, temporal-feature errors per step and strategy,
    the selection choices and per-block reconstruction losses.
    """
    recipe = resolve_recipe(config)
    adapter = get_adapter(adapter) if isinstance(adapter, str) else adapter
    if not calibration.calls:
        raise ConfigError("calibration set has no recorded calls: record at least one sampler step")
    torch.manual_seed(recipe.seed)
    model.eval()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    qmodel = wrap_model(copy.deepcopy(model), adapter, recipe, calibration.timesteps)
    qmodel.model.requires_grad_(False)
    timings["wrap"] = time.perf_counter() - start

    stage = time.perf_counter()
    observe_activations(qmodel, calibration, recipe.progress)
    timings["activation_ranges"] = time.perf_counter() - stage

    stage = time.perf_counter()
    tib = TemporalInformationBlock.from_calibration(adapter, calibration, model_device(model))
    temporal_report = maintain_temporal_features(qmodel, model, tib, recipe, calibration)
    timings["temporal"] = time.perf_counter() - stage

    stage = time.perf_counter()
    reconstruction_report: dict[str, Any] = {}
    if recipe.reconstruction.enabled:
        reconstruction_report = reconstruct_blocks(qmodel, model, calibration, recipe)
    timings["reconstruction"] = time.perf_counter() - stage

    freeze_all(qmodel)
    record_final_errors(qmodel, model, tib, temporal_report)
    qmodel.recipe, qmodel.fingerprint = recipe, model_fingerprint(model)
    timings["total"] = time.perf_counter() - start
    qmodel.report = {
        "method": recipe.name,
        "seconds": timings,
        "temporal": temporal_report,
        "reconstruction": reconstruction_report,
        "quantized_weight_fraction": qmodel.quantized_weight_fraction(),
        "calibration_rows": sum(len(call.args[0]) for call in calibration.calls),
    }
    return qmodel


def calibrate_recipe(recipe: RecipeConfig, model: nn.Module | None = None,
                     device: torch.device | str | None = None) -> QuantizedModel:
    """Load the recipe's model (unless given), record its calibration set in one FP sampling
    pass and :func:`quantize` it; ``report["seconds"]`` gains ``record`` and ``calibration_total``.
    ``device``: move the model there first (None: leave it where it is; a loaded model is on CPU).

    Calibration prompts are the toy world's (default) or ``calibration.prompts_file`` encoded by
    ``calibration.text_encoder`` (a local T5 folder), sampled at ``calibration.video`` size.
    """
    from tfmq_video.calib.recorder import record_recipe_calibration

    adapter = get_adapter(recipe.model.adapter)
    if recipe.calibration.prompts_file is not None:
        from tfmq_video.calib.prompts import check_prompt_inputs

        check_prompt_inputs(recipe.calibration)  # a missing file or encoder fails before the model loads
    model = adapter.load_model(recipe.model.path) if model is None else model
    if device is not None:
        model = model.to(device)
    start = time.perf_counter()
    calibration = record_recipe_calibration(model, recipe.calibration, recipe.progress, recipe.model.adapter)
    record_seconds = time.perf_counter() - start
    log.info("recorded %d calls over %d steps in %.1f s (%.1f MB on CPU)", len(calibration.calls),
             len(calibration.timesteps), record_seconds, calibration.nbytes() / 2**20)
    qmodel = quantize(model, adapter, calibration, recipe)
    qmodel.report["seconds"]["record"] = record_seconds
    qmodel.report["seconds"]["calibration_total"] = time.perf_counter() - start
    return qmodel
