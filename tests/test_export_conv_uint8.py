"""Quantized patchify convs and unsigned 8-bit weights: export -> load -> run equals fake quant."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dit_adapters.base import get_adapter
from tfmq_video.calib.testing import tiny_model_inputs, tiny_stdit3
from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.export import RTNConfig, load_quantized, rtn_records, save_quantized
from tfmq_video.export.format import MANIFEST_NAME, QUANTIZED_FILE
from tfmq_video.quant.config import parse_config
from tfmq_video.quant.model import to_records, wrap_model
from tfmq_video.quant.modules import QuantConv
from tfmq_video.quant.quantizers import ActSpec, StepContext, WeightSpec
from tfmq_video.quant.records import ActivationRecord, QuantizedLinearRecord
from tfmq_video.runtime import build_runtime_model
from tfmq_video.runtime.conv import QuantPatchConv, patchify_problem
from tfmq_video.runtime.linear import QuantLinear

# Same tolerances as test_export_format.py: reference = the same float32 computation, cpu = the
# same integer math with another rounding order (a code can flip at a rounding tie).
EXPORT_RTOL = {"reference": 1e-5, "cpu": 1e-3}
ADAPTER = get_adapter("opensora-stdit3")
STEPS = [900.0, 500.0]


@pytest.fixture(autouse=True)
def eager_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def model_inputs(t: float = 500.0) -> dict:
    return tiny_model_inputs(t, seed=5)


def calibrated(weight: dict, activation: dict | None = None, keep_tib_fp: bool = True):
    """A tiny STDiT3 (patchify Conv3d included) wrapped in fake quant with observed ranges, and its FP copy."""
    model = tiny_stdit3()
    fp = copy.deepcopy(model)
    quant = {"weight": weight, "quantize_attention": False}
    if activation is not None:
        quant["activation"] = activation
    recipe = parse_config({"quant": quant, "tib": {"keep_fp": keep_tib_fp}, "progress": False})
    qmodel = wrap_model(model, ADAPTER, recipe, STEPS)
    for quantizer in qmodel.activation_quantizers():
        quantizer.observe()
    with torch.no_grad():
        for t in STEPS:
            qmodel(**model_inputs(t))
    for quantizer in qmodel.activation_quantizers():
        quantizer.finalize()
    return qmodel, fp


# --------------------------------------------------------------------------- whole model, calibrated records


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "weight",
    [{"bits": 8}, {"bits": 4, "group_size": 64}, {"bits": 8, "symmetric": False}],
    ids=["w8", "w4-g64", "w8-unsigned"],
)
def test_calibrated_model_with_patchify_conv_round_trips(tmp_path: Path, weight: dict, backend: str) -> None:
    qmodel, fp = calibrated(weight)
    records, _ = to_records(qmodel)
    conv = next(r for r in records if r.name == "x_embedder.proj")
    assert conv.original_shape == (64, 4, 1, 2, 2)
    save_quantized(tmp_path / "q", fp, records, calibrated_timesteps=STEPS)
    manifest = json.loads((tmp_path / "q" / MANIFEST_NAME).read_text())
    entry = manifest["layers"]["x_embedder.proj"]
    assert entry["conv"] == {"weight_shape": [64, 4, 1, 2, 2], "kernel_size": [1, 2, 2]}
    assert (entry["out_features"], entry["in_features"]) == (64, 16)
    assert "x_embedder.proj.weight" not in manifest["full_precision"]
    assert "conv" not in manifest["layers"]["spatial_blocks.0.mlp.fc1"]
    unsigned8 = weight.get("symmetric") is False and weight["bits"] == 8
    assert entry["weight_storage"] == (
        "uint8" if unsigned8 else "int4_packed" if weight["bits"] == 4 else "int8"
    )

    loaded = load_quantized(tmp_path / "q", backend=backend)
    assert isinstance(loaded.x_embedder.proj, QuantPatchConv)
    assert {m.backend for m in loaded.modules() if isinstance(m, QuantLinear)} == {backend}
    for t in STEPS:
        with torch.no_grad():
            expected = qmodel(**model_inputs(t))
            assert rel(loaded(**model_inputs(t)), expected) < EXPORT_RTOL[backend]
            if backend == "reference":
                # bit for bit: a last-bit difference here flips ties in the next activation quantizer
                video = model_inputs(t)["x"]
                assert torch.equal(loaded.x_embedder.proj(video), qmodel.model.x_embedder.proj(video))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_quantized_temporal_block_runs_in_the_runtime(tmp_path: Path, backend: str) -> None:
    # RTN/Q-Diffusion-style exports quantize the timestep embedder, whose forward reads ``mlp[0].weight.dtype``.
    qmodel, fp = calibrated({"bits": 8}, keep_tib_fp=False)
    records, _ = to_records(qmodel)
    assert {"t_embedder.mlp.0", "t_block.1"} <= {r.name for r in records}
    save_quantized(tmp_path / "q", fp, records, calibrated_timesteps=STEPS)
    loaded = load_quantized(tmp_path / "q", backend=backend)
    assert isinstance(loaded.t_embedder.mlp[0], QuantLinear)
    assert loaded.t_embedder.mlp[0].weight.shape == fp.t_embedder.mlp[0].weight.shape
    for t in STEPS:
        with torch.no_grad():
            assert rel(loaded(**model_inputs(t)), qmodel(**model_inputs(t))) < EXPORT_RTOL[backend]


def test_unsigned_8bit_weights_are_stored_as_uint8(tmp_path: Path) -> None:
    qmodel, fp = calibrated({"bits": 8, "symmetric": False})
    records, _ = to_records(qmodel)
    save_quantized(tmp_path / "q", fp, records, calibrated_timesteps=STEPS)
    tensors = load_file(str(tmp_path / "q" / QUANTIZED_FILE))
    codes = tensors["spatial_blocks.0.mlp.fc1.weight_codes"]
    assert codes.dtype == torch.uint8 and int(codes.max()) > 127  # real 0..255 codes, not wrapped
    layer = qmodel.model.get_submodule("spatial_blocks.0.mlp.fc1")
    expected = layer.weight_quant.integer_codes(layer.weight).reshape(codes.shape)
    assert torch.equal(codes.float(), expected)


# --------------------------------------------------------------------------- one conv layer against its fake quant


def conv_record(layer: QuantConv, name: str = "conv") -> QuantizedLinearRecord:
    """What to_records makes of a fake-quant conv."""
    wq, out = layer.weight_quant, layer.weight.shape[0]
    quantizer = layer.input_quant
    if quantizer.spec.mode == "dynamic_per_token":
        act = ActivationRecord("dynamic_per_token", quantizer.spec.bits, quantizer.spec.symmetric)
    else:
        scale, zero = quantizer.scale.detach(), quantizer.zero_point.detach()
        if quantizer.spec.mode == "static":
            scale, zero = scale[0], zero[0]
        act = ActivationRecord(
            quantizer.spec.mode, quantizer.spec.bits, quantizer.spec.symmetric, scale, zero
        )
    return QuantizedLinearRecord(
        name=name,
        weight_codes=wq.integer_codes(layer.weight).reshape(out, -1).to(torch.int8),
        weight_scale=wq.scale.detach().reshape(out, -1),
        weight_zero_point=wq.zero_point.detach().reshape(out, -1),
        weight_bits=wq.spec.bits,
        weight_signed=wq.spec.symmetric,
        group_size=wq.spec.group_size,
        bias=None if layer.bias is None else layer.bias.detach(),
        activation=act,
        original_shape=tuple(layer.weight.shape),
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", ["static", "dynamic_per_token"])
@pytest.mark.parametrize(
    "conv,shape",
    [
        (
            lambda: nn.Conv3d(16, 24, (1, 2, 2), stride=(1, 2, 2)),
            (2, 16, 3, 9, 8),
        ),  # odd H: the conv drops a row
        (lambda: nn.Conv2d(8, 16, 4, stride=4, bias=False), (2, 8, 12, 16)),
        (lambda: nn.Conv1d(64, 8, 3, stride=3), (3, 64, 9)),
    ],
    ids=["conv3d", "conv2d", "conv1d"],
)
@pytest.mark.parametrize(
    "weight",
    [WeightSpec(8), WeightSpec(8, symmetric=False), WeightSpec(4, group_size=64)],
    ids=["w8", "w8-unsigned", "w4-g64"],
)
def test_patch_conv_matches_fake_quant_conv(
    conv, shape: tuple, weight: WeightSpec, mode: str, backend: str
) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * 2 + 0.5
    fake = QuantConv(conv(), weight, ActSpec(8, symmetric=False, mode=mode), StepContext([500.0]))
    if mode != "dynamic_per_token":
        fake.input_quant.observe()
        fake(x)
        fake.input_quant.finalize()
    layer = QuantPatchConv(conv_record(fake), backend=backend)
    with torch.no_grad():
        expected = fake(x)
        out = layer(x)
    assert out.shape == expected.shape
    assert rel(out, expected) < 2e-5  # per layer, as in test_runtime_linear.py


def test_non_patchify_conv_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    model = tiny_stdit3()
    fp = copy.deepcopy(model)
    qmodel = wrap_model(
        model, ADAPTER, parse_config({"quant": {"weight": {"bits": 8}}, "progress": False}), STEPS
    )
    records, _ = to_records(qmodel)
    fp.x_embedder.proj.stride = (1, 1, 1)  # an overlapping conv: not a Linear over patches
    fp.x_embedder.proj.padding = (0, 1, 1)
    with pytest.raises(ConfigError) as info:
        save_quantized(tmp_path / "q", fp, records, calibrated_timesteps=STEPS)
    message = str(info.value)
    assert "x_embedder.proj" in message and "stride (1, 1, 1) != kernel size (1, 2, 2)" in message
    assert "padding (0, 1, 1)" in message and "keep_fp" in message
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_conv_entry_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    model = tiny_stdit3()
    save_quantized(tmp_path / "q", model, rtn_records(model, RTNConfig(include=("x_embedder.proj",))))
    path = tmp_path / "q" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["layers"]["x_embedder.proj"]["conv"]["weight_shape"] = [64, 4, 2, 2, 1]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"x_embedder.proj: manifest conv weight \(64, 4, 2, 2, 1\)"):
        load_quantized(tmp_path / "q")


def test_patchify_geometry() -> None:
    assert patchify_problem(nn.Conv3d(4, 8, (1, 2, 2), stride=(1, 2, 2))) is None
    assert patchify_problem(nn.Conv2d(4, 8, 2, stride=2, padding="valid")) is None
    assert "dilation" in patchify_problem(nn.Conv2d(4, 8, 2, stride=2, dilation=2))
    assert "groups 2" in patchify_problem(nn.Conv2d(4, 8, 2, stride=2, groups=2))
    assert "padding same" in patchify_problem(nn.Conv2d(4, 8, 3, padding="same"))


# --------------------------------------------------------------------------- unsigned 8-bit weights, RTN records


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation_mode", ["dynamic_per_token", "static"])
def test_unsigned_8bit_rtn_export_matches_fake_quant(
    tmp_path: Path, backend: str, activation_mode: str
) -> None:
    model = tiny_stdit3()
    records = rtn_records(model, RTNConfig(weight_bits=8, weight_signed=False))
    if activation_mode == "static":
        for record in records:
            record.activation = ActivationRecord("static", 8, False, torch.tensor(0.05), torch.tensor(120.0))
    assert records[0].weight_codes.dtype == torch.uint8 and int(records[0].weight_codes.max()) > 127
    save_quantized(tmp_path / "q", model, records)
    fake = build_runtime_model(tiny_stdit3(), records, backend="reference")
    loaded = load_quantized(tmp_path / "q", backend=backend)
    with torch.no_grad():
        assert rel(loaded(**model_inputs()), fake(**model_inputs())) < EXPORT_RTOL[backend]
        # the quantization error itself (the static parameters above are arbitrary, not calibrated)
        assert rel(loaded(**model_inputs()), model(**model_inputs())) < (
            0.02 if activation_mode != "static" else 0.1
        )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rtn_records_include_the_patchify_conv(tmp_path: Path, backend: str) -> None:
    model = tiny_stdit3()
    config = RTNConfig(weight_bits=8, weight_signed=False, include=("x_embedder.proj", "spatial_blocks.*"))
    records = rtn_records(model, config)
    conv = next(r for r in records if r.name == "x_embedder.proj")
    assert conv.original_shape == (64, 4, 1, 2, 2) and conv.weight_codes.shape == (64, 16)
    save_quantized(tmp_path / "q", model, records)
    fake = build_runtime_model(tiny_stdit3(), records, backend="reference")
    loaded = load_quantized(tmp_path / "q", backend=backend)
    with torch.no_grad():
        expected = fake(**model_inputs())
        assert rel(loaded(**model_inputs()), expected) < EXPORT_RTOL[backend]
        half = load_quantized(tmp_path / "q", backend=backend, dtype=torch.bfloat16)
        assert half.x_embedder.proj.weight.dtype == torch.bfloat16  # STDiT3 reads its compute dtype there
        out = half(**model_inputs())
        assert rel(out, expected) < 0.05
    assert half.float().x_embedder.proj.weight.dtype == torch.float32


def test_out_of_range_codes_are_refused() -> None:
    linear = nn.Linear(8, 4)
    record = rtn_records(nn.ModuleDict({"l": linear}), RTNConfig(weight_bits=4, include=("l",)))[0]
    record.weight_codes = record.weight_codes.to(torch.int16) + 40
    with pytest.raises(ConfigError, match="outside the signed 4-bit range"):
        QuantLinear(record, backend="reference")


# --------------------------------------------------------------------------- triton backend (interpreter on CPU)

TRITON_SCRIPT = """
import torch
from torch import nn
from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
from tfmq_video.quant.modules import QuantConv
from tfmq_video.quant.quantizers import ActSpec, WeightSpec
from tfmq_video.runtime.conv import QuantPatchConv
from tfmq_video.runtime.linear import QuantLinear
from tests.test_export_conv_uint8 import conv_record, rel

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
layer = QuantLinear(rtn_linear_record("l", nn.Linear(64, 40), RTNConfig(weight_bits=8, weight_signed=False)),
                    backend="reference").to(device)
