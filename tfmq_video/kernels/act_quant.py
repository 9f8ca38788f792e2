"""Fused activation quantization: per-token int8, and LayerNorm + adaLN modulate + quantize.

The second is the input of a DiT block's first Linear (STDiT3/PixArt ``t2i_modulate(norm(x))``,
Wan ``norm(x) * (1 + scale) + shift``; the runtime's ``QuantLinear.forward_norm_modulate`` calls
it through :func:`dit_adapters.fused.norm_modulate_linear`): one pass reads x once and writes int8
codes instead of three float passes before the GEMM. Two quantizers:

- dynamic per token, symmetric: ``scale = max|x| / 127`` per token, ``q = round(x / scale)``;
- static (calibrated per tensor, or per timestep under FSC, read from a 0-d tensor so a step
  change needs no new launch configuration): ``q = clamp(round(x / s) + z, qmin, qmax) - offset``,
  ``offset`` moving unsigned 8-bit codes into int8 (as ``runtime.int_ops.quant_static``).

Rounding is half away from zero (torch rounds half to even): codes may differ by one at exact ties.
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


def layernorm_modulate_quant_static_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, act_scale: torch.Tensor,
    act_zero: torch.Tensor, qmin: int, qmax: int, offset: int,
) -> torch.Tensor:
    """Reference of :func:`layernorm_modulate_quant_static`: int8 codes (B*L, C)."""
    modulated = layernorm_modulate_ref(x, shift, scale, eps).reshape(-1, x.shape[-1])
    codes = torch.clamp(torch.round(modulated / act_scale.float()) + act_zero.float(), qmin, qmax) - offset
    return codes.to(torch.int8)


# --------------------------------------------------------------------------- Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_quant_kernel(
        x_ptr, shift_ptr, mod_scale_ptr, q_ptr, s_ptr, static_scale_ptr, static_zero_ptr,
        C, rows_per_batch, eps, qmin, qmax, offset,
        NORM: tl.constexpr, STATIC: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program per token: optional LayerNorm + modulate, then int8 quantization (per-token
        symmetric, writing the token's scale; or with the static scale and zero point)."""
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
        if STATIC:
            scaled = x / tl.load(static_scale_ptr).to(tl.float32)
            codes = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(-scaled + 0.5))
            codes = codes + tl.load(static_zero_ptr).to(tl.float32)
            codes = tl.minimum(tl.maximum(codes, qmin), qmax) - offset
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-8)
            scaled = x / scale
            codes = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(-scaled + 0.5))
            codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
            tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * C + cols, codes.to(tl.int8), mask=valid)


def _launch(x2d: torch.Tensor, shift: torch.Tensor, mod_scale: torch.Tensor, rows_per_batch: int,
            eps: float, norm: bool, static: tuple[torch.Tensor, torch.Tensor, int, int, int] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel over the rows of ``x2d``; ``static``: (scale, zero, qmin, qmax, offset)."""
    require_triton()
    rows, channels = x2d.shape
    codes = torch.empty(rows, channels, dtype=torch.int8, device=x2d.device)
    scales = torch.empty(rows if static is None else 1, 1, dtype=torch.float32, device=x2d.device)
    if static is None:  # the static parameter pointers are not read
        static_scale, static_zero, qmin, qmax, offset = scales, scales, 0, 0, 0
    else:
        static_scale, static_zero, qmin, qmax, offset = static
        static_scale, static_zero = static_scale.reshape(1).float(), static_zero.reshape(1).float()
    if rows:
        _act_quant_kernel[(rows,)](
            x2d, shift, mod_scale, codes, scales, static_scale, static_zero,
            channels, rows_per_batch, eps, float(qmin), float(qmax), float(offset),
            NORM=norm, STATIC=static is not None, BLOCK_C=next_power_of_2(channels),
        )
    return codes, scales


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token int8 quantization of (M, K) (see :func:`per_token_quant_ref`)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return _launch(x2d, x2d, x2d, 1, 0.0, norm=False)


def static_quant(
    x: torch.Tensor, act_scale: torch.Tensor, act_zero: torch.Tensor, qmin: int, qmax: int, offset: int
) -> torch.Tensor:
    """Triton ``clamp(round(x / s) + z, qmin, qmax) - offset`` of (M, K) with a calibrated scale ``s``
    and zero point ``z`` (one-element tensors, read on the device: no host sync); int8 codes (M, K)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    codes, _ = _launch(x2d, x2d, x2d, 1, 0.0, norm=False, static=(act_scale, act_zero, qmin, qmax, offset))
    return codes


def _modulation_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """shift/scale of shape (B or 1, 1, C) as contiguous (B, C) rows."""
    batch, _, channels = x.shape
    return (shift.expand(batch, 1, channels).reshape(batch, channels).contiguous(),
            scale.expand(batch, 1, channels).reshape(batch, channels).contiguous())


def layernorm_modulate_quant(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token ``quant(LayerNorm(x) * (1 + scale) + shift)``; x (B, L, C), shift/scale
    (B or 1, 1, C) -> codes (B*L, C) and scales (B*L, 1)."""
    shift2d, scale2d = _modulation_rows(x, shift, scale)
    return _launch(x.contiguous().reshape(-1, x.shape[-1]), shift2d, scale2d, x.shape[1], eps, norm=True)


def layernorm_modulate_quant_static(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, act_scale: torch.Tensor,
    act_zero: torch.Tensor, qmin: int, qmax: int, offset: int,
) -> torch.Tensor:
    """Triton ``clamp(round(LayerNorm(x) * (1 + scale) + shift) / s) + z, qmin, qmax) - offset``
    with a calibrated scale ``s`` and zero point ``z`` (one-element tensors); int8 codes (B*L, C)."""
    shift2d, scale2d = _modulation_rows(x, shift, scale)
    codes, _ = _launch(x.contiguous().reshape(-1, x.shape[-1]), shift2d, scale2d, x.shape[1], eps, norm=True,
                       static=(act_scale, act_zero, qmin, qmax, offset))
    return codes
