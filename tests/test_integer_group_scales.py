"""Integer group scales: group scales as integer multiples of one scale per row, so the CPU runtime
runs a per-group W4 layer as one per-channel int8 GEMM (codes times multipliers) with the same output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_export_conv_uint8 import EXPORT_RTOL, STEPS, calibrated, model_inputs, rel
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.errors import ConfigError
from tfmq_video.export import RTNConfig, load_quantized, save_quantized
from tfmq_video.export.rtn import rtn_linear_record
from tfmq_video.quant.affine import IntRange, factor_group_scales, group_multiplier_limit
from tfmq_video.quant.config import parse_config
from tfmq_video.quant.model import to_records
from tfmq_video.quant.quantizers import WeightQuantizer, WeightSpec
from tfmq_video.runtime import int_ops
from tfmq_video.runtime.linear import QuantLinear

INTEGER_G64 = {"bits": 4, "group_size": 64, "integer_group_scales": True}


@pytest.fixture(autouse=True)
def eager_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")


def uneven_groups(out_features: int = 32, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    """A weight whose groups of 64 inputs differ in magnitude by up to 8x, as trained layers' do."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    gains = torch.exp(torch.rand(out_features, in_features // 64, generator=generator) * 2.0)
    return weight * gains.repeat_interleave(64, dim=1)


def weight_error(spec: WeightSpec, weight: torch.Tensor) -> float:
    quantizer = WeightQuantizer(spec, weight.shape)
    quantizer.initialize(weight)
    with torch.no_grad():
        return float((quantizer(weight) - weight).pow(2).sum() / weight.pow(2).sum())


def test_multiplier_limit_keeps_every_product_in_int8() -> None:
    for bits in range(2, 8):
        grid = IntRange(bits, signed=True)
        limit = group_multiplier_limit(grid)
        assert grid.qmin * limit >= -128 and grid.qmax * limit <= 127
        assert grid.qmin * (limit + 1) < -128  # the largest such multiplier
    for grid in (IntRange(4, signed=False), IntRange(8, signed=True)):
        with pytest.raises(ConfigError, match="symmetric"):
            group_multiplier_limit(grid)


def test_factoring_finds_the_smallest_multipliers_or_none() -> None:
    scale = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.5, 0.5]])
    row_scale, multipliers = factor_group_scales(scale, limit=16)  # type: ignore[misc]
    assert multipliers.tolist() == [[3, 1, 2], [1, 1, 1]]
    assert torch.allclose(row_scale * multipliers, scale)
    assert factor_group_scales(torch.tensor([[1.0, 0.73]]), limit=16) is None  # 100 / 73: no multiplier up to 16
    assert factor_group_scales(torch.tensor([[1.0, 0.05]]), limit=16) is None  # needs k = 20 > 16
    assert factor_group_scales(torch.tensor([[1.0, 0.0]]), limit=16) is None


@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_quantizer_snaps_group_scales_and_keeps_most_of_the_group_gain(init: str) -> None:
    weight = uneven_groups()
    spec = WeightSpec(bits=4, group_size=64, init=init, integer_group_scales=True)  # type: ignore[arg-type]
    quantizer = WeightQuantizer(spec, weight.shape)
    quantizer.initialize(weight)
    factors = factor_group_scales(quantizer.scale.reshape(32, -1), group_multiplier_limit(quantizer.grid))
    assert factors is not None
    _, multipliers = factors
    assert int(multipliers.min()) >= 1 and int(multipliers.max()) <= 16
    assert len(multipliers.unique()) > 4  # the groups really have different scales

    per_channel = weight_error(WeightSpec(bits=4, init=init), weight)  # type: ignore[arg-type]
    float_groups = weight_error(WeightSpec(bits=4, group_size=64, init=init), weight)  # type: ignore[arg-type]
    integer_groups = weight_error(spec, weight)
    assert float_groups < per_channel
    # integer scales give back less than a fifth of what groups gain over per channel
    assert integer_groups < float_groups + 0.2 * (per_channel - float_groups)


