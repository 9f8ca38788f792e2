"""The hand-off from calibration to export: what one quantized layer needs at run time.

Calibration (fake quantization) produces :class:`QuantizedLinearRecord` objects; export
writes them to disk and the runtime builds integer modules from them. Integer codes are
stored in int8 tensors (int4 codes too, before packing); scales are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ActivationMode = Literal["static", "per_timestep", "dynamic_per_token", "none"]


@dataclass
class ActivationRecord:
    """How the input activation of a layer is quantized.

    - ``static``: ``scale``/``zero_point`` are scalars (per tensor).
    - ``per_timestep``: ``scale``/``zero_point`` have shape (num_steps,), indexed by the
      :class:`~tfmq_video.quant.context.TimestepContext` step (FSC).
    - ``dynamic_per_token``: computed at run time from each token's range (no tensors).
    - ``none``: the activation stays in floating point (weight-only layer).
    """

    mode: ActivationMode
    bits: int = 8
    signed: bool = True
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


@dataclass
class QuantizedLinearRecord:
    """A Linear (or a Conv reshaped to one) with integer weights.

    ``weight_codes``: int8 (out_features, in_features) codes in the signed or unsigned range of
    ``weight_bits``; ``weight_scale``/``weight_zero_point``: (out_features, 1) per channel or
    (out_features, in_features // group_size) per group.
    """

    name: str
    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_bits: int
    weight_signed: bool
    group_size: int | None
    bias: torch.Tensor | None
    activation: ActivationRecord
    original_shape: tuple[int, ...] | None = None  # the conv weight shape when the layer was a conv

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight these codes represent, (out_features, in_features)."""
        codes = self.weight_codes.float()
        out_features, in_features = codes.shape
        if self.group_size is None:
            return (codes - self.weight_zero_point) * self.weight_scale
        grouped = codes.view(out_features, in_features // self.group_size, self.group_size)
        zero = self.weight_zero_point.unsqueeze(-1)
        return ((grouped - zero) * self.weight_scale.unsqueeze(-1)).view(out_features, in_features)
