"""The Q-Diffusion baseline's TIB: layer-wise output reconstruction (BRECQ), one static activation set."""

from __future__ import annotations

import pytest
import torch

import tfmq_video
from dit_adapters.base import get_adapter
from tfmq_video.calib import tiar
from tfmq_video.calib.baselines import METHODS, method_recipe
from tfmq_video.calib.optimize import relative_error
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.calib.testing import sample_tiny
from tfmq_video.calib.tib import TemporalInformationBlock
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import RecipeConfig, parse_config
from tfmq_video.quant.model import QuantizedModel

FAST = RecipeConfig(
    progress=False, tib={"iterations": 60}, reconstruction={"iterations": 10, "batch_size": 2}
)
TIB_LAYERS = ["t_embedder.mlp.0", "t_embedder.mlp.2", "fps_embedder.mlp.0", "fps_embedder.mlp.2", "t_block.1"]


@pytest.fixture(scope="module")
def tib(calibration: CalibrationSet) -> TemporalInformationBlock:
    return TemporalInformationBlock.from_calibration(get_adapter("opensora-stdit3"), calibration)


def _quantize(
    model: torch.nn.Module, calibration: CalibrationSet, method: str, **tib: object
) -> QuantizedModel:
    recipe = method_recipe(method, 4, 8, FAST)
    if tib:
        recipe = recipe.model_copy(update={"tib": recipe.tib.model_copy(update=tib)})
    return tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)


@pytest.fixture(scope="module")
def qdiffusion(model: torch.nn.Module, calibration: CalibrationSet) -> QuantizedModel:
    return _quantize(model, calibration, "qdiffusion")


def _layer_errors(
    qmodel: QuantizedModel, model: torch.nn.Module, tib: TemporalInformationBlock
) -> dict[str, float]:
    """Each TIB layer's output (on its input in the quantized TIB) against the FP layer's output."""
    _, _, targets = tiar.capture_layer_io(model, tib, TIB_LAYERS)
    _, _, outputs = tiar.capture_layer_io(qmodel.model, tib, TIB_LAYERS, qmodel)
    return {name: float(relative_error(outputs[name], targets[name])) for name in TIB_LAYERS}


def test_qdiffusion_recipe_reconstructs_the_tib_layer_by_layer_and_nothing_else_does() -> None:
    for method in METHODS:
        cfg = method_recipe(method, 4, 8, FAST).tib
        assert cfg.layerwise_reconstruction == (method in ("qdiffusion", "qdiffusion-tib-layerwise"))
    cfg = method_recipe("qdiffusion", 4, 8, FAST).tib
    assert not (cfg.tiar or cfg.fsc or cfg.cache or cfg.select or cfg.keep_fp)
    assert cfg.iterations == FAST.tib.iterations  # same budget per layer as TIAR


def test_recipe_validation_of_layerwise_reconstruction() -> None:
    ok = parse_config(
        {
            "tib": {
                "layerwise_reconstruction": True,
                "tiar": False,
                "fsc": False,
                "cache": False,
                "select": False,
            }
        }
    )
    assert ok.tib.layerwise_reconstruction and not RecipeConfig().tib.layerwise_reconstruction
    with pytest.raises(ConfigError, match="tib.layerwise_reconstruction and tib.tiar are alternative"):
        parse_config({"tib": {"layerwise_reconstruction": True}})  # tiar defaults to on
    with pytest.raises(ConfigError, match="needs a quantized TIB"):
        parse_config({"tib": {"layerwise_reconstruction": True, "tiar": False, "keep_fp": True}})
    with pytest.raises(ConfigError, match="tib.layerwise_reconstruction"):
        parse_config({"tib": {"layerwise_reconstruction": "sometimes", "tiar": False}})
    with pytest.raises(ConfigError, match="tib.layerwise_reconstrucion"):
        parse_config({"tib": {"layerwise_reconstrucion": True, "tiar": False}})  # misspelled: extra key


