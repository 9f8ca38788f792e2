"""Fake quantizers for weights and activations, with their initialization and learnable parts.

- :class:`WeightQuantizer`: per output channel or per group, min-max / percentile / MSE
  initialization, learnable step size (LSQ) and learnable rounding (AdaRound), then frozen
  integer codes.
- :class:`ActQuantizer`: per tensor static, per token dynamic, or per timestep static (FSC:
  one scale and zero point per calibrated step, picked by the :class:`StepContext`).

Both are ``nn.Module`` objects whose state dict holds every number needed to reproduce them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.quant.affine import (
    IntRange,
    code_dtype,
    fake_quantize,
    group_multiplier_limit,
    minmax_qparams,
    quantize,
)
from tfmq_video.quant.context import TimestepContext

InitMethod = Literal["minmax", "percentile", "mse"]
ActMode = Literal["static", "per_timestep", "dynamic_per_token"]
SUPPORTED_GROUP_SIZES = (64, 128)
MSE_RATIOS = torch.linspace(0.3, 1.0, 36)

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


class StepContext(TimestepContext):
    """A :class:`TimestepContext` that can also give every row of a batch its own step.

    ``row_indices`` (a LongTensor over the batch) is set while calibration evaluates rows
    from several timesteps at once; per-timestep quantizers then pick one parameter set per row.
    """

    def __init__(self, calibrated_timesteps: list[float], atol: float = 1e-3) -> None:
        super().__init__(calibrated_timesteps, atol)
        self.row_indices: torch.Tensor | None = None

    def current(self) -> int | torch.Tensor:
        """The row indices when set, else the scalar step index."""
        return self.row_indices if self.row_indices is not None else self.index


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is quantized: bits, symmetric (signed) or not, per channel or per group, init.

    ``integer_group_scales``: every group scale of a row is an integer multiple of one float scale
    per row (:func:`integer_group_scales`), so the runtime can expand the codes into one per-channel
    int8 weight and run a single integer GEMM per layer. No effect per channel.
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    init: InitMethod = "minmax"
    percentile: float = 0.999
    integer_group_scales: bool = False

    def __post_init__(self) -> None:
        grid = IntRange(self.bits, self.symmetric)
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"weight group_size must be one of {SUPPORTED_GROUP_SIZES} or null, got {self.group_size}")
        if self.integer_group_scales:
            group_multiplier_limit(grid)


@dataclass(frozen=True)
class ActSpec:
    """How an activation is quantized: bits, symmetric or not, mode and initialization."""

    bits: int = 8
    symmetric: bool = False
    mode: ActMode = "static"
    init: InitMethod = "mse"
    percentile: float = 0.9999

    def __post_init__(self) -> None:
        IntRange(self.bits, self.symmetric)
        if self.mode not in ("static", "per_timestep", "dynamic_per_token"):
            raise ConfigError(f"unknown activation mode {self.mode!r}: use static, per_timestep or dynamic_per_token")


# --------------------------------------------------------------------------- range search


def search_qparams(
    rows: torch.Tensor, grid: IntRange, method: InitMethod, percentile: float = 0.999
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, shape (R, 1), for each row of ``rows`` (R, n).

    ``minmax`` covers the full range; ``percentile`` clips to the given quantiles;
    ``mse`` shrinks the min-max range by the ratio (of :data:`MSE_RATIOS`) with the lowest
    squared quantization error per row.
    """
    rows = rows.detach().float()
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    if method == "minmax":
        return minmax_qparams(lo, hi, grid)
    if method == "percentile":
        lo = torch.quantile(rows, 1.0 - percentile, dim=1, keepdim=True)
        hi = torch.quantile(rows, percentile, dim=1, keepdim=True)
        return minmax_qparams(lo, hi, grid)
    if method != "mse":
        raise ConfigError(f"unknown init method {method!r}: use minmax, percentile or mse")
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_zero = minmax_qparams(lo, hi, grid)
    for ratio in MSE_RATIOS.tolist():
        scale, zero = minmax_qparams(lo * ratio, hi * ratio, grid)
        err = (fake_quantize(rows, scale, zero, grid) - rows).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# --------------------------------------------------------------------------- weights