x = torch.randn(21, 64, device=device)
ref = layer(x)
assert layer.set_backend("triton") == "triton"
assert rel(layer(x), ref) < 1e-2, rel(layer(x), ref)
fake = QuantConv(nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2)), WeightSpec(8, symmetric=False),
                 ActSpec(8, symmetric=False, mode="static"), None)
x = torch.randn(2, 4, 2, 8, 8)
fake.input_quant.observe(); fake(x); fake.input_quant.finalize()
conv = QuantPatchConv(conv_record(fake), backend="reference").to(device)
expected = fake.to(device)(x.to(device))
assert conv.set_backend("triton") == "triton"
assert rel(conv(x.to(device)), expected) < 1e-2, rel(conv(x.to(device)), expected)
print("ok")
"""


def test_triton_backend_runs_unsigned_8bit_and_patch_conv() -> None:
    from tfmq_video.kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0" if torch.cuda.is_available() else "1",
        "TFMQ_CPU_COMPILE": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_rtn_per_group_falls_back_to_per_channel_where_the_group_does_not_divide() -> None:
    """RTN with ``group_size`` 64, as calibration does: the 16-input patch conv is quantized per
    channel (one scale per output row), the 64-input linears per group."""
    model = tiny_stdit3()
    config = RTNConfig(weight_bits=4, group_size=64, include=("x_embedder.proj", "spatial_blocks.*"))
    records = {r.name: r for r in rtn_records(model, config)}
    assert records["x_embedder.proj"].group_size is None
    assert records["x_embedder.proj"].weight_scale.shape == (64, 1)
    assert records["spatial_blocks.0.attn.qkv"].group_size == 64
    assert records["spatial_blocks.0.attn.qkv"].weight_scale.shape == (192, 1)
    assert records["spatial_blocks.0.mlp.fc2"].weight_scale.shape == (64, 4)
