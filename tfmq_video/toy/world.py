"""The toy world's fixed settings, bundled model locations and its generation helper."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dit_adapters.opensora.loading import load_stdit3
from dit_adapters.opensora.rflow import RFlowSampler, SamplerConfig, StepCallback, seeded_noise
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from tfmq_video.checkpoint import load_into, read_config, read_weights
from tfmq_video.devices import model_device, move
from tfmq_video.errors import CheckpointError
from tfmq_video.toy.classifier import ToyClassifierConfig, ToyVideoClassifier
from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES, tensor_to_clips
from tfmq_video.toy.text import ToyTextEncoder

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TOY_STDIT3_DIR = ASSETS_DIR / "toy_stdit3"
TOY_CLASSIFIER_DIR = ASSETS_DIR / "toy_classifier"

TOY_FPS = 8.0
TOY_CAPTION_DIM = 64
TOY_CAPTION_TOKENS = 8

TOY_STDIT3_CONFIG = STDiT3Config(
    input_sq_size=FRAME_SIZE,
    in_channels=3,
    patch_size=(1, 4, 4),
    hidden_size=128,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    pred_sigma=False,
    caption_channels=TOY_CAPTION_DIM,
    model_max_length=TOY_CAPTION_TOKENS,
    qk_norm=True,
)

# The toy videos are pixels at 32x32: the upstream resolution-based shift would be ~0, so the
# ratio is fixed for training and sampling alike. A shift of 3 (about what Open-Sora 1.2 uses
# for 480p) spends more training and sampling at high noise, where the caption decides the
# shape and the motion.
TOY_SAMPLER_CONFIG = SamplerConfig(num_steps=20, guidance_scale=4.0, use_timestep_transform=True, fixed_shift=3.0)

VIDEO_SHAPE = (3, NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)


def toy_text_encoder() -> ToyTextEncoder:
    """The caption encoder the bundled model was trained with."""
    return ToyTextEncoder(dim=TOY_CAPTION_DIM, max_length=TOY_CAPTION_TOKENS)


def load_toy_stdit3(folder: str | Path | None = None) -> STDiT3:
    """The bundled trained toy STDiT3 (float32, eval mode)."""
    return load_stdit3(folder or TOY_STDIT3_DIR)


def model_kwargs(batch: int) -> dict:
    """The non-caption inputs of a toy forward pass (fps and pixel size)."""
    size = torch.full((batch,), float(FRAME_SIZE))
    return {"fps": torch.tensor([TOY_FPS]), "height": size, "width": size}


@torch.no_grad()
def generate_latents(
    model: Callable[..., torch.Tensor],
    null_caption: torch.Tensor,
    captions: Sequence[str],
    seeds: Sequence[int],
    sampler_config: SamplerConfig = TOY_SAMPLER_CONFIG,
    batch_size: int = 16,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one video per (caption, seed): float (N, 3, T, H, W) in model space.

    ``null_caption`` is the model's ``y_embedder.y_embedding`` (L, C_cap). The inputs move to
    the model's device (noise is drawn on CPU from each seed, so every device starts from the
    same noise); the videos come back on CPU.
    """
    if len(captions) != len(seeds):
        raise ValueError(f"got {len(captions)} captions but {len(seeds)} seeds; give one seed per caption")
    encoder = toy_text_encoder()
    sampler = RFlowSampler(sampler_config)
    device = model_device(model)
    outputs = []
    for start in range(0, len(captions), batch_size):
        chunk = slice(start, start + batch_size)
        y, mask = move(encoder.encode(captions[chunk]), device)
        noise = seeded_noise(seeds[chunk], VIDEO_SHAPE, device=device)
        null = null_caption.to(device)[None, None].expand(len(y), 1, *null_caption.shape)
        outputs.append(
            sampler.sample(
                model, noise, y, null, mask=mask, extra_kwargs=move(model_kwargs(len(y)), device),
                height=FRAME_SIZE, width=FRAME_SIZE, num_frames=NUM_FRAMES, callback=callback, progress=progress,
            ).to("cpu")
        )
    return torch.cat(outputs)


def generate_clips(model: STDiT3, captions: Sequence[str], seeds: Sequence[int], **kwargs: object) -> np.ndarray:
    """Sample uint8 (N, T, H, W, 3) clips from an STDiT3 (see :func:`generate_latents`)."""
    latents = generate_latents(model, model.y_embedder.y_embedding, captions, seeds, **kwargs)  # type: ignore[arg-type]
    return tensor_to_clips(latents)


def load_toy_classifier(folder: str | Path | None = None) -> ToyVideoClassifier:
    """The bundled toy video classifier (float32, eval mode); its features are the toy FVD space."""
    folder = Path(folder or TOY_CLASSIFIER_DIR)
    raw = read_config(folder)
    try:
        config = ToyClassifierConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: {err}") from err
    model = ToyVideoClassifier(config)
    load_into(model, read_weights(folder), str(folder))
    return model.eval()
