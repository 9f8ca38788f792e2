"""Reconstruction of the temporal information block (TIB): TIAR, or layer by layer (Q-Diffusion).

One function, :func:`reconstruct_tib`, optimizes the TIB's weight rounding (AdaRound) and
activation step sizes (LSQ) with the ``tib`` schedule; only the objective differs:

- ``"temporal_features"`` (TIAR, our method): the TIB is one reconstruction unit whose
  parameters jointly minimize the relative error of every temporal feature, summed over all
  calibrated timesteps.
- ``"layer_outputs"`` (the Q-Diffusion/BRECQ treatment of layers outside the blocks): every TIB
  layer, in execution order, is its own unit minimizing the relative error of its own output
  against the FP layer's output on the FP input, its input coming from the already quantized
  predecessors. With ``tib.fsc`` off this leaves one static activation parameter set for all
  timesteps.

Either way each calibrated timestep is one row of a single batch (the TIB depends on t alone),
and both get the same number of layer updates: ``tib.iterations`` per layer, i.e. TIAR runs
``iterations x (number of TIB layers)`` steps. With only ``iterations`` steps TIAR had a fifth of
the layer-wise budget on STDiT3 (5 TIB layers) and ended above it (W4A6 temporal-feature error
5.95e-5 vs 4.44e-5); with the same budget it is below (3.23e-5; docs/results.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from tfmq_video.calib.observe import recording_layer_io
from tfmq_video.calib.optimize import RoundingSchedule, optimize_rounding, relative_error
from tfmq_video.calib.tib import TemporalInformationBlock
from tfmq_video.quant.config import TIBConfig
from tfmq_video.quant.model import QuantizedModel
from tfmq_video.quant.modules import QuantWeightLayer

Objective = Literal["temporal_features", "layer_outputs"]
OBJECTIVES: tuple[Objective, ...] = ("temporal_features", "layer_outputs")
# one reconstruction unit: name, its layers, its loss and (optionally) its output error after the fit
Unit = tuple[str, list[QuantWeightLayer], Callable[[int], torch.Tensor], Callable[[], float] | None]


def temporal_feature_loss(
    qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock
) -> torch.Tensor:
    """Mean over features of the relative error summed over timesteps (differentiable)."""
    reference = tib.fp_features(fp_model)
    features = tib.features(qmodel.model, qmodel)
    return torch.stack([relative_error(features[name], reference[name]) for name in reference]).mean()


def tib_schedule(config: TIBConfig, layers_per_unit: int = 1) -> RoundingSchedule:
    """The optimization schedule of one TIB unit from ``tib``: ``iterations`` per layer of the unit
    (so TIAR, one unit of every TIB layer, takes as many steps as layer-wise reconstruction takes in
    all), the learning rates and the rounding weight."""
    return RoundingSchedule(config.iterations * layers_per_unit, config.lr_rounding, config.lr_scale,
                            config.rounding_weight)


def capture_layer_io(
    model: nn.Module,
    tib: TemporalInformationBlock,
    names: Sequence[str],
    qmodel: QuantizedModel | None = None,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One TIB pass (no gradients): the layers of ``names`` that ran, in execution order, and
    their inputs and outputs over the calibrated timesteps (``qmodel``: rows use their step)."""
    with recording_layer_io(model, names) as seen, torch.no_grad():
        tib.features(model, qmodel)
    for name in seen.order:
        if seen.calls(name) > 1:
            raise RuntimeError(
                f"TIB layer {name} runs more than once per pass: layer-wise "
                "reconstruction needs one input per layer"
            )
    return seen.order, {k: v[0] for k, v in seen.inputs.items()}, {k: v[0] for k, v in seen.outputs.items()}


def layer_output_loss(
    qmodel: QuantizedModel, layer: QuantWeightLayer, inputs: torch.Tensor, target: torch.Tensor
) -> Callable[[int], torch.Tensor]:
    """Relative error of ``layer`` on ``inputs`` (one row per calibrated step) against ``target``."""
    rows = torch.arange(len(inputs))

    def loss(_: int) -> torch.Tensor:
        qmodel.context.row_indices = rows
        try:
            return relative_error(layer(inputs), target)
        finally:
            qmodel.context.row_indices = None

    return loss


def _joint_unit(
    qmodel: QuantizedModel,
    fp_model: nn.Module,
    tib: TemporalInformationBlock,
    layers: dict[str, QuantWeightLayer],
) -> Iterator[Unit]:
    yield "TIAR", list(layers.values()), lambda _: temporal_feature_loss(qmodel, fp_model, tib), None


def _layer_units(
    qmodel: QuantizedModel,
    fp_model: nn.Module,
    tib: TemporalInformationBlock,
    layers: dict[str, QuantWeightLayer],
) -> Iterator[Unit]:
    """Each layer in execution order; its input is captured after its predecessors were frozen."""
    order, _, targets = capture_layer_io(fp_model, tib, list(layers))
    for name in order:
        _, q_inputs, _ = capture_layer_io(qmodel.model, tib, [name], qmodel)
        loss = layer_output_loss(qmodel, layers[name], q_inputs[name], targets[name])
        yield name, [layers[name]], loss, lambda loss=loss: float(loss(0).detach())


def reconstruct_tib(
    qmodel: QuantizedModel,
    fp_model: nn.Module,
    tib: TemporalInformationBlock,
    config: TIBConfig,
    objective: Objective = "temporal_features",
    progress: bool = False,
) -> dict[str, Any]:
    """Optimize the TIB's quantization against ``objective`` (see module docstring); every
    reconstructed layer is frozen after. Returns ``{"objective", "units": {name: {...}}, "seconds"}``
    with, per unit, the loss curve's ends, the seconds and (layer-wise) the layer's output error
    before (``initial_error``: initialized quantizers, i.e. round to nearest) and after the fit."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown TIB objective {objective!r}; use one of {OBJECTIVES}")
    start = time.perf_counter()
    layers = dict(qmodel.weight_layers("tib"))
    build = _joint_unit if objective == "temporal_features" else _layer_units
    units: dict[str, dict[str, Any]] = {}
    for name, unit_layers, loss, output_error in build(qmodel, fp_model, tib, layers):
        schedule = tib_schedule(config, len(unit_layers))
        unit_start = time.perf_counter()
        report: dict[str, Any] = {}
        if output_error is not None:
            with torch.no_grad():
                report["initial_error"] = output_error()
        acts = [layer.input_quant for layer in unit_layers if layer.input_quant is not None]
        losses = optimize_rounding(unit_layers, acts, loss, schedule, name, progress)
        report.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
        if output_error is not None:
            with torch.no_grad():
                report["output_error"] = output_error()
        report["seconds"] = time.perf_counter() - unit_start
        units[name] = report
    return {"objective": objective, "units": units, "seconds": time.perf_counter() - start}
