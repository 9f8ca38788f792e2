"""The model families the toy world has a trained model of, behind one interface.

A :class:`ToyFamily` says how to load the family's toy model, how to generate evaluation videos
with it (FP or quantized) and how to record its calibration set in one FP sampling pass. The
quality table (:mod:`tfmq_video.calib.quality`) runs every method on any of them:

- ``stdit3``: the bundled toy STDiT3 (Open-Sora's rectified flow, one shared ``t_block``);
- ``cogvideox``: the bundled toy CogVideoX (diffusers' model, DDIM v-prediction, adaLN linears
  in every block, so the temporal information block is spread over the whole network).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tfmq_video.calib.recorder import (
    CalibrationSet,
    calibration_seeds,
    record_calls,
    toy_calibration_captions,
)
from tfmq_video.errors import ConfigError


@dataclass(frozen=True)
class ToyFamily:
    """How the toy world drives one model family."""

    name: str
    adapter: str
    load: Callable[[str | None], nn.Module]
    generate: Callable[[nn.Module, Sequence[str], Sequence[int]], torch.Tensor]  # -> (N, 3, T, H, W) on CPU
    record: Callable[[nn.Module, int, int, Sequence[int] | None, int, bool], CalibrationSet]
    sampler: str  # the sampler's settings, part of the FP-video cache key


def _load_stdit3(path: str | None) -> nn.Module:
    from tfmq_video.toy.world import load_toy_stdit3

    return load_toy_stdit3(path)


def _generate_stdit3(model: nn.Module, captions: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    from tfmq_video.toy.world import generate_latents

    return generate_latents(model, model.y_embedder.y_embedding, captions, seeds)


def _record_stdit3(model: nn.Module, num_prompts: int, seed: int, steps: Sequence[int] | None, batch_size: int,
                   progress: bool) -> CalibrationSet:
    from tfmq_video.calib.recorder import record_toy_calibration

    return record_toy_calibration(model, num_prompts, seed, steps, batch_size, progress)


def _load_cogvideox(path: str | None) -> nn.Module:
    from tfmq_video.toy.cogvideox_world import load_toy_cogvideox

    return load_toy_cogvideox(path)


def _generate_cogvideox(model: nn.Module, captions: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    from tfmq_video.toy.cogvideox_world import generate_cogvideox_latents

    return generate_cogvideox_latents(model, captions, seeds)


def _record_cogvideox(model: nn.Module, num_prompts: int, seed: int, steps: Sequence[int] | None, batch_size: int,
                      progress: bool) -> CalibrationSet:
    """The toy calibration captions sampled by the CogVideoX loop, its calls kept by a hook."""
    from dit_adapters.base import get_adapter
    from tfmq_video.toy.cogvideox_world import TOY_COGVIDEOX_STEPS, generate_cogvideox_latents

    captions = toy_calibration_captions(num_prompts, seed, TOY_COGVIDEOX_STEPS, steps)
    seeds = calibration_seeds(seed, len(captions))

    def run() -> None:
        generate_cogvideox_latents(model, captions, seeds, batch_size=batch_size)

    return record_calls(model, get_adapter("cogvideox").timestep_of, run, steps)


def _cogvideox_sampler() -> str:
    from tfmq_video.toy.cogvideox_world import TOY_COGVIDEOX_GUIDANCE, TOY_COGVIDEOX_STEPS

    return f"cogvideox-ddim steps={TOY_COGVIDEOX_STEPS} guidance={TOY_COGVIDEOX_GUIDANCE}"


def _stdit3_sampler() -> str:
    from tfmq_video.toy.world import TOY_SAMPLER_CONFIG

    return repr(TOY_SAMPLER_CONFIG)


def toy_family(name: str) -> ToyFamily:
    """The toy family ``name`` (``stdit3`` or ``cogvideox``)."""
    if name == "stdit3":
        return ToyFamily("stdit3", "opensora-stdit3", _load_stdit3, _generate_stdit3, _record_stdit3, _stdit3_sampler())
    if name == "cogvideox":
        return ToyFamily("cogvideox", "cogvideox", _load_cogvideox, _generate_cogvideox, _record_cogvideox,
                         _cogvideox_sampler())
    raise ConfigError(f"unknown toy family {name!r}; available: {list(TOY_FAMILY_NAMES)}")


TOY_FAMILY_NAMES: tuple[str, ...] = ("stdit3", "cogvideox")


def toy_family_of_adapter(adapter: str) -> ToyFamily:
    """The toy family whose model ``adapter`` describes; an adapter without a toy model is an error."""
    for name in TOY_FAMILY_NAMES:
        family = toy_family(name)
        if family.adapter == adapter:
            return family
    raise ConfigError(f"the toy world has no {adapter!r} model: the toy calibration prompts need one of the adapters "
                      f"{[toy_family(n).adapter for n in TOY_FAMILY_NAMES]}; give calibration data of your own "
                      "through the Python API (tfmq_video.quantize with record_calls)")
