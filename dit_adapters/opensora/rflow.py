"""Rectified-flow scheduler and sampler as Open-Sora 1.2 uses them.

Conventions (upstream): timesteps live in [0, num_timesteps]; noising is
``x_t = (1 - t/N) x0 + (t/N) noise``; the model predicts the velocity ``v = x0 - noise``;
sampling walks from t = N to 0 with ``z += v * (t_i - t_{i+1}) / N`` under classifier-free
guidance with the null caption. Timesteps are shifted towards the noisy end by
``t' = r t / (1 + (r - 1) t)`` (t in [0, 1]), with ``r`` from the resolution and frame
count (upstream) or fixed by the config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tfmq_video.errors import ConfigError

ModelFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """Rectified-flow settings. Defaults are Open-Sora 1.2's (30 steps, CFG 7)."""

    num_steps: int = 30
    guidance_scale: float = 7.0
    num_timesteps: int = 1000
    use_timestep_transform: bool = True
    # Upstream ratio: sqrt(H*W / base_resolution) * sqrt((frames // 17 * 5) / base_num_frames).
    base_resolution: int = 512 * 512
    base_num_frames: int = 1
    transform_scale: float = 1.0
    # When set, used as the ratio r instead of the resolution/frame formula.
    fixed_shift: float | None = None
    use_discrete_timesteps: bool = False

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_timesteps < 1:
            raise ConfigError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if self.fixed_shift is not None and self.fixed_shift <= 0:
            raise ConfigError(f"fixed_shift must be > 0, got {self.fixed_shift}")


@dataclass
class StepState:
    """What a step callback sees: the model inputs of step ``index`` and their result.

    ``model_kwargs`` is the batched (conditional then unconditional) input of the guidance pass.
    """

    index: int
    timestep: torch.Tensor  # (B,) in [0, num_timesteps]
    latents: torch.Tensor  # (B, C, T, H, W) before the update
    model_input: torch.Tensor  # (2B or B, C, T, H, W) as fed to the model
    model_timestep: torch.Tensor  # (2B or B,)
    model_kwargs: dict
    velocity: torch.Tensor  # guided velocity (B, C, T, H, W)
    next_latents: torch.Tensor


StepCallback = Callable[[StepState], None]


