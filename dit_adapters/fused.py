"""Sites of a DiT block that a quantized runtime may fuse.

- Block inputs, LayerNorm -> adaLN modulate -> Linear: DiT blocks (STDiT3, PixArt, Wan, ...)
  feed their first Linears with ``LayerNorm(x) * (1 + scale) + shift``. A port writes such a
  site as :func:`norm_modulate_linear`; a quantized Linear that can compute the three steps plus
  its activation quantization in one kernel (the runtime's ``QuantLinear`` on the triton backend)
  says so through :class:`FusesNormModulate`.
- MLPs, Linear -> activation -> Linear: a port writes the modulated MLP as
  :func:`norm_modulate_mlp`; a quantized first Linear whose GEMM can apply the activation and
  write the second Linear's integer input codes directly (``QuantLinear`` on the cpu backend
  with oneDNN, when the second Linear's input scale is calibrated) says so through
  :class:`EmitsActivationCodes`, and the hidden activation is never written in float.

Every other module runs the plain sequence. The result is the same either way, up to the
quantizers' rounding.
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


class EmitsActivationCodes(Protocol):
    """A Linear whose GEMM can apply an activation and quantize its output for the next Linear."""

    def emits_codes_for(self, activation: nn.Module, consumer: nn.Module) -> bool:
        """Whether :meth:`forward_activation_codes` can feed ``consumer`` now (backend, schemes)."""

    def forward_activation_codes(self, x: torch.Tensor, activation: nn.Module, consumer: nn.Module) -> torch.Tensor:
        """``consumer``'s integer input codes of ``activation(self(x))``, shape (..., out_features);
        ``consumer.forward_codes(codes, x.dtype)`` finishes the computation."""


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


def norm_modulate_mlp(
    norm: nn.Module, fc1: nn.Module, activation: nn.Module, fc2: nn.Module,
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
) -> torch.Tensor:
    """``fc2(activation(fc1(modulate(norm(x), shift, scale))))`` with the fusions the layers offer.

    When ``fc1`` emits ``fc2``'s input codes (:class:`EmitsActivationCodes`), the activation and
    fc2's input quantization run inside fc1's GEMM; otherwise the block input may still be fused
    by :func:`norm_modulate_linear`.
    """
    emits = getattr(fc1, "emits_codes_for", None)
    if emits is not None and emits(activation, fc2):
        codes = fc1.forward_activation_codes(modulate(norm(x), shift, scale), activation, fc2)
        return fc2.forward_codes(codes, x.dtype)
    return fc2(activation(norm_modulate_linear(norm, fc1, x, shift, scale)))
