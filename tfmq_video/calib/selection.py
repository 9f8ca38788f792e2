"""Disturbance-aware selection: per temporal feature and step, the strategy with the lower error.

Three measures of "error" (``tib.select_by``):

- ``feature``: the relative error of the temporal feature itself against FP (the paper's choice);
- ``output``: the relative error of the FP model's output on the recorded calibration calls of
  that step when this one feature alone is served by the strategy (every other feature and layer
  FP). A feature error says how far a feature moved, not how much the move matters: two
  candidates with equal relative error can differ in their effect on the denoiser's output;
- ``trajectory``: the feature errors plus their sum over the steps, minimized jointly over the
  per-step choices of each feature. The sampler integrates the denoiser over the steps, so an
  error that points the same way at every step (a quantized TIB's weights are the same at every
  step) drifts the trajectory, while independent per-step errors (a per-step quantized cache)
  partly cancel. On the toy model at W4A8 the calibrated TIB's ``t_mlp`` error had a mean cosine
  of 0.49 between steps and the cache's 0.003 (docs/results.md, session 10).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from dit_adapters.base import DiTAdapter, TemporalFeatures, TemporalOverride
from tfmq_video.calib.recorder import CalibrationSet, RecordedCall
from tfmq_video.devices import model_device


def select_strategies(
    tib_errors: Mapping[str, torch.Tensor], cache_errors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{feature: (S,) bool}``: True where the cache's error is not above the quantized TIB's."""
    return {name: cache_errors[name] <= tib_errors[name] for name in cache_errors}


def describe_choices(use_cache: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """JSON-friendly record of the choices: ``{feature: ["cache" | "tib", ...] per step}``."""
    return {name: ["cache" if bool(flag) else "tib" for flag in flags] for name, flags in use_cache.items()}


def trajectory_cost(errors: torch.Tensor) -> torch.Tensor:
    """``sum_s |e_s|^2 + |sum_s e_s|^2`` of per-step errors (S, dim): the per-step errors and their
    drift over the trajectory (for independent errors the two terms are about equal; for one
    error repeated at every step the second is S times the first)."""
    errors = errors.double()
    return errors.pow(2).sum() + errors.sum(0).pow(2).sum()


def select_for_trajectory(
    tib_features: TemporalFeatures, cache_features: TemporalFeatures, fp_features: TemporalFeatures
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Per feature, the per-step choices (True = cache) minimizing :func:`trajectory_cost` of the
    served errors: start from the cheapest of the per-step lower errors, the cache everywhere and
    the TIB everywhere, then flip single steps while the cost falls (coordinate descent: each
    accepted flip lowers it, so it stops, never above either strategy alone). Returns the choices
    and, per feature, the cost of the TIB everywhere, the cache everywhere and the choices."""
    choices, costs = {}, {}
    for name, fp in fp_features.items():  # on CPU: the search runs many small steps
        tib_err = tib_features[name].double().cpu() - fp.double().cpu()
        cache_err = cache_features[name].double().cpu() - fp.double().cpu()
        def cost(flags: torch.Tensor, tib_err: torch.Tensor = tib_err, cache_err: torch.Tensor = cache_err) -> float:
            return float(trajectory_cost(torch.where(flags[:, None], cache_err, tib_err)))

        everywhere = torch.ones(len(fp), dtype=torch.bool)
        starts = (cache_err.pow(2).sum(1) <= tib_err.pow(2).sum(1), everywhere, ~everywhere)
        use_cache = min(starts, key=cost)
        best = cost(use_cache)
        improved = True
        while improved:
            improved = False
            for step in range(len(use_cache)):
                trial = use_cache.clone()
                trial[step] = ~trial[step]
                trial_cost = cost(trial)
                if trial_cost < best:
                    use_cache, best, improved = trial, trial_cost, True
        choices[name] = use_cache
        costs[name] = {"tib": cost(~everywhere), "cache": cost(everywhere), "selected": best}
    return choices, costs


def _calls_by_step(calibration: CalibrationSet) -> dict[int, list[RecordedCall]]:
    by_step: dict[int, list[RecordedCall]] = defaultdict(list)
    for call in calibration.calls:
        by_step[call.step].append(call)
    return by_step


def _serving(name: str, value: torch.Tensor) -> TemporalOverride:
    """An override that computes the FP features and replaces ``name`` by ``value`` (dim,) in every row."""

    def override(
        batch: int, conditions: Mapping[str, torch.Tensor], compute: Callable[[], TemporalFeatures],
        names: Sequence[str] | None,
    ) -> TemporalFeatures:
        features = dict(compute())
        if name in features:
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
    device = model_device(fp_model)
    errors = {strategy: {name: torch.full((steps,), float("inf")) for name in features}
              for strategy, features in candidates.items()}
    jobs = [(strategy, name) for strategy, features in candidates.items() for name in features]
    try:
        for step in tqdm(sorted(by_step), desc="selection by output", leave=False, disable=not progress):
            calls = [call.on(device) for call in by_step[step]]
            adapter.override_temporal_features(fp_model, None)
            references = [adapter.output_tensor(fp_model(*args, **kwargs)).float() for args, kwargs in calls]
            norm = sum(float(ref.pow(2).sum()) for ref in references)
            for strategy, name in jobs:
                adapter.override_temporal_features(fp_model, _serving(name, candidates[strategy][name][step]))
                diff = sum(float((adapter.output_tensor(fp_model(*args, **kwargs)).float() - ref).pow(2).sum())
                           for (args, kwargs), ref in zip(calls, references, strict=True))
                errors[strategy][name][step] = diff / max(norm, 1e-30)
    finally:
        adapter.override_temporal_features(fp_model, None)
    return errors