def group_size_for(fan_in: int, group_size: int | None) -> int | None:
    """``group_size``, or None (per channel) for a layer whose ``fan_in`` is not a multiple of it
    (a small patch embedding, say): the rule calibration and RTN export share."""
    if group_size is not None and fan_in % group_size:
        return None
    return group_size


def weight_rows(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, ...) weight -> (out, in) per channel or (out * in / g, g) per group."""
    flat = weight.reshape(weight.shape[0], -1)
    if group_size is None:
        return flat
    if flat.shape[1] % group_size:
        raise ConfigError(
            f"weight of shape {tuple(weight.shape)} has {flat.shape[1]} inputs, not a multiple of group_size {group_size}"
        )
    return flat.reshape(-1, group_size)


def integer_group_scales(
    rows: torch.Tensor, scale: torch.Tensor, out_features: int, grid: IntRange, method: InitMethod
) -> torch.Tensor:
    """Snap the group scales (R, 1) of weight ``rows`` (R, g) to ``row_scale * k`` (QServe-style
    two-level scales), with R = out_features * groups and a symmetric ``grid``.

    Per output row, ``row_scale`` is the row's largest group scale over ``K`` =
    :func:`~tfmq_video.quant.affine.group_multiplier_limit` and each group's integer ``k`` in 1..K is
    the one with the lowest squared rounding error of the group, among all of 1..K (``mse``) or the
    two next to the searched scale (``minmax``, ``percentile``: the step moves by less than one
    ``row_scale``, and the largest group keeps its scale).
    """
    limit = group_multiplier_limit(grid)
    rows = rows.detach().float()
    per_row = scale.reshape(out_features, -1)
    unit = (per_row.amax(dim=1, keepdim=True) / limit).expand_as(per_row).reshape(-1, 1)
    if method == "mse":
        candidates = [unit * k for k in range(1, limit + 1)]
    else:
        below = torch.clamp(torch.floor(scale / unit + 1e-6), 1, limit)
        candidates = [unit * below, unit * torch.clamp(below + 1, max=limit)]
    best_err = torch.full_like(unit, math.inf)
    best = unit.clone()
    for candidate in candidates:
        err = (fake_quantize(rows, candidate, 0.0, grid) - rows).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, candidate, best)
    return best


def search_weight_qparams(
    weight: torch.Tensor, grid: IntRange, method: InitMethod, group_size: int | None = None,
    percentile: float = 0.999, integer_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_qparams` of ``weight`` (out, ...) per channel or per group (shape (R, 1), rows
    as in :func:`weight_rows`), group scales snapped by :func:`integer_group_scales` when
    ``integer_scales`` is set. Calibration and RTN export both set weights up here."""
    rows = weight_rows(weight, group_size)
    scale, zero = search_qparams(rows, grid, method, percentile)
    if integer_scales and group_size is not None:
        scale = integer_group_scales(rows, scale, weight.shape[0], grid, method)
    return scale, zero


