"""A small deterministic text encoder for toy captions (the role T5 plays for Open-Sora).

Each word of a fixed vocabulary has a fixed pseudo-random embedding (from a seed); a
sinusoidal position code is added, and captions are padded to ``max_length`` tokens with a
padding mask. No weights are learned, so the encoder needs no checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tfmq_video.errors import ConfigError
from tfmq_video.toy.data import COLORS, DIRECTIONS, SHAPES

VOCABULARY: tuple[str, ...] = ("a", "moving", *SHAPES, *COLORS, *DIRECTIONS)


class ToyTextEncoder:
    """Captions -> (B, 1, max_length, dim) token embeddings and a (B, max_length) mask."""

    def __init__(self, dim: int = 64, max_length: int = 8, seed: int = 1234) -> None:
        self.dim = dim
        self.max_length = max_length
        generator = torch.Generator().manual_seed(seed)
        self.word_table = torch.randn(len(VOCABULARY), dim, generator=generator)
        positions = torch.arange(max_length, dtype=torch.float32)[:, None]
        freqs = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) / dim * 4.0)
        self.position_table = torch.zeros(max_length, dim)
        self.position_table[:, 0::2] = torch.sin(positions * freqs) * 0.5
        self.position_table[:, 1::2] = torch.cos(positions * freqs) * 0.5

    def tokenize(self, caption: str) -> list[int]:
        """Word indices of ``caption``; an unknown word or an over-long caption is an error."""
        words = caption.lower().split()
        if not words:
            raise ConfigError("empty caption: write e.g. 'a red square moving left'")
        unknown = [w for w in words if w not in VOCABULARY]
        if unknown:
            raise ConfigError(f"caption {caption!r} has unknown words {unknown}; the toy vocabulary is {list(VOCABULARY)}")
        if len(words) > self.max_length:
            raise ConfigError(f"caption {caption!r} has {len(words)} words; at most {self.max_length} fit")
        return [VOCABULARY.index(w) for w in words]

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, L, dim) embeddings (zeros at padding) and (B, L) int mask (1 = real token)."""
        y = torch.zeros(len(captions), 1, self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = self.tokenize(caption)
            n = len(ids)
            y[row, 0, :n] = self.word_table[ids] + self.position_table[:n]
            mask[row, :n] = 1
        return y, mask
