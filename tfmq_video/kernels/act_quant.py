"""Fused activation quantization: per-token int8, and LayerNorm + adaLN modulate + quantize.

The second is the input of a DiT block's first Linear (STDiT3/PixArt ``t2i_modulate(norm(x))``,
Wan ``norm(x) * (1 + scale) + shift``): one pass reads x once and writes int8 codes and one
float32 scale per token, instead of three float passes before the GEMM.
Quantization is symmetric: ``scale = max|x| / 127``, ``q = round(x / scale)``.
"""

from __future__ import annotations

import torch

from tfmq_video.kernels._triton import HAS_TRITON, next_power_of_2, require_triton

QMAX = 127.0
SCALE_EPS = 1e-8


# --------------------------------------------------------------------------- references


def per_token_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) and float32 scales (M, 1)."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / QMAX).clamp(min=SCALE_EPS)
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX).to(torch.int8), scale


def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (no affine) in float32; x (B, L, C), shift/scale (B, 1, C)."""
    normed = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return normed * (1 + scale.float()) + shift.float()


def layernorm_modulate_quant_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`layernorm_modulate_quant`: codes (B*L, C) and scales (B*L, 1)."""
    modulated = layernorm_modulate_ref(x, shift, scale, eps)
    return per_token_quant_ref(modulated.reshape(-1, x.shape[-1]))


# --------------------------------------------------------------------------- Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_quant_kernel(
        x_ptr, shift_ptr, mod_scale_ptr, q_ptr, s_ptr,
        C, rows_per_batch, eps,
        NORM: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program per token: optional LayerNorm + modulate, then symmetric int8 quantization."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        valid = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=valid, other=0.0).to(tl.float32)
        if NORM:
            batch = row // rows_per_batch
            mean = tl.sum(x, axis=0) / C
            centered = tl.where(valid, x - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / C
            shift = tl.load(shift_ptr + batch * C + cols, mask=valid, other=0.0).to(tl.float32)
            mod = tl.load(mod_scale_ptr + batch * C + cols, mask=valid, other=0.0).to(tl.float32)
            x = centered / tl.sqrt(var + eps) * (1.0 + mod) + shift
            x = tl.where(valid, x, 0.0)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-8)
        scaled = x / scale
        codes = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(-scaled + 0.5))
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        tl.store(q_ptr + row * C + cols, codes.to(tl.int8), mask=valid)
        tl.store(s_ptr + row, scale)


def _launch(x2d: torch.Tensor, shift: torch.Tensor, mod_scale: torch.Tensor, rows_per_batch: int,
            eps: float, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    rows, channels = x2d.shape
    codes = torch.empty(rows, channels, dtype=torch.int8, device=x2d.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x2d.device)
    if rows:
        _act_quant_kernel[(rows,)](
            x2d, shift, mod_scale, codes, scales, channels, rows_per_batch, eps,
            NORM=norm, BLOCK_C=next_power_of_2(channels),
        )
    return codes, scales


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token int8 quantization of (M, K) (see :func:`per_token_quant_ref`)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return _launch(x2d, x2d, x2d, 1, 0.0, norm=False)


def layernorm_modulate_quant(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quant(LayerNorm(x) * (1 + scale) + shift)``; x (B, L, C), shift/scale (B, 1, C)."""
    batch, length, channels = x.shape
    shift2d = shift.reshape(batch, channels).contiguous()
    scale2d = scale.reshape(batch, channels).contiguous()
    return _launch(x.contiguous().reshape(-1, channels), shift2d, scale2d, length, eps, norm=True)
