"""W4A8 GEMM: int4 weights (packed two per byte) unpacked to int8 in the main loop, int8 dot.

The weight is the packed layout of :mod:`tfmq_video.export.packing`: uint8 (N, ceil(K/2)),
element 2j in the low nibble and 2j+1 in the high nibble of byte j. Each K step loads contiguous
activation codes and the weight bytes K-major, unpacks both nibbles and interleaves them back
into K order (``tl.interleave``), so one int8 dot covers the step. (Until session 9 the kernel
loaded the even and odd activation columns as two strided tiles for two half-K dots; on an H100
that ran at 0.10-0.22x of bf16 cuBLAS.) Per-group
scales (and zero points) are applied per group on the int32 partial sums (QServe-style two-level
accumulation); per-channel weights are one group spanning K. Math: see
:mod:`tfmq_video.kernels.intmath`.
"""

from __future__ import annotations

import torch

from tfmq_video.errors import ConfigError
from tfmq_video.export.packing import unpack_int4
from tfmq_video.kernels._triton import HAS_TRITON, gemm_configs, launch_gemm, require_triton
from tfmq_video.kernels.intmath import int_linear_ref, weight_correction


def w4a8_gemm_ref(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, in_features: int, w_signed: bool,
    w_scale: torch.Tensor, bias: torch.Tensor | None = None, x_zero: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`w4a8_gemm`: unpack, then the exact integer formula in float64."""
    w_codes = unpack_int4(w_packed, in_features, w_signed)
    return int_linear_ref(x_codes, x_scale, x_zero, w_codes, w_scale, w_zero, bias, out_dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _unpack_nibbles(packed, SIGNED: tl.constexpr):
        """uint8 bytes -> (low, high) int8 codes."""
        b = packed.to(tl.int32)
        lo = b & 0xF
        hi = (b >> 4) & 0xF
        if SIGNED:
            lo = lo - ((lo & 8) << 1)
            hi = hi - ((hi & 8) << 1)
        return lo.to(tl.int8), hi.to(tl.int8)

    @triton.jit
    def _w4a8_kernel(
        x_ptr, w_ptr, xs_ptr, xz_ptr, ws_ptr, wz_ptr, corr_ptr, b_ptr, out_ptr,
        M, N, K, KP, group_len, num_groups,
        SIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XZERO: tl.constexpr, HAS_WZERO: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr,
    ):
        """One output tile; the K loop walks groups, and inside a group steps of 2 * HALF_K codes.

        Each step loads 2 * HALF_K contiguous activation codes and HALF_K weight bytes per output
        channel (K-major, as the int8 tensor cores take B), unpacks the low and high nibbles and
        interleaves them back into K order, so one int8 dot covers the step.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, HALF_K)
        rk = tl.arange(0, 2 * HALF_K)
        row_ok = rm[:, None] < M
        facc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, num_groups):
            k_start = g * group_len  # even: groups have even lengths, or there is one group
            iacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k0 in range(0, group_len, 2 * HALF_K):
                k = k_start + k0 + rk
                k_ok = ((k0 + rk) < group_len) & (k < K)
                x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=row_ok & k_ok[None, :], other=0)
                byte = (k_start + k0) // 2 + rj
                byte_ok = ((k0 + 2 * rj) < group_len) & (byte < KP)
                packed = tl.load(w_ptr + rn[:, None] * KP + byte[None, :],
                                 mask=(rn[:, None] < N) & byte_ok[None, :], other=0)
                w_lo, w_hi = _unpack_nibbles(packed, SIGNED)
                # The high nibble of an odd K's last byte meets a masked (zero) activation.
                iacc += tl.dot(x, tl.trans(tl.interleave(w_lo, w_hi)))
                if HAS_WZERO:
                    xsum += tl.sum(x.to(tl.int32), axis=1)
            w_scale = tl.load(ws_ptr + rn * num_groups + g, mask=rn < N, other=0.0)
            part = iacc.to(tl.float32)
            if HAS_WZERO:
                w_zero = tl.load(wz_ptr + rn * num_groups + g, mask=rn < N, other=0.0)
                part -= w_zero[None, :] * xsum.to(tl.float32)[:, None]
            facc += part * w_scale[None, :]
        if HAS_XZERO:
            x_zero = tl.load(xz_ptr + rm, mask=rm < M, other=0.0)
            corr = tl.load(corr_ptr + rn, mask=rn < N, other=0.0)
            facc -= x_zero[:, None] * corr[None, :]
        out = facc * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    _w4a8_tuned = triton.autotune(configs=gemm_configs("HALF_K", (32, 64)), key=["M", "N", "K"])(_w4a8_kernel)


def w4a8_gemm(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, in_features: int, w_signed: bool,
    w_scale: torch.Tensor, bias: torch.Tensor | None = None, x_zero: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None, correction: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16, block_m: int | None = None, block_n: int | None = None,
    half_k: int | None = None,
) -> torch.Tensor:
    """Triton W4A8 linear: int8 (M, K) codes x packed int4 (N, ceil(K/2)) -> (M, N) ``out_dtype``.

    ``w_scale``/``w_zero``: (N, G) with G = 1 (per channel) or K / group_size (even group sizes).
    Tiles: autotuned per (M, N, K) on a GPU unless given; 64 x 64, K steps of 2 x 32 in the interpreter.
    """
    require_triton()
    M, K = x_codes.shape
    N, groups = w_scale.shape
    if in_features != K:
        raise ConfigError(f"activation has {K} features but the weight expects {in_features}")
    group_len = K // groups
    if groups > 1 and (K % groups or group_len % 2):
        raise ConfigError(f"W4A8 groups must split K={K} into equal even-sized groups, got {groups} groups")
    out = torch.empty(M, N, dtype=out_dtype, device=x_codes.device)
    if x_zero is not None and correction is None:
        codes = unpack_int4(w_packed, in_features, w_signed)
        correction = weight_correction(codes, w_scale, w_zero if w_zero is not None else torch.zeros_like(w_scale))
    dummy = w_scale
    args = (
        x_codes.contiguous(), w_packed.contiguous(), x_scale.reshape(-1).float().contiguous(),
        dummy if x_zero is None else x_zero.reshape(-1).float().contiguous(),
        w_scale.float().contiguous(), dummy if w_zero is None else w_zero.float().contiguous(),
        dummy if correction is None else correction.float().contiguous(),
        dummy if bias is None else bias.contiguous(), out,
        M, N, K, w_packed.shape[1], group_len, groups,
    )
    flags = {"SIGNED": w_signed, "HAS_BIAS": bias is not None, "HAS_XZERO": x_zero is not None,
             "HAS_WZERO": w_zero is not None}
    launch_gemm(_w4a8_kernel, _w4a8_tuned, M, N, args, flags, block_m, block_n, "HALF_K", half_k, 32,
                codes_per_k=2)
    return out
