"""The integer linear algebra of the CPU backend, as small tensor-only functions.

Each function is written so ``torch.compile`` (Inductor) can fuse it into one vectorized
loop: the per-token quantization reads ``x`` once and writes int8 codes and scales, and the
epilogue reads the int32 accumulator once and writes the dequantized, biased output. Math:
see :mod:`tfmq_video.kernels.intmath`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tfmq_video.runtime.backends import cpu_compile_enabled, warn_once

SCALE_EPS = 1e-8


def quant_per_token_symmetric(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> int8 codes and float32 scales (M, 1); ``scale = max(max|x| / qmax, eps)``."""
    x = x.float()
    scale = torch.clamp(x.abs().amax(-1, keepdim=True) / qmax, min=SCALE_EPS)
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8), scale


def quant_per_token_asymmetric(
    x: torch.Tensor, qmin: float, qmax: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) -> int8 codes (shifted by ``-offset``), scales and zero points (M, 1), min-max per token."""
    x = x.float()
    lo = torch.clamp(x.amin(-1, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=SCALE_EPS)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    codes = torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - offset
    return codes.to(torch.int8), scale, zero - offset


def quant_static(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: float, qmax: float, offset: float
) -> torch.Tensor:
    """(M, K) -> int8 codes (shifted by ``-offset``) with calibrated per-tensor ``scale``/``zero``."""
    codes = torch.clamp(torch.round(x.float() / scale) + zero, qmin, qmax) - offset
    return codes.to(torch.int8)


def dequant_epilogue(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    x_zero: torch.Tensor | None, correction: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int32 (M, N) -> ``((acc * s_w - z_x * C) * s_x + b)`` in ``out_dtype`` (per-channel weights)."""
    out = acc.float() * w_scale
    if x_zero is not None and correction is not None:
        out = out - x_zero * correction
    out = out * x_scale
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


def linear_per_token(
    x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, qmax: float,
) -> torch.Tensor:
    """Whole W8A8 linear with symmetric per-token activations: quantize, ``_int_mm``, epilogue.

    Compiled as one graph, Inductor fuses the quantization into one pass over ``x`` and the
    dequantization and bias into one pass over the int32 accumulator.
    """
    codes, x_scale = quant_per_token_symmetric(x, qmax)
    return dequant_epilogue(torch._int_mm(codes, w_t), x_scale, w_scale, bias, None, None, x.dtype)


def linear_static(
    x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, zero: torch.Tensor, correction: torch.Tensor, qmin: float, qmax: float, offset: float,
) -> torch.Tensor:
    """Whole W8A8 linear with a calibrated per-tensor (or current-timestep) activation scale/zero point."""
    codes = quant_static(x, scale, zero, qmin, qmax, offset)
    return dequant_epilogue(torch._int_mm(codes, w_t), scale, w_scale, bias, zero - offset, correction, x.dtype)


def onednn_available() -> bool:
    """Whether oneDNN's prepacked quantized linear (``torch.ops.onednn.qlinear_*``) can be used."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def onednn_prepack(codes: torch.Tensor) -> torch.Tensor:
    """Prepack int8 (out, in) per-channel codes for :func:`onednn_qlinear` (blocked VNNI layout)."""
    return torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)


@torch.library.custom_op("tfmq_video::onednn_qlinear", mutates_args=())
def onednn_qlinear(
    codes_u8: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, packed: torch.Tensor,
    w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """oneDNN u8 x s8 GEMM with the per-tensor activation and per-channel weight dequantization
    (and bias) fused: ``(codes - x_zero) * x_scale @ (w * w_scale)^T + bias``.

    A custom op, so compiled blocks call it as one opaque kernel (Inductor's own lowering of
    ``onednn.qlinear_pointwise`` needs frozen weights).
    """
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes_u8, x_scale, x_zero, packed, w_scale, torch.zeros_like(w_scale, dtype=torch.int64), bias,
        1.0, 0, out_dtype, "none", [], "",
    )


@onednn_qlinear.register_fake
def _(codes_u8, x_scale, x_zero, packed, w_scale, bias, out_dtype):  # type: ignore[no-untyped-def]
    return codes_u8.new_empty((codes_u8.shape[0], w_scale.shape[0]), dtype=out_dtype)


@torch.library.custom_op("tfmq_video::onednn_qlinear_codes", mutates_args=())
def onednn_qlinear_codes(
    codes_u8: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, packed: torch.Tensor,
    w_scale: torch.Tensor, bias: torch.Tensor | None, out_scale: torch.Tensor, out_zero: torch.Tensor,
    post_op: str, algorithm: str,
) -> torch.Tensor:
    """:func:`onednn_qlinear` followed, inside the GEMM, by an activation (oneDNN post-op, e.g.
    ``gelu``/``tanh``) and the next layer's per-tensor input quantization: returns uint8
    ``clamp(round(act(y) / out_scale) + out_zero, 0, 255)``.

    ``out_scale``/``out_zero`` are 0-d tensors (a per-timestep pair is selected by the caller with
    the step index tensor); oneDNN takes them as numbers, read here, inside the opaque op, so a
    compiled graph does not guard on their values.
    """
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes_u8, x_scale, x_zero, packed, w_scale, torch.zeros_like(w_scale, dtype=torch.int64), bias,
        float(out_scale), int(out_zero), torch.uint8, post_op, [], algorithm,
    )


@onednn_qlinear_codes.register_fake
def _(codes_u8, x_scale, x_zero, packed, w_scale, bias, out_scale, out_zero, post_op, algorithm):  # type: ignore[no-untyped-def]
    return codes_u8.new_empty((codes_u8.shape[0], w_scale.shape[0]), dtype=torch.uint8)


def quant_per_token_u8(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token codes shifted by +128 into uint8 (oneDNN's u8 activations) and scales (M, 1)."""
    codes, scale = quant_per_token_symmetric(x, qmax)
    return (codes.to(torch.int16) + 128).to(torch.uint8), scale


def rescale_rows(y: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``y * x_scale + bias`` (the per-token part of the dequantization, after a oneDNN GEMM)."""
    out = y.float() * x_scale
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


def quant_static_u8(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """Codes of a calibrated per-tensor scale/zero point, shifted into uint8 when the grid is signed."""
    shift = 128.0 if qmin < 0 else 0.0
    return (torch.clamp(torch.round(x.float() / scale) + zero, qmin, qmax) + shift).to(torch.uint8)


_COMPILED: dict[Callable, Callable] = {}
_FAILED: set[Callable] = set()


def fused(fn: Callable) -> Callable:
    """``fn`` compiled by Inductor (cached), or ``fn`` itself when compilation is disabled."""
    if torch.compiler.is_compiling():  # inside a compiled block: the outer graph fuses it (and Dynamo
        return fn  # must not read the caches below: it would guard on them and recompile when they grow)
    if not cpu_compile_enabled() or fn in _FAILED:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    compiled = _COMPILED[fn]

    def call(*args: object) -> object:
        if torch.compiler.is_compiling():  # inside a compiled block: let the outer graph fuse it
            return fn(*args)
        if fn in _FAILED:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as err:  # a missing C++ compiler, an Inductor bug: stay correct, get slower
            _FAILED.add(fn)
            warn_once(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); using eager ops")
            return fn(*args)

    return call