def test_minmax_snapping_keeps_the_largest_group_scale() -> None:
    weight = uneven_groups()
    quantizer = WeightQuantizer(WeightSpec(bits=4, group_size=64, init="minmax"), weight.shape)
    quantizer.initialize(weight)
    snapped = WeightQuantizer(WeightSpec(bits=4, group_size=64, init="minmax", integer_group_scales=True), weight.shape)
    snapped.initialize(weight)
    top = quantizer.scale.reshape(32, -1).amax(dim=1)
    assert torch.allclose(snapped.scale.reshape(32, -1).amax(dim=1), top)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"integer_group_scales": True, "bits": 4}, "needs weights per group"),
        ({"integer_group_scales": True, "bits": 4, "group_size": 64, "symmetric": False}, "symmetric"),
        ({"integer_group_scales": True, "bits": 8, "group_size": 64}, "below 8 bits"),
    ],
)
def test_config_rejects_integer_scales_it_cannot_honour(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"quant.weight.*{message}"):
        parse_config({"quant": {"weight": raw}})


def test_rtn_config_rejects_an_unsigned_grid() -> None:
    with pytest.raises(ConfigError, match="symmetric"):
        RTNConfig(weight_bits=4, weight_signed=False, group_size=64, integer_group_scales=True)


def cpu_layer(linear: nn.Linear, integer: bool) -> QuantLinear:
    config = RTNConfig(weight_bits=4, group_size=64, integer_group_scales=integer, activation_mode="dynamic_per_token")
    return QuantLinear(rtn_linear_record("layer", linear, config), backend="cpu")


def test_cpu_layer_runs_integer_groups_as_one_per_channel_gemm() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight.copy_(uneven_groups(48, 256, seed=1) * 0.05)
    x = torch.randn(40, 256)
    integer, floating = cpu_layer(linear, True), cpu_layer(linear, False)
    assert integer.integer_group_factors() is not None
    assert floating.integer_group_factors() is None  # float group scales are no integer multiples
    # one scale per output channel reaches the GEMM: the multipliers are inside the int8 codes
    assert integer._cache["w_scale"].shape == (1, 48) and floating._cache["w_scale"].shape == (4, 48)
    assert ("onednn" in integer._cache) == int_ops.onednn_available()
    codes = integer._cache["w_t"]
    assert int(codes.abs().max()) > 7  # expanded beyond the 4-bit range
    reference = QuantLinear(integer.to_record(), backend="reference")
    with torch.no_grad():
        assert rel(integer(x), reference(x)) < 1e-5
        assert torch.equal(reference.dequantized_weight(), integer.dequantized_weight())


def test_calibrated_checkpoint_with_integer_group_scales_round_trips(tmp_path: Path) -> None:
    qmodel, fp = calibrated(INTEGER_G64)
    records, _ = to_records(qmodel)
    grouped = [r for r in records if r.group_size == 64 and r.weight_scale.shape[1] > 1]
    assert grouped, "the tiny model has layers with more than one group of 64 inputs"
    for record in grouped:
        assert factor_group_scales(record.weight_scale, 16) is not None
    save_quantized(tmp_path / "q", fp, records, calibrated_timesteps=STEPS)
    loaded = load_quantized(tmp_path / "q", backend="cpu")
    layers = {m.name: m for m in loaded.modules() if isinstance(m, QuantLinear)}
    for record in grouped:
        assert layers[record.name]._cache["w_scale"].shape[0] == 1
    for t in STEPS:
        with torch.no_grad():
            assert rel(loaded(**model_inputs(t)), qmodel(**model_inputs(t))) < EXPORT_RTOL["cpu"]


def test_method_recipes_keep_integer_scales_below_8_bits_only() -> None:
    base = parse_config({"quant": {"weight": INTEGER_G64}})
    assert method_recipe("tfmq", 4, 8, base).quant.weight.integer_group_scales
    assert method_recipe("rtn", 4, 8, base).quant.weight.integer_group_scales
    w8 = method_recipe("tfmq", 8, 8, base).quant.weight  # a W8A8 row of a sweep still runs
    assert not w8.integer_group_scales and w8.group_size == 64
