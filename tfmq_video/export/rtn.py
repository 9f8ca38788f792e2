"""Round-to-nearest (min-max) quantization of Linear (and Conv) layers into export records.

A calibration-free stand-in for the calibration core: it produces the same
:class:`~tfmq_video.quant.records.QuantizedLinearRecord` hand-off, so tests and benchmarks
can export and run real integer models without calibrating.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.quant.affine import IntRange, code_dtype, group_multiplier_limit, quantize
from tfmq_video.quant.quantizers import group_size_for, search_weight_qparams, weight_rows
from tfmq_video.quant.records import ActivationRecord, QuantizedLinearRecord
from tfmq_video.runtime.conv import CONV_TYPES

# The temporal information block and the embedders stay in full precision (as ViDiT-Q does);
# every Linear of the transformer blocks is quantized.
DEFAULT_INCLUDE: tuple[str, ...] = ("spatial_blocks.*", "temporal_blocks.*")


@dataclass(frozen=True)
class RTNConfig:
    """What to quantize and how: weight bits/grid/group size, activation mode and bits, name patterns.

    A layer whose input size is not a multiple of ``group_size`` is quantized per channel, as in
    calibration. ``integer_group_scales``: see :class:`~tfmq_video.quant.quantizers.WeightSpec`.
    """

    weight_bits: int = 8
    weight_signed: bool = True
    group_size: int | None = None
    integer_group_scales: bool = False
    activation_mode: str = "dynamic_per_token"
    activation_bits: int = 8
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.integer_group_scales:
            group_multiplier_limit(IntRange(self.weight_bits, self.weight_signed))


def weight_qparams(
    weight: torch.Tensor, grid: IntRange, group_size: int | None, integer_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zero points, (out, 1) per channel or (out, in // group_size) per group
    (integer multiples of one scale per row with ``integer_scales``)."""
    scale, zero = search_weight_qparams(weight, grid, "minmax", group_size, integer_scales=integer_scales)
    return scale.reshape(weight.shape[0], -1), zero.reshape(weight.shape[0], -1)


def rtn_linear_record(
    name: str, linear: nn.Linear, config: RTNConfig, activation: ActivationRecord | None = None
) -> QuantizedLinearRecord:
    """Quantize one Linear's weight by rounding to nearest on min-max parameters.

    A Conv is quantized as its weight flattened to (out, in * prod(kernel)), with ``original_shape``
    set (export accepts patchify convs only: see :mod:`tfmq_video.runtime.conv`).
    """
    grid = IntRange(config.weight_bits, config.weight_signed)
    conv = isinstance(linear, CONV_TYPES)
    weight = linear.weight.detach().float()
    weight = weight.reshape(weight.shape[0], -1) if conv else weight
    group_size = group_size_for(weight.shape[1], config.group_size)
    scale, zero_point = weight_qparams(weight, grid, group_size, config.integer_group_scales)
    rows = weight_rows(weight, group_size)
    codes = quantize(rows, scale.reshape(-1, 1), zero_point.reshape(-1, 1), grid).reshape(weight.shape)
    if activation is None:
        activation = ActivationRecord(mode=config.activation_mode, bits=config.activation_bits)  # type: ignore[arg-type]
    bias = None if linear.bias is None else linear.bias.detach().float().clone()
    return QuantizedLinearRecord(
        name=name, weight_codes=codes.to(code_dtype(grid)), weight_scale=scale.float(), weight_zero_point=zero_point.float(),
        weight_bits=config.weight_bits, weight_signed=config.weight_signed, group_size=group_size,
        bias=bias, activation=activation, original_shape=tuple(linear.weight.shape) if conv else None,
    )


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches one of the fnmatch-style patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def rtn_records(model: nn.Module, config: RTNConfig) -> list[QuantizedLinearRecord]:
    """Records for every Linear and Conv of ``model`` selected by ``config.include`` minus ``config.exclude``."""
    records = [
        rtn_linear_record(name, module, config)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, *CONV_TYPES))
        and matches(name, config.include)
        and not matches(name, config.exclude)
    ]
    if not records:
        raise ConfigError(f"no Linear layer matches include={config.include} exclude={config.exclude}")
    return records
