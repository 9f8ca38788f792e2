"""The fused MLP of the cpu backend: fc1's oneDNN GEMM applies GELU and writes fc2's uint8 input codes.

Checked against float math (the codes), against the unfused cpu path and the reference backend
(the outputs), per timestep, under Dynamo, in a whole STDiT3, and where it must not be taken.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

from dit_adapters.fused import modulate, norm_modulate_mlp
from tfmq_video.errors import ConfigError
from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
from tfmq_video.quant.context import TimestepContext
from tfmq_video.quant.records import ActivationRecord
from tfmq_video.runtime.int_ops import onednn_available
from tfmq_video.runtime.linear import QuantLinear

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN quantized linear")

WIDTH, HIDDEN, ROWS = 48, 96, 37


@pytest.fixture(autouse=True)
def eager_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")


def static(scale: float | list[float], zero: float | list[float], signed: bool = True, bits: int = 8) -> ActivationRecord:
    mode = "per_timestep" if isinstance(scale, list) else "static"
    return ActivationRecord(mode, bits, signed, torch.tensor(scale), torch.tensor(zero))


def mlp_layers(
    fc1_act: ActivationRecord, fc2_act: ActivationRecord, context: TimestepContext | None = None, weight_bits: int = 8
) -> tuple[QuantLinear, QuantLinear]:
    torch.manual_seed(3)
    fc1, fc2 = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
    config = RTNConfig(weight_bits=weight_bits)
    return (QuantLinear(rtn_linear_record("fc1", fc1, config, fc1_act), context=context, backend="cpu"),
            QuantLinear(rtn_linear_record("fc2", fc2, config, fc2_act), context=context, backend="cpu"))


def block_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, ROWS, WIDTH, generator=generator)
    shift = 0.1 * torch.randn(2, 1, WIDTH, generator=generator)
    scale = 0.1 * torch.randn(2, 1, WIDTH, generator=generator)
    return x, shift, scale


def run_mlp(fc1: QuantLinear, fc2: QuantLinear, gelu: nn.Module, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, shift, scale = (t.to(dtype) for t in block_inputs(seed))
    norm = nn.LayerNorm(WIDTH, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        return norm_modulate_mlp(norm, fc1, gelu, fc2, x, shift, scale)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


FC1_ACT = static(0.03, 0.0)
CONSUMERS = {"signed": static(0.01, 3.0), "unsigned": static(0.01, 20.0, signed=False)}


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_codes_are_the_quantized_activation(consumer: str, approximate: str) -> None:
    fc1, fc2 = mlp_layers(FC1_ACT, CONSUMERS[consumer])
    gelu = nn.GELU(approximate=approximate)
    assert fc1.emits_codes_for(gelu, fc2)
    x = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(1))
    codes = fc1.forward_activation_codes(x, gelu, fc2)
    assert codes.dtype == torch.uint8 and codes.shape == (ROWS, HIDDEN)
    # float64 reference: fc1 on its own quantized input, the GELU, fc2's quantizer, shifted into uint8
    hidden = F.gelu(F.linear(fc1.fake_quantize_input(x).double(), fc1.dequantized_weight().double(),
                             fc1.bias.double()), approximate=approximate)
    grid, zero = fc2.act_grid, float(fc2.act_zero_point)
    shift = 128 if grid.signed else 0
    expected = torch.clamp(torch.round(hidden / float(fc2.act_scale)) + zero, grid.qmin, grid.qmax) + shift
    diff = (codes.double() - expected).abs()
    assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())  # ties rounded in float32
    assert int(codes.min()) == 0 or int(codes.max()) == 255 or codes.unique().numel() > 50  # a real range


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_fused_mlp_matches_unfused_and_reference(consumer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fc1, fc2 = mlp_layers(FC1_ACT, CONSUMERS[consumer])
    gelu = nn.GELU(approximate="tanh")
    fused = run_mlp(fc1, fc2, gelu)
    monkeypatch.setattr(QuantLinear, "emits_codes_for", lambda *_: False)
    unfused = run_mlp(fc1, fc2, gelu)
    fc1.set_backend("reference"), fc2.set_backend("reference")
    reference = run_mlp(fc1, fc2, gelu)
    assert fused.shape == reference.shape == (2, ROWS, WIDTH)
    assert rel(fused, unfused) < 5e-3 and rel(fused, reference) < 5e-3, (rel(fused, unfused), rel(fused, reference))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_keeps_the_block_dtype(dtype: torch.dtype) -> None:
    fc1, fc2 = mlp_layers(FC1_ACT, CONSUMERS["signed"])
    gelu = nn.GELU(approximate="tanh")
    out = run_mlp(fc1, fc2, gelu, dtype=dtype)
    assert out.dtype == dtype
    fc1.set_backend("reference"), fc2.set_backend("reference")
    assert rel(out.float(), run_mlp(fc1, fc2, gelu)) < 2e-2


def test_per_timestep_codes_follow_the_step() -> None:
    context = TimestepContext([900.0, 500.0, 100.0])
    fc1, fc2 = mlp_layers(static([0.05, 0.03, 0.02], [0.0, 0.0, 0.0]), static([0.02, 0.005, 0.01], [0.0, 4.0, -3.0]),
                          context=context)
    gelu = nn.GELU(approximate="tanh")
    outputs = []
    for t in (900.0, 500.0, 100.0):
        context.set_timestep(t)
        fused = run_mlp(fc1, fc2, gelu)
        fc1.set_backend("reference"), fc2.set_backend("reference")
        reference = run_mlp(fc1, fc2, gelu)
        fc1.set_backend("cpu"), fc2.set_backend("cpu")
        assert rel(fused, reference) < 5e-3, (t, rel(fused, reference))
        outputs.append(fused)
    assert rel(outputs[0], outputs[1]) > 1e-2 and rel(outputs[1], outputs[2]) > 1e-2


def test_w4_weights_take_the_fused_path() -> None:
    fc1, fc2 = mlp_layers(FC1_ACT, CONSUMERS["signed"], weight_bits=4)
    gelu = nn.GELU(approximate="tanh")
    assert fc1.emits_codes_for(gelu, fc2)
    fused = run_mlp(fc1, fc2, gelu)
    fc1.set_backend("reference"), fc2.set_backend("reference")
    assert rel(fused, run_mlp(fc1, fc2, gelu)) < 5e-3


@pytest.mark.parametrize(
    ("fc1_act", "fc2_act", "activation", "backend"),
    [
        (FC1_ACT, ActivationRecord("dynamic_per_token", 8, True), nn.GELU(), "cpu"),  # per-token consumer
        (ActivationRecord("dynamic_per_token", 8, True), CONSUMERS["signed"], nn.GELU(), "cpu"),  # per-token fc1
        (FC1_ACT, static(0.05, 0.0, bits=6), nn.GELU(), "cpu"),  # a 6-bit grid does not fill uint8
        (FC1_ACT, CONSUMERS["signed"], nn.SiLU(), "cpu"),  # no post-op for it here
        (FC1_ACT, CONSUMERS["signed"], nn.GELU(), "reference"),
    ],
    ids=["dynamic-consumer", "dynamic-fc1", "a6-consumer", "silu", "reference"],
)
def test_unfusable_mlps_take_the_plain_path(fc1_act: ActivationRecord, fc2_act: ActivationRecord,
                                            activation: nn.Module, backend: str) -> None:
    fc1, fc2 = mlp_layers(fc1_act, fc2_act)
    fc1.set_backend(backend), fc2.set_backend(backend)
    assert not fc1.emits_codes_for(activation, fc2)
    x, shift, scale = block_inputs()
    norm = nn.LayerNorm(WIDTH, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        out = norm_modulate_mlp(norm, fc1, activation, fc2, x, shift, scale)
        expected = fc2(activation(fc1(modulate(norm(x), shift, scale))))
    assert torch.equal(out, expected)
    with pytest.raises(ConfigError, match="cannot emit the input codes"):
        fc1.forward_activation_codes(x, activation, fc2)


class FusedBlock(nn.Module):
    """A residual block whose MLP goes through :func:`norm_modulate_mlp`."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6, elementwise_affine=False)
        self.fc1, self.act, self.fc2 = fc1, nn.GELU(approximate="tanh"), fc2

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + norm_modulate_mlp(self.norm, self.fc1, self.act, self.fc2, x, shift, scale)


