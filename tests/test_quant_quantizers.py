"""Quantizer math: round trips, clamping, zero points, gradients, init methods, AdaRound, FSC."""

from __future__ import annotations

import logging

import pytest
import torch

from tfmq_video.errors import ConfigError
from tfmq_video.quant.affine import IntRange, dequantize, fake_quantize, minmax_qparams, quantize
from tfmq_video.quant.quantizers import (
    ActQuantizer,
    ActSpec,
    StepContext,
    WeightQuantizer,
    WeightSpec,
    _Observer,
    search_qparams,
)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_grid_values_round_trip_exactly(bits: int, signed: bool) -> None:
    grid = IntRange(bits, signed)
    scale, zero = torch.tensor(0.25), torch.tensor(0.0 if signed else float(2 ** (bits - 1)))
    codes = torch.arange(grid.qmin, grid.qmax + 1).float()
    values = dequantize(codes, scale, zero)
    assert torch.equal(quantize(values, scale, zero, grid), codes)
    assert torch.equal(fake_quantize(values, scale, zero, grid), values)


def test_out_of_range_values_clamp_to_the_grid() -> None:
    grid = IntRange(4, signed=True)
    q = quantize(torch.tensor([-100.0, 100.0, 0.3]), torch.tensor(0.1), 0.0, grid)
    assert q.tolist() == [-8.0, 7.0, 3.0]


def test_asymmetric_zero_point_makes_zero_exact() -> None:
    grid = IntRange(8, signed=False)
    scale, zero = minmax_qparams(torch.tensor(-0.37), torch.tensor(2.9), grid)
    assert float(zero) == round(float(zero)) and grid.qmin <= float(zero) <= grid.qmax
    assert float(fake_quantize(torch.tensor(0.0), scale, zero, grid)) == 0.0


@pytest.mark.parametrize("signed", [True, False])
def test_evaluation_fake_quant_is_bitwise_the_straight_through_one(signed: bool) -> None:
    grid = IntRange(8 if signed else 4, signed)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=generator) * 3
    x[0, :16] = torch.arange(16) * 0.5 - 4  # exact ties at scale 0.5
    scale = torch.rand(64, 1, generator=generator) * 0.05 + 0.01
    scale[0] = 0.5
    zero = torch.zeros(64, 1) if signed else torch.randint(0, 16, (64, 1)).float()
    with torch.no_grad():
        evaluated = fake_quantize(x, scale, zero, grid)
    with torch.enable_grad():
        traced = fake_quantize(x.clone().requires_grad_(), scale, zero, grid)
    assert torch.equal(evaluated, traced.detach())
    assert not torch.equal(evaluated, x) and evaluated.data_ptr() != x.data_ptr()


