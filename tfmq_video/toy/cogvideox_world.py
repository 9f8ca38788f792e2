"""The toy world for a CogVideoX-family model: its config, scheduler, sampling and calibration.

The toy CogVideoX works in pixel space like the toy STDiT3 (no VAE: 3 channels, 8 frames of
32 x 32), takes the toy caption embeddings as ``encoder_hidden_states`` (zeros for the empty
prompt) and is trained with CogVideoX's objective (v-prediction on its zero-terminal-SNR DDPM
schedule) and sampled with its guided DDIM loop (:mod:`dit_adapters.cogvideox.sampling`).
Videos come back as (N, 3, T, H, W), the toy STDiT3's layout, so one evaluator scores both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_adapters.cogvideox.sampling import cogvideox_scheduler, guided_ddim_sample
from dit_adapters.opensora.rflow import seeded_noise
from tfmq_video.devices import model_device
from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES
from tfmq_video.toy.world import (
    ASSETS_DIR,
    TOY_CAPTION_DIM,
    TOY_CAPTION_TOKENS,
    VIDEO_SHAPE,
    toy_text_encoder,
)

TOY_COGVIDEOX_DIR = ASSETS_DIR / "toy_cogvideox"
PATCH = 4

#: ``CogVideoXTransformer3DModel`` arguments of the toy model: width 128, 4 blocks, 4 x 4 patches,
#: a time embedding a quarter of the width (CogVideoX-2B: 512 of 1920), so the adaLN linears hold about
#: the same share of the weights as in CogVideoX-2B (64 tokens a frame, 512 a video, plus 8 text
#: tokens in one attention).
TOY_COGVIDEOX_CONFIG: dict[str, Any] = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3, time_embed_dim=32,
    text_embed_dim=TOY_CAPTION_DIM, num_layers=4, sample_width=FRAME_SIZE, sample_height=FRAME_SIZE,
    sample_frames=NUM_FRAMES, patch_size=PATCH, temporal_compression_ratio=1, max_text_seq_length=TOY_CAPTION_TOKENS,
    use_rotary_positional_embeddings=False,
)
TOY_COGVIDEOX_STEPS = 20
TOY_COGVIDEOX_GUIDANCE = 4.0


def build_toy_cogvideox(seed: int = 0) -> nn.Module:
    """A freshly initialized toy ``CogVideoXTransformer3DModel`` (float32, eval mode)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**TOY_COGVIDEOX_CONFIG).eval()


def load_toy_cogvideox(folder: str | Path | None = None) -> nn.Module:
    """The bundled trained toy CogVideoX (or the one in ``folder``), through the adapter's loader."""
    from dit_adapters.base import get_adapter

    return get_adapter("cogvideox").load_model(str(folder or TOY_COGVIDEOX_DIR)).float().eval()


def caption_embeddings(captions: Sequence[str]) -> torch.Tensor:
    """(B, L, D) toy caption embeddings as ``encoder_hidden_states`` (zeros at padding)."""
    y, _ = toy_text_encoder().encode(list(captions))
    return y[:, 0]


def to_model_layout(videos: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> CogVideoX's (B, T, C, H, W); the inverse is the same permutation."""
    return videos.permute(0, 2, 1, 3, 4)


@torch.no_grad()
def generate_cogvideox_latents(model: nn.Module, captions: Sequence[str], seeds: Sequence[int],
                               num_steps: int = TOY_COGVIDEOX_STEPS, guidance: float = TOY_COGVIDEOX_GUIDANCE,
                               batch_size: int = 16) -> torch.Tensor:
    """One video per (caption, seed) from a toy CogVideoX: float (N, 3, T, H, W) on CPU.

    The noise of each seed is drawn on the CPU as for the toy STDiT3, so both families (and every
    device) start from the same noise.
    """
    if len(captions) != len(seeds):
        raise ValueError(f"got {len(captions)} captions but {len(seeds)} seeds; give one seed per caption")
    device = model_device(model)
    outputs = []
    for start in range(0, len(captions), batch_size):
        chunk = slice(start, start + batch_size)
        text = caption_embeddings(captions[chunk]).to(device)
        noise = to_model_layout(seeded_noise(seeds[chunk], VIDEO_SHAPE, device=device))
        latents = guided_ddim_sample(model, noise, text, torch.zeros_like(text), cogvideox_scheduler(), num_steps,
                                     guidance)
        outputs.append(to_model_layout(latents).cpu())
    return torch.cat(outputs)
