"""Cache-based temporal feature maintenance and the module that serves the features at inference.

Temporal features depend on the timestep only, so they are precomputed for every calibrated
step, quantized with per-step parameters chosen against the FP features (MSE search) and
served by lookup. A per-(step, feature) choice (see :mod:`tfmq_video.calib.selection`) says
whether the cache or the quantized TIB serves a feature. Timesteps outside the calibrated set
map to the nearest calibrated step (the :class:`StepContext` warns once); calls with other
TIB conditions than calibrated (e.g. another fps) fall back to the quantized TIB, warning once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from dit_adapters.base import TemporalFeatures
from tfmq_video.quant.affine import IntRange, dequantize, quantize
from tfmq_video.quant.quantizers import StepContext, search_qparams

log = logging.getLogger(__name__)


def _group_size(dim: int, group_size: int | None) -> int:
    """``group_size`` when it divides ``dim``, else the whole feature (one group)."""
    return group_size if group_size is not None and dim % group_size == 0 else dim


class TemporalFeatureCache(nn.Module):
    """Quantized temporal features per calibrated step, with a per-step "use the cache" flag.

    Buffers per feature ``f``: ``f_codes`` (S, dim) int8, ``f_scale``/``f_zero_point`` (S, G) with
    one scale per step and group of ``group_size`` channels (G = 1 when ``group_size`` is None or
    does not divide the feature's width), ``f_use_cache`` (S,) bool; per condition ``c``: ``condition_c``.
    Groups cost a few bytes per step and keep an outlier channel (e.g. one adaLN shift) from
    coarsening the grid of a whole feature.
    """

    def __init__(self, context: StepContext, feature_dims: Mapping[str, int], conditions: Mapping[str, torch.Tensor],
                 bits: int, group_size: int | None = None) -> None:
        super().__init__()
        self.context = context
        self.grid = IntRange(bits, signed=True)
        self.group_size = group_size
        self.group_sizes = {name: _group_size(dim, group_size) for name, dim in feature_dims.items()}
        self.feature_names = tuple(feature_dims)
        self.condition_names = tuple(conditions)
        steps = len(context)
        for name, dim in feature_dims.items():
            self.register_buffer(f"{name}_codes", torch.zeros(steps, dim, dtype=torch.int8))
            groups = dim // self.group_sizes[name]
            self.register_buffer(f"{name}_scale", torch.ones(steps, groups))
            self.register_buffer(f"{name}_zero_point", torch.zeros(steps, groups))
            self.register_buffer(f"{name}_use_cache", torch.ones(steps, dtype=torch.bool))
        for name, value in conditions.items():
            self.register_buffer(f"condition_{name}", value.detach().clone().float())
        self._warned = False

    def fill(self, fp_features: Mapping[str, torch.Tensor]) -> None:
        """Quantize the FP features (S, dim) per step and channel group with MSE-searched parameters."""
        for name in self.feature_names:
            values = fp_features[name].detach().float()
            steps, dim = values.shape
            rows = values.reshape(-1, self.group_sizes[name])
            scale, zero = search_qparams(rows, self.grid, "mse")
            codes = quantize(rows, scale, zero, self.grid).reshape(steps, dim)
            getattr(self, f"{name}_codes").copy_(codes.to(torch.int8))
            getattr(self, f"{name}_scale").copy_(scale.reshape(steps, -1))
            getattr(self, f"{name}_zero_point").copy_(zero.reshape(steps, -1))

    def lookup(self, name: str, steps: int | torch.Tensor) -> torch.Tensor:
        """Dequantized cached feature ``name`` at ``steps`` ((dim,) for an int, (R, dim) for indices)."""
        codes = getattr(self, f"{name}_codes")[steps]
        grouped = codes.reshape(*codes.shape[:-1], -1, self.group_sizes[name])
        scale = getattr(self, f"{name}_scale")[steps].unsqueeze(-1)
        zero = getattr(self, f"{name}_zero_point")[steps].unsqueeze(-1)
        return dequantize(grouped, scale, zero).reshape(codes.shape)

    def all_features(self) -> TemporalFeatures:
        """Every cached feature at every step, (S, dim) each."""
        return {name: self.lookup(name, torch.arange(len(self.context))) for name in self.feature_names}

    def set_choices(self, use_cache: Mapping[str, torch.Tensor]) -> None:
        """Per feature, which steps (S,) bool are served from the cache."""
        for name, flags in use_cache.items():
            getattr(self, f"{name}_use_cache").copy_(flags)

    def _conditions_match(self, conditions: Mapping[str, torch.Tensor]) -> bool:
        for name in self.condition_names:
            value = conditions[name].detach().reshape(-1).float().to(getattr(self, f"condition_{name}").device)
            if not torch.allclose(value, getattr(self, f"condition_{name}").reshape(-1)):
                if not self._warned:
                    self._warned = True
                    log.warning("temporal feature cache was calibrated for %s=%s, got %s; using the quantized TIB",
                                name, getattr(self, f"condition_{name}").tolist(), value.tolist())
                return False
        return True

    def forward(
        self, batch: int, conditions: Mapping[str, torch.Tensor], compute: Callable[[], TemporalFeatures],
        names: Sequence[str] | None = None,
    ) -> TemporalFeatures:
        """Temporal features ``names`` (every cached one when None) for ``batch`` rows: cached where
        chosen for the current step (or each row's step, during block reconstruction), computed elsewhere."""
        if not self._conditions_match(conditions):
            return compute()
        steps = self.context.current()
        computed: TemporalFeatures | None = None
        out = {}
        for name in self.feature_names if names is None else names:
            use = getattr(self, f"{name}_use_cache")[steps]
            cached = self.lookup(name, steps)
            if cached.dim() == 1:
                cached = cached.expand(batch, -1)
            if bool(use.all()):
                out[name] = cached
                continue
            computed = compute() if computed is None else computed
            out[name] = torch.where(use.reshape(-1, 1), cached.to(computed[name].dtype), computed[name])
        return out
