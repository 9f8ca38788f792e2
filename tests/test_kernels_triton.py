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

from tfmq_video.errors import ConfigError
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


@in_process
@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (6, True)])
def test_layernorm_modulate_quant_static(kernels, bits: int, signed: bool) -> None:
    from tfmq_video.quant.affine import IntRange, int8_offset

    aq = kernels["act_quant"]
    grid = IntRange(bits, signed=signed)
    x = randn_with_outliers(2, 13, 72, seed=6)
    shift = randn_with_outliers(1, 1, 72, seed=7)  # one modulation row broadcast over the batch
    scale = randn_with_outliers(1, 1, 72, seed=8) * 0.1
    act_scale, act_zero = torch.tensor(0.21, device=DEVICE), torch.tensor(3.0 if signed else 130.0, device=DEVICE)
    args = (x, shift, scale, 1e-6, act_scale, act_zero, grid.qmin, grid.qmax, int8_offset(grid))
    codes = aq.layernorm_modulate_quant_static(*args)
    ref = aq.layernorm_modulate_quant_static_ref(*args)
    assert codes.shape == (26, 72) and codes.dtype == torch.int8
    assert (codes.int() - ref.int()).abs().max() <= 1
    assert int(codes.min()) == grid.qmin - int8_offset(grid)  # the outliers reach the clamp


# --------------------------------------------------------------------------- GEMMs


