"""Fake-quant replacements for Linear/Conv layers and for the attention matmuls.

A wrapped layer keeps the original ``weight``/``bias`` parameters under the same names, so the
wrapped model's state dict is the original one plus quantizer entries. The forward pass is the
original one with ``weight -> weight_quant(weight)`` and ``x -> input_quant(x)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_video.quant.quantizers import ActQuantizer, ActSpec, StepContext, WeightQuantizer, WeightSpec

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class QuantWeightLayer(nn.Module):
    """Shared part of :class:`QuantLinear` and :class:`QuantConv`: quantized weight and input."""

    channel_dim = -1

    def __init__(
        self, layer: nn.Module, weight_spec: WeightSpec | None, act_spec: ActSpec | None, context: StepContext | None,
        initialize: bool = True,
    ) -> None:
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        device = self.weight.device
        self.weight_quant = None if weight_spec is None else WeightQuantizer(weight_spec, self.weight.shape).to(device)
        self.input_quant = None if act_spec is None else ActQuantizer(act_spec, context, self.channel_dim).to(device)
        if self.weight_quant is not None and initialize:
            self.weight_quant.initialize(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (fake-quantized when a weight quantizer is set)."""
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.apply_weight(x, self.quantized_weight())

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The layer's operation with the given weight."""
        raise NotImplementedError


class QuantLinear(QuantWeightLayer):
    """Fake-quant ``nn.Linear``."""

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``."""
        return F.linear(x, weight, self.bias)


class QuantConv(QuantWeightLayer):
    """Fake-quant ``nn.Conv{1,2,3}d`` (zero padding); weights quantized per output channel."""

    channel_dim = 1

    def __init__(self, layer: nn.Module, weight_spec: WeightSpec | None, act_spec: ActSpec | None,
                 context: StepContext | None, initialize: bool = True) -> None:
        super().__init__(layer, weight_spec, act_spec, context, initialize)
        if layer.padding_mode != "zeros":
            raise NotImplementedError(f"QuantConv supports zero padding only, got {layer.padding_mode!r}")
        self.conv_fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(layer)]
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution with the given weight."""
        return self.conv_fn(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def wrap_weight_layer(
    layer: nn.Module, weight_spec: WeightSpec | None, act_spec: ActSpec | None, context: StepContext | None,
    initialize: bool = True,
) -> QuantWeightLayer:
    """The fake-quant replacement of a Linear or Conv layer (``initialize``: set its weight scales)."""
    if isinstance(layer, nn.Linear):
        return QuantLinear(layer, weight_spec, act_spec, context, initialize)
    if isinstance(layer, CONV_TYPES):
        return QuantConv(layer, weight_spec, act_spec, context, initialize)
    raise TypeError(f"cannot quantize a {type(layer).__name__}: only Linear and Conv1d/2d/3d layers")


class QuantAttention(nn.Module):
    """Attention ``softmax(q k^T / sqrt(d)) v`` with quantized matmul inputs.

    ``q``/``k`` (inputs of QK^T) and ``v`` are quantized with the activation spec; the softmax
    probabilities (input of P·V) with an unsigned grid of the same bits. ``attn_mask`` is a
    boolean mask (True = attend) broadcast against the (B, h, n_q, n_k) scores.
    """

    def __init__(self, spec: ActSpec, context: StepContext | None) -> None:
        super().__init__()
        self.q_quant = ActQuantizer(spec, context)
        self.k_quant = ActQuantizer(spec, context)
        self.v_quant = ActQuantizer(spec, context)
        prob_spec = ActSpec(bits=spec.bits, symmetric=False, mode=spec.mode, init="minmax")
        self.p_quant = ActQuantizer(prob_spec, context)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same contract as ``F.scaled_dot_product_attention`` with a boolean mask."""
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = self.p_quant(torch.softmax(scores.float(), dim=-1).to(q.dtype))
        return probs @ v


class KernelAttention(nn.Module):
    """Attention as tfmq-video's INT8 attention kernel computes it (``attention_mode: per_block``).

    Q (times the softmax scale) and K (minus its mean over tokens) are rounded to int8 with one
    scale per tile of query/key rows, computed from the tensor itself at every call; P and V
    enter P·V in fp16 (:mod:`tfmq_video.kernels.int8_attention`). There is nothing to calibrate;
    gradients pass the rounding straight through, so block reconstruction sees the kernel's error.
    """

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same contract as :meth:`QuantAttention.forward`."""
        from tfmq_video.kernels import int8_attention as kernel

        q_scaled, k_smooth = kernel.scaled_smoothed_qk(q, k, None)
        q_hat = _straight_through(q_scaled, kernel.fake_quantize_per_block(q_scaled.detach(), kernel.BLOCK_M))
        k_hat = _straight_through(k_smooth, kernel.fake_quantize_per_block(k_smooth.detach(), kernel.BLOCK_N))
        return kernel.attend_base2(q_hat @ k_hat.transpose(-2, -1), v, attn_mask).to(q.dtype)

    def extra_repr(self) -> str:
        return "int8 Q/K per tile (dynamic), P·V in fp16"


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` forward, the identity's gradient backward."""
    return x + (rounded - x).detach()


def activation_quantizers(module: nn.Module) -> list[ActQuantizer]:
    """Every activation quantizer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


def weight_layers(module: nn.Module) -> list[tuple[str, QuantWeightLayer]]:
    """Every fake-quant weight layer inside ``module`` with its name."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, QuantWeightLayer)]
