"""Calibration prompts from a text file, encoded by a local T5 (Open-Sora 1.2's caption encoder).

``record_prompt_calibration(model, calibration)`` reads the prompts file, checks the encoder
against the model (caption width, caption length, latent channels) before any heavy work, encodes
every caption once (float32, batched, on the model's device), frees the encoder and runs the FP
sampler once per batch of prompts (:func:`tfmq_video.calib.recorder.record_calibration`).

Upstream conventions followed (Open-Sora 1.2 ``T5Embedder``): tokens padded to ``max_length``
and truncated, special tokens (the closing ``</s>``) added, the attention mask is the caption
mask, the encoder's ``last_hidden_state`` is the caption (B, 1, L, C). The null caption of
guidance is the model's ``y_embedder.y_embedding``. Not done here: upstream's optional caption
cleaning and its ``aesthetic score`` suffix; write captions in the file exactly as they should be
encoded.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from dit_adapters.opensora.rflow import SamplerConfig
from tfmq_video.calib.recorder import CalibrationSet, calibration_seeds, record_calibration
from tfmq_video.devices import model_device
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import CalibrationConfig, TextEncoderConfig, VideoConfig

log = logging.getLogger(__name__)

EXTRA = "t5"  # pip install 'tfmq-video[t5]'


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Captions of a UTF-8 text file: one a line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"calibration.prompts_file {path} does not exist: write a UTF-8 text file with one caption a line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"calibration.prompts_file {path} is not UTF-8 text ({err}): save it as UTF-8"
        ) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(
            f"calibration.prompts_file {path} has no captions (only blank or # lines): "
            "write one caption a line"
        )
    return prompts


def _import_transformers() -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"a T5 text encoder needs the transformers package: pip install 'tfmq-video[{EXTRA}]' "
            "(transformers, sentencepiece, protobuf)"
        ) from None
    return transformers


def t5_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a local T5 folder (clear errors for a missing folder or file)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"calibration.text_encoder.path {folder} is not a folder: give a local Hugging Face "
            "folder holding the T5 encoder (config.json + weights) and its tokenizer; nothing is "
            "downloaded"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"calibration.text_encoder.path {folder} has no config.json: it must be a Hugging "
            "Face T5 folder (e.g. DeepFloyd/t5-v1_1-xxl downloaded beforehand)"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file} is not valid JSON: {err}") from None


def check_caption_fit(model: nn.Module, encoder_dim: int, max_length: int, source: str) -> None:
    """The encoder's captions must match the model's null caption ``y_embedder.y_embedding`` (L, C)."""
    null = model.y_embedder.y_embedding
    length, channels = int(null.shape[0]), int(null.shape[-1])
    if encoder_dim != channels:
        raise ConfigError(
            f"the text encoder {source} produces {encoder_dim}-dim captions but the model's "
            f"caption_channels is {channels}: use the encoder the model was trained with "
            "(T5-XXL, 4096, for Open-Sora 1.2)"
        )
    if max_length != length:
        raise ConfigError(
            f"calibration.text_encoder.max_length is {max_length} but the model takes captions of "
            f"{length} tokens (model_max_length): set max_length: {length}"
        )


def check_latent_fit(model: nn.Module, video: VideoConfig) -> None:
    """The latent channels must be the model's input channels (when the model says)."""
    in_channels = getattr(getattr(model, "config", None), "in_channels", None)
    if in_channels is not None and int(in_channels) != video.latent_channels:
        raise ConfigError(
            f"calibration.video.latent_channels is {video.latent_channels} but the model takes "
            f"{in_channels} latent channels: set latent_channels: {in_channels}"
        )