def test_one_graph_serves_every_step_under_dynamo() -> None:
    """The per-timestep output scale is read inside the opaque op: moving to the next step must not
    recompile the block, and the compiled block must still follow the step."""
    torch._dynamo.reset()
    steps = [900.0, 700.0, 500.0, 300.0, 100.0]
    context = TimestepContext(steps)
    scales = [0.004 * (1 + 2 * (s % 3)) for s in range(len(steps))]
    fc1, fc2 = mlp_layers(static([0.03] * len(steps), [0.0] * len(steps)), static(scales, [0.0] * len(steps)),
                          context=context)
    block = FusedBlock(fc1, fc2)
    counter = CompileCounter()
    compiled = torch.compile(block, backend=counter, dynamic=True)
    x, shift, scale = block_inputs()
    outputs = []
    with torch.no_grad():
        for t in steps:
            context.set_timestep(t)
            out = compiled(x, shift, scale)
            assert torch.allclose(out, block(x, shift, scale))
            outputs.append(out)
    assert counter.frame_count == 1
    assert all(rel(outputs[i], outputs[i + 1]) > 1e-3 for i in range(len(steps) - 1))


def test_stdit3_on_cpu_uses_the_fused_mlps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole tiny STDiT3 with static activation scales on the cpu backend: both blocks' MLPs take
    the fused path, and the output matches the reference backend."""
    from tfmq_video.calib.testing import tiny_model_inputs, tiny_stdit3
    from tfmq_video.export import rtn_records
    from tfmq_video.runtime import build_runtime_model

    model, inputs = tiny_stdit3(), tiny_model_inputs()
    records = rtn_records(model, RTNConfig(weight_bits=8, include=("spatial_blocks.*", "temporal_blocks.*")))
    peaks: dict[str, float] = {}
    hooks = [model.get_submodule(r.name).register_forward_pre_hook(
        lambda _m, args, name=r.name: peaks.__setitem__(name, float(args[0].abs().max()))) for r in records]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    for record in records:
        record.activation = ActivationRecord("static", 8, True, torch.tensor(peaks[record.name] / 127), torch.tensor(0.0))

    fused_calls: list[str] = []
    real = QuantLinear.forward_activation_codes

    def counted(self: QuantLinear, *args: object) -> torch.Tensor:
        fused_calls.append(self.name)
        return real(self, *args)

    monkeypatch.setattr(QuantLinear, "forward_activation_codes", counted)
    with torch.no_grad():
        expected = build_runtime_model(tiny_stdit3(), records, backend="reference", attention="fp", compile=False)(**inputs)
        assert not fused_calls
        out = build_runtime_model(tiny_stdit3(), records, backend="cpu", attention="fp", compile=False)(**inputs)
    assert sorted(fused_calls) == sorted(r.name for r in records if r.name.endswith("mlp.fc1"))
    assert len(fused_calls) == 2
    assert rel(out, expected) < 1e-2, rel(out, expected)
