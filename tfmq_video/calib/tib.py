"""The temporal information block (TIB) as an object: its modules, inputs and temporal features.

The TIB depends on the timestep and sample-independent conditions only, so it is evaluated
once per calibrated timestep: all calibrated timesteps form one batch whose rows select their
own per-timestep quantization parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_adapters.base import DiTAdapter, TemporalFeatures
from tfmq_video.calib.optimize import relative_error
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.errors import ConfigError
from tfmq_video.quant.model import QuantizedModel


@dataclass
class TemporalInformationBlock:
    """The TIB of a model family for the calibrated timesteps and conditions.

    ``timesteps`` (S,) are the calibrated timesteps (row i = calibrated step i); ``conditions``
    the other TIB inputs (e.g. fps), equal for every recorded call.
    """

    adapter: DiTAdapter
    timesteps: torch.Tensor
    conditions: Mapping[str, torch.Tensor]
    _fp_cache: TemporalFeatures | None = field(default=None, repr=False)

    @classmethod
    def from_calibration(cls, adapter: DiTAdapter, calibration: CalibrationSet) -> TemporalInformationBlock:
        """Timesteps and conditions of a calibration set (conditions must not vary between calls)."""
        conditions: dict[str, torch.Tensor] | None = None
        for call in calibration.calls:
            current = adapter.temporal_conditions(call.args, call.kwargs)
            if conditions is None:
                conditions = current
            elif any(not torch.equal(conditions[k], current[k]) for k in conditions):
                raise ConfigError(
                    "the temporal information block's conditions (e.g. fps) differ between calibration calls; "
                    "calibrate one condition value at a time"
                )
        if conditions is None:
            raise ConfigError("calibration set has no recorded calls")
        return cls(adapter, torch.tensor(calibration.timesteps, dtype=torch.float32), conditions)

    def __len__(self) -> int:
        return len(self.timesteps)

    def modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The TIB's modules inside ``model``."""
        return [(name, model.get_submodule(name)) for name in self.adapter.temporal_modules]

    def features(self, model: nn.Module, qmodel: QuantizedModel | None = None) -> TemporalFeatures:
        """Temporal features (S, dim) per feature name; with ``qmodel``, rows use their step's parameters."""
        if qmodel is None:
            return self.adapter.temporal_features(model, self.timesteps, self.conditions)
        qmodel.context.row_indices = torch.arange(len(self))
        try:
            return self.adapter.temporal_features(model, self.timesteps, self.conditions)
        finally:
            qmodel.context.row_indices = None

    def fp_features(self, fp_model: nn.Module) -> TemporalFeatures:
        """The FP temporal features (computed once)."""
        if self._fp_cache is None:
            with torch.no_grad():
                self._fp_cache = {k: v.detach() for k, v in self.features(fp_model).items()}
        return self._fp_cache


def feature_errors(features: TemporalFeatures, reference: TemporalFeatures) -> dict[str, torch.Tensor]:
    """Relative squared error per feature and calibrated step: ``{name: (S,)}``."""
    return {name: relative_error(features[name].float(), reference[name].float(), dim=0).detach() for name in reference}


def mean_error(errors: Mapping[str, torch.Tensor]) -> float:
    """The temporal-feature error: mean over features and steps."""
    return float(torch.stack([e.mean() for e in errors.values()]).mean())
