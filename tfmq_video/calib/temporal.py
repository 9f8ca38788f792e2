"""The temporal maintenance stage: TIAR and/or FSC, the feature cache and the selection between them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tfmq_video.calib.cache import TemporalFeatureCache
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.calib.selection import (
    describe_choices,
    output_errors,
    select_for_trajectory,
    select_strategies,
)
from tfmq_video.calib.tiar import reconstruct_tib
from tfmq_video.calib.tib import TemporalInformationBlock, feature_errors, mean_error
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.quant.model import QuantizedModel


def _errors(qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return feature_errors(tib.features(qmodel.model, qmodel), tib.fp_features(fp_model))


def _as_lists(errors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {name: [float(v) for v in values] for name, values in errors.items()}


def build_cache(qmodel: QuantizedModel, tib: TemporalInformationBlock, fp_features: dict[str, torch.Tensor],
                bits: int, group_size: int | None = None) -> TemporalFeatureCache:
    """A cache of the FP features quantized to ``bits`` per step and channel group (shapes from ``fp_features``)."""
    dims = {name: value.shape[-1] for name, value in fp_features.items()}
    device = next(iter(fp_features.values())).device
    cache = TemporalFeatureCache(qmodel.context, dims, tib.conditions, bits, group_size).to(device)
    cache.fill(fp_features)
    return cache


def _selection(
    qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock, recipe: RecipeConfig,
    cache: TemporalFeatureCache, tib_errors: dict[str, torch.Tensor], cache_errors: dict[str, torch.Tensor],
    calibration: CalibrationSet | None, report: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The per (feature, step) choices: by feature error, by the trajectory cost of the feature
    errors (``tib.select_by: trajectory``; costs go to the report) or by the FP model's output
    error (``output``, which needs the calibration calls; its errors go to the report)."""
    if recipe.tib.select_by == "feature":
        return select_strategies(tib_errors, cache_errors)
    with torch.no_grad():
        candidates = {"tib": {k: v.detach() for k, v in tib.features(qmodel.model, qmodel).items()},
                      "cache": cache.all_features()}
    if recipe.tib.select_by == "trajectory":
        choices, costs = select_for_trajectory(candidates["tib"], candidates["cache"], tib.fp_features(fp_model))
        report["trajectory_costs"] = costs
        return choices
    if calibration is None:
        raise ValueError("tib.select_by: output needs the calibration set")
    errors = output_errors(fp_model, qmodel.adapter, calibration, candidates, recipe.progress)
    report["output_errors"] = {strategy: _as_lists(values) for strategy, values in errors.items()}
    return select_strategies(errors["tib"], errors["cache"])


def maintain_temporal_features(
    qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock, recipe: RecipeConfig,
    calibration: CalibrationSet | None = None,
) -> dict[str, Any]:
    """Calibrate the TIB per ``recipe.tib`` (TIAR, or layer-wise reconstruction for the Q-Diffusion
    baseline); install the cache when used. Returns a report with per-step errors of each strategy
    (``initial``, ``tib``, ``cache``, ``final``; ``output_errors`` when selecting by output), the
    choices and ``tib_reconstruction`` (per unit losses, errors and seconds) when the TIB was
    reconstructed. ``calibration``: the recorded calls, needed by ``tib.select_by: output``."""
    cfg = recipe.tib
    report: dict[str, Any] = {"initial": _as_lists(_errors(qmodel, fp_model, tib))}
    tib_layers = [layer for _, layer in qmodel.weight_layers("tib")]
    if (cfg.tiar or cfg.layerwise_reconstruction) and tib_layers:
        objective = "temporal_features" if cfg.tiar else "layer_outputs"
        reconstruction = reconstruct_tib(qmodel, fp_model, tib, cfg, objective, recipe.progress)
        report["tib_reconstruction"] = reconstruction
        if cfg.tiar:
            tiar = reconstruction["units"]["TIAR"]
            report["tiar_loss"] = [tiar["first_loss"], tiar["last_loss"]] if tiar["first_loss"] is not None else []
    for layer in tib_layers:
        if layer.weight_quant is not None and not bool(layer.weight_quant.frozen):
            layer.weight_quant.freeze(layer.weight)
    tib_errors = _errors(qmodel, fp_model, tib)
    report["tib"] = _as_lists(tib_errors)
    if cfg.cache and not cfg.keep_fp:
        fp_features = tib.fp_features(fp_model)
        cache = build_cache(qmodel, tib, fp_features, recipe.cache_bits(), cfg.cache_group_size)
        cache_errors = feature_errors(cache.all_features(), fp_features)
        report["cache"] = _as_lists(cache_errors)
        if cfg.select:
            use_cache = _selection(qmodel, fp_model, tib, recipe, cache, tib_errors, cache_errors, calibration, report)
        else:
            use_cache = {name: torch.ones(len(tib), dtype=torch.bool) for name in fp_features}
        cache.set_choices(use_cache)
        qmodel.set_temporal_cache(cache)
        report["choices"] = describe_choices(use_cache)
    record_final_errors(qmodel, fp_model, tib, report)
    return report


def record_final_errors(qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock,
                        report: dict[str, Any]) -> None:
    """Set ``report["final"]`` (per feature and step) and ``report["temporal_feature_error"]`` (their
    mean) to the errors of the features ``qmodel`` serves now. Called again once every layer is frozen,
    since TIB layers calibrated with their block (``tib.in_block_layers: block``) change after this stage."""
    final = _errors(qmodel, fp_model, tib)
    report["final"] = _as_lists(final)
    report["temporal_feature_error"] = mean_error(final)
