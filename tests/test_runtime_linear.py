"""QuantLinear: the CPU backend matches the reference backend; backend selection and fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
from tfmq_video.kernels._triton import HAS_TRITON
from tfmq_video.quant.context import TimestepContext
from tfmq_video.quant.records import ActivationRecord
from tfmq_video.runtime import backends
from tfmq_video.runtime.backends import BackendUnavailableError, resolve_backend
from tfmq_video.runtime.linear import QuantLinear

# Both backends compute the same integer math; they differ by float32 rounding of the epilogue
# (and by the dtype of the output). Outputs are compared relative to their norm.
CPU_VS_REFERENCE_RTOL = 2e-5


def inputs_with_outliers(rows: int, features: int, seed: int) -> torch.Tensor:
    """Random activations with a few large channels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator)
    x[:, 1] *= 30.0
    return x


def make_layer(config: RTNConfig, activation: ActivationRecord | None = None, in_f: int = 70, out_f: int = 37,
               context: TimestepContext | None = None, backend: str = "cpu") -> QuantLinear:
    torch.manual_seed(1)
    linear = nn.Linear(in_f, out_f)
    return QuantLinear(rtn_linear_record("layer", linear, config, activation), context=context, backend=backend)


def compare_backends(layer: QuantLinear, x: torch.Tensor) -> None:
    layer.set_backend("cpu")
    out_cpu = layer(x)
    layer.set_backend("reference")
    out_ref = layer(x)
    assert out_cpu.shape == out_ref.shape and torch.isfinite(out_cpu).all()
    err = float((out_cpu.double() - out_ref.double()).norm() / out_ref.double().norm())
    assert err < CPU_VS_REFERENCE_RTOL, err


@pytest.fixture(autouse=True)
def eager_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compilation is tested once below; elsewhere eager ops keep the suite fast."""
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")


@pytest.mark.parametrize(
    "config",
    [
        RTNConfig(weight_bits=8),
        RTNConfig(weight_bits=4),
        RTNConfig(weight_bits=4, weight_signed=False),
        RTNConfig(weight_bits=4, group_size=10),
        RTNConfig(weight_bits=6),
    ],
    ids=["w8", "w4", "w4-unsigned", "w4-g10", "w6"],
)
def test_cpu_matches_reference_dynamic(config: RTNConfig) -> None:
    compare_backends(make_layer(config), inputs_with_outliers(33, 70, seed=2))


@pytest.mark.parametrize("group_size", [None, 10])
def test_unsigned_8bit_weights_run_on_cpu(group_size: int | None) -> None:
    layer = make_layer(RTNConfig(weight_bits=8, weight_signed=False, group_size=group_size))
    assert layer.weight_codes.dtype == torch.uint8 and int(layer.weight_codes.max()) > 127
    compare_backends(layer, inputs_with_outliers(33, 70, seed=2))


def test_cpu_matches_reference_asymmetric_per_token() -> None:
    act = ActivationRecord("dynamic_per_token", bits=8, signed=False)
    compare_backends(make_layer(RTNConfig(weight_bits=8), act), inputs_with_outliers(19, 70, seed=3).abs() - 0.3)


@pytest.mark.parametrize("signed", [True, False])
def test_cpu_matches_reference_static(signed: bool) -> None:
    act = ActivationRecord("static", bits=8, signed=signed, scale=torch.tensor(0.05), zero_point=torch.tensor(0.0 if signed else 100.0))
    compare_backends(make_layer(RTNConfig(weight_bits=8), act), inputs_with_outliers(21, 70, seed=4))


def test_per_timestep_parameters_follow_the_context() -> None:
    context = TimestepContext([900.0, 500.0, 100.0])
    act = ActivationRecord("per_timestep", bits=8, signed=True, scale=torch.tensor([0.2, 0.05, 0.01]), zero_point=torch.zeros(3))
    layer = make_layer(RTNConfig(weight_bits=4), act, context=context)
    x = inputs_with_outliers(9, 70, seed=5)
    outputs = []
    for t in (900.0, 100.0):
        context.set_timestep(t)
        compare_backends(layer, x)
        outputs.append(layer(x))
    assert not torch.allclose(outputs[0], outputs[1])


def test_weight_only_layer_runs_in_float() -> None:
    layer = make_layer(RTNConfig(weight_bits=4), ActivationRecord("none"))
    compare_backends(layer, inputs_with_outliers(5, 70, seed=6))


def test_compiled_cpu_path_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "1")
    layer = make_layer(RTNConfig(weight_bits=8), in_f=64, out_f=48)
    compare_backends(layer, inputs_with_outliers(40, 64, seed=7))


def test_bf16_input_keeps_dtype_and_accuracy() -> None:
    layer = make_layer(RTNConfig(weight_bits=8))
    x = inputs_with_outliers(16, 70, seed=8)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    layer.set_backend("reference")
    ref = layer(x)
    assert float((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_model_cast_keeps_float32_scales() -> None:
    layer = make_layer(RTNConfig(weight_bits=8))
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_codes.dtype == torch.int8


def test_backend_selection() -> None:
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("fast", "cpu")


def test_forced_triton_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton backend can run")
    # Without triton the error says so; with it, it says how to put the model on the GPU.
    with pytest.raises(BackendUnavailableError, match="device='cuda'" if HAS_TRITON else "triton is not installed"):
        resolve_backend("triton", "cpu")
    with pytest.raises(BackendUnavailableError):
        make_layer(RTNConfig(weight_bits=8), backend="triton")


def test_auto_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "backend_problem", lambda name, device: None if name == "reference" else "no int8 units")
    with caplog.at_level(logging.WARNING, logger="tfmq_video.runtime.backends"):
        assert resolve_backend("auto", "cpu") == "reference"
        assert resolve_backend("auto", "cpu") == "reference"
    assert sum("falling back" in r.message for r in caplog.records) == 1


def test_unsupported_scheme_falls_back_or_fails() -> None:
    layer = make_layer(RTNConfig(weight_bits=8, group_size=10), backend="reference")
    assert layer.unsupported("triton") is not None
    assert layer.unsupported("cpu") is None
