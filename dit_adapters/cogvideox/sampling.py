"""Guided DDIM sampling as diffusers' ``CogVideoXPipeline`` drives the transformer.

The transformer is called with keyword arguments and both classifier-free-guidance halves in one
batch (unconditional first), exactly as the pipeline does, so calibration data recorded from this
loop (:func:`tfmq_video.calib.recorder.record_calls`) look like a pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def cogvideox_scheduler(**overrides: Any) -> Any:
    """CogVideoX's DDIM scheduler as its pipelines configure it (v-prediction, zero terminal SNR,
    trailing timesteps, SNR shift 3), with ``overrides`` applied."""
    from diffusers import CogVideoXDDIMScheduler

    settings: dict[str, Any] = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=True,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    )
    return CogVideoXDDIMScheduler(**{**settings, **overrides})


@torch.no_grad()
def guided_ddim_sample(model: Callable[..., Any], latents: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor,
                       scheduler: Any, num_steps: int, guidance: float,
                       extra_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Denoise ``latents`` (B, F, C, H, W) from pure noise with ``num_steps`` DDIM steps.

    ``text`` and ``null_text`` (B, L, D) are the conditional and unconditional text embeddings;
    the model sees ``cat([null, text])`` and ``cat([latents, latents])`` in one call per step and
    the prediction is ``uncond + guidance * (cond - uncond)``. ``scheduler`` is stateful: a fresh
    one (or the same one, re-set) per call.
    """
    if text.shape != null_text.shape:
        raise ValueError(f"text {tuple(text.shape)} and null_text {tuple(null_text.shape)} must have one shape")
    scheduler.set_timesteps(num_steps, device=latents.device)
    both_texts = torch.cat([null_text, text])
    for t in scheduler.timesteps:
        out = model(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=both_texts,
                    timestep=t.expand(2 * len(latents)), return_dict=False, **dict(extra_kwargs or {}))[0]
        uncond, cond = out.float().chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents
