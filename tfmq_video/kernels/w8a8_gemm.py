"""W8A8 GEMM: int8 activations x int8 weights -> int32, fused dequantization and bias.

The integer math shared by every backend is in :mod:`tfmq_video.kernels.intmath`.
"""

from __future__ import annotations

import torch

from tfmq_video.kernels._triton import HAS_TRITON, gemm_configs, launch_gemm, require_triton
from tfmq_video.kernels.intmath import int_linear_ref, weight_correction

# --------------------------------------------------------------------------- reference


def w8a8_gemm_ref(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, x_zero: torch.Tensor | None = None, w_zero: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`w8a8_gemm` (per-channel weights: ``w_scale`` (N, 1))."""
    return int_linear_ref(x_codes, x_scale, x_zero, w_codes, w_scale, w_zero, bias, out_dtype)


# --------------------------------------------------------------------------- Triton

GROUP_M = 8  # row tiles that walk the same weight tiles together (L2 reuse)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def input_rows(ptr, rm, M, PER_ROW: tl.constexpr):
        """An input's scale (or zero point) as a (BLOCK_M, 1) column of per-row values, or the one
        per-tensor value (a static / per-timestep scale: no (M,) vector to build per call)."""
        # One return: the GPU's Triton (3.6) type-checks every return of a jit function, even one
        # after a constexpr branch that already returned, and a column and a scalar do not unify.
        if PER_ROW:  # noqa: SIM108 (a statement: Triton resolves a constexpr `if` before typing)
            rows = tl.load(ptr + rm, mask=rm < M, other=0.0)[:, None]
        else:
            rows = tl.load(ptr)
        return rows

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles walk a band
        of column tiles together, so the weight tiles they share stay in L2."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        band = GROUP_M * tiles_n
        first_m = (pid // band) * GROUP_M
        rows_in_band = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % band) % rows_in_band, (pid % band) // rows_in_band

    @triton.jit
    def _w8a8_kernel(
        x_ptr, w_ptr, xs_ptr, xz_ptr, ws_ptr, wz_ptr, corr_ptr, b_ptr, out_ptr,
        M, N, K,
        HAS_BIAS: tl.constexpr, HAS_XZERO: tl.constexpr, HAS_WZERO: tl.constexpr, X_PER_ROW: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) output tile: int8 dot into int32, then the fused epilogue.

        A 1-D grid in grouped order (GROUP_M row tiles per band of weight tiles); the weight tile
        is read as it lies, (BLOCK_N, BLOCK_K) K-major, and transposed for the dot; out-of-range
        rows are clamped to row 0 (their results are not stored) so that, when BLOCK_K divides K,
        the main loop loads without masks. (This form ran 1.26x faster than session 9's on an
        H100 at 16k x 3072 x 12288: docs/benchmarks.md.)
        """
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + tl.where(rm < M, rm, 0)[:, None] * K + rk[None, :]
        w_tile = w_ptr + tl.where(rn < N, rn, 0)[:, None] * K + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_tile)
                b = tl.load(w_tile)
            else:
                k_ok = (k0 + rk)[None, :] < K
                a = tl.load(x_tile, mask=k_ok, other=0)
                b = tl.load(w_tile, mask=k_ok, other=0)
            # not tl.dot(a, b, acc): Triton 3.6 (the H100's) refuses an int32 accumulator argument
            acc += tl.dot(a, tl.trans(b))
            if HAS_WZERO:
                xsum += tl.sum(a.to(tl.int32), axis=1)
            x_tile += BLOCK_K
            w_tile += BLOCK_K
        w_scale = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32)
        if HAS_WZERO:
            w_zero = tl.load(wz_ptr + rn, mask=rn < N, other=0.0)
            out -= w_zero[None, :] * xsum.to(tl.float32)[:, None]
        out = out * w_scale[None, :]
        if HAS_XZERO:
            corr = tl.load(corr_ptr + rn, mask=rn < N, other=0.0)
            out -= input_rows(xz_ptr, rm, M, X_PER_ROW) * corr[None, :]
        out = out * input_rows(xs_ptr, rm, M, X_PER_ROW)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    _even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    _w8a8_plain = _even_k(_w8a8_kernel)
    _w8a8_tuned = triton.autotune(configs=gemm_configs("BLOCK_K", (64, 128)), key=["M", "N", "K"])(
        _even_k(_w8a8_kernel)
    )


def input_params(
    x_scale: torch.Tensor, x_zero: torch.Tensor | None, rows: int
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The input's scale and zero point as the GEMM kernels read them: flat float32, one value each
    when both are per tensor (``per_row`` False), else (rows,) vectors."""
    per_row = x_scale.numel() != 1 or (x_zero is not None and x_zero.numel() != 1)

    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).float()
        return (t.expand(rows) if per_row and t.numel() == 1 else t).contiguous()

    return flat(x_scale), None if x_zero is None else flat(x_zero), per_row


def w8a8_gemm(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, x_zero: torch.Tensor | None = None, w_zero: torch.Tensor | None = None,
    correction: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
    block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """Triton W8A8 linear: int8 (M, K) codes x int8 (N, K) per-channel codes -> (M, N) ``out_dtype``.

    ``x_scale``/``x_zero``: (M, 1) per token, or one element each for a per-tensor input;
    ``w_scale``/``w_zero`` (N, 1); ``correction`` is :func:`weight_correction` (needed with ``x_zero``).
    Tiles: autotuned per (M, N, K) on a GPU unless given; 64 x 64 x 64 in the interpreter.
    """
    require_triton()
    M, K = x_codes.shape
    N = w_codes.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=x_codes.device)
    if x_zero is not None and correction is None:
        correction = weight_correction(w_codes, w_scale, w_zero if w_zero is not None else torch.zeros_like(w_scale))
    dummy = w_scale
    x_scale, x_zero, per_row = input_params(x_scale, x_zero, M)
    args = (
        x_codes.contiguous(), w_codes.contiguous(), x_scale, dummy if x_zero is None else x_zero,
        w_scale.reshape(-1).float().contiguous(),
        dummy if w_zero is None else w_zero.reshape(-1).float().contiguous(),
        dummy if correction is None else correction.float().contiguous(),
        dummy if bias is None else bias.contiguous(), out, M, N, K,
    )
    flags = {"HAS_BIAS": bias is not None, "HAS_XZERO": x_zero is not None, "HAS_WZERO": w_zero is not None,
             "X_PER_ROW": per_row, "GROUP_M": GROUP_M}
    launch_gemm(_w8a8_plain, _w8a8_tuned, M, N, args, flags, block_m, block_n, "BLOCK_K", block_k, 64, grouped=True)
    return out
