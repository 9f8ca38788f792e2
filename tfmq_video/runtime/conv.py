"""QuantPatchConv: a quantized patchify convolution run as a :class:`QuantLinear` over patches.

A convolution whose stride equals its kernel size, without padding, with dilation 1 and one
group (a DiT's patch embedding: STDiT3's ``x_embedder.proj`` Conv3d, a Conv2d patchify) is a
Linear over flattened, non-overlapping patches. The weight ``(out, C, *kernel)`` is stored as
``(out, C * prod(kernel))`` codes in the ``(C, *kernel)`` order of ``weight.reshape(out, -1)``;
the input ``(B, C, *spatial)`` becomes patch rows ``(B, *grid, C * prod(kernel))`` in the same
order, runs through the backend's integer GEMM, and the output goes back to ``(B, out, *grid)``.
The ``reference`` backend runs ``F.convNd`` instead, the fake-quant model's own computation, so that
it matches that model bit for bit on every CPU.
Trailing input positions that do not fill a patch are dropped, as the convolution does.

Static and per-timestep activation parameters are per tensor, so they are the same on patch
rows. A dynamic per-token conv quantizes each input position over its channels (the
fake-quant model's token axis is the channel axis), which is not one scale per patch row: such
layers compute in float32 on every backend (the patch embedding is a tiny part of the model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.quant.affine import dequantize, minmax_qparams, quantize
from tfmq_video.quant.context import TimestepContext
from tfmq_video.quant.records import QuantizedLinearRecord
from tfmq_video.runtime.linear import QuantLinear

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _tuple(value: object, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def patchify_problem(module: nn.Module) -> str | None:
    """Why ``module`` (an ``nn.ConvNd`` or a fake-quant conv) is not a patchify conv, or None.

    A patchify conv has stride == kernel size, no padding, dilation 1 and one group.
    """
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() not in (3, 4, 5) or not hasattr(module, "stride"):
        return f"a {type(module).__name__} is not a Conv1d/2d/3d"
    kernel = tuple(weight.shape[2:])
    n = len(kernel)
    stride = _tuple(module.stride, n)
    padding = module.padding
    dilation = _tuple(getattr(module, "dilation", 1), n)
    groups = getattr(module, "groups", 1)
    problems = []
    if stride != kernel:
        problems.append(f"stride {stride} != kernel size {kernel}")
    if padding != "valid" and (isinstance(padding, str) or any(p != 0 for p in _tuple(padding, n))):
        problems.append(f"padding {padding}")
    if any(d != 1 for d in dilation):
        problems.append(f"dilation {dilation}")
    if groups != 1:
        problems.append(f"groups {groups}")
    return "; ".join(problems) or None


class QuantPatchConv(QuantLinear):
    """A quantized patchify Conv{1,2,3}d (see module docstring); buffers are those of :class:`QuantLinear`."""

    def __init__(
        self,
        record: QuantizedLinearRecord,
        context: TimestepContext | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = record.original_shape
        if shape is None or len(shape) not in (3, 4, 5):
            raise ConfigError(
                f"{record.name}: a conv record needs original_shape (out, in, *kernel), got {shape}"
            )
        if (shape[0], math.prod(shape[1:])) != tuple(record.weight_codes.shape):
            raise ConfigError(
                f"{record.name}: codes {tuple(record.weight_codes.shape)} are not the conv weight {tuple(shape)} "
                "flattened to (out, in * prod(kernel))"
            )
        super().__init__(record, context=context, backend=backend, dtype=dtype)
        self.original_shape = tuple(int(s) for s in shape)
        self.in_channels = self.original_shape[1]
        self.kernel_size = self.original_shape[2:]

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, *grid, C * prod(kernel)) in the weight's (C, *kernel) order."""
        n = len(self.kernel_size)
        grid = [size // k for size, k in zip(x.shape[2:], self.kernel_size, strict=True)]
        x = x[
            (
                slice(None),
                slice(None),
                *(slice(0, g * k) for g, k in zip(grid, self.kernel_size, strict=True)),
            )
        ]
        split = [d for g, k in zip(grid, self.kernel_size, strict=True) for d in (g, k)]
        x = x.reshape(x.shape[0], x.shape[1], *split)
        order = [0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2)]
        return x.permute(order).reshape(x.shape[0], *grid, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) (or unbatched (C, *spatial)) -> (B, out, *grid)."""
        n = len(self.kernel_size)
        unbatched = x.dim() == n + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != n + 2 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"{self.name}: expected input (B, {self.in_channels}, ...) with {n} spatial dims, "
                f"got {tuple(x.shape)}"
            )
        if self.backend == "reference" and self.activation.mode != "dynamic_per_token":
            out = self._reference_conv(x)
        else:
            if self.activation.mode == "dynamic_per_token":
                out = self._per_position_forward(x)
            else:
                out = super().forward(self.patches(x))
            out = out.permute(0, n + 1, *range(1, n + 1))
        return out.squeeze(0) if unbatched else out

    def _reference_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quant model's own float32 convolution, so that ``reference`` matches it bit for bit.

        A GEMM over patch rows sums in another order than ``F.convNd``; a last-bit difference in
        the patch embedding can then flip a rounding tie of the next static activation quantizer.
        """
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        weight = self._reference_weight().reshape(self.original_shape)
        return conv(self.fake_quantize_input(x), weight, self.bias, stride=self.kernel_size).to(x.dtype)

    def _per_position_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic quantization per input position over its channels, then float32 math."""
        xf, grid = x.float(), self.act_grid
        scale, zero = minmax_qparams(xf.amin(1, keepdim=True), xf.amax(1, keepdim=True), grid)
        xq = dequantize(quantize(xf, scale, zero, grid), scale, zero)
        return F.linear(self.patches(xq), self._reference_weight(), self.bias).to(x.dtype)

    def _prepare(self) -> None:
        self._cache.clear()
        if self.activation.mode != "dynamic_per_token":
            super()._prepare()

    def extra_repr(self) -> str:
        return f"conv {tuple(self.original_shape)}, kernel=stride={tuple(self.kernel_size)}, {super().extra_repr()}"
