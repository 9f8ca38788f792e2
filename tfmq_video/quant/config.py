"""The calibration config tree (pydantic) and YAML loading with clear errors.

A recipe says *what* to do; the calibration stages read their own section:
``model`` (adapter and weights), ``calibration`` (prompts, seeds, steps), ``quant`` (weight,
activation, attention specs and layers kept FP), ``tib`` (TIAR, FSC, cache, selection),
``reconstruction`` (BRECQ settings). See ``configs/*.yaml`` for complete examples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tfmq_video.errors import ConfigError
from tfmq_video.quant.quantizers import SUPPORTED_GROUP_SIZES, ActSpec, WeightSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_bits(value: int) -> int:
    if not 2 <= value <= 8:
        raise ValueError(f"unsupported bit width {value}: use 2 to 8 bits")
    return value


class WeightConfig(_Section):
    """Weight quantization: ``bits``, ``symmetric``, ``group_size`` (null = per channel), ``init``."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    init: Literal["minmax", "percentile", "mse"] = "mse"
    percentile: float = Field(0.999, gt=0.5, le=1.0)

    _bits = field_validator("bits")(_check_bits)

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        if value is not None and value not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} or null (per channel)")
        return value

    def spec(self) -> WeightSpec:
        """The quantizer spec."""
        return WeightSpec(self.bits, self.symmetric, self.group_size, self.init, self.percentile)


class ActivationConfig(_Section):
    """Activation quantization outside the TIB: ``bits``, ``symmetric``, ``mode``, ``init``."""

    bits: int = 8
    symmetric: bool = False
    mode: Literal["static", "per_timestep", "dynamic_per_token"] = "static"
    init: Literal["minmax", "percentile", "mse"] = "mse"
    percentile: float = Field(0.9999, gt=0.5, le=1.0)

    _bits = field_validator("bits")(_check_bits)

    def spec(self, mode: str | None = None) -> ActSpec:
        """The quantizer spec (optionally with another mode)."""
        return ActSpec(self.bits, self.symmetric, mode or self.mode, self.init, self.percentile)  # type: ignore[arg-type]


class QuantConfig(_Section):
    """What is quantized: weights, activations, attention matmul inputs; layers kept FP by name pattern."""

    weight: WeightConfig = WeightConfig()
    activation: ActivationConfig = ActivationConfig()
    quantize_attention: bool = True
    keep_fp: tuple[str, ...] = ()


class TIBConfig(_Section):
    """Temporal information block handling.

    ``keep_fp``: leave the TIB unquantized (ViDiT-Q). Otherwise its layers are quantized with
    the weight/activation settings, plus: ``tiar`` (optimize against the temporal features),
    ``fsc`` (per-timestep activation parameters), ``cache`` (precomputed quantized features)
    and ``select`` (per feature and timestep, keep whichever of the quantized TIB and the cache
    has the lower error; needs ``cache``).
    """

    keep_fp: bool = False
    tiar: bool = True
    fsc: bool = True
    cache: bool = True
    select: bool = True
    cache_bits: int | None = None  # default: the activation bits
    iterations: int = Field(1500, ge=0)
    lr_rounding: float = Field(5e-2, gt=0)
    lr_scale: float = Field(1e-3, ge=0)
    rounding_weight: float = Field(0.3, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> TIBConfig:
        if self.select and not self.cache:
            raise ValueError("tib.select needs tib.cache: selection chooses between the quantized TIB and the cache")
        if self.cache_bits is not None:
            _check_bits(self.cache_bits)
        return self


class ReconstructionConfig(_Section):
    """BRECQ-style block reconstruction of every transformer block (AdaRound weights)."""

    enabled: bool = True
    iterations: int = Field(300, ge=0)
    batch_size: int = Field(4, ge=1)
    lr_rounding: float = Field(5e-2, gt=0)
    learn_act_scales: bool = False
    lr_scale: float = Field(1e-4, ge=0)
    rounding_weight: float = Field(0.3, ge=0)
    warmup: float = Field(0.2, ge=0, lt=1)
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)


class CalibrationConfig(_Section):
    """Calibration data: the toy prompts (``num_prompts`` training captions), seeds, sampler steps."""

    num_prompts: int = Field(8, ge=1)
    seed: int = 0
    steps: tuple[int, ...] | None = None  # None = every sampler step
    max_rows: int | None = Field(192, ge=1)  # cap on recorded model-input rows kept for reconstruction
    batch_size: int = Field(16, ge=1)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and len(value) == 0:
            raise ValueError("calibration.steps is empty: list step indices or leave it out for every step")
        if value is not None and min(value) < 0:
            raise ValueError("calibration.steps must be non-negative step indices")
        return value


class ModelConfig(_Section):
    """Which model: ``adapter`` name and ``path`` (a model folder, or ``toy`` for the bundled model)."""

    adapter: str = "opensora-stdit3"
    path: str = "toy"


class RecipeConfig(_Section):
    """A full calibration recipe."""

    name: str = "tfmq"
    model: ModelConfig = ModelConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    quant: QuantConfig = QuantConfig()
    tib: TIBConfig = TIBConfig()
    reconstruction: ReconstructionConfig = ReconstructionConfig()
    seed: int = 0
    progress: bool = True

    def cache_bits(self) -> int:
        """Bits of the temporal feature cache."""
        return self.tib.cache_bits or self.quant.activation.bits


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(raw: object, source: str = "(dict)") -> RecipeConfig:
    """Validate a config mapping; every problem is listed in one :class:`ConfigError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level, got {type(raw).__name__}")
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike) -> RecipeConfig:
    """Read and validate a YAML recipe."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(raw, str(path))
