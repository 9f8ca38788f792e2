"""Integer linear algebra shared by every backend (no triton import).

Math shared by every backend (reference, CPU, Triton). With ``x ~ s_x (q_x - z_x)`` per token
and ``w ~ s_w[n, g] (q_w - z_w[n, g])`` per channel (one group) or per group ``g``:

    y[m, n] = s_x[m] * ( sum_g s_w[n, g] * (A_g[m, n] - z_w[n, g] * X_g[m]) - z_x[m] * C[n] ) + b[n]

where ``A_g = sum_{k in g} q_x q_w`` (the integer GEMM), ``X_g = sum_{k in g} q_x`` and
``C[n] = sum_g s_w[n, g] sum_{k in g} (q_w - z_w)`` (a per-layer constant, see
:func:`weight_correction`). Symmetric schemes (zero points 0) drop the correction terms.
"""

from __future__ import annotations

import torch


def weight_correction(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``C[n] = sum_g s_w[n, g] * sum_{k in g} (q_w[n, k] - z_w[n, g])`` as float32 (N,)."""
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    centered = codes.double().reshape(out_features, groups, in_features // groups) - zero_point.double().unsqueeze(-1)
    return (centered.sum(-1) * scale.double()).sum(-1).float()


def int_linear_ref(
    x_codes: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor | None,
    w_codes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The formula above in float64 (exact integer sums): codes (M, K) and (N, K), scales (M, 1), (N, G)."""
    xq = x_codes.double()
    if x_zero is not None:
        xq = xq - x_zero.double()
    out_features, in_features = w_codes.shape
    groups = w_scale.shape[1]
    wq = w_codes.double().reshape(out_features, groups, in_features // groups)
    if w_zero is not None:
        wq = wq - w_zero.double().unsqueeze(-1)
    wq = (wq * w_scale.double().unsqueeze(-1)).reshape(out_features, in_features)
    out = (xq @ wq.t()) * x_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)
