"""Disturbance-aware selection: per temporal feature and step, the strategy with the lower error.

Two measures of "error" (``tib.select_by``):

- ``feature``: the relative error of the temporal feature itself against FP (the paper's choice);
- ``output``: the relative error of the FP model's output on the recorded calibration calls of
  that step when this one feature alone is served by the strategy (every other feature and layer
  FP). A feature error says how far a feature moved, not how much the move matters: two
  candidates with equal relative error can differ in their effect on the denoiser's output, which
  is what the sampler integrates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn
from tqdm import tqdm

from dit_adapters.base import DiTAdapter, TemporalFeatures
from tfmq_video.calib.recorder import CalibrationSet, RecordedCall


def select_strategies(
    tib_errors: Mapping[str, torch.Tensor], cache_errors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{feature: (S,) bool}``: True where the cache's error is not above the quantized TIB's."""
    return {name: cache_errors[name] <= tib_errors[name] for name in cache_errors}


def describe_choices(use_cache: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """JSON-friendly record of the choices: ``{feature: ["cache" | "tib", ...] per step}``."""
    return {name: ["cache" if bool(flag) else "tib" for flag in flags] for name, flags in use_cache.items()}


def _calls_by_step(calibration: CalibrationSet) -> dict[int, list[RecordedCall]]:
    by_step: dict[int, list[RecordedCall]] = defaultdict(list)
    for call in calibration.calls:
        by_step[call.step].append(call)
    return by_step


def _serving(name: str, value: torch.Tensor):  # noqa: ANN202 (a TemporalOverride)
    """An override that computes the FP features and replaces ``name`` by ``value`` (dim,) in every row."""

    def override(timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor], compute) -> TemporalFeatures:  # noqa: ANN001
        features = dict(compute())
        reference = features[name]
        features[name] = value.to(reference.dtype).expand_as(reference)
        return features

    return override


@torch.no_grad()
def output_errors(
    fp_model: nn.Module, adapter: DiTAdapter, calibration: CalibrationSet,
    candidates: Mapping[str, TemporalFeatures], progress: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{strategy: {feature: (S,)}}``: relative squared error of the FP model's output over the
    recorded calls of each calibrated step when that feature alone is served by the strategy.

    ``candidates``: ``{strategy: {feature: (S, dim)}}`` (what each strategy would serve per step).
    The FP model's TIB is routed through a temporary override and restored afterwards. Steps with
    no recorded call get an infinite error (the selection then falls back to the cache)."""
    steps = len(calibration.timesteps)
    by_step = _calls_by_step(calibration)
    errors = {strategy: {name: torch.full((steps,), float("inf")) for name in features}
              for strategy, features in candidates.items()}
    jobs = [(strategy, name) for strategy, features in candidates.items() for name in features]
    try:
        for step in tqdm(sorted(by_step), desc="selection by output", leave=False, disable=not progress):
            calls = by_step[step]
            adapter.override_temporal_features(fp_model, None)
            references = [fp_model(*call.args, **call.kwargs).float() for call in calls]
            norm = sum(float(ref.pow(2).sum()) for ref in references)
            for strategy, name in jobs:
                adapter.override_temporal_features(fp_model, _serving(name, candidates[strategy][name][step]))
                diff = sum(float((fp_model(*call.args, **call.kwargs).float() - ref).pow(2).sum())
                           for call, ref in zip(calls, references, strict=True))
                errors[strategy][name][step] = diff / max(norm, 1e-30)
    finally:
        adapter.override_temporal_features(fp_model, None)
    return errors