class RFlowSampler:
    """Open-Sora 1.2's rectified flow: timestep schedule, noising, training target, sampling."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()

    # ------------------------------------------------------------------ schedule
    def shift_ratio(self, height: int, width: int, num_frames: int) -> float:
        """The ratio r of the timestep transform for a video of this pixel size."""
        cfg = self.config
        if cfg.fixed_shift is not None:
            return cfg.fixed_shift
        ratio_space = (height * width / cfg.base_resolution) ** 0.5
        frames = 1 if num_frames == 1 else num_frames // 17 * 5
        ratio_time = (frames / cfg.base_num_frames) ** 0.5
        ratio = ratio_space * ratio_time * cfg.transform_scale
        if ratio <= 0:
            raise ConfigError(
                f"timestep shift ratio is {ratio} for {num_frames} frames of {height}x{width}; "
                "set SamplerConfig.fixed_shift for videos this small"
            )
        return ratio

    def transform(self, t: torch.Tensor, ratio: float) -> torch.Tensor:
        """Shift timesteps in [0, N] towards N: ``r t / (1 + (r - 1) t)`` on t / N."""
        n = self.config.num_timesteps
        unit = t / n
        return ratio * unit / (1 + (ratio - 1) * unit) * n

    def timesteps(self, batch: int, height: int, width: int, num_frames: int, device: torch.device | str = "cpu"
                  ) -> list[torch.Tensor]:
        """The ``num_steps`` sampling timesteps, each a (batch,) tensor, from noisy to clean."""
        cfg = self.config
        values = [(1.0 - i / cfg.num_steps) * cfg.num_timesteps for i in range(cfg.num_steps)]
        if cfg.use_discrete_timesteps:
            values = [float(round(v)) for v in values]
        steps = [torch.full((batch,), v, device=device, dtype=torch.float32) for v in values]
        if cfg.use_timestep_transform:
            ratio = self.shift_ratio(height, width, num_frames)
            steps = [self.transform(t, ratio) for t in steps]
        return steps

    # ------------------------------------------------------------------ training
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t/N) x0 + (t/N) noise`` with t of shape (B,)."""
        w = (t / self.config.num_timesteps).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - w) * x0 + w * noise

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the model learns: ``x0 - noise``."""
        return x0 - noise

    def sample_training_t(self, batch: int, height: int, width: int, num_frames: int,
                          generator: torch.Generator | None = None, logit_location: float = 0.0) -> torch.Tensor:
        """Logit-normal training timesteps in [0, N], shifted like the sampling schedule.

        ``logit_location`` moves the normal's mean (0 upstream); a positive value puts more
        training weight on the noisy end, where the sampler lays out the video."""
        t = torch.sigmoid(torch.randn(batch, generator=generator) + logit_location) * self.config.num_timesteps
        if self.config.use_timestep_transform:
            t = self.transform(t, self.shift_ratio(height, width, num_frames))
        return t

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        null_y: torch.Tensor,
        mask: torch.Tensor | None = None,
        extra_kwargs: dict | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        callback: StepCallback | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Denoise ``noise`` (B, C, T, H, W) into latents under guidance.

        ``y`` (B, 1, L, C_cap) and ``null_y`` (B or 1, 1, L, C_cap) are the conditional and null
        captions; ``mask`` (B, L) is the conditional caption mask (the model repeats it for the
        null half, as upstream). ``height``/``width``/``num_frames`` are the pixel video size used
        by the timestep transform (defaults: the latent size). ``extra_kwargs`` (e.g. fps) go to
        the model unchanged. ``callback`` is called after every step with a :class:`StepState`.
        """
        cfg = self.config
        batch = noise.shape[0]
        _, _, frames, lat_h, lat_w = noise.shape
        height, width, num_frames = height or lat_h, width or lat_w, num_frames or frames
        if null_y.shape[0] != batch:
            null_y = null_y.expand(batch, *null_y.shape[1:])
        use_guidance = cfg.guidance_scale != 1.0
        model_kwargs = dict(extra_kwargs or {})
        model_kwargs["y"] = torch.cat([y, null_y], 0) if use_guidance else y
        model_kwargs["mask"] = mask
        steps = self.timesteps(batch, height, width, num_frames, device=noise.device)

        z = noise
        iterator: Sequence[torch.Tensor] = tqdm(steps, desc="sampling", leave=False) if progress else steps
        for i, t in enumerate(iterator):
            z_in = torch.cat([z, z], 0) if use_guidance else z
            t_in = torch.cat([t, t], 0) if use_guidance else t
            pred = model(z_in, t_in, **model_kwargs)
            velocity = pred[:, : z.shape[1]].float()  # drop the sigma half of pred_sigma models
            if use_guidance:
                cond, uncond = velocity.chunk(2, dim=0)
                velocity = uncond + cfg.guidance_scale * (cond - uncond)
            t_next = steps[i + 1] if i + 1 < len(steps) else torch.zeros_like(t)
            dt = ((t - t_next) / cfg.num_timesteps).view(-1, 1, 1, 1, 1)
            z_next = z + velocity * dt
            if callback is not None:
                callback(StepState(i, t, z, z_in, t_in, model_kwargs, velocity, z_next))
            z = z_next
        return z


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, each sample drawn from its own seed.

    A sample's noise does not depend on the batch it is generated in, so FP and quantized
    runs of the same seed start from the same point.
    """
    out = torch.empty(len(seeds), *shape)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        out[row] = torch.randn(*shape, generator=generator)
    return out.to(device)
