"""A tiny random CogVideoX transformer and a guided DDIM sampling loop, for tests and smoke runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dit_adapters.cogvideox.sampling import guided_ddim_sample

TINY_COGVIDEOX: dict[str, Any] = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
    text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
    max_text_seq_length=6, temporal_compression_ratio=4,
)
TINY_LATENT = (2, 4, 8, 8)  # (frames, channels, height, width): CogVideoX's latent layout
TINY_TEXT = (6, 24)


def tiny_cogvideox(seed: int = 0, rotary: bool = False) -> nn.Module:
    """A randomly initialized tiny ``CogVideoXTransformer3DModel`` (two blocks, width 32); with
    ``rotary``, CogVideoX-5B's rotary positions instead of sincos tables."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**TINY_COGVIDEOX, use_rotary_positional_embeddings=rotary).eval()


def tiny_rotary_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary (cos, sin) tables a CogVideoX pipeline passes the tiny model."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = TINY_LATENT[2] // TINY_COGVIDEOX["patch_size"]
    return get_3d_rotary_pos_embed(TINY_COGVIDEOX["attention_head_dim"], ((0, 0), (grid, grid)), (grid, grid),
                                   TINY_LATENT[0])


def sample_tiny_cogvideox(model: Callable[..., Any], seeds: tuple[int, ...] = (0, 1), num_steps: int = 4,
                          guidance: float = 5.0, rotary: bool = False) -> torch.Tensor:
    """Guided DDIM (v-prediction) sampling as CogVideoX's pipeline calls the transformer: keyword
    arguments, conditional and unconditional halves in one call, one sampling run per seed."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    extra = {"image_rotary_emb": tiny_rotary_tables()} if rotary else {}
    outputs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, *TINY_LATENT, generator=generator)
        text = torch.randn(1, *TINY_TEXT, generator=generator)
        outputs.append(guided_ddim_sample(model, latents, text, torch.zeros_like(text), scheduler, num_steps, guidance,
                                          extra))
    return torch.cat(outputs)


def tiny_cogvideox_pipeline(seed: int = 0) -> Any:
    """A real diffusers ``CogVideoXPipeline`` of tiny random parts: a word-level tokenizer, a one-layer
    T5 encoder, a two-level CogVideoX VAE and :func:`tiny_cogvideox` (16 x 16 pixels, 5 frames)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["a", "red", "blue", "ball", "square", "moves", "left", "right", "up", "down"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TINY_TEXT[1], d_ff=32, num_layers=1,
                                           num_heads=2, d_kv=12)).eval()
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
                                 block_out_channels=(8, 8), latent_channels=TINY_LATENT[1], layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4).eval()
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=tiny_cogvideox(seed), scheduler=scheduler)


#: call options of :func:`tiny_cogvideox_pipeline` matching the tiny transformer's latent size
TINY_PIPELINE_CALL: dict[str, Any] = dict(height=16, width=16, num_frames=5, num_inference_steps=4,
                                          max_sequence_length=TINY_TEXT[0], guidance_scale=5.0, output_type="pt")
