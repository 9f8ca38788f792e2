"""Block-input sites that a quantized runtime may fuse: LayerNorm -> adaLN modulate -> Linear.

DiT blocks (STDiT3, PixArt, Wan, ...) feed their first Linears with
``LayerNorm(x) * (1 + scale) + shift``. A port writes such a site as
:func:`norm_modulate_linear`; a quantized Linear that can compute the three steps plus its
activation quantization in one kernel (the runtime's ``QuantLinear`` on the triton backend)
says so through :class:`FusesNormModulate`, and every other module runs the plain sequence.
The result is the same either way, up to the quantizer's rounding.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation as PixArt/Open-Sora write it (``t2i_modulate``): ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


class FusesNormModulate(Protocol):
    """A Linear that can take the un-normalized block input and do norm, modulation and its own input."""

    def fuses_norm_modulate(self) -> bool:
        """Whether :meth:`forward_norm_modulate` runs a fused kernel now (it depends on the backend)."""

    def forward_norm_modulate(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``self(modulate(layer_norm(x, eps), shift, scale))``; x (B, L, C), shift/scale (B, 1, C)."""


def norm_modulate_linear(
    norm: nn.Module, linear: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``linear(modulate(norm(x), shift, scale))``, fused by ``linear`` when it can.

    Fusion needs a LayerNorm without its own affine parameters (the adaLN blocks' case). The
    check reads attributes rather than ``isinstance(linear, FusesNormModulate)``, which
    ``torch.compile`` would have to trace through the protocol machinery.
    """
    fuses = getattr(linear, "fuses_norm_modulate", None)
    if fuses is not None and isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine and fuses():
        return linear.forward_norm_modulate(x, shift, scale, norm.eps)
    return linear(modulate(norm(x), shift, scale))
