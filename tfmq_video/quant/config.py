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
    """Weight quantization: ``bits``, ``symmetric``, ``group_size`` (null = per channel), ``init``,
    ``integer_group_scales`` (group scales as integer multiples of one scale per row, so the CPU
    runtime runs one int8 GEMM per layer: see :func:`~tfmq_video.quant.quantizers.integer_group_scales`)."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    init: Literal["minmax", "percentile", "mse"] = "mse"
    percentile: float = Field(0.999, gt=0.5, le=1.0)
    integer_group_scales: bool = False

    _bits = field_validator("bits")(_check_bits)

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        if value is not None and value not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} or null (per channel)")
        return value

    @model_validator(mode="after")
    def _integer_scales(self) -> WeightConfig:
        if self.integer_group_scales and (self.group_size is None or not self.symmetric or self.bits >= 8):
            raise ValueError(
                "integer_group_scales needs weights per group (group_size 64 or 128), symmetric, below 8 bits; "
                f"got group_size {self.group_size}, symmetric {self.symmetric}, {self.bits} bits"
            )
        return self

    def spec(self) -> WeightSpec:
        """The quantizer spec."""
        return WeightSpec(self.bits, self.symmetric, self.group_size, self.init, self.percentile,
                          self.integer_group_scales)


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
    """What is quantized: weights, activations, attention matmul inputs; layers kept FP by name pattern.

    ``attention_mode`` (with ``quantize_attention``): ``per_block`` (the default) models the
    runtime's INT8 attention kernel (int8 Q/K with a scale per tile computed at run time, P·V in
    fp16), so calibration sees the attention error of a deployment with ``attention="int8"`` (the
    runtime's default, SDPA, has none); its bits are the kernel's 8 whatever ``activation.bits`` is. ``static`` quantizes q, k, v and the softmax probabilities with the
    activation settings (one calibrated range each: Q-Diffusion's treatment). Those quantizers are
    not exported, as no runtime computes attention that way; the recipes of the results recorded
    before session 17 set it explicitly.
    """

    weight: WeightConfig = WeightConfig()
    activation: ActivationConfig = ActivationConfig()
    quantize_attention: bool = True
    attention_mode: Literal["static", "per_block"] = "per_block"
    keep_fp: tuple[str, ...] = ()


class TIBConfig(_Section):
    """Temporal information block handling.

    ``keep_fp``: leave the TIB unquantized (ViDiT-Q). Otherwise its layers are quantized with
    the weight/activation settings, plus: ``tiar`` (optimize against the temporal features),
    ``fsc`` (per-timestep activation parameters), ``cache`` (precomputed quantized features)
    and ``select`` (per feature and timestep, keep whichever of the quantized TIB and the cache
    has the lower error; needs ``cache``), the error being the feature's own (``select_by:
    feature``), the FP model's output error with that feature served (``output``) or the feature
    errors plus their drift summed over the steps (``trajectory``; :mod:`tfmq_video.calib.selection`). ``layerwise_reconstruction`` (the Q-Diffusion/BRECQ
    treatment of layers outside the blocks, an alternative to ``tiar``): every TIB layer is
    reconstructed on its own against its FP output over the calibrated timesteps. Both use
    ``iterations`` (per TIB layer: TIAR, which optimizes all of them at once, runs ``iterations`` times
    the number of TIB layers), ``lr_rounding``, ``lr_scale`` (relative to each step size's magnitude,
    see :mod:`tfmq_video.calib.optimize`) and ``rounding_weight``.

    ``in_block_layers``: where the TIB layers that sit inside transformer blocks (CogVideoX's and
    FLUX's per-block adaLN linears of the time embedding; STDiT3 has none) are calibrated: with
    the TIB (``tib``, the default: TIAR, FSC, the cache and the selection see them) or, ``block``,
    as ordinary layers of their block's reconstruction, which is what BRECQ and Q-Diffusion do
    with every layer inside a block (the ``qdiffusion`` baseline). ``block`` excludes TIAR, FSC
    and the cache.
    """

    keep_fp: bool = False
    in_block_layers: Literal["tib", "block"] = "tib"
    tiar: bool = True
    fsc: bool = True
    cache: bool = True
    select: bool = True
    select_by: Literal["feature", "output", "trajectory"] = "feature"
    layerwise_reconstruction: bool = False
    cache_bits: int | None = None  # default: 8 (see RecipeConfig.cache_bits)
    cache_group_size: int | None = Field(32, ge=1)  # channels per cache scale; None: one scale per step and feature
    iterations: int = Field(1500, ge=0)
    lr_rounding: float = Field(5e-2, gt=0)
    lr_scale: float = Field(1e-3, ge=0)
    rounding_weight: float = Field(0.3, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> TIBConfig:
        if self.select and not self.cache:
            raise ValueError("tib.select needs tib.cache: selection chooses between the quantized TIB and the cache")
        if self.layerwise_reconstruction and self.tiar:
            raise ValueError("tib.layerwise_reconstruction and tib.tiar are alternative objectives for the TIB "
                             "(its layers' own outputs vs the joint temporal features): enable one")
        if self.in_block_layers == "block" and (self.tiar or self.fsc or self.cache):
            raise ValueError("tib.in_block_layers: block calibrates the TIB layers inside blocks with their block, "
                             "which TIAR, FSC and the cache would contradict: set tiar, fsc and cache to false, or "
                             "in_block_layers: tib")
        if self.layerwise_reconstruction and self.keep_fp:
            raise ValueError("tib.layerwise_reconstruction needs a quantized TIB: tib.keep_fp leaves it in full "
                             "precision")
        if self.cache_bits is not None:
            _check_bits(self.cache_bits)
        return self


class ReconstructionConfig(_Section):
    """BRECQ-style block reconstruction of every transformer block (AdaRound weights).

    ``bias_correction``: after a unit is frozen, shift the bias of each of its quantized layers,
    in execution order, by the mean difference between the FP layer's output on the FP stream and
    the quantized layer's output on the quantized stream (per output channel, over every
    calibration row and token), so the unit's error has no common offset left; layers without a
    bias are left as they are.

    ``guidance_scale``: reconstruct what a classifier-free-guidance sampler uses. It steps along
    ``uncond + s * (cond - uncond)``, so an error in the difference of a guidance pair's outputs is
    multiplied by ``s``; that difference, a small part of either output, carries what the caption
    asks for. With s > 1 every minibatch is whole guidance pairs (the two halves of a recorded
    call whose samples are equal, as every guidance sampler batches them) and the loss is the
    relative error of the guided combination, averaged over the two ways of ordering a pair (which
    half is conditional differs between samplers): the rows' relative error plus
    ``2 (s^2 - s) |e_a - e_b|^2 / |target|^2``, the difference taken over the tokens the prediction
    is made from (``DiTAdapter.prediction_tokens``: CogVideoX's video tokens, not its text tokens).
    Set it to the sampler's guidance scale; 0: off.
    """

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
    bias_correction: bool = False
    guidance_scale: float = Field(0.0, ge=0)

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("guidance_scale must be 0 (off) or the sampler's guidance scale, above 1 (at s <= 1 "
                             "guidance does not amplify the difference of a pair)")
        return value


class TextEncoderConfig(_Section):
    """The caption encoder of a prompts file: ``kind`` (``t5``), ``path`` (a local Hugging Face
    folder holding the encoder and its tokenizer; never downloaded) and ``max_length`` (tokens per
    caption, padded and truncated; must equal the model's ``model_max_length``)."""

    kind: Literal["t5"] = "t5"
    path: str = Field(min_length=1)
    max_length: int = Field(300, ge=1)


class VideoConfig(_Section):
    """Pixel size of the calibration videos (``num_frames``, ``height``, ``width``, ``fps``) and the
    VAE compression that maps it to the latent the sampler starts from. Defaults: Open-Sora 1.2
    (240p 9:16, 51 frames = 2 s at 24 fps; its VAE: 4 channels, 8x spatial, 4x temporal applied
    per ``micro_frame_size`` chunk of 17 frames). See :meth:`latent_shape`."""

    num_frames: int = Field(51, ge=1)
    height: int = Field(240, ge=1)
    width: int = Field(426, ge=1)
    fps: float = Field(24.0, gt=0)
    latent_channels: int = Field(4, ge=1)
    spatial_compression: int = Field(8, ge=1)
    temporal_compression: int = Field(4, ge=1)
    micro_frame_size: int | None = Field(17, ge=1)  # null: the whole clip is one chunk

    @model_validator(mode="after")
    def _fits(self) -> VideoConfig:
        for name in ("height", "width"):
            if getattr(self, name) < self.spatial_compression:
                raise ValueError(f"{name} {getattr(self, name)} is smaller than the VAE's spatial compression "
                                 f"{self.spatial_compression}: use at least {self.spatial_compression} pixels")
        return self

    def latent_frames(self) -> int:
        """Latent frames of ``num_frames`` video frames, as Open-Sora 1.2's VAE computes them
        (``VideoAutoencoderPipeline.get_latent_size`` + ``VAE_Temporal.get_latent_size``): every full
        chunk of ``m = micro_frame_size`` frames gives ``ceil(m / f)`` latent frames, the remainder
        ``ceil((T % m) / f)``, with ``f = temporal_compression`` (17 -> 5, 51 -> 15, 102 -> 30)."""
        f, frames = self.temporal_compression, self.num_frames
        m = self.micro_frame_size
        if m is None:
            return -(-frames // f)
        return (frames // m) * -(-m // f) + -(-(frames % m) // f)

    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of the latent video: spatial sizes are floored as upstream (426 -> 53)."""
        s = self.spatial_compression
        return (self.latent_channels, self.latent_frames(), self.height // s, self.width // s)


class SamplerSettings(_Section):
    """Rectified-flow sampler of the calibration pass (defaults: Open-Sora 1.2, 30 steps, CFG 7,
    resolution-dependent timestep shift; ``fixed_shift`` replaces the shift ratio)."""

    num_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.0, gt=0)
    use_timestep_transform: bool = True
    fixed_shift: float | None = Field(None, gt=0)


class CalibrationConfig(_Section):
    """Calibration data: prompts, seeds, sampler steps.

    Prompt source: the toy world's training captions (default; ``num_prompts`` of them, with the
    toy encoder, video size and sampler), or ``prompts_file`` (UTF-8, one caption per line, blank
    lines and ``#`` lines ignored; all captions, or the first ``num_prompts`` when it is set)
    encoded by ``text_encoder`` and sampled at ``video`` size with ``sampler``.
    """

    num_prompts: int = Field(8, ge=1)
    seed: int = 0
    steps: tuple[int, ...] | None = None  # None = every sampler step
    max_rows: int | None = Field(192, ge=1)  # cap on recorded model-input rows kept for reconstruction
    batch_size: int = Field(16, ge=1)
    prompts_file: str | None = None  # None = the toy prompts
    text_encoder: TextEncoderConfig | None = None
    video: VideoConfig | None = None  # default with a prompts file: VideoConfig()
    sampler: SamplerSettings | None = None  # default with a prompts file: SamplerSettings()

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and len(value) == 0:
            raise ValueError("calibration.steps is empty: list step indices or leave it out for every step")
        if value is not None and min(value) < 0:
            raise ValueError("calibration.steps must be non-negative step indices")
        return value

    @model_validator(mode="after")
    def _prompt_source(self) -> CalibrationConfig:
        if self.prompts_file is None:
            extra = [name for name in ("text_encoder", "video", "sampler") if getattr(self, name) is not None]
            if extra:
                raise ValueError(f"calibration.{', calibration.'.join(extra)} only apply to a prompts file: set "
                                 "calibration.prompts_file, or remove them to use the toy prompts")
            return self
        if not self.prompts_file.strip():
            raise ValueError("calibration.prompts_file is empty: give the path of a text file with one caption a line")
        if self.text_encoder is None:
            raise ValueError("calibration.prompts_file needs calibration.text_encoder (e.g. {kind: t5, path: "
                             "/path/to/t5-v1_1-xxl}) to encode the captions")
        num_steps = self.sampler_settings().num_steps
        if self.steps is not None and max(self.steps) >= num_steps:
            raise ValueError(f"calibration.steps {sorted(self.steps)} exceed the sampler's {num_steps} steps "
                             f"(indices 0..{num_steps - 1})")
        return self

    def video_settings(self) -> VideoConfig:
        """``video``, or the Open-Sora 1.2 defaults."""
        return self.video or VideoConfig()

    def sampler_settings(self) -> SamplerSettings:
        """``sampler``, or the Open-Sora 1.2 defaults."""
        return self.sampler or SamplerSettings()


class ModelConfig(_Section):
    """Which model: ``adapter`` name and ``path`` (a local model folder, e.g. Open-Sora 1.2's
    ``OpenSora-STDiT-v3``, or ``toy`` for the bundled model)."""

    adapter: str = "opensora-stdit3"
    path: str = "toy"


def check_prompt_file_adapter(adapter: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` unless ``adapter``'s models can be calibrated from a prompts file (encoded
    with Open-Sora's T5: ``opensora-stdit3`` only)."""
    if adapter != "opensora-stdit3":
        raise error(f"calibration.prompts_file is encoded with Open-Sora's T5 for opensora-stdit3 only, not for "
                    f"{adapter!r}: remove it to use the toy prompts, or record your pipeline's own calls with "
                    "tfmq_video.calib.recorder.record_calls (docs/calibration.md)")


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

    @model_validator(mode="after")
    def _prompt_files_for_stdit3(self) -> RecipeConfig:
        if self.calibration.prompts_file is not None:
            check_prompt_file_adapter(self.model.adapter, ValueError)
        return self

    def cache_bits(self) -> int:
        """Bits of the temporal feature cache: ``tib.cache_bits``, else 8 whatever the activation bits.

        The cache stores int8 codes either way, so fewer bits save nothing; and a temporal feature is
        consumed by elementwise adaLN modulation in float (or, were it a GEMM input, re-quantized by
        that layer's own input quantizer), so quantizing it to the activation bits only adds error:
        at A6 a 6-bit cache had 3-6x the temporal-feature error of the TIAR-calibrated TIB, an 8-bit
        one a third to a fifth of it (docs/results.md, "Temporal features at W4A6").
        """
        return self.tib.cache_bits or 8


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
