"""The PyTorch references of the kernels agree with independent float computations."""

from __future__ import annotations

import torch

from tfmq_video.kernels.intmath import int_linear_ref, weight_correction
from tfmq_video.quant.affine import IntRange, dequantize, minmax_qparams, quantize


def test_int_linear_ref_equals_dequantized_float_matmul() -> None:
    torch.manual_seed(0)
    x_codes = torch.randint(0, 256, (9, 24)).to(torch.int16) - 128
    x_scale, x_zero = torch.rand(9, 1) + 0.1, torch.randint(-3, 3, (9, 1)).float()
    w_codes = torch.randint(0, 16, (5, 24), dtype=torch.int8)
    w_scale, w_zero = torch.rand(5, 3) + 0.1, torch.randint(0, 15, (5, 3)).float()
    bias = torch.randn(5)
    x = (x_codes.double() - x_zero.double()) * x_scale.double()
    w = ((w_codes.double().view(5, 3, 8) - w_zero.double()[..., None]) * w_scale.double()[..., None]).view(5, 24)
    expected = x @ w.t() + bias.double()
    out = int_linear_ref(x_codes, x_scale, x_zero, w_codes, w_scale, w_zero, bias, torch.float64)
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-9)
    correction = weight_correction(w_codes, w_scale, w_zero)
    assert torch.allclose(correction.double(), w.sum(1), rtol=1e-5)


def test_per_token_quant_ref_matches_affine_quantize() -> None:
    from tfmq_video.runtime.int_ops import quant_per_token_symmetric

    x = torch.randn(7, 33) * 3
    codes, scale = quant_per_token_symmetric(x, 127.0)
    grid = IntRange(8, True)
    ref_scale, ref_zero = minmax_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), grid)
    assert torch.allclose(scale, ref_scale)
    assert torch.equal(codes.float(), quantize(x, ref_scale, ref_zero, grid))
    assert torch.allclose(dequantize(codes, scale, 0.0), x, atol=float(scale.max()) / 2 + 1e-6)
