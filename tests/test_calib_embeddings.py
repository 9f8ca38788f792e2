"""Layer-wise reconstruction of the layers outside the TIB and the blocks (patch and caption
embedders), as BRECQ treats layers outside blocks."""

from __future__ import annotations

import torch

import tfmq_video
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.calib.optimize import relative_error
from tfmq_video.calib.reconstruction import capture_embed_io, embedding_layer_names
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.quant.config import RecipeConfig

BASE = RecipeConfig(progress=False, tib={"iterations": 10}, reconstruction={"iterations": 80, "batch_size": 4})


def embedding_errors(qmodel, fp: torch.nn.Module, calibration: CalibrationSet) -> dict[str, float]:
    names = embedding_layer_names(qmodel)
    _, _, targets, _ = capture_embed_io(qmodel.adapter, fp, calibration, names, None)
    _, _, outputs, _ = capture_embed_io(qmodel.adapter, qmodel.model, calibration, names, qmodel.context)
    return {name: float(relative_error(outputs[name], targets[name])) for name in names}


def test_embedders_are_reconstructed_and_their_error_drops(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    reconstructed = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("qdiffusion", 4, 8, BASE))
    assert embedding_layer_names(reconstructed) == ["x_embedder.proj", "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2"]
    report = reconstructed.report["reconstruction"]["embeddings"]
    assert set(report) == {"x_embedder.proj", "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2"}
    plain = method_recipe("qdiffusion", 4, 8, BASE.model_copy(update={"reconstruction": BASE.reconstruction.model_copy(
        update={"iterations": 0})}))
    nearest = tfmq_video.quantize(model, "opensora-stdit3", calibration, plain)
    after, before = embedding_errors(reconstructed, model, calibration), embedding_errors(nearest, model, calibration)
    assert all(after[name] < before[name] for name in after), (before, after)