def test_ste_gradient_passes_inside_range_and_stops_outside() -> None:
    grid = IntRange(4, signed=True)
    x = torch.tensor([0.33, -0.12, 5.0, -5.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quantize(x, scale, 0.0, grid).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # LSQ: clamped values contribute qmax / qmin, in-range ones round(x/s) - x/s
    expected = (3 - 3.3) + (-1 + 1.2) + 7 - 8
    assert float(scale.grad) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_unsupported_bit_widths_are_rejected(bits: int) -> None:
    with pytest.raises(ConfigError, match="unsupported bit width"):
        WeightSpec(bits=bits)
    with pytest.raises(ConfigError, match="unsupported bit width"):
        ActSpec(bits=bits)


def test_group_size_must_be_supported_and_divide_the_inputs() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        WeightSpec(group_size=32)
    with pytest.raises(ConfigError, match="multiple of group_size"):
        WeightQuantizer(WeightSpec(group_size=64), (8, 96))


@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_weight_quantizer_shapes_and_error_bound(group_size: int | None) -> None:
    weight = torch.randn(16, 256)
    quantizer = WeightQuantizer(WeightSpec(bits=4, group_size=group_size, init="minmax"), weight.shape)
    quantizer.initialize(weight)
    rows = 16 if group_size is None else 16 * 256 // group_size
    assert quantizer.scale.shape == (rows, 1)
    out = quantizer(weight)
    assert out.shape == weight.shape
    # round to nearest: at most half a step off, per row
    step = quantizer.scale.reshape(16, -1).repeat_interleave(256 // quantizer.scale.reshape(16, -1).shape[1], dim=1)
    assert bool(((out - weight).abs() <= step / 2 + 1e-6).all())


def test_mse_and_percentile_init_beat_minmax_on_outliers() -> None:
    rows = torch.randn(4, 4096)
    rows[:, 0] = 40.0
    grid = IntRange(4, signed=True)

    def error(method: str) -> float:
        scale, zero = search_qparams(rows, grid, method, 0.999)  # type: ignore[arg-type]
        return float((fake_quantize(rows, scale, zero, grid) - rows).pow(2).sum())

    assert error("mse") < error("minmax")
    assert error("percentile") < error("minmax")
    with pytest.raises(ConfigError, match="unknown init method"):
        search_qparams(rows, grid, "best")  # type: ignore[arg-type]


def test_adaround_starts_at_the_float_weight_and_freezes_to_valid_codes() -> None:
    weight = torch.randn(8, 64) * 0.1
    quantizer = WeightQuantizer(WeightSpec(bits=4), weight.shape)
    quantizer.initialize(weight)
    alpha = quantizer.start_adaround(weight)
    assert torch.allclose(quantizer(weight), weight, atol=1e-3 * float(quantizer.scale.max()) * 10)
    quantizer(weight).sum().backward()
    assert alpha.grad is not None and bool(alpha.grad.abs().sum() > 0)
    assert float(quantizer.rounding_regularizer(2.0).detach()) > 0
    quantizer.freeze(weight)
    assert quantizer.alpha is None and bool(quantizer.frozen)
    assert int(quantizer.codes.min()) >= -8 and int(quantizer.codes.max()) <= 7
    floor = torch.floor(weight / quantizer.scale)
    assert bool(((quantizer.codes.float() - floor) >= 0).all() and ((quantizer.codes.float() - floor) <= 1).all())


def test_static_activation_quantizer_calibrates_from_observed_data() -> None:
    quantizer = ActQuantizer(ActSpec(bits=8, init="minmax"))
    quantizer.observe()
    x = torch.linspace(-1.0, 3.0, 1000)
    assert torch.equal(quantizer(x), x)
    quantizer.finalize()
    assert float(quantizer.scale[0]) == pytest.approx(4.0 / 255, rel=1e-4)
    assert float((quantizer(x) - x).abs().max()) <= float(quantizer.scale[0]) / 2 + 1e-6


def test_static_range_weighs_every_call_alike_whatever_their_order() -> None:
    """A static range seen over many calls (the sampler's steps, in order) is the range of all of
    them: here the calls shrink step by step, and the last ones must not decide the range."""
    generator = torch.Generator().manual_seed(0)
    calls = [torch.randn(20_000, generator=generator) * amplitude for amplitude in range(40, 0, -1)]
    quantizer = ActQuantizer(ActSpec(bits=8, init="percentile", percentile=0.99))
    quantizer.observe()
    for call in calls:
        quantizer(call)
    quantizer.finalize()
    every_value = torch.cat(calls)
    exact = (every_value.quantile(0.99) - every_value.quantile(0.01)) / 255
    assert float(quantizer.scale[0]) == pytest.approx(float(exact), rel=0.05)


def test_observer_sample_is_uniform_over_values_seen() -> None:
    observer = _Observer(max_values=4096)
    for call in range(40):
        observer.add(0, torch.full((10_000,), float(call)))
    observer.add(0, torch.full((40_000,), 40.0))  # one call as large as four others: four times the share
    sample = observer.samples[0][:-2]  # the last two entries are the extremes
    shares = torch.bincount(sample.long(), minlength=41).float() / sample.numel()
    assert observer.count(0) == 440_000
    assert bool((shares[:40] > 0.5 / 44).all() and (shares[:40] < 1.6 / 44).all()), shares
    assert float(shares[40]) == pytest.approx(4 / 44, abs=0.02)
    assert observer.samples[0][-2:].tolist() == [0.0, 40.0]


def test_unobserved_static_quantizer_is_an_error() -> None:
    quantizer = ActQuantizer(ActSpec())
    quantizer.observe()
    with pytest.raises(ConfigError, match="saw no data"):
        quantizer.finalize()


def test_dynamic_per_token_uses_each_tokens_range() -> None:
    quantizer = ActQuantizer(ActSpec(bits=8, mode="dynamic_per_token"))
    x = torch.randn(3, 5, 16) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    err = (quantizer(x) - x).abs().amax(-1)
    span = x.amax(-1) - x.amin(-1).clamp(max=0)
    assert bool((err <= span / 255 / 2 + 1e-6).all())


def _per_timestep_quantizer() -> tuple[ActQuantizer, StepContext]:
    context = StepContext([1000.0, 500.0, 100.0])
    quantizer = ActQuantizer(ActSpec(bits=8, init="minmax", symmetric=True, mode="per_timestep"), context)
    quantizer.observe()
    for step, amplitude in ((0, 1.0), (1, 10.0)):
        context.set_index(step)
        quantizer(torch.linspace(-amplitude, amplitude, 101))
    quantizer.finalize()
    return quantizer, context


def test_fsc_picks_parameters_by_step_index() -> None:
    quantizer, context = _per_timestep_quantizer()
    assert float(quantizer.scale[0]) == pytest.approx(1.0 / 127)
    assert float(quantizer.scale[1]) == pytest.approx(10.0 / 127)
    # a step never seen during calibration takes its nearest seen step's parameters
    assert float(quantizer.scale[2]) == float(quantizer.scale[1])
    x = torch.tensor([0.5])
    context.set_timestep(1000.0)
    fine = quantizer(x)
    context.set_timestep(500.0)
    coarse = quantizer(x)
    assert float((fine - x).abs()) < float((coarse - x).abs())
    context.row_indices = torch.tensor([0, 1])
    rows = quantizer(torch.tensor([[0.5], [0.5]]))
    assert torch.equal(rows[:, 0], torch.cat([fine, coarse]))


def test_fsc_outside_the_calibrated_set_uses_nearest_step_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    quantizer, context = _per_timestep_quantizer()
    with caplog.at_level(logging.WARNING):
        assert context.set_timestep(980.0) == 0
        assert context.set_timestep(480.0) == 1
    assert sum("not calibrated" in r.message for r in caplog.records) == 1
    with pytest.raises(ConfigError, match="no timestep set"):
        ActQuantizer(ActSpec(mode="per_timestep"), StepContext([1.0]))(torch.ones(2))
    with pytest.raises(ConfigError, match="needs a StepContext"):
        ActQuantizer(ActSpec(mode="per_timestep"))


@pytest.mark.parametrize(("bits", "symmetric"), [(8, False), (8, True), (4, False), (4, True)])
def test_freezing_keeps_the_fake_quantized_weight(bits: int, symmetric: bool) -> None:
    # Unsigned 8-bit codes reach 255: the frozen code buffer must hold them without wrapping.
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    quantizer = WeightQuantizer(WeightSpec(bits=bits, symmetric=symmetric, init="minmax"), weight.shape)
    quantizer.initialize(weight)
    before = quantizer(weight)
    quantizer.freeze(weight)
    assert int(quantizer.codes.max()) > (2 ** (bits - 1) if not symmetric else 0)
    assert torch.equal(quantizer(weight), before)
