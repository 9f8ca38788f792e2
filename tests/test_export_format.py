"""Export -> load -> run, the manifest and its checks, weight sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.export import RTNConfig, load_quantized, rtn_records, save_quantized, weight_bytes_report
from tfmq_video.export.format import MANIFEST_NAME, QUANTIZED_FILE
from tfmq_video.quant.records import ActivationRecord
from tfmq_video.runtime import build_runtime_model, compute_temporal_cache
from tfmq_video.runtime.linear import QuantLinear

# Loaded with the reference backend, the exported model and the in-memory fake-quant model do
# the same float32 computation: they agree to 1e-5 (relative norm difference). The cpu backend
# computes the same integer math with another float32 rounding order; a last-bit difference
# can flip one activation code at a rounding tie in a later layer, so the whole-model
# tolerance is 1e-3 (per layer it is 2e-5, see test_runtime_linear.py).
EXPORT_RTOL = {"reference": 1e-5, "cpu": 1e-3}

TINY = STDiT3Config(
    input_sq_size=32, in_channels=3, patch_size=(1, 4, 4), hidden_size=64, depth=2, num_heads=4,
    caption_channels=32, model_max_length=8, pred_sigma=False,
)


@pytest.fixture(autouse=True)
def eager_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")


def tiny_model(seed: int = 0) -> STDiT3:
    torch.manual_seed(seed)
    return STDiT3(TINY).eval()


def inputs(t: float = 500.0) -> tuple:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 16, 16, generator=generator)
    y = torch.randn(2, 1, 8, 32, generator=generator)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    return x, torch.full((2,), t), y, mask


def run(model: torch.nn.Module, t: float = 500.0) -> torch.Tensor:
    x, ts, y, mask = inputs(t)
    with torch.no_grad():
        return model(x, ts, y, mask, fps=torch.tensor([8.0]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("config", [RTNConfig(weight_bits=8), RTNConfig(weight_bits=4), RTNConfig(weight_bits=4, group_size=16)],
                         ids=["w8a8", "w4a8", "w4a8-g16"])
def test_export_load_run_matches_fake_quant_model(tmp_path: Path, config: RTNConfig, backend: str) -> None:
    model = tiny_model()
    records = rtn_records(model, config)
    save_quantized(tmp_path / "q", model, records)
    fake = build_runtime_model(tiny_model(), records, backend="reference")
    loaded = load_quantized(tmp_path / "q", backend=backend)
    assert {m.backend for m in loaded.modules() if isinstance(m, QuantLinear)} == {backend}
    assert rel(run(loaded), run(fake)) < EXPORT_RTOL[backend]
    assert rel(run(loaded), run(model)) < (0.02 if config.weight_bits == 8 else 0.2)  # quantization error itself


def test_manifest_describes_the_checkpoint(tmp_path: Path) -> None:
    model = tiny_model()
    save_quantized(tmp_path / "q", model, rtn_records(model, RTNConfig(weight_bits=4)))
    manifest = json.loads((tmp_path / "q" / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and manifest["family"] == "stdit3"
    assert manifest["model_config"]["hidden_size"] == 64
    layer = manifest["layers"]["spatial_blocks.0.mlp.fc1"]
    assert layer["weight_storage"] == "int4_packed" and layer["activation"]["mode"] == "dynamic_per_token"
    assert "t_block.1.weight" in manifest["full_precision"]
    assert set(manifest["files"]) == {"quantized.safetensors", "full_precision.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert not list(tmp_path.glob(".q.*")), "temporary export folder left behind"


def test_per_timestep_parameters_and_temporal_cache_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    steps = [900.0, 500.0, 100.0]
    scales = torch.tensor([0.08, 0.05, 0.03])
    records = rtn_records(model, RTNConfig(weight_bits=8))
    for record in records:
        if record.name.endswith("mlp.fc1"):
            record.activation = ActivationRecord("per_timestep", 8, True, scales.clone(), torch.zeros(3))
    cache = compute_temporal_cache(model, steps, fps=8.0)
    save_quantized(tmp_path / "q", model, records, calibrated_timesteps=steps, temporal_cache=cache)
    loaded = load_quantized(tmp_path / "q", backend="cpu")
    fake = build_runtime_model(tiny_model(), records, backend="reference", calibrated_timesteps=steps)
    for t in steps:
        assert rel(run(loaded, t), run(fake, t)) < EXPORT_RTOL["cpu"]
    assert loaded.timestep_context.index == 2


def test_w4_is_close_to_4x_smaller_than_bf16(tmp_path: Path) -> None:
    config = STDiT3Config(input_sq_size=32, in_channels=3, patch_size=(1, 4, 4), hidden_size=576, depth=1,
                          num_heads=8, caption_channels=32, model_max_length=8, pred_sigma=False)
    torch.manual_seed(0)
    model = STDiT3(config).eval()
    save_quantized(tmp_path / "q", model, rtn_records(model, RTNConfig(weight_bits=4)))
    report = weight_bytes_report(load_quantized(tmp_path / "q", backend="reference"), tmp_path / "q")
    assert report["memory_ratio_vs_bf16"] > 3.8 and report["disk_ratio_vs_bf16"] > 3.8


def tamper(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    model = tiny_model()
    return save_quantized(tmp_path / "q", model, rtn_records(model, RTNConfig(weight_bits=8)))


def test_wrong_version_is_refused(exported: Path) -> None:
    tamper(exported, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_quantized(exported)


def test_corrupt_tensor_file_is_refused(exported: Path) -> None:
    data = bytearray((exported / QUANTIZED_FILE).read_bytes())
    data[-1] ^= 0xFF
    (exported / QUANTIZED_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_quantized(exported)


def test_shape_mismatch_is_refused(exported: Path) -> None:
    def shrink(manifest: dict) -> None:
        manifest["model_config"]["mlp_ratio"] = 2.0

    tamper(exported, shrink)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_quantized(exported)


def test_missing_manifest_and_missing_file(tmp_path: Path, exported: Path) -> None:
    with pytest.raises(CheckpointError, match="not a tfmq-video quantized checkpoint"):
        load_quantized(tmp_path)
    (exported / QUANTIZED_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(exported)


def test_records_that_do_not_fit_the_model_are_refused() -> None:
    records = rtn_records(tiny_model(), RTNConfig(weight_bits=8))
    records[0].name = "spatial_blocks.0.no_such_layer"
    with pytest.raises(ConfigError, match="no such module"):
        build_runtime_model(tiny_model(), records)
