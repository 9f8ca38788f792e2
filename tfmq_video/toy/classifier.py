"""A small 3D-convolutional video classifier of the toy world (shape, color, direction).

Its penultimate features are the feature space of FVD on the toy world, the role I3D plays
for real videos. Input: float (N, 3, T, H, W) in [-1, 1], the toy model's pixel space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from tfmq_video.toy.data import COLORS, DIRECTIONS, SHAPES

HEADS: dict[str, int] = {"shape": len(SHAPES), "color": len(COLORS), "direction": len(DIRECTIONS)}


@dataclass(frozen=True)
class ToyClassifierConfig:
    """Widths of the three conv stages and of the feature layer."""

    widths: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128

    @classmethod
    def from_dict(cls, raw: dict) -> ToyClassifierConfig:
        """Build from ``config.json``; unknown keys are an error."""
        unknown = sorted(set(raw) - {"widths", "feature_dim", "model_type"})
        if unknown:
            raise ValueError(f"unknown toy classifier config keys {unknown}")
        return cls(widths=tuple(raw.get("widths", cls.widths)), feature_dim=int(raw.get("feature_dim", cls.feature_dim)))

    def to_dict(self) -> dict:
        """JSON-serializable config."""
        return {**asdict(self), "widths": list(self.widths), "model_type": "ToyVideoClassifier"}


def _conv_block(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv3d(c_out, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class ToyVideoClassifier(nn.Module):
    """Conv3d stages (32x32 -> 32 -> 16 -> 8), global average pool, feature layer, three heads."""

    def __init__(self, config: ToyClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ToyClassifierConfig()
        w1, w2, w3 = self.config.widths
        self.stem = _conv_block(3, w1, (1, 1, 1))  # (T, 32, 32): full resolution keeps shape detail
        self.stage2 = _conv_block(w1, w2, (1, 2, 2))  # (T, 16, 16)
        self.stage3 = _conv_block(w2, w3, (2, 2, 2))  # (T/2, 8, 8)
        self.feature = nn.Sequential(nn.Linear(w3, self.config.feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(self.config.feature_dim, n) for name, n in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) in [-1, 1] -> (N, feature_dim) penultimate features (the FVD space)."""
        h = self.stage3(self.stage2(self.stem(x)))
        return self.feature(h.mean(dim=(2, 3, 4)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: ``{"shape": (N, 3), "color": (N, 4), "direction": (N, 4)}``."""
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Class indices per head for a batch of videos, evaluated in chunks."""
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
        for start in range(0, len(x), batch_size):
            logits = self(x[start : start + batch_size])
            for name, value in logits.items():
                outputs[name].append(value.argmax(dim=-1))
        return {name: torch.cat(values) for name, values in outputs.items()}
