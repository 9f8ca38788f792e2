"""Per-timestep (FSC) activation parameters under compiled blocks: one graph for every step.

The step index reaches the quantized layers as a 0-d tensor (``TimestepContext.index_tensor``),
so a compiled block must not recompile when the sampler moves to the next step, and its output
must still follow the step's calibrated scales.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from tfmq_video.errors import ConfigError
from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
from tfmq_video.quant.context import TimestepContext
from tfmq_video.quant.records import ActivationRecord
from tfmq_video.runtime import build_runtime_model
from tfmq_video.runtime.convert import compile_blocks

STEPS = [
    1000.0 - 75.0 * i for i in range(12)
]  # 12 calibrated timesteps, more than Dynamo's recompile limit (8)
WIDTH = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyModel(nn.Module):
    """Two blocks in a ModuleList (what ``compile_blocks`` compiles); ``forward(x, timestep)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def step_scales(layer: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step scales that differ strongly between steps (so ignoring the step changes the output)."""
    scale = torch.tensor([0.004 * (1 + 2 * (s % 3)) * (1 + 0.1 * layer) for s in range(len(STEPS))])
    zero = torch.zeros_like(scale) if signed else torch.full_like(scale, 110.0)
    return scale, zero


def records(config: RTNConfig, bits: int = 8, signed: bool = True, steps: int | None = None) -> list:
    model = TinyModel()
    out = []
    for i, name in enumerate(f"blocks.{b}.{fc}" for b in range(2) for fc in ("fc1", "fc2")):
        scale, zero = step_scales(i, signed)
        act = ActivationRecord("per_timestep", bits, signed, scale[:steps], zero[:steps])
        out.append(rtn_linear_record(name, model.get_submodule(name), config, act))
    return out


def build(config: RTNConfig, backend: str, bits: int = 8, signed: bool = True) -> nn.Module:
    recs = records(config, bits, signed)
    return build_runtime_model(TinyModel(), recs, backend=backend, calibrated_timesteps=STEPS, compile=False)


def inputs() -> torch.Tensor:
    return torch.randn(2, 24, WIDTH, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, t: float) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs(), torch.full((2,), t))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")  # eager references stay eager; blocks are compiled explicitly
    torch._dynamo.reset()
    counters.clear()


def check_steps(compiled: nn.Module, eager: nn.Module, graphs: object, tol: float) -> None:
    """Every calibrated step: compiled == eager, outputs differ between steps, no new graph after step 0."""
    outputs, after_first = [], None
    for t in STEPS:
        out, ref = run(compiled, t), run(eager, t)
        assert rel(out, ref) <= tol, (t, rel(out, ref))
        outputs.append(ref)
        after_first = graphs() if after_first is None else after_first
    assert 0 < after_first == graphs() <= 2, (
        after_first,
        graphs(),
    )  # at most one graph per block, none per step
    # consecutive steps scale by 1x, 3x or 5x: the step chosen must show in the output
    assert all(rel(outputs[i], outputs[i + 1]) > 1e-3 for i in range(len(STEPS) - 1))


@pytest.mark.parametrize(
    ("backend", "config", "bits", "signed"),
    [
        ("cpu", RTNConfig(weight_bits=8), 8, True),  # oneDNN GEMM with the static scale fused
        ("cpu", RTNConfig(weight_bits=8), 6, True),  # linear_static (_int_mm + epilogue)
        (
            "cpu",
            RTNConfig(weight_bits=4, group_size=8),
            8,
            False,
        ),  # quantize_input with a zero point, per group
        ("reference", RTNConfig(weight_bits=8), 8, True),  # fake_quantize_input
    ],
    ids=["cpu-w8a8-onednn", "cpu-w8a6-int-mm", "cpu-w4g8-a8-asym", "reference"],
)
def test_one_graph_per_block_for_every_step(backend: str, config: RTNConfig, bits: int, signed: bool) -> None:
    counter = CompileCounter()
    eager = build(config, backend, bits, signed)
    compiled = build(config, backend, bits, signed)
    assert compile_blocks(compiled, backend=counter) == 2
    check_steps(compiled, eager, lambda: counter.frame_count, tol=1e-6)


def test_inductor_blocks_compile_once_for_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime's own compilation (``build_runtime_model(compile=True)``: Inductor, dynamic shapes)."""
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "1")
    config = RTNConfig(weight_bits=8)
    eager = build_runtime_model(
        TinyModel(), records(config), backend="cpu", calibrated_timesteps=STEPS, compile=False
    )
    compiled = build_runtime_model(
        TinyModel(), records(config), backend="cpu", calibrated_timesteps=STEPS, compile=True
    )
    check_steps(compiled, eager, lambda: counters["stats"]["unique_graphs"], tol=1e-4)


def test_index_tensor_is_updated_in_place_and_checked_when_set() -> None:
    context = TimestepContext(STEPS)
    with pytest.raises(ConfigError, match="no timestep set"):
        context.index_tensor  # noqa: B018
    context.set_timestep(torch.full((2,), STEPS[3]))
    tensor = context.index_tensor
    assert tensor.dtype == torch.int64 and tensor.dim() == 0 and int(tensor) == context.index == 3
    context.set_index(7)
    assert context.index_tensor is tensor and int(tensor) == 7
    with pytest.raises(ConfigError, match="outside"):
        context.set_index(len(STEPS))
    assert int(tensor) == 7


def test_missing_timestep_and_short_parameters_are_errors() -> None:
    model = build(RTNConfig(weight_bits=8), "cpu")
    with pytest.raises(ConfigError, match="no timestep set"):
        model.blocks[0](inputs())  # a block called without the model's timestep hook
    with pytest.raises(ConfigError, match="per-timestep activation scales"):
        build_runtime_model(
            TinyModel(), records(RTNConfig(weight_bits=8), steps=5), calibrated_timesteps=STEPS
        )
