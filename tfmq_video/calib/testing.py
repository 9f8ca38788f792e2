"""A tiny random STDiT3 and its calibration set, for tests and smoke runs (seconds on a CPU)."""

from __future__ import annotations

import torch

from dit_adapters.opensora.rflow import RFlowSampler, SamplerConfig
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from tfmq_video.calib.recorder import CalibrationSet, StepRecorder
from tfmq_video.devices import model_device, move

TINY_CONFIG = STDiT3Config(input_sq_size=16, in_channels=4, patch_size=(1, 2, 2), hidden_size=64, depth=1,
                           num_heads=2, caption_channels=16, model_max_length=4, pred_sigma=False)
TINY_SAMPLER = SamplerConfig(num_steps=4, guidance_scale=3.0, fixed_shift=2.0)
TINY_LATENT = (4, 2, 8, 8)


def tiny_stdit3(seed: int = 0) -> STDiT3:
    """A randomly initialized tiny STDiT3 (hidden 64, one spatial + one temporal block)."""
    torch.manual_seed(seed)
    return STDiT3(TINY_CONFIG).eval()


def tiny_call_inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Noise, captions, null caption and extra kwargs of a tiny sampling run."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *TINY_LATENT, generator=generator)
    y = torch.randn(batch, 1, TINY_CONFIG.model_max_length, TINY_CONFIG.caption_channels, generator=generator)
    null = torch.zeros(1, 1, TINY_CONFIG.model_max_length, TINY_CONFIG.caption_channels)
    return noise, y, null, {"fps": torch.tensor([8.0])}


def tiny_model_inputs(t: float = 500.0, seed: int = 5) -> dict:
    """Keyword inputs of one forward pass of the tiny model at timestep ``t`` (batch 2, the
    first caption half padded)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, *TINY_LATENT, generator=generator),
        "timestep": torch.full((2,), t),
        "y": torch.randn(2, 1, TINY_CONFIG.model_max_length, TINY_CONFIG.caption_channels, generator=generator),
        "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        "fps": torch.tensor([8.0]),
    }


@torch.no_grad()
def sample_tiny(model: torch.nn.Module, batch: int = 2, seed: int = 0, recorder: StepRecorder | None = None,
                sampler: SamplerConfig = TINY_SAMPLER) -> torch.Tensor:
    """Sample tiny latents (optionally recording the calls) on the model's device; the latents
    come back on CPU."""
    noise, y, null, extra = move(tiny_call_inputs(batch, seed), model_device(model))
    return RFlowSampler(sampler).sample(model, noise, y, null, extra_kwargs=extra, callback=recorder).cpu()


def tiny_calibration(model: torch.nn.Module, batch: int = 2, steps: list[int] | None = None,
                     seed: int = 0) -> CalibrationSet:
    """The tiny model's calibration set from one sampling pass."""
    recorder = StepRecorder(steps)
    sample_tiny(model, batch, seed, recorder)
    return recorder.calibration_set()