class WeightQuantizer(nn.Module):
    """Fake quantizer of one weight tensor (see module docstring).

    Modes: ``rtn`` (round to nearest, straight-through), ``adaround`` (learned rounding
    ``floor(w/s) + h(alpha)``) and ``frozen`` (integer codes stored in the ``codes`` buffer).
    """

    def __init__(self, spec: WeightSpec, weight_shape: torch.Size | tuple[int, ...]) -> None:
        super().__init__()
        self.spec = spec
        self.grid = IntRange(spec.bits, spec.symmetric)
        self.weight_shape = tuple(weight_shape)
        n_rows = weight_rows(torch.empty(self.weight_shape, device="meta"), spec.group_size).shape[0]
        self.scale = nn.Parameter(torch.ones(n_rows, 1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(n_rows, 1))
        self.register_buffer("codes", torch.zeros(self.weight_shape, dtype=code_dtype(self.grid)))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.alpha: nn.Parameter | None = None

    def initialize(self, weight: torch.Tensor) -> None:
        """Set scale and zero point from ``weight`` by the spec's init method."""
        spec = self.spec
        scale, zero = search_weight_qparams(weight, self.grid, spec.init, spec.group_size, spec.percentile,
                                            spec.integer_group_scales)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        self.frozen.fill_(False)

    def _soft_rounding(self) -> torch.Tensor:
        assert self.alpha is not None
        return torch.clamp(torch.sigmoid(self.alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)

    def start_adaround(self, weight: torch.Tensor) -> nn.Parameter:
        """Create the learnable rounding variable, initialized to reproduce ``w / s`` exactly."""
        scaled = weight_rows(weight.detach(), self.spec.group_size) / self.scale
        rest = (scaled - scaled.floor()).clamp(1e-4, 1 - 1e-4)
        alpha = -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        return self.alpha

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2h - 1|^beta)``: pushes every soft rounding to 0 or 1."""
        if self.alpha is None:
            return torch.zeros(())
        return (1 - (2 * self._soft_rounding() - 1).abs().pow(beta)).sum()

    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Codes (as floats) in the weight's shape: hard AdaRound decisions or round to nearest."""
        if bool(self.frozen):
            return self.codes.float()
        rows = weight_rows(weight.detach(), self.spec.group_size)
        if self.alpha is not None:
            soft = (rows / self.scale).floor() + (self._soft_rounding() >= 0.5).float()
            q = torch.clamp(soft + self.zero_point, self.grid.qmin, self.grid.qmax)
        else:
            q = quantize(rows, self.scale.detach(), self.zero_point, self.grid)
        return q.reshape(self.weight_shape)

    def freeze(self, weight: torch.Tensor) -> None:
        """Store the final integer codes and drop the rounding variable (inference mode)."""
        codes = self.integer_codes(weight)
        self.codes.copy_(codes.to(self.codes.dtype))
        self.frozen.fill_(True)
        self.alpha = None
        self.scale.requires_grad_(False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight, same shape as ``weight``."""
        g = self.spec.group_size
        if bool(self.frozen):
            rows = weight_rows(self.codes.float(), g)
            return ((rows - self.zero_point) * self.scale).reshape(self.weight_shape).to(weight.dtype)
        rows = weight_rows(weight, g)
        if self.alpha is not None:
            soft = (rows / self.scale).floor().detach() + self._soft_rounding()
            q = torch.clamp(soft + self.zero_point, self.grid.qmin, self.grid.qmax)
            out = (q - self.zero_point) * self.scale
        else:
            out = fake_quantize(rows, self.scale, self.zero_point, self.grid)
        return out.reshape(self.weight_shape).to(weight.dtype)

    def extra_repr(self) -> str:
        integer = ", integer_group_scales=True" if self.spec.integer_group_scales else ""
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, group_size={self.spec.group_size}{integer}"


# --------------------------------------------------------------------------- activations


class _Observer:
    """Bounded statistics of observed values per key (step index or 0).

    Per key: a uniform random sample (at most ``max_values``) of every value observed under the
    key, whatever the number and size of the calls, plus the exact extremes so that min-max init
    sees the true range. Merging weighs the kept sample and a new call by how many values each
    stands for; merging them half and half instead would let the last few calls (the sampler's
    last steps, when calls are recorded in step order) dominate a static range.
    """

    def __init__(self, max_values: int = 1 << 16, seed: int = 0) -> None:
        self.max_values = max_values
        self.generator = torch.Generator().manual_seed(seed)
        self._sample: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}
        self._low: dict[int, torch.Tensor] = {}
        self._high: dict[int, torch.Tensor] = {}

    def _draw(self, values: torch.Tensor, count: int, replace: bool) -> torch.Tensor:
        """``count`` of ``values`` drawn uniformly (all of them when there are no more)."""
        if values.numel() <= count:
            return values
        if replace:  # a call can hold far more values than a permutation of them should cost
            return values[torch.randint(values.numel(), (count,), generator=self.generator)]
        return values[torch.randperm(values.numel(), generator=self.generator)[:count]]

    def add(self, key: int, x: torch.Tensor) -> None:
        """Record the values of ``x`` under ``key``."""
        values = x.detach().reshape(-1).float().cpu()
        if values.numel() == 0:
            return
        seen = self._count.get(key, 0)
        total = seen + values.numel()
        keep_old = min(round(self.max_values * seen / total), self._sample[key].numel() if seen else 0)
        kept = [self._draw(self._sample[key], keep_old, replace=False)] if seen else []
        self._sample[key] = torch.cat([*kept, self._draw(values, self.max_values - keep_old, replace=True)])
        self._count[key] = total
        low, high = values.min()[None], values.max()[None]
        self._low[key] = torch.minimum(self._low[key], low) if seen else low
        self._high[key] = torch.maximum(self._high[key], high) if seen else high

    def count(self, key: int) -> int:
        """How many values were observed under ``key``."""
        return self._count.get(key, 0)

    @property
    def samples(self) -> dict[int, torch.Tensor]:
        """Per key, the kept sample followed by the smallest and largest value observed."""
        return {key: torch.cat([sample, self._low[key], self._high[key]]) for key, sample in self._sample.items()}


class ActQuantizer(nn.Module):
    """Fake quantizer of an activation (see module docstring).

    ``state``: ``"off"`` passes values through, ``"observe"`` records statistics (and passes
    through), ``"quant"`` fake-quantizes. ``channel_dim`` is the feature axis, reduced per token
    in dynamic mode (``-1`` for Linear inputs, ``1`` for Conv inputs).
    """

    def __init__(self, spec: ActSpec, context: StepContext | None = None, channel_dim: int = -1) -> None:
        super().__init__()
        self.spec = spec
        self.grid = IntRange(spec.bits, spec.symmetric)
        self.channel_dim = channel_dim
        if spec.mode == "per_timestep" and context is None:
            raise ConfigError("a per-timestep activation quantizer needs a StepContext")
        self.context = context
        n = len(context) if spec.mode == "per_timestep" and context is not None else 1
        self.scale = nn.Parameter(torch.ones(n), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(n))
        self.state = "quant"
        self._observer: _Observer | None = None

    # ---------------------------------------------------------------- calibration
    def observe(self) -> None:
        """Start recording statistics (values pass through unchanged)."""
        self.state = "observe"
        self._observer = _Observer()

    def finalize(self) -> None:
        """Set parameters from the recorded statistics and switch to quantizing."""
        if self.spec.mode != "dynamic_per_token":
            samples = {} if self._observer is None else self._observer.samples
            if not samples:
                raise ConfigError("activation quantizer saw no data during calibration; check the calibration set")
            for key, values in samples.items():
                scale, zero = search_qparams(values[None], self.grid, self.spec.init, self.spec.percentile)
                with torch.no_grad():
                    self.scale[key] = scale.reshape(())
                    self.zero_point[key] = zero.reshape(())
            if self.spec.mode == "per_timestep":
                self._fill_unseen_steps(set(samples))
        self._observer = None
        self.state = "quant"

    def _fill_unseen_steps(self, observed: set[int]) -> None:
        """Steps that never ran during calibration take the parameters of the nearest seen step."""
        seen = torch.tensor(sorted(observed))
        with torch.no_grad():
            for step in range(len(self.scale)):
                if step not in observed:
                    nearest = int(seen[(seen - step).abs().argmin()])
                    self.scale[step] = self.scale[nearest]
                    self.zero_point[step] = self.zero_point[nearest]

    def _step_key(self) -> int:
        return int(self.context.index) if self.spec.mode == "per_timestep" and self.context is not None else 0

    # ---------------------------------------------------------------- forward
    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.mode == "dynamic_per_token":
            detached = x.detach()
            lo = detached.amin(dim=self.channel_dim, keepdim=True)
            hi = detached.amax(dim=self.channel_dim, keepdim=True)
            return minmax_qparams(lo, hi, self.grid)
        if self.spec.mode == "static":
            return self.scale[0], self.zero_point[0]
        assert self.context is not None
        step = self.context.current()
        if isinstance(step, int):
            return self.scale[step], self.zero_point[step]
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.scale[step].view(shape), self.zero_point[step].view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x`` (or ``x`` itself when off or observing)."""
        if self.state == "off":
            return x
        if self.state == "observe":
            if self.spec.mode != "dynamic_per_token":
                assert self._observer is not None
                self._observer.add(self._step_key(), x)
            return x
        scale, zero = self._params(x)
        return fake_quantize(x.float(), scale, zero, self.grid).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, mode={self.spec.mode}"
