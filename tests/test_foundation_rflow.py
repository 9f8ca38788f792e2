"""The rectified-flow sampler: schedule, noising, guidance, callback."""

from __future__ import annotations

import math

import pytest
import torch

from dit_adapters.opensora.rflow import RFlowSampler, SamplerConfig, StepState, seeded_noise
from tfmq_video.errors import ConfigError


def test_timesteps_follow_the_upstream_transform() -> None:
    sampler = RFlowSampler(SamplerConfig(num_steps=4, fixed_shift=3.0))
    steps = [float(t[0]) for t in sampler.timesteps(1, 32, 32, 8)]
    for i, value in enumerate(steps):
        unit = 1 - i / 4
        assert math.isclose(value, 3 * unit / (1 + 2 * unit) * 1000, rel_tol=1e-6)
    assert steps == sorted(steps, reverse=True)


def test_resolution_ratio_matches_upstream_formula() -> None:
    sampler = RFlowSampler(SamplerConfig())
    # 720p, 51 frames: sqrt(720*1280 / 512^2) * sqrt(51 // 17 * 5)
    assert math.isclose(sampler.shift_ratio(720, 1280, 51), math.sqrt(720 * 1280 / 512**2) * math.sqrt(15))
    with pytest.raises(ConfigError, match="fixed_shift"):
        sampler.shift_ratio(32, 32, 8)  # 8 frames -> frame factor 0: upstream formula breaks


def test_noising_and_velocity_target_are_consistent() -> None:
    sampler = RFlowSampler(SamplerConfig())
    x0, noise = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([250.0, 1000.0])
    x_t = sampler.add_noise(x0, noise, t)
    assert torch.allclose(x_t[1], noise[1])
    # One exact Euler step with the true velocity from t lands on x0 at t = 0.
    assert torch.allclose(x_t + sampler.velocity_target(x0, noise) * (t / 1000).view(-1, 1, 1, 1, 1), x0, atol=1e-6)


def test_sampler_with_oracle_velocity_recovers_target_and_calls_back_every_step() -> None:
    target = torch.randn(2, 3, 2, 4, 4)
    noise = seeded_noise([5, 6], (3, 2, 4, 4))
    sampler = RFlowSampler(SamplerConfig(num_steps=7, guidance_scale=3.0, fixed_shift=2.0))
    seen: list[StepState] = []

    def oracle(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Straight-line flow to `target`: v = (target - z) / (t / N); same for cond and uncond.
        return (target.repeat(2, 1, 1, 1, 1) - z) / (t / 1000).view(-1, 1, 1, 1, 1)

    y, null = torch.randn(2, 1, 4, 8), torch.randn(1, 1, 4, 8)
    out = sampler.sample(oracle, noise, y, null, mask=torch.ones(2, 4), callback=seen.append)
    assert torch.allclose(out, target, atol=1e-5)
    assert [s.index for s in seen] == list(range(7))
    assert seen[0].model_input.shape[0] == 4  # cond + uncond batch
    assert torch.equal(seen[0].model_kwargs["y"][2:], null.expand(2, 1, 4, 8))
    assert torch.equal(seen[-1].next_latents, out)


def test_guidance_combines_cond_and_uncond() -> None:
    sampler = RFlowSampler(SamplerConfig(num_steps=1, guidance_scale=4.0, fixed_shift=1.0))

    def model(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1).expand_as(z)

    y, null = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 0.5)
    out = sampler.sample(model, torch.zeros(1, 1, 1, 1, 1), y, null)
    assert torch.allclose(out, torch.tensor(0.5 + 4.0 * 0.5))  # uncond + s * (cond - uncond), dt = 1


def test_seeded_noise_does_not_depend_on_the_batch() -> None:
    together = seeded_noise([1, 2, 3], (2, 3))
    alone = seeded_noise([2], (2, 3))
    assert torch.equal(together[1], alone[0])


def test_invalid_sampler_config() -> None:
    with pytest.raises(ConfigError, match="num_steps"):
        SamplerConfig(num_steps=0)
