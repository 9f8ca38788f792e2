"""The :class:`~dit_adapters.base.DiTAdapter` of Open-Sora 1.2's STDiT3.

TIB: ``t_embedder`` + ``fps_embedder`` -> ``t``; ``t_block`` -> ``t_mlp`` (``STDiT3.time_embedding``).
Blocks: spatial and temporal blocks interleaved. Attention sites: every ``attn`` and
``cross_attn``. The caption null embedding and positional tables are buffers, not layers,
so nothing needs to be kept FP by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dit_adapters.base import BlockBatch, DiTAdapter, TemporalFeatures, TemporalOverride
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config

CALL_ARGUMENTS = ("x", "timestep", "y", "mask", "x_mask", "fps", "height", "width")


def _argument(args: tuple, kwargs: Mapping[str, Any], name: str) -> Any:
    position = CALL_ARGUMENTS.index(name)
    return args[position] if len(args) > position else kwargs.get(name)


class ServedTimeEmbedding:
    """``STDiT3.time_embedding`` served through a :data:`TemporalOverride`; the model and the
    override are attributes (no closure), so a deep copy serves the copied model through the copied cache."""

    def __init__(self, model: STDiT3, override: TemporalOverride) -> None:
        self.model, self.override = model, override

    def __call__(self, timestep: torch.Tensor, fps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, t_mlp)`` as the override serves them."""
        def compute() -> TemporalFeatures:
            t, t_mlp = STDiT3.time_embedding(self.model, timestep, fps)
            return {"t": t, "t_mlp": t_mlp}

        features = self.override(timestep.shape[0], {"fps": fps.reshape(-1)[:1].float()}, compute, None)
        return features["t"], features["t_mlp"]


class STDiT3Adapter(DiTAdapter):
    """Adapter of :class:`~dit_adapters.opensora.stdit3.STDiT3` (toy and XL/2 alike)."""

    name = "opensora-stdit3"
    temporal_modules = ("t_embedder", "fps_embedder", "t_block")
    keep_fp_patterns = ()

    def build_model(self, config: Mapping[str, Any]) -> nn.Module:
        """An STDiT3 with random weights from its config dict."""
        model = STDiT3(STDiT3Config.from_dict(dict(config)))
        return model.eval()

    def load_model(self, path: str) -> nn.Module:
        """``toy`` for the bundled toy model, else a checkpoint folder."""
        if path == "toy":
            from tfmq_video.toy.world import load_toy_stdit3

            return load_toy_stdit3()
        from dit_adapters.opensora.loading import load_stdit3

        return load_stdit3(path)

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """``config.json`` of the model."""
        assert isinstance(model, STDiT3)
        return model.config.to_dict()

    def timestep_of(self, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """``timestep`` (B,)."""
        return _argument(args, kwargs, "timestep")

    def temporal_conditions(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``fps`` (the only other TIB input)."""
        fps = _argument(args, kwargs, "fps")
        if fps is None:
            raise ValueError("STDiT3 calls need fps")
        return {"fps": fps.reshape(-1)[:1].float()}

    def temporal_features(
        self, model: nn.Module, timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor]
    ) -> TemporalFeatures:
        """``{"t": (B, C), "t_mlp": (B, 6C)}``."""
        assert isinstance(model, STDiT3)
        t, t_mlp = model.time_embedding(timestep, conditions["fps"])
        return {"t": t, "t_mlp": t_mlp}

    def override_temporal_features(self, model: nn.Module, override: TemporalOverride | None) -> None:
        """Shadow ``model.time_embedding`` by an instance attribute calling ``override``."""
        assert isinstance(model, STDiT3)
        model.__dict__.pop("time_embedding", None)
        if override is not None:
            model.__dict__["time_embedding"] = ServedTimeEmbedding(model, override)

    def block_names(self, model: nn.Module) -> list[str]:
        """``spatial_blocks.0, temporal_blocks.0, spatial_blocks.1, ...``."""
        assert isinstance(model, STDiT3)
        return [f"{kind}_blocks.{i}" for i in range(model.config.depth) for kind in ("spatial", "temporal")]

    def attention_sites(self, model: nn.Module) -> list[str]:
        """Self- and cross-attention of every block."""
        return [f"{block}.{site}" for block in self.block_names(model) for site in ("attn", "cross_attn")]

    def embed(self, model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> BlockBatch:
        """Tokens, caption, masks and temporal features of one call."""
        assert isinstance(model, STDiT3)
        inputs = model.embed(*args, **kwargs)
        rows = {"y": inputs.y, "y_mask": inputs.y_mask, "t": inputs.t, "t_mlp": inputs.t_mlp}
        static = {"grid": inputs.grid, "video_size": inputs.video_size}
        return BlockBatch(inputs.x, rows, static)

    def run_block(self, block: nn.Module, batch: BlockBatch) -> torch.Tensor:
        """``block(x, y, t_mlp, y_mask, T, S)``."""
        T, H, W = batch.static["grid"]
        return block(batch.hidden, batch.rows["y"], batch.rows["t_mlp"], batch.rows["y_mask"], T, H * W)

    def head_name(self, model: nn.Module) -> str | None:
        """``final_layer`` (modulated by ``t``)."""
        return "final_layer"

    def run_head(self, head: nn.Module, batch: BlockBatch) -> torch.Tensor:
        """``final_layer(x, t)``: (R, N, patch * C_out) tokens."""
        return head(batch.hidden, batch.rows["t"])