class T5CaptionEncoder:
    """A local T5 encoder and its tokenizer: captions -> (B, 1, L, C) float32 and a (B, L) mask."""

    def __init__(self, config: TextEncoderConfig, device: torch.device | str = "cpu") -> None:
        transformers = _import_transformers()
        self.max_length = config.max_length
        self.device = torch.device(device)
        path = config.path
        t5_config(path)
        major = int(transformers.__version__.split(".")[0])
        dtype_arg = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.encoder = transformers.T5EncoderModel.from_pretrained(
                path, local_files_only=True, **dtype_arg
            )
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the T5 encoder or tokenizer from {path}: {err}") from None
        self.encoder = self.encoder.to(device=self.device, dtype=torch.float32).eval()

    @property
    def dim(self) -> int:
        """Caption channels (``d_model``)."""
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, max_length, dim) float32 captions and (N, max_length) long mask (1 = token), on CPU."""
        ys, masks = [], []
        for start in range(0, len(captions), batch_size):
            tokens = self.tokenizer(
                captions[start : start + batch_size],
                max_length=self.max_length,
                padding="max_length",
                truncation=True,
                return_attention_mask=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            ids = tokens["input_ids"].to(self.device)
            mask = tokens["attention_mask"].to(self.device)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            ys.append(hidden.float().cpu()[:, None])
            masks.append(mask.long().cpu())
        return torch.cat(ys), torch.cat(masks)


def encode_prompts(
    model: nn.Module, prompts: list[str], text_encoder: TextEncoderConfig, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``prompts`` with the recipe's T5 after checking it fits ``model``; the encoder is freed after."""
    _import_transformers()
    raw = t5_config(text_encoder.path)
    dim = raw.get("d_model")
    if dim is None:
        raise ConfigError(f"{Path(text_encoder.path) / 'config.json'} has no d_model: is it a T5 config?")
    check_caption_fit(model, int(dim), text_encoder.max_length, text_encoder.path)
    encoder = T5CaptionEncoder(text_encoder, model_device(model))
    y, mask = encoder.encode(prompts, batch_size)
    del encoder
    gc.collect()
    return y, mask


def stdit3_extra_kwargs(video: VideoConfig) -> Callable[[int], dict]:
    """The non-caption STDiT3 inputs of a batch (upstream ``prepare_multi_resolution_info``): fps and
    the pixel height and width (they set the position-embedding scale)."""

    def kwargs(batch: int) -> dict:
        return {
            "fps": torch.tensor([float(video.fps)]),
            "height": torch.full((batch,), float(video.height)),
            "width": torch.full((batch,), float(video.width)),
        }

    return kwargs


def sampler_config(calibration: CalibrationConfig) -> SamplerConfig:
    """The rectified-flow settings of the calibration section."""
    s = calibration.sampler_settings()
    return SamplerConfig(
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        use_timestep_transform=s.use_timestep_transform,
        fixed_shift=s.fixed_shift,
    )


def check_prompt_inputs(calibration: CalibrationConfig) -> list[str]:
    """The prompts of ``calibration``, after checking that the file, the encoder folder and the
    ``transformers`` package are there (cheap: nothing is loaded)."""
    cal = calibration
    if cal.prompts_file is None or cal.text_encoder is None:
        raise ConfigError(
            "a prompts file calibration needs calibration.prompts_file and calibration.text_encoder"
        )
    prompts = read_prompts(cal.prompts_file)
    if "num_prompts" in cal.model_fields_set:
        if cal.num_prompts > len(prompts):
            raise ConfigError(
                f"calibration.num_prompts is {cal.num_prompts} but {cal.prompts_file} has only "
                f"{len(prompts)} captions: lower num_prompts or leave it out to use them all"
            )
        prompts = prompts[: cal.num_prompts]
    _import_transformers()
    t5_config(cal.text_encoder.path)
    return prompts


def record_prompt_calibration(
    model: nn.Module, calibration: CalibrationConfig, progress: bool = False
) -> CalibrationSet:
    """Calibration set of a prompts file: T5 captions, one FP sampling pass per batch of prompts."""
    cal = calibration
    prompts = check_prompt_inputs(cal)
    assert cal.text_encoder is not None
    video = cal.video_settings()
    check_latent_fit(model, video)
    y, mask = encode_prompts(model, prompts, cal.text_encoder, cal.batch_size)
    log.info(
        "encoded %d prompts into captions %s; latents %s", len(prompts), tuple(y.shape), video.latent_shape()
    )
    return record_calibration(
        model,
        y,
        mask,
        model.y_embedder.y_embedding,
        video.latent_shape(),
        stdit3_extra_kwargs(video),
        calibration_seeds(cal.seed, len(prompts)),
        sampler_config(cal),
        video_size=(video.num_frames, video.height, video.width),
        steps=cal.steps,
        batch_size=cal.batch_size,
        progress=progress,
    )
