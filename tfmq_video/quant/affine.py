"""Uniform affine quantization math shared by calibration (fake quant) and the runtime (real ints).

``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``.
Symmetric schemes use ``zero_point = 0`` and a signed range; asymmetric ones an unsigned
range with an integer zero point. Scales broadcast against ``x`` (per tensor, per channel,
per group or per token: the caller shapes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfmq_video.errors import ConfigError

SUPPORTED_BITS = range(2, 9)


@dataclass(frozen=True)
class IntRange:
    """The integer grid of a ``bits``-wide code, signed (symmetric) or unsigned (asymmetric)."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}: use 2 to 8 bits")

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


def int8_offset(grid: IntRange) -> int:
    """Shift that moves a grid's codes into int8: 128 for unsigned 8-bit codes, else 0."""
    return 128 if (not grid.signed and grid.bits == 8) else 0


def code_dtype(grid: IntRange) -> torch.dtype:
    """Storage dtype of unpacked integer codes: uint8 for unsigned 8-bit codes (0..255), else int8."""
    return torch.uint8 if int8_offset(grid) else torch.int8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return (x.round() - x).detach() + x


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, grid: IntRange) -> torch.Tensor:
    """Integer codes of ``x`` (as a float tensor holding integers; cast with ``.to(torch.int8)``)."""
    return torch.clamp(torch.round(x / scale) + zero_point, grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    """Real values of codes ``q``."""
    return (q.float() - zero_point) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, grid: IntRange
) -> torch.Tensor:
    """Quantize then dequantize; gradients pass straight through the rounding (LSQ-compatible:
    gradients also reach ``scale`` and ``zero_point`` when they require grad).

    Without a gradient to carry, the same operations run in place on one buffer: the values are
    bitwise those of the straight-through path (``(round(v) - v) + v`` is exactly ``round(v)``
    in floating point), at a fraction of the memory traffic of evaluation runs.
    """
    if not _needs_grad(x, scale, zero_point):
        q = torch.div(x, scale)
        q.round_().add_(zero_point).clamp_(grid.qmin, grid.qmax).sub_(zero_point).mul_(scale)
        return q
    q = torch.clamp(round_ste(x / scale) + zero_point, grid.qmin, grid.qmax)
    return (q - zero_point) * scale


def _needs_grad(*values: torch.Tensor | float) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(v) and v.requires_grad for v in values)


def minmax_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, grid: IntRange, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[x_min, x_max]`` (elementwise over the given shapes).

    Signed grids are symmetric around 0 (zero point 0); unsigned grids are asymmetric and
    always include 0 so that zero padding is exact.
    """
    if grid.signed:
        bound = torch.maximum(x_min.abs(), x_max.abs())
        scale = torch.clamp(bound / grid.qmax, min=eps)
        return scale, torch.zeros_like(scale)
    lo = torch.clamp(x_min, max=0.0)
    hi = torch.clamp(x_max, min=0.0)
    scale = torch.clamp((hi - lo) / (grid.qmax - grid.qmin), min=eps)
    zero_point = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale, zero_point


def group_multiplier_limit(grid: IntRange) -> int:
    """Largest integer group multiplier ``k`` for which every code of the signed ``grid`` times ``k``
    stays in int8: ``2 ** (8 - bits)`` (16 for 4-bit codes: -8 * 16 = -128, 7 * 16 = 112).

    Integer group scales (:func:`factor_group_scales`) need a symmetric (signed) grid below 8 bits.
    """
    if not grid.signed or grid.bits >= 8:
        kind = "signed" if grid.signed else "unsigned"
        raise ConfigError(
            f"integer group scales need symmetric (signed) weights of 2 to 7 bits, got {kind} {grid.bits}-bit; "
            "set quant.weight.symmetric: true and bits below 8, or turn integer_group_scales off"
        )
    return 2 ** (8 - grid.bits)


def factor_group_scales(
    scale: torch.Tensor, limit: int, rtol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split per-group scales (out, G) into one float scale per row times integer multipliers.

    Returns ``(row_scale (out, 1), multipliers (out, G) int64)`` with ``row_scale * multipliers``
    equal to ``scale`` within ``rtol`` and every multiplier in ``1..limit``, or None when no such
    split exists. Per row it tries ``row_scale = max(scale) / m`` for ``m = 1..limit`` and keeps the
    smallest ``m`` that works, so the multipliers are as small as they can be.
    """
    top = scale.amax(dim=1, keepdim=True)
    if not bool((scale > 0).all()):
        return None
    row_scale = torch.zeros_like(top)
    multipliers = torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
    pending = torch.ones(scale.shape[0], dtype=torch.bool, device=scale.device)
    for m in range(1, limit + 1):
        candidate = top / m
        ratio = scale / candidate
        rounded = ratio.round()
        fits = ((ratio - rounded).abs() <= rtol * rounded.clamp_min(1)).all(dim=1) & (rounded >= 1).all(dim=1)
        take = pending & fits
        row_scale[take] = candidate[take]
        multipliers[take] = rounded[take].to(torch.int64)
        pending &= ~take
        if not bool(pending.any()):
            return row_scale, multipliers
    return None
