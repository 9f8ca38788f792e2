"""A TFMQ-calibrated model (AdaRound codes, per-timestep TIB activations, temporal cache and
selection) exported to the packed format and reloaded runs like the fake-quant model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tfmq_video
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.calib.checkpoint import save_calibrated
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.calib.testing import tiny_model_inputs
from tfmq_video.cli import main
from tfmq_video.errors import CheckpointError
from tfmq_video.export import load_quantized
from tfmq_video.export.format import CACHE_FILE, MANIFEST_NAME
from tfmq_video.quant.config import RecipeConfig

# Both backends: float rounding differs from the fake-quant model by an ulp here and there (the
# quantized TIB runs on a batch of 2 rows in the fake model and on all steps at export, so its
# matmuls sum in another order; the cpu backend uses integer GEMMs), and one activation code at a
# rounding tie can flip; one flipped code moves the tiny model's output by ~1e-3. Exact weight
# codes are checked in test_quant_model.py (records reproduce the fake-quant weights).
EXPORT_RTOL = {"reference": 5e-3, "cpu": 5e-3}
FAST = RecipeConfig(progress=False, quant={"quantize_attention": False}, tib={"iterations": 40},
                    reconstruction={"iterations": 5, "batch_size": 2})


@pytest.fixture(autouse=True)
def eager_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFMQ_CPU_COMPILE", "0")


@pytest.fixture(scope="module", params=[(4, 8), (8, 8)], ids=["w4a8", "w8a8"])
def calibrated(request: pytest.FixtureRequest, model: torch.nn.Module, calibration: CalibrationSet):
    wbits, abits = request.param
    return tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("tfmq", wbits, abits, FAST))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def model_inputs(t: float) -> dict:
    return tiny_model_inputs(t, seed=11)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_exported_tfmq_model_matches_the_fake_quant_model(tmp_path: Path, calibrated, backend: str) -> None:
    from tfmq_video.export.calibrated import export_calibrated

    folder = export_calibrated(calibrated, tmp_path / "packed")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert CACHE_FILE in manifest["files"] and manifest["temporal_cache"]["num_steps"] == len(calibrated.context)
    assert manifest["calibrated_timesteps"] == [float(t) for t in calibrated.context.timesteps]
    loaded = load_quantized(folder, backend=backend, attention="fp")
    outputs = []
    for t in calibrated.context.timesteps.tolist():
        with torch.no_grad():
            expected = calibrated(**model_inputs(t))
            got = loaded(**model_inputs(t))
        assert rel(got, expected) < EXPORT_RTOL[backend], (t, rel(got, expected))
        outputs.append(expected)
    # the per-step parameters and served features show: steps give different outputs
    assert rel(outputs[0], outputs[-1]) > 1e-2


def test_export_command_and_calibrate_export(tmp_path: Path, calibrated, capsys: pytest.CaptureFixture) -> None:
    save_calibrated(calibrated, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "packed")]) == 0
    summary = json.loads(capsys.readouterr().out)
    wbits = calibrated.recipe.quant.weight.bits
    assert summary["out"] == str(tmp_path / "packed")
    # rows of 64 inputs: a float32 scale and zero point per row cost 8 bytes against 128 bf16
    # bytes, and the patch embedding has 16 inputs, so the ratios stay below 4x / 2x
    assert summary["memory_ratio_vs_bf16"] > (3.0 if wbits == 4 else 1.7)
    loaded = load_quantized(tmp_path / "packed", backend="reference", attention="fp")
    t = float(calibrated.context.timesteps[1])
    with torch.no_grad():
        assert rel(loaded(**model_inputs(t)), calibrated(**model_inputs(t))) < EXPORT_RTOL["reference"]


def test_export_of_a_folder_that_is_not_a_calibrated_checkpoint_fails_cleanly(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "ckpt").mkdir()
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "packed")]) == 2
    assert "ckpt" in capsys.readouterr().err
    assert not (tmp_path / "packed").exists()
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "ckpt")
