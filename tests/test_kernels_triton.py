"""Every Triton kernel against its PyTorch reference, in Triton's CPU interpreter when no GPU.

Shapes are tiny and deliberately not multiples of the block sizes; inputs are fresh random
tensors with outliers, in fp16/fp32 (the interpreter computes bf16 dots wrongly); outputs are
poisoned with NaN first so unwritten elements fail the comparison.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tfmq_video.kernels._triton import HAS_TRITON, TRITON_IMPORT_ERROR

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason=f"triton is not installed ({TRITON_IMPORT_ERROR})")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _interpreter_usable_here() -> bool:
    """Without a GPU the kernels need Triton's interpreter, which must be on when triton is first imported."""
    if ON_GPU or not HAS_TRITON:
        return True
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


IN_PROCESS = _interpreter_usable_here()
in_process = pytest.mark.skipif(
    not IN_PROCESS,
    reason="triton was imported in compiled mode before TRITON_INTERPRET=1 could be set; "
    "these tests run in test_kernels_in_interpreter_subprocess instead",
)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_interpreter_subprocess() -> None:
    """Run this file again in a fresh interpreter with TRITON_INTERPRET=1 set from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def kernels() -> dict:
    """The kernel modules (imported after the interpreter switch above)."""
    names = ("act_quant", "w8a8_gemm", "w4a8_gemm", "int8_attention")
    return {n: importlib.import_module(f"tfmq_video.kernels.{n}") for n in names}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch):
    """Make ``torch.empty``/``empty_like`` return NaN-filled (float) or extreme-valued (int) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(torch.iinfo(t.dtype).min)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def randn_with_outliers(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    x.view(-1, shape[-1])[:, 0] *= 25.0
    return x.to(DEVICE, dtype)


def randint8(*shape: int, seed: int, lo: int = -127, hi: int = 127) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=generator, dtype=torch.int8).to(DEVICE)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert torch.isfinite(out).all(), "non-finite output (unwritten elements?)"
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < rtol, err


# --------------------------------------------------------------------------- act quant


@in_process
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows,channels", [(7, 72), (33, 50)])
def test_per_token_quant(kernels, dtype: torch.dtype, rows: int, channels: int) -> None:
    aq = kernels["act_quant"]
    x = randn_with_outliers(rows, channels, seed=rows, dtype=dtype)
    codes, scale = aq.per_token_quant(x)
    ref_codes, ref_scale = aq.per_token_quant_ref(x)
    assert torch.allclose(scale, ref_scale, rtol=1e-6)
    # round-half-away-from-zero (kernel) vs half-to-even (torch) may differ by one code at ties
    assert (codes.int() - ref_codes.int()).abs().max() <= 1


@in_process
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_layernorm_modulate_quant(kernels, dtype: torch.dtype) -> None:
    aq = kernels["act_quant"]
    x = randn_with_outliers(2, 13, 72, seed=3, dtype=dtype)
    shift = randn_with_outliers(2, 1, 72, seed=4, dtype=dtype)
    scale = randn_with_outliers(2, 1, 72, seed=5, dtype=dtype) * 0.1
    codes, scales = aq.layernorm_modulate_quant(x, shift, scale, eps=1e-6)
    ref_codes, ref_scales = aq.layernorm_modulate_quant_ref(x, shift, scale, eps=1e-6)
    assert torch.allclose(scales, ref_scales, rtol=1e-4)
    assert (codes.int() - ref_codes.int()).abs().max() <= 1


# --------------------------------------------------------------------------- GEMMs