@in_process
@pytest.mark.parametrize("zeros", [False, True], ids=["symmetric", "zero-points"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tiles", [{}, {"block_m": 16, "block_n": 32, "block_k": 32}], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("M,K", [(37, 100), (300, 128)], ids=["ragged-K", "even-K-many-row-tiles"])
def test_w8a8_gemm(kernels, zeros: bool, out_dtype: torch.dtype, tiles: dict, M: int, K: int) -> None:
    """Ragged K (masked loads) and K a multiple of every K step (unmasked loads); 300 rows in tiles
    of 16 are 19 row tiles: two full bands of the grouped tile order and a partial one."""
    gemm = kernels["w8a8_gemm"]
    N = 70
    x, w = randint8(M, K, seed=1), randint8(N, K, seed=2)
    x_scale = torch.rand(M, 1, device=DEVICE) / 100 + 1e-3
    w_scale = torch.rand(N, 1, device=DEVICE) / 100 + 1e-3
    bias = randn_with_outliers(N, seed=3)
    x_zero = torch.randint(-9, 9, (M, 1), device=DEVICE).float() if zeros else None
    w_zero = torch.randint(-5, 5, (N, 1), device=DEVICE).float() if zeros else None
    out = gemm.w8a8_gemm(x, x_scale, w, w_scale, bias, x_zero, w_zero, out_dtype=out_dtype, **tiles)
    ref = gemm.w8a8_gemm_ref(x, x_scale, w, w_scale, bias, x_zero, w_zero)
    assert out.dtype == out_dtype
    assert_close_rel(out, ref, 1e-3 if out_dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize(
    "signed,groups,K,zeros",
    [(True, 1, 75, False), (False, 1, 300, True), (True, 4, 96, False), (False, 3, 192, True)],
    ids=["signed-channel-oddK", "unsigned-channel-3steps", "signed-group24", "unsigned-group64"],
)
@pytest.mark.parametrize("tiles", [{}, {"block_m": 16, "block_n": 32}], ids=["default-tiles", "small-tiles"])
@in_process
def test_w4a8_gemm(kernels, signed: bool, groups: int, K: int, zeros: bool, tiles: dict) -> None:
    """Odd K (a half-used last byte), several steps with a tail (K=300: steps of 128), groups padded
    to a step (24 -> 64) and groups of exactly one step (64)."""
    from tfmq_video.export.packing import pack_int4

    gemm = kernels["w4a8_gemm"]
    M, N = 19, 45
    lo, hi = (-8, 7) if signed else (0, 15)
    x, codes = randint8(M, K, seed=5), randint8(N, K, seed=6, lo=lo, hi=hi)
    packed = pack_int4(codes.cpu(), signed).to(DEVICE)
    x_scale = torch.rand(M, 1, device=DEVICE) / 100 + 1e-3
    w_scale = torch.rand(N, groups, device=DEVICE) / 10 + 1e-3
    w_zero = torch.randint(0, 15, (N, groups), device=DEVICE).float() if zeros else None
    x_zero = torch.randint(-9, 9, (M, 1), device=DEVICE).float() if zeros else None
    bias = randn_with_outliers(N, seed=7)
    out = gemm.w4a8_gemm(x, x_scale, packed, K, signed, w_scale, bias, x_zero, w_zero, out_dtype=torch.float32,
                         **tiles)
    ref = gemm.w4a8_gemm_ref(x, x_scale, packed, K, signed, w_scale, bias, x_zero, w_zero)
    assert_close_rel(out, ref, 1e-6)


@in_process
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("zero", ["per-tensor", "per-row", "none"])
def test_gemms_take_a_per_tensor_input_scale(kernels, bits: int, zero: str) -> None:
    """A static / per-timestep input passes one scale (and zero point) instead of (M, 1) vectors;
    a per-row zero point with a per-tensor scale makes both per row."""
    from tfmq_video.export.packing import pack_int4

    M, K, N = 37, 128, 45
    x = randint8(M, K, seed=11)
    scale = torch.tensor([[0.013]], device=DEVICE)
    x_zero = {"per-tensor": torch.tensor([[3.0]], device=DEVICE),
              "per-row": torch.randint(-9, 9, (M, 1), device=DEVICE).float(), "none": None}[zero]
    w_scale = torch.rand(N, 1, device=DEVICE) / 10 + 1e-3
    bias = randn_with_outliers(N, seed=12)
    if bits == 8:
        gemm, w = kernels["w8a8_gemm"], randint8(N, K, seed=13)
        out = gemm.w8a8_gemm(x, scale, w, w_scale, bias, x_zero, out_dtype=torch.float32)
        ref = gemm.w8a8_gemm_ref(x, scale.expand(M, 1), w, w_scale, bias,
                                 None if x_zero is None else x_zero.expand(M, 1))
    else:
        gemm, codes = kernels["w4a8_gemm"], randint8(N, K, seed=13, lo=-8, hi=7)
        packed = pack_int4(codes.cpu(), True).to(DEVICE)
        out = gemm.w4a8_gemm(x, scale, packed, K, True, w_scale, bias, x_zero, out_dtype=torch.float32)
        ref = gemm.w4a8_gemm_ref(x, scale.expand(M, 1), packed, K, True, w_scale, bias,
                                 None if x_zero is None else x_zero.expand(M, 1))
    assert_close_rel(out, ref, 1e-6)


def test_gemm_autotune_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the GEMMs autotune over valid tiles; the interpreter (and any caller that fixes a
    tile) runs the fixed tiles, since it cannot time kernels; TFMQ_VIDEO_AUTOTUNE=0 turns it off."""
    from tfmq_video.kernels._triton import AUTOTUNE_ENV, gemm_configs, interpreting, use_autotune

    assert len(gemm_configs()) == 7 and set(gemm_configs()[0].kwargs) == {"BLOCK_M", "BLOCK_N"}  # W4A8
    configs = gemm_configs("BLOCK_K", (64, 128))
    assert len(configs) == 14
    for config in configs:
        sizes = config.kwargs
        assert set(sizes) == {"BLOCK_M", "BLOCK_N", "BLOCK_K"}
        assert all(size >= 16 and size & (size - 1) == 0 for size in sizes.values())  # tl.dot: powers of 2, >= 16
    assert not use_autotune(64, None, None)
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert use_autotune(None, None, None) == (not interpreting())
    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    assert not use_autotune(None, None, None)


@pytest.mark.parametrize(
    "tiles,named", [((16, 32, 16), "block_k=16"), ((16, 48, 32), "block_n=48"), ((8, 32, 32), "block_m=8")],
)
def test_gemm_tiles_the_int8_dot_cannot_run_are_refused(tiles: tuple[int, int, int], named: str) -> None:
    """An int8 ``tl.dot`` needs at least 32 codes of K on NVIDIA GPUs (the interpreter runs 16,
    which is how a W4A8 test with 16-code dots once passed the CPU tests and failed on an H100)."""
    from tfmq_video.kernels._triton import MIN_INT8_DOT_K, check_tiles
    from tfmq_video.kernels.w4a8_gemm import split_step

    with pytest.raises(ConfigError, match=named):
        check_tiles(*tiles, "BLOCK_K")
    check_tiles(16, 32, 32, "BLOCK_K")
    check_tiles(None, None, None, "BLOCK_K")
    # W4A8's dots cover half a step of its weight layout, for any group length
    assert all(split_step(group) // 2 >= MIN_INT8_DOT_K for group in (1, 24, 64, 75, 128, 4608))


@pytest.mark.parametrize("num_groups,in_features", [(1, 75), (4, 96), (2, 256), (1, 1152)])
def test_split_int4_layout(num_groups: int, in_features: int) -> None:
    """The W4A8 kernel's split layout: byte j of each step holds code j (low nibble) and code
    step/2 + j (high nibble) of that step, groups padded to whole steps with zero codes."""
    from tfmq_video.export.packing import pack_int4
    from tfmq_video.kernels.w4a8_gemm import split_int4

    codes = randint8(5, in_features, seed=3, lo=-8, hi=7).cpu()
    split = split_int4(pack_int4(codes, signed=True), in_features, num_groups)
    group_len = in_features // num_groups
    assert split.group_len == group_len and split.step in (64, 128)
    steps_per_group = -(-group_len // split.step)
    data = split.data.to(torch.int16)
    assert tuple(data.shape) == (5, num_groups * steps_per_group * split.step // 2)
    per_step = data.reshape(5, num_groups, steps_per_group, split.step // 2)
    halves = torch.stack((per_step & 0xF, per_step >> 4), dim=-2)  # (N, groups, steps, 2, step / 2)
    unpacked = halves.reshape(5, num_groups, steps_per_group * split.step)
    signed = unpacked - ((unpacked & 8) << 1)
    assert torch.equal(signed[..., :group_len].reshape(5, in_features), codes.to(torch.int16))
    assert not signed[..., group_len:].any()


# --------------------------------------------------------------------------- attention


@in_process
@pytest.mark.parametrize("head_dim", [16, 64, 72, 128])
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
    # head dim 16: the 25x outlier channel is 1 of 16, so it sets a coarser per-block int8 scale
    assert_close_rel(out, exact, 5e-2 if head_dim >= 64 else 1e-1)


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


@in_process
def test_int8_attention_takes_the_models_strided_head_views(kernels) -> None:
    """The model hands over q/k/v as permuted views of (B, N, H, D) projections; the output must
    come back in the logical (B, H, N, D) order, not in q's strides."""
    attn = kernels["int8_attention"]
    q = randn_with_outliers(2, 40, 3, 72, seed=4).permute(0, 2, 1, 3)
    k = randn_with_outliers(2, 24, 3, 72, seed=5).permute(0, 2, 1, 3)
    v = randn_with_outliers(2, 24, 3, 72, seed=6).permute(0, 2, 1, 3)
    assert not q.is_contiguous()
    out = attn.int8_attention(q, k, v)
    assert_close_rel(out, attn.int8_attention_ref(q.contiguous(), k.contiguous(), v.contiguous()), 3e-3)


@in_process
@pytest.mark.parametrize("tiles", [(64, 32), (16, 128)], ids=["64x32", "16x128"])
def test_int8_attention_other_tiles(kernels, tiles: tuple[int, int]) -> None:
    """Tiles (which are also the Q/K quantization blocks) other than the default 128 x 64."""
    attn = kernels["int8_attention"]
    q, k, v = (randn_with_outliers(1, 2, 150, 64, seed=20 + i) for i in range(3))
    out = attn.int8_attention(q, k, v, block_m=tiles[0], block_n=tiles[1])
    assert_close_rel(out, attn.int8_attention_ref(q, k, v, block_m=tiles[0], block_n=tiles[1]), 3e-3)
    with pytest.raises(ConfigError, match="block_m=48"):
        attn.int8_attention(q, k, v, block_m=48)


@in_process
def test_quantize_qk_matches_the_reference_preparation(kernels) -> None:
    """The Triton Q/K pass (strided views in, contiguous codes out) against the PyTorch one."""
    attn = kernels["int8_attention"]
    q = randn_with_outliers(2, 70, 3, 72, seed=30).permute(0, 2, 1, 3)
    k = (randn_with_outliers(2, 70, 3, 72, seed=31) + 3.0).permute(0, 2, 1, 3)
    got = attn.quantize_qk(q, k, None)
    want = attn.prepare_qk(q, k, None)
    for name, a, b in zip(("q codes", "q scale", "k codes", "k scale"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == torch.int8:  # rounding ties (half away from zero vs half to even) may differ by one
            assert (a.int() - b.int()).abs().max() <= 1, name
            assert (a != b).float().mean() < 1e-3, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- runtime on the triton backend


@in_process
@pytest.mark.parametrize("mode", ["dynamic_per_token", "static", "per_timestep"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_fused_norm_modulate_input(kernels, mode: str, bits: int) -> None:
    from torch import nn

    from dit_adapters.fused import modulate, norm_modulate_linear
    from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
    from tfmq_video.quant.context import TimestepContext
    from tfmq_video.quant.records import ActivationRecord
    from tfmq_video.runtime.linear import QuantLinear

    torch.manual_seed(0)
    if mode == "dynamic_per_token":
        activation = ActivationRecord(mode=mode, bits=8, signed=True)
    elif mode == "static":  # unsigned 8-bit codes with a zero point: the int8 shift and the correction term
        activation = ActivationRecord(mode=mode, bits=8, signed=False, scale=torch.tensor(0.03),
                                      zero_point=torch.tensor(131.0))
    else:  # one (scale, zero point) per calibrated step; step 1 is used below
        activation = ActivationRecord(mode=mode, bits=8, signed=False, scale=torch.tensor([0.01, 0.03, 0.02]),
                                      zero_point=torch.tensor([120.0, 131.0, 128.0]))
    context = TimestepContext([900.0, 500.0, 100.0]) if mode == "per_timestep" else None
    record = rtn_linear_record("l", nn.Linear(72, 40), RTNConfig(weight_bits=bits), activation)
    layer = QuantLinear(record, context=context, backend="reference").to(DEVICE)
    if context is not None:
        context.set_timestep(torch.tensor([500.0]))
    norm = nn.LayerNorm(72, eps=1e-6, elementwise_affine=False)
    x = randn_with_outliers(2, 11, 72, seed=10)
    shift = randn_with_outliers(2, 1, 72, seed=11) * 0.1
    scale = randn_with_outliers(2, 1, 72, seed=12) * 0.05
    ref = layer(modulate(norm(x), shift, scale))
    assert not layer.fuses_norm_modulate()  # the reference backend takes the plain path
    assert layer.set_backend("triton") == "triton"
    assert layer.fuses_norm_modulate()
    out = norm_modulate_linear(norm, layer, x, shift, scale)
    assert out.shape == (2, 11, 40)
    assert_close_rel(out, ref, 1e-2)  # codes may differ by one at rounding ties


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


@in_process
@pytest.mark.parametrize("bits,attention", [(8, "fp"), (4, "fp"), (8, "int8")])
def test_stdit3_on_triton_uses_the_fused_block_inputs(
    kernels, bits: int, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole tiny STDiT3 on the triton backend: every LayerNorm -> modulate -> Linear site (qkv,
    fc1 of each block, the final layer) takes the fused kernel, and the output matches the reference
    (with INT8 attention too: the Triton kernel against its PyTorch reference, on the model's strided
    head views and caption mask)."""
    from tfmq_video.calib.testing import tiny_model_inputs, tiny_stdit3
    from tfmq_video.export import RTNConfig, rtn_records
    from tfmq_video.runtime import build_runtime_model
    from tfmq_video.runtime.linear import QuantLinear

    fused_calls: list[str] = []
    real = QuantLinear.forward_norm_modulate

    def counted(self: QuantLinear, *args: object) -> torch.Tensor:
        fused_calls.append(self.name)
        return real(self, *args)

    monkeypatch.setattr(QuantLinear, "forward_norm_modulate", counted)
    records = rtn_records(tiny_stdit3(), RTNConfig(weight_bits=bits, include=("spatial_blocks.*", "temporal_blocks.*", "final_layer.linear")))
    inputs = {k: v.to(DEVICE) for k, v in tiny_model_inputs().items()}
    with torch.no_grad():
        reference = build_runtime_model(tiny_stdit3(), records, backend="reference", attention=attention, compile=False)
        expected = reference.to(DEVICE)(**inputs)
        assert not fused_calls
        # Built on the CPU and run on the GPU: the device argument moves it before the backend is prepared.
        triton_model = build_runtime_model(tiny_stdit3(), records, backend="triton", attention=attention, compile=False,
                                           device=DEVICE)
        out = triton_model(**inputs)
    sites = {r.name for r in records if r.name.endswith(("attn.qkv", "mlp.fc1", "final_layer.linear"))}
    assert len(sites) == 5  # one spatial and one temporal block: qkv and fc1 each, plus the final layer
    assert set(fused_calls) == sites
    assert_close_rel(out, expected, 2e-2)


def test_kernels_do_not_pass_an_accumulator_to_int_dots() -> None:
    """``tl.dot(a, b, acc)`` compiles in the interpreter's Triton (3.9) but not in the H100's (3.6)
    when the inputs are int8 (it asserts the float32 default ``out_dtype`` equals the accumulator's
    int32): session 10 lost a GPU run to it. Every ``tl.dot`` in the kernels takes two operands."""
    import ast

    kernel_dir = Path(__file__).resolve().parents[1] / "tfmq_video" / "kernels"
    offenders = []
    for source in sorted(kernel_dir.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot"
                    and (len(node.args) > 2 or any(k.arg in ("acc", "out_dtype") for k in node.keywords))):
                offenders.append(f"{source.name}:{node.lineno}")
    assert not offenders, offenders
    assert any("tl.dot(" in s.read_text() for s in kernel_dir.glob("*.py"))  # the scan sees the kernels


def _jit_functions(source: Path) -> list:
    """The ``@triton.jit`` functions of a kernel source file, as AST nodes."""
    import ast

    return [node for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list)]


def test_jit_functions_return_once() -> None:
    """The interpreter runs a jit helper that returns early from a constexpr branch
    (``if PER_ROW: return column`` then ``return scalar``), but the GPU's Triton (3.6) type-checks
    both returns and refuses a (BLOCK_M, 1) tensor and a scalar: session 20 lost its first GPU call
    to it. Every jit function has at most one ``return``."""
    import ast

    kernel_dir = Path(__file__).resolve().parents[1] / "tfmq_video" / "kernels"
    functions = {source: _jit_functions(source) for source in sorted(kernel_dir.glob("*.py"))}
    offenders = [f"{source.name}:{fn.name}" for source, fns in functions.items() for fn in fns
                 if sum(isinstance(node, ast.Return) for node in ast.walk(fn)) > 1]
    assert not offenders, offenders
    assert sum(len(fns) for fns in functions.values()) >= 5  # the scan sees the kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason=(
    "a GPU box runs the tool compiled (tools/gpu_check.sh sweep); its older Triton's interpreter "
    "(3.6 on the lent H200) fails on these kernels: only 0-dimensional arrays can be converted to Python scalars"))
def test_gpu_kernel_sweep_runs_every_variant_in_the_interpreter(tmp_path: Path) -> None:
    """``tools/gpu_kernel_sweep.py --smoke``: every section and kernel variant of the GPU session's
    instrument runs (tiny shapes, Triton's interpreter) and matches its reference, so a lent GPU's
    minutes are not lost to a broken tool."""
    import json

    out = tmp_path / "sweep.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "gpu_kernel_sweep.py"
    result = subprocess.run(
        [sys.executable, str(tool), "--smoke", "--json", str(out)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["section"] for row in rows} == {"gemm", "attention", "layer"}
    assert not [row for row in rows if "error" in row]
    assert all(row["rel_err"] < 2e-2 for row in rows if "rel_err" in row)
    assert {row["method"] for row in rows if row["section"] == "gemm"} >= {
        "library_autotuned", "w8a8_library", "w8a8_tma", "w4a8_library_autotuned_presplit"}
