"""The temporal information block (TIB) as an object: its modules, inputs and temporal features.

The TIB depends on the timestep and sample-independent conditions only, so it is evaluated
once per calibrated timestep: all calibrated timesteps form one batch whose rows select their
own per-timestep quantization parameters.
"""

from __future__ import annotations

import copy
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
    def from_calibration(cls, adapter: DiTAdapter, calibration: CalibrationSet,
                         device: torch.device | str = "cpu") -> TemporalInformationBlock:
        """Timesteps and conditions of a calibration set (conditions must not vary between calls),
        on ``device`` (where the model runs)."""
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
        timesteps = torch.tensor(calibration.timesteps, dtype=torch.float32, device=device)
        return cls(adapter, timesteps, {k: v.to(device) for k, v in conditions.items()})

    def __len__(self) -> int:
        return len(self.timesteps)

    def modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The TIB's modules inside ``model``."""
        return [(name, model.get_submodule(name)) for name in self.adapter.temporal_module_names(model)]

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


def graft_tib(qmodel: QuantizedModel, donor: nn.Module, cache: nn.Module | None = None) -> QuantizedModel:
    """A copy of ``qmodel`` whose temporal information block is ``donor``'s, its features served by
    ``cache`` (a :class:`~tfmq_video.calib.cache.TemporalFeatureCache` of the donor's calibration)
    or computed by the grafted modules when None.

    ``donor``: a model of the same family, FP or another calibration's ``qmodel.model`` on the same
    calibrated timesteps. Everything outside the TIB stays ``qmodel``'s, so grafts of several
    donors differ in their TIB alone: an ablation that holds the blocks' calibration fixed. The
    grafted quantizers and the cache are copies rebound to the new model's step context.
    """
    donor_context = getattr(cache, "context", None)
    if donor_context is not None and not torch.equal(donor_context.timesteps, qmodel.context.timesteps):
        raise ConfigError("the donor's cache was calibrated on other timesteps than this model; graft a TIB of "
                          "a calibration on the same calibration set")
    grafted = copy.deepcopy(qmodel)
    grafted.set_temporal_cache(None)  # the copied override serves the TIB modules replaced below
    for name in grafted.adapter.temporal_module_names(grafted.model):
        parent_name, _, child = name.rpartition(".")
        parent = grafted.model.get_submodule(parent_name) if parent_name else grafted.model
        setattr(parent, child, copy.deepcopy(donor.get_submodule(name)))
    cache = copy.deepcopy(cache)
    for module in [*grafted.model.modules(), *([] if cache is None else [cache])]:
        if getattr(module, "context", None) is not None:
            module.context = grafted.context
    grafted.set_temporal_cache(cache)
    return grafted