@in_process
@pytest.mark.parametrize("zeros", [False, True], ids=["symmetric", "zero-points"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_w8a8_gemm(kernels, zeros: bool, out_dtype: torch.dtype) -> None:
    gemm = kernels["w8a8_gemm"]
    M, K, N = 37, 100, 70
    x, w = randint8(M, K, seed=1), randint8(N, K, seed=2)
    x_scale = torch.rand(M, 1, device=DEVICE) / 100 + 1e-3
    w_scale = torch.rand(N, 1, device=DEVICE) / 100 + 1e-3
    bias = randn_with_outliers(N, seed=3)
    x_zero = torch.randint(-9, 9, (M, 1), device=DEVICE).float() if zeros else None
    w_zero = torch.randint(-5, 5, (N, 1), device=DEVICE).float() if zeros else None
    out = gemm.w8a8_gemm(x, x_scale, w, w_scale, bias, x_zero, w_zero, out_dtype=out_dtype)
    ref = gemm.w8a8_gemm_ref(x, x_scale, w, w_scale, bias, x_zero, w_zero)
    assert out.dtype == out_dtype
    assert_close_rel(out, ref, 1e-3 if out_dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize(
    "signed,groups,zeros", [(True, 1, False), (False, 1, True), (True, 4, False), (False, 4, True)],
    ids=["signed-channel", "unsigned-channel", "signed-group", "unsigned-group"],
)
@in_process
def test_w4a8_gemm(kernels, signed: bool, groups: int, zeros: bool) -> None:
    from tfmq_video.export.packing import pack_int4

    gemm = kernels["w4a8_gemm"]
    M, N = 19, 45
    K = 96 if groups > 1 else 75  # odd K for per-channel: the last byte is half used
    lo, hi = (-8, 7) if signed else (0, 15)
    x, codes = randint8(M, K, seed=5), randint8(N, K, seed=6, lo=lo, hi=hi)
    packed = pack_int4(codes.cpu(), signed).to(DEVICE)
    x_scale = torch.rand(M, 1, device=DEVICE) / 100 + 1e-3
    w_scale = torch.rand(N, groups, device=DEVICE) / 10 + 1e-3
    w_zero = torch.randint(0, 15, (N, groups), device=DEVICE).float() if zeros else None
    x_zero = torch.randint(-9, 9, (M, 1), device=DEVICE).float() if zeros else None
    bias = randn_with_outliers(N, seed=7)
    out = gemm.w4a8_gemm(x, x_scale, packed, K, signed, w_scale, bias, x_zero, w_zero, out_dtype=torch.float32)
    ref = gemm.w4a8_gemm_ref(x, x_scale, packed, K, signed, w_scale, bias, x_zero, w_zero)
    assert_close_rel(out, ref, 1e-6)


# --------------------------------------------------------------------------- attention


@in_process
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_attention_self(kernels, head_dim: int, dtype: torch.dtype) -> None:
    attn = kernels["int8_attention"]
    q = randn_with_outliers(1, 2, 70, head_dim, seed=head_dim, dtype=dtype)
    k = randn_with_outliers(1, 2, 70, head_dim, seed=head_dim + 1, dtype=dtype) + 2.0  # a shared offset: smoothing
    v = randn_with_outliers(1, 2, 70, head_dim, seed=head_dim + 2, dtype=dtype)
    out = attn.int8_attention(q, k, v)
    assert out.dtype == dtype
    assert_close_rel(out, attn.int8_attention_ref(q, k, v), 3e-3)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert_close_rel(out, exact, 5e-2)


@in_process
def test_int8_attention_key_padding_mask(kernels) -> None:
    attn = kernels["int8_attention"]
    q = randn_with_outliers(2, 2, 33, 72, seed=1)
    k = randn_with_outliers(2, 2, 11, 72, seed=2)
    v = randn_with_outliers(2, 2, 11, 72, seed=3)
    key_mask = torch.ones(2, 11, dtype=torch.bool, device=DEVICE)
    key_mask[1, 4:] = False
    out = attn.int8_attention(q, k, v, key_mask)
    assert_close_rel(out, attn.int8_attention_ref(q, k, v, key_mask), 3e-3)
    # masked keys must not matter: changing them leaves the output unchanged
    v2 = v.clone()
    v2[1, :, 4:] = 1e4
    assert torch.allclose(attn.int8_attention(q, k, v2, key_mask)[1], out[1])


# --------------------------------------------------------------------------- runtime on the triton backend


@in_process
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16)])
def test_quant_linear_triton_matches_reference(kernels, bits: int, group: int | None) -> None:
    from torch import nn

    from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
    from tfmq_video.runtime.linear import QuantLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = QuantLinear(rtn_linear_record("l", linear, RTNConfig(weight_bits=bits, group_size=group)), backend="reference")
    layer.to(DEVICE)
    x = randn_with_outliers(21, 64, seed=9)
    ref = layer(x)
    assert layer.set_backend("triton") == "triton"
    assert_close_rel(layer(x), ref, 1e-2)  # per-token codes may differ by one at rounding ties
