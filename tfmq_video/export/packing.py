"""Packing of 4-bit weight codes, two per byte.

Layout (the on-disk and in-memory format of every W4 tensor, also read by the Triton W4A8
kernel): codes of shape ``(out_features, in_features)`` become a ``uint8`` tensor of shape
``(out_features, ceil(in_features / 2))``. Byte ``j`` of row ``n`` holds

- element ``(n, 2j)`` in its **low** nibble (bits 0-3) and
- element ``(n, 2j + 1)`` in its **high** nibble (bits 4-7).

A nibble is the code's 4-bit two's complement (signed grid, codes -8..7) or the code itself
(unsigned grid, codes 0..15). An odd ``in_features`` leaves the last high nibble 0. Rows stay
whole so per-channel and per-group scales keep their (out, groups) shape.
"""

from __future__ import annotations

import torch

from tfmq_video.errors import ConfigError


def packed_columns(in_features: int) -> int:
    """Bytes per packed row for ``in_features`` 4-bit codes."""
    return (in_features + 1) // 2


def pack_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Pack int8 codes (out, in) in the 4-bit range into uint8 (out, ceil(in / 2)) (layout above)."""
    if codes.dim() != 2:
        raise ConfigError(f"pack_int4 expects a 2-D (out, in) code tensor, got shape {tuple(codes.shape)}")
    lo, hi = (-8, 7) if signed else (0, 15)
    values = codes.to(torch.int16)
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        raise ConfigError(
            f"codes span [{int(values.min())}, {int(values.max())}], outside the {'signed' if signed else 'unsigned'} "
            f"4-bit range [{lo}, {hi}]"
        )
    if values.shape[1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    nibbles = values & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (out, ceil(in / 2)) -> int8 codes (out, in_features)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_columns(in_features):
        raise ConfigError(
            f"packed int4 tensor must be uint8 (out, {packed_columns(in_features)}) for {in_features} inputs, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    values = packed.to(torch.int16)
    nibbles = torch.stack((values & 0xF, values >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    if signed:
        nibbles = nibbles - ((nibbles & 0x8) << 1)
    return nibbles.to(torch.int8)