def test_layerwise_reconstruction_lowers_every_tib_layer_output_error_against_rtn(
    qdiffusion: QuantizedModel,
    model: torch.nn.Module,
    calibration: CalibrationSet,
    tib: TemporalInformationBlock,
) -> None:
    rtn = _quantize(model, calibration, "rtn")
    rtn_errors = _layer_errors(rtn, model, tib)
    errors = _layer_errors(qdiffusion, model, tib)
    units = qdiffusion.report["temporal"]["tib_reconstruction"]["units"]
    assert list(units) == TIB_LAYERS  # execution order
    for name in TIB_LAYERS:
        assert errors[name] < rtn_errors[name], name
        assert units[name]["output_error"] == pytest.approx(errors[name], rel=1e-5)
        assert units[name]["output_error"] < units[name]["initial_error"], name  # vs its own round to nearest
        assert units[name]["last_loss"] < units[name]["first_loss"], name


def test_layerwise_reconstruction_lowers_temporal_feature_error_against_the_rtn_tib_baseline(
    qdiffusion: QuantizedModel,
    model: torch.nn.Module,
    calibration: CalibrationSet,
) -> None:
    old = _quantize(model, calibration, "qdiffusion", layerwise_reconstruction=False)  # TIB left at RTN
    assert "tib_reconstruction" not in old.report["temporal"]
    new_error = qdiffusion.report["temporal"]["temporal_feature_error"]
    assert new_error < 0.9 * old.report["temporal"]["temporal_feature_error"]
    assert qdiffusion.report["temporal"]["tib_reconstruction"]["seconds"] > 0
    fp = sample_tiny(model, seed=3)
    assert float((sample_tiny(qdiffusion, seed=3) - fp).pow(2).sum() / fp.pow(2).sum()) < 0.2


def test_qdiffusion_tib_has_one_static_activation_set_and_no_cache(qdiffusion: QuantizedModel) -> None:
    layers = qdiffusion.weight_layers("tib")
    assert [name for name, _ in layers] == TIB_LAYERS
    for name, layer in layers:
        assert layer.input_quant is not None and layer.input_quant.spec.mode == "static", name
        assert layer.input_quant.scale.numel() == 1 and layer.input_quant.zero_point.numel() == 1, name
        assert layer.weight_quant is not None and bool(layer.weight_quant.frozen), name
    assert qdiffusion.temporal_cache is None
    assert "choices" not in qdiffusion.report["temporal"] and "tiar_loss" not in qdiffusion.report["temporal"]


def test_one_function_two_objectives_with_the_tib_iteration_budget(
    model: torch.nn.Module,
    calibration: CalibrationSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int, int]] = []
    original = tiar.optimize_rounding

    def spy(layers, acts, loss_fn, schedule, description="", progress=False):  # type: ignore[no-untyped-def]
        calls.append((description, len(layers), schedule.iterations))
        return original(layers, acts, loss_fn, schedule, description, progress)

    monkeypatch.setattr(tiar, "optimize_rounding", spy)
    tiar_model = _quantize(model, calibration, "tfmq-tiar")
    tib_calls, calls[:] = list(calls), []
    _quantize(model, calibration, "qdiffusion")
    layer_calls = list(calls)
    # one joint unit, with the layer-wise total of steps: iterations per TIB layer
    assert tib_calls == [("TIAR", len(TIB_LAYERS), FAST.tib.iterations * len(TIB_LAYERS))]
    assert layer_calls == [(name, 1, FAST.tib.iterations) for name in TIB_LAYERS]  # one unit per layer
    report = tiar_model.report["temporal"]["tib_reconstruction"]
    assert report["objective"] == "temporal_features" and list(report["units"]) == ["TIAR"]
    assert "output_error" not in report["units"]["TIAR"]


def test_unknown_objective_is_rejected(
    qdiffusion: QuantizedModel, model: torch.nn.Module, tib: TemporalInformationBlock
) -> None:
    with pytest.raises(ValueError, match="unknown TIB objective"):
        tiar.reconstruct_tib(qdiffusion, model, tib, FAST.tib, "block_outputs")  # type: ignore[arg-type]
