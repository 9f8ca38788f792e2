"""Calibration of a model on a GPU from a recording kept on CPU, and the device helpers.

The GPU tests run where CUDA is present (the lent H100 of ``tools/gpu_check.sh``); CI has none.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tfmq_video
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.calib.checkpoint import load_calibrated, save_calibrated
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.calib.testing import sample_tiny
from tfmq_video.devices import full_float32, model_device, move, pick_device
from tfmq_video.errors import ConfigError
from tfmq_video.export import load_quantized
from tfmq_video.export.calibrated import export_calibrated
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.quant.model import QuantizedModel, to_records

FAST = RecipeConfig(progress=False, tib={"iterations": 60}, reconstruction={"iterations": 10, "batch_size": 2})
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_move_reaches_every_nested_tensor() -> None:
    value = {"a": (torch.ones(2, requires_grad=True), [torch.zeros(1)]), "b": 3}
    moved = move(value, "cpu")
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list) and moved["b"] == 3
    assert not moved["a"][0].requires_grad  # detached: recordings never hold autograd graphs


def test_device_names_are_checked() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device name"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.fixture
def fp32_on_gpu() -> Iterator[None]:
    """TF32 off, as ``bench quality --device cuda`` sets it, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    full_float32(torch.device("cuda"))
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def _codes(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    return {name: layer.weight_quant.codes.cpu() for name, layer in qmodel.weight_layers() if layer.weight_quant}


# case -> method and recipe changes, so that every stage of the calibration code runs on the GPU
CASES: dict[str, tuple[str, dict]] = {
    "tfmq": ("tfmq", {}), "tfmq-trajectory": ("tfmq-trajectory", {}), "viditq": ("viditq", {}), "rtn": ("rtn", {}),
    "tfmq-select-by-output": ("tfmq", {"tib": {"select_by": "output"}}),
    "qdiffusion-bias-correction": ("qdiffusion", {"reconstruction": {"bias_correction": True}}),
}


def _case_recipe(case: str) -> RecipeConfig:
    method, changes = CASES[case]
    recipe = method_recipe(method, 4, 8, FAST)
    for section, values in changes.items():
        recipe = recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=values)})
    return recipe


@needs_cuda
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_on_the_gpu_calibrates_like_on_the_cpu(case: str, model: torch.nn.Module,
                                                        calibration: CalibrationSet, fp32_on_gpu: None) -> None:
    recipe = _case_recipe(case)
    on_gpu = tfmq_video.quantize(copy.deepcopy(model).cuda(), "opensora-stdit3", calibration, recipe)
    on_cpu = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cuda"}
    assert model_device(model).type == "cpu"  # the FP model is left where it was
    gpu_codes, cpu_codes = _codes(on_gpu), _codes(on_cpu)
    same = sum(int((gpu_codes[k] == cpu_codes[k]).sum()) for k in cpu_codes)
    total = sum(v.numel() for v in cpu_codes.values())
    # the same optimization in other floating-point rounding: a few borderline roundings may differ
    assert same / total > 0.99, f"only {same / total:.4f} of the integer codes agree"
    fp = sample_tiny(model, seed=3)
    gpu_error, cpu_error = _relative(sample_tiny(on_gpu, seed=3), fp), _relative(sample_tiny(on_cpu, seed=3), fp)
    assert gpu_error < 0.2 and gpu_error < 1.5 * cpu_error + 1e-4, (gpu_error, cpu_error)


@needs_cuda
def test_a_checkpoint_calibrated_on_the_gpu_loads_on_the_cpu(model: torch.nn.Module, calibration: CalibrationSet,
                                                            tmp_path: Path, fp32_on_gpu: None) -> None:
    on_gpu = tfmq_video.quantize(copy.deepcopy(model).cuda(), "opensora-stdit3", calibration,
                                 method_recipe("tfmq", 4, 8, FAST))
    folder = save_calibrated(on_gpu, tmp_path / "ckpt")
    loaded = load_calibrated(folder, model)
    assert model_device(loaded).type == "cpu"
    assert _relative(sample_tiny(loaded, seed=7), sample_tiny(on_gpu, seed=7)) < 1e-8
    # the packed integer export of the model on the GPU holds what the reloaded CPU copy's does
    gpu_records, gpu_served = to_records(on_gpu)
    cpu_records, cpu_served = to_records(loaded)
    for gpu_record, cpu_record in zip(gpu_records, cpu_records, strict=True):
        for gpu_part, cpu_part in ((gpu_record, cpu_record), (gpu_record.activation, cpu_record.activation)):
            for field, value in vars(cpu_part).items():
                if torch.is_tensor(value):
                    assert torch.equal(getattr(gpu_part, field), value), (cpu_record.name, field)
    assert all(torch.allclose(gpu_served[k], cpu_served[k], atol=1e-5) for k in cpu_served)
    load_quantized(export_calibrated(on_gpu, tmp_path / "packed"), backend="reference", compile=False)
