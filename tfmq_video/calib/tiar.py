"""TIAR: temporal information aware reconstruction of the temporal information block.

The TIB is one reconstruction unit: its weight rounding (AdaRound) and activation step sizes
(LSQ; per timestep under FSC) minimize the relative error of every temporal feature, summed
over all calibrated timesteps. Each timestep is one row of a single batch.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq_video.calib.optimize import RoundingSchedule, optimize_rounding, relative_error
from tfmq_video.calib.tib import TemporalInformationBlock
from tfmq_video.quant.config import TIBConfig
from tfmq_video.quant.model import QuantizedModel


def temporal_feature_loss(qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock) -> torch.Tensor:
    """Mean over features of the relative error summed over timesteps (differentiable)."""
    reference = tib.fp_features(fp_model)
    features = tib.features(qmodel.model, qmodel)
    return torch.stack([relative_error(features[name], reference[name]) for name in reference]).mean()


def run_tiar(
    qmodel: QuantizedModel, fp_model: nn.Module, tib: TemporalInformationBlock, config: TIBConfig,
    progress: bool = False,
) -> list[float]:
    """Optimize the TIB's quantization against the temporal features; returns the loss curve."""
    layers = [layer for _, layer in qmodel.weight_layers("tib")]
    acts = [layer.input_quant for layer in layers if layer.input_quant is not None]
    schedule = RoundingSchedule(config.iterations, config.lr_rounding, config.lr_scale, config.rounding_weight)
    return optimize_rounding(
        layers, acts, lambda _: temporal_feature_loss(qmodel, fp_model, tib), schedule, "TIAR", progress
    )
