"""W4A8 GEMM: int4 weights (packed two per byte) unpacked to int8 in the main loop, int8 dots.

The stored layout (:mod:`tfmq_video.export.packing`, uint8 (N, ceil(K/2)), element 2j in the low
nibble of byte j) pairs neighbouring K columns in a byte, so unpacking it gives the even and odd
columns, which must be put back in K order before a dot. The kernel instead reads a *split*
layout that :func:`split_int4` derives once per layer (the runtime caches it next to the packed
buffer): K is cut into steps of ``step`` codes (64 or 128) per group, and byte j of a step holds
code j in its low nibble and code ``step / 2 + j`` in its high nibble. Unpacking a step then gives
its first and its second half, each a contiguous K range, and the main loop does two int8 dots
against two contiguous activation tiles: no interleave, no strided loads. (Session 9's H100 run
measured 0.10-0.22x of bf16 cuBLAS with two strided half dots; session 10's sweep 0.4x with one dot
after ``tl.interleave``.) Groups are padded to whole steps with zero codes, which meet masked
(zero) activations. Per-group scales (and zero points) are applied per group on the int32 partial
sums (QServe-style two-level accumulation); per-channel weights are one group spanning K. Math:
see :mod:`tfmq_video.kernels.intmath`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfmq_video.errors import ConfigError
from tfmq_video.export.packing import unpack_int4
from tfmq_video.kernels._triton import HAS_TRITON, gemm_configs, launch_gemm, require_triton
from tfmq_video.kernels.intmath import int_linear_ref, weight_correction
from tfmq_video.kernels.w8a8_gemm import input_params


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

    from tfmq_video.kernels.w8a8_gemm import input_rows

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
        M, N, K, row_bytes, group_len, group_bytes, num_groups,
        SIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XZERO: tl.constexpr, HAS_WZERO: tl.constexpr,
        X_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF_STEP: tl.constexpr,
    ):
        """One output tile; the K loop walks groups, and inside a group steps of 2 * HALF_STEP codes
        of the split layout: one byte tile, two contiguous activation tiles, two int8 dots."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, HALF_STEP)
        row_ok = rm[:, None] < M
        x_rows = x_ptr + rm[:, None] * K
        w_rows = w_ptr + rn[:, None] * row_bytes
        facc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, num_groups):
            iacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k0 in range(0, group_len, 2 * HALF_STEP):
                first = k0 + rj
                second = first + HALF_STEP
                x_first = tl.load(x_rows + (g * group_len + first)[None, :],
                                  mask=row_ok & (first < group_len)[None, :], other=0)
                x_second = tl.load(x_rows + (g * group_len + second)[None, :],
                                   mask=row_ok & (second < group_len)[None, :], other=0)
                packed = tl.load(w_rows + (g * group_bytes + k0 // 2 + rj)[None, :], mask=rn[:, None] < N, other=0)
                w_first, w_second = _unpack_nibbles(packed, SIGNED)
                # not tl.dot(..., iacc): Triton 3.6 (the H100's) refuses an int32 accumulator argument
                iacc += tl.dot(x_first, tl.trans(w_first))
                iacc += tl.dot(x_second, tl.trans(w_second))
                if HAS_WZERO:
                    xsum += tl.sum(x_first.to(tl.int32), axis=1) + tl.sum(x_second.to(tl.int32), axis=1)
            w_scale = tl.load(ws_ptr + rn * num_groups + g, mask=rn < N, other=0.0)
            part = iacc.to(tl.float32)
            if HAS_WZERO:
                w_zero = tl.load(wz_ptr + rn * num_groups + g, mask=rn < N, other=0.0)
                part -= w_zero[None, :] * xsum.to(tl.float32)[:, None]
            facc += part * w_scale[None, :]
        if HAS_XZERO:
            corr = tl.load(corr_ptr + rn, mask=rn < N, other=0.0)
            facc -= input_rows(xz_ptr, rm, M, X_PER_ROW) * corr[None, :]
        out = facc * input_rows(xs_ptr, rm, M, X_PER_ROW)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    _w4a8_tuned = triton.autotune(configs=gemm_configs(), key=["M", "N", "K", "HALF_STEP"])(_w4a8_kernel)


@dataclass(frozen=True)
class SplitInt4:
    """A weight in the kernel's split layout: uint8 ``data`` (N, groups * padded group / 2), K steps
    of ``step`` codes, groups of ``group_len`` codes (K for per-channel weights)."""

    data: torch.Tensor
    step: int
    group_len: int
    num_groups: int


def split_step(group_len: int) -> int:
    """Codes per main-loop step: 128 (two dots of 64) when a group has that many, else 64."""
    return 128 if group_len >= 128 else 64


def split_int4(w_packed: torch.Tensor, in_features: int, num_groups: int) -> SplitInt4:
    """Repack the stored int4 layout (N, ceil(K/2)) into the kernel's split layout (module docstring)."""
    if in_features % num_groups:
        raise ConfigError(f"{num_groups} groups do not split K={in_features}")
    group_len = in_features // num_groups
    step = split_step(group_len)
    padded = -(-group_len // step) * step
    nibbles = unpack_int4(w_packed, in_features, signed=False).to(torch.int16)  # raw 4-bit patterns
    nibbles = nibbles.reshape(-1, num_groups, group_len)
    nibbles = torch.nn.functional.pad(nibbles, (0, padded - group_len))
    halves = nibbles.reshape(nibbles.shape[0], num_groups, padded // step, 2, step // 2)
    data = (halves[..., 0, :] | (halves[..., 1, :] << 4)).to(torch.uint8)
    return SplitInt4(data.reshape(nibbles.shape[0], -1).contiguous(), step, group_len, num_groups)


def w4a8_gemm(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, in_features: int, w_signed: bool,
    w_scale: torch.Tensor, bias: torch.Tensor | None = None, x_zero: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None, correction: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16, block_m: int | None = None, block_n: int | None = None,
    w_split: SplitInt4 | None = None,
) -> torch.Tensor:
    """Triton W4A8 linear: int8 (M, K) codes x packed int4 (N, ceil(K/2)) -> (M, N) ``out_dtype``.

    ``x_scale``/``x_zero``: (M, 1) per token, or one element each for a per-tensor input.
    ``w_scale``/``w_zero``: (N, G) with G = 1 (per channel) or K / group_size. ``w_split``: the
    weight already in the kernel's layout (:func:`split_int4`; a layer caches it), else derived here.
    Tiles: autotuned per (M, N, K) on a GPU unless given; 64 x 64 in the interpreter.
    """
    require_triton()
    M, K = x_codes.shape
    N, groups = w_scale.shape
    if in_features != K:
        raise ConfigError(f"activation has {K} features but the weight expects {in_features}")
    if K % groups:
        raise ConfigError(f"W4A8 groups must split K={K} into equal groups, got {groups} groups")
    if w_split is None:
        w_split = split_int4(w_packed, in_features, groups)
    out = torch.empty(M, N, dtype=out_dtype, device=x_codes.device)
    if x_zero is not None and correction is None:
        codes = unpack_int4(w_packed, in_features, w_signed)
        correction = weight_correction(codes, w_scale, w_zero if w_zero is not None else torch.zeros_like(w_scale))
    dummy = w_scale
    x_scale, x_zero, per_row = input_params(x_scale, x_zero, M)
    args = (
        x_codes.contiguous(), w_split.data, x_scale, dummy if x_zero is None else x_zero,
        w_scale.float().contiguous(), dummy if w_zero is None else w_zero.float().contiguous(),
        dummy if correction is None else correction.float().contiguous(),
        dummy if bias is None else bias.contiguous(), out,
        M, N, K, w_split.data.shape[1], w_split.group_len, w_split.data.shape[1] // groups, groups,
    )
    flags = {"SIGNED": w_signed, "HAS_BIAS": bias is not None, "HAS_XZERO": x_zero is not None,
             "HAS_WZERO": w_zero is not None, "X_PER_ROW": per_row, "HALF_STEP": w_split.step // 2}
    launch_gemm(_w4a8_kernel, _w4a8_tuned, M, N, args, flags, block_m, block_n)
    return out
