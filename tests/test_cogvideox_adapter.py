"""CogVideoX (a real diffusers ``CogVideoXTransformer3DModel``, tiny and random): per-block temporal
features, recording a pipeline-style sampling loop, calibration with every method, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import tfmq_video
from dit_adapters.cogvideox import CogVideoXAdapter
from dit_adapters.cogvideox.testing import (
    TINY_LATENT,
    TINY_TEXT,
    sample_tiny_cogvideox,
    tiny_cogvideox,
    tiny_rotary_tables,
)
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.calib.checkpoint import load_calibrated, save_calibrated
from tfmq_video.calib.recorder import CalibrationSet, record_calls
from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.quant.config import RecipeConfig, parse_config

FAST = RecipeConfig(progress=False, tib={"iterations": 60}, reconstruction={"iterations": 10, "batch_size": 2})
ADAPTER = CogVideoXAdapter()


@pytest.fixture(scope="module")
def cog() -> torch.nn.Module:
    return tiny_cogvideox()


@pytest.fixture(scope="module")
def cog_calibration(cog: torch.nn.Module) -> CalibrationSet:
    return record_calls(cog, ADAPTER.timestep_of, lambda: sample_tiny_cogvideox(cog))


@pytest.fixture(scope="module")
def quantized(cog: torch.nn.Module, cog_calibration: CalibrationSet) -> dict[str, tfmq_video.QuantizedModel]:
    return {method: tfmq_video.quantize(cog, "cogvideox", cog_calibration, method_recipe(method, 4, 8, FAST))
            for method in ("rtn", "qdiffusion", "viditq", "tfmq")}


def call_inputs(t: float, seed: int = 3, rotary: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": torch.randn(2, *TINY_LATENT, generator=generator),
              "encoder_hidden_states": torch.randn(2, *TINY_TEXT, generator=generator),
              "timestep": torch.full((2,), t), "return_dict": False}
    if rotary:
        inputs["image_rotary_emb"] = tiny_rotary_tables()
    return inputs


@pytest.mark.parametrize("rotary", [False, True])
def test_prepared_model_computes_what_diffusers_computes(rotary: bool) -> None:
    model = tiny_cogvideox(rotary=rotary)
    prepared = copy.deepcopy(model)
    ADAPTER.prepare(prepared)
    inputs = call_inputs(400.0, rotary=rotary)
    with torch.no_grad():
        expected, actual = model(**inputs)[0], prepared(**inputs)[0]
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert all(callable(prepared.get_submodule(site).attention) for site in ADAPTER.attention_sites(prepared))


def test_temporal_features_are_the_outputs_the_blocks_consume(cog: torch.nn.Module) -> None:
    seen: dict[str, torch.Tensor] = {}
    modules = ADAPTER.feature_modules(cog)
    handles = [cog.get_submodule(module).register_forward_hook(
        lambda _m, _i, out, feature=feature: seen.__setitem__(feature, out)) for feature, module in modules.items()]
    try:
        with torch.no_grad():
            cog(**call_inputs(250.0))
    finally:
        for handle in handles:
            handle.remove()
    features = ADAPTER.temporal_features(cog, torch.tensor([250.0]), {})
    assert set(features) == set(modules) == {"block0_norm1", "block0_norm2", "block1_norm1", "block1_norm2",
                                             "norm_out"}
    for name, value in features.items():
        assert torch.allclose(value[0], seen[name][0], atol=1e-6), name


def test_recording_a_keyword_calling_pipeline_loop(cog: torch.nn.Module, cog_calibration: CalibrationSet) -> None:
    # two sampling runs of 4 steps, each call carrying both guidance halves
    assert len(cog_calibration.timesteps) == 4 and len(cog_calibration.calls) == 8
    assert [call.step for call in cog_calibration.calls] == [0, 1, 2, 3] * 2
    assert cog_calibration.timesteps == sorted(cog_calibration.timesteps, reverse=True)
    first = cog_calibration.calls[0]
    assert first.args[0].shape == (2, *TINY_LATENT) and first.args[1].shape == (2, *TINY_TEXT)
    assert first.kwargs == {"return_dict": False}
    subset = record_calls(cog, ADAPTER.timestep_of, lambda: sample_tiny_cogvideox(cog), steps=[1, 3])
    assert subset.sampler_steps == [1, 3] and len(subset.calls) == 4
    with torch.no_grad():  # a recorded call replays the pipeline's call
        replay = cog(*first.args, **first.kwargs)[0]
        direct = cog(hidden_states=first.args[0], encoder_hidden_states=first.args[1], timestep=first.args[2],
                     return_dict=False)[0]
    assert torch.equal(replay, direct)


def test_every_adaln_linear_belongs_to_the_tib(quantized: dict) -> None:
    plans = quantized["tfmq"].plans
    for i in range(2):
        assert plans[f"transformer_blocks.{i}.norm1.linear"].role == "tib"
        assert plans[f"transformer_blocks.{i}.norm2.linear"].role == "tib"
        assert plans[f"transformer_blocks.{i}.attn1.to_q"].role == "block"
    assert plans["norm_out.linear"].role == "tib" and plans["time_embedding.linear_1"].role == "tib"
    assert plans["proj_out"].weight is None  # kept FP by the adapter
    model = quantized["tfmq"].model
    tib = sum(model.get_submodule(name).weight.numel() for name, plan in plans.items() if plan.role == "tib")
    total = sum(model.get_submodule(name).weight.numel() for name in plans)
    fp_only = model.get_submodule("proj_out").weight.numel()
    # ViDiT-Q keeps the TIB in FP: here that is most of the weights of every block
    assert quantized["viditq"].quantized_weight_fraction() == pytest.approx((total - tib - fp_only) / total)
    assert quantized["tfmq"].quantized_weight_fraction() == pytest.approx((total - fp_only) / total)
    assert tib / total > 0.3


def test_tfmq_has_the_lowest_temporal_feature_error(quantized: dict) -> None:
    errors = {method: q.report["temporal"]["temporal_feature_error"] for method, q in quantized.items()}
    assert errors["viditq"] == 0
    assert errors["tfmq"] < errors["qdiffusion"] < errors["rtn"], errors
    choices = quantized["tfmq"].report["temporal"]["choices"]
    assert set(choices) == set(ADAPTER.feature_modules(quantized["tfmq"].model))


def test_block_reconstruction_leaves_the_tib_layers_inside_blocks_alone(cog: torch.nn.Module,
                                                                        cog_calibration: CalibrationSet) -> None:
    """The per-block adaLN linears belong to the TIB: their rounding, activation steps and biases
    are TIAR's, so reconstructing the blocks around them must not move them."""
    recipe = method_recipe("tfmq", 4, 8, FAST.model_copy(update={"reconstruction": FAST.reconstruction.model_copy(
        update={"learn_act_scales": True, "bias_correction": True})}))
    without = recipe.model_copy(update={"reconstruction": recipe.reconstruction.model_copy(update={"enabled": False})})
    reconstructed = tfmq_video.quantize(cog, "cogvideox", cog_calibration, recipe)
    tib_only = tfmq_video.quantize(cog, "cogvideox", cog_calibration, without)
    tib_state = {name: value for name, value in tib_only.model.state_dict().items()
                 if ADAPTER.is_temporal(name.rsplit(".", 1)[0]) and ".norm" in name}
    assert tib_state
    after = reconstructed.model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in tib_state.items())
    blocks = [name for name in tib_only.model.state_dict() if ".attn1.to_q." in name]
    assert any(not torch.equal(after[name], tib_only.model.state_dict()[name]) for name in blocks)


def test_qdiffusion_calibrates_the_adaln_linears_inside_blocks_with_their_blocks(
        quantized: dict, cog: torch.nn.Module, cog_calibration: CalibrationSet) -> None:
    """BRECQ/Q-Diffusion know no TIB: a layer inside a block is reconstructed with that block, and
    the reported temporal-feature error is that of the finished model."""
    from tfmq_video.calib.tib import TemporalInformationBlock, feature_errors, mean_error

    qdiffusion = quantized["qdiffusion"]
    plans = qdiffusion.plans
    assert plans["transformer_blocks.0.norm1.linear"].role == "block"
    assert plans["transformer_blocks.0.norm1.linear"].activation.mode == "static"
    assert plans["time_embedding.linear_1"].role == "tib" and plans["norm_out.linear"].role == "tib"
    tib = TemporalInformationBlock.from_calibration(ADAPTER, cog_calibration, "cpu")
    with torch.no_grad():
        measured = mean_error(feature_errors(tib.features(qdiffusion.model, qdiffusion), tib.fp_features(cog)))
    assert qdiffusion.report["temporal"]["temporal_feature_error"] == pytest.approx(measured, rel=1e-9)
    recipe = method_recipe("qdiffusion", 4, 8, FAST)
    no_blocks = recipe.model_copy(update={"reconstruction": recipe.reconstruction.model_copy(update={"enabled": False})})
    unreconstructed = tfmq_video.quantize(cog, "cogvideox", cog_calibration, no_blocks).model.state_dict()
    adaln = [name for name in unreconstructed if ".norm1.linear.weight_quant." in name]
    assert adaln
    after = qdiffusion.model.state_dict()
    assert any(not torch.equal(after[name], unreconstructed[name]) for name in adaln)


def test_tib_only_studies_refuse_a_tib_calibrated_with_its_blocks(cog: torch.nn.Module) -> None:
    """``tools/compare_tib_strategies.py`` (and the swap study) quantize the TIB alone: the faithful
    Q-Diffusion has no TIB of its own on CogVideoX, so it is refused with the method to use."""
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "compare_tib_strategies.py"
    spec = importlib.util.spec_from_file_location("compare_tib_strategies", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ConfigError, match="qdiffusion-tib-layerwise"):
        module.only_tib_quantized(method_recipe("qdiffusion", 4, 8, FAST), cog, ADAPTER)
    recipe = module.only_tib_quantized(method_recipe("qdiffusion-tib-layerwise", 4, 8, FAST), cog, ADAPTER)
    assert "transformer_blocks.0.attn1.to_q" in recipe.quant.keep_fp
    assert "transformer_blocks.0.norm1.linear" not in recipe.quant.keep_fp


def test_in_block_layers_block_refuses_the_tib_remedies() -> None:
    with pytest.raises(ConfigError, match="in_block_layers"):
        parse_config({"tib": {"in_block_layers": "block"}})
    assert method_recipe("qdiffusion-tib-layerwise", 4, 8).tib.in_block_layers == "tib"


def test_blocks_run_alone_on_mixed_step_rows_use_each_rows_step(quantized: dict,
                                                                 cog_calibration: CalibrationSet) -> None:
    """Block reconstruction mixes steps in a minibatch: the per-block features (cache or per-step
    TIB quantizers) must follow each row's step, as in a model call at that step."""
    for method in ("tfmq", "qdiffusion"):
        qmodel = quantized[method]
        block = qmodel.model.get_submodule("transformer_blocks.1")
        calls = [cog_calibration.calls[0], cog_calibration.calls[3]]  # steps 0 and 3
        with torch.no_grad():
            batches = []
            for call in calls:
                qmodel.context.set_index(call.step)
                batch = ADAPTER.embed(qmodel.model, call.args, call.kwargs)
                batch.steps = torch.full((len(batch),), call.step)
                batches.append(batch)
            alone = [ADAPTER.run_block(block, batch) for batch in batches]  # scalar step still set to 3
            qmodel.context.set_index(calls[0].step)
            first_alone = ADAPTER.run_block(block, batches[0])
            mixed = type(batches[0]).concat(batches)
            qmodel.context.row_indices = mixed.steps
            try:
                together = ADAPTER.run_block(block, mixed)
            finally:
                qmodel.context.row_indices = None
        assert torch.allclose(together[:2], first_alone, atol=1e-5), method
        assert torch.allclose(together[2:], alone[1], atol=1e-5), method
        if method == "tfmq":  # per-step cache and FSC parameters: the step matters (Q-Diffusion has one set)
            assert not torch.allclose(first_alone, alone[0], atol=1e-5)


def test_checkpoint_round_trip(quantized: dict, tmp_path: Path) -> None:
    qmodel = quantized["tfmq"]
    save_calibrated(qmodel, tmp_path / "cal")
    loaded = load_calibrated(tmp_path / "cal")
    inputs = call_inputs(float(qmodel.context.timesteps[2]))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], qmodel(**inputs)[0])


def test_a_deep_copy_serves_its_own_cache(quantized: dict) -> None:
    qmodel = quantized["tfmq"]
    copied = copy.deepcopy(qmodel)
    inputs = call_inputs(float(qmodel.context.timesteps[1]))
    with torch.no_grad():
        before = qmodel(**inputs)[0]
        assert torch.equal(copied(**inputs)[0], before)
        copied.temporal_cache.block0_norm1_codes.zero_()
        changed = copied(**inputs)[0]
        assert torch.equal(qmodel(**inputs)[0], before)
    assert not torch.allclose(changed, before)


def test_export_to_the_integer_runtime_is_refused_clearly(quantized: dict, tmp_path: Path) -> None:
    from tfmq_video.export.calibrated import export_calibrated

    with pytest.raises(ConfigError, match="supports \\['opensora-stdit3'\\], not 'cogvideox'"):
        export_calibrated(quantized["tfmq"], tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_grafting_the_fp_tib_restores_the_fp_temporal_features(quantized: dict, cog: torch.nn.Module) -> None:
    from tfmq_video.calib.tib import graft_tib

    qmodel = quantized["tfmq"]
    grafted = graft_tib(qmodel, cog)
    timesteps = qmodel.context.timesteps.float()
    with torch.no_grad():
        fp = ADAPTER.temporal_features(cog, timesteps, {})
        served = ADAPTER.temporal_features(grafted.model, timesteps, {})
        quantized_features = ADAPTER.temporal_features(qmodel.model, timesteps, {})
    assert all(torch.equal(served[name], fp[name]) for name in fp)
    assert not torch.equal(quantized_features["block0_norm1"], fp["block0_norm1"])


def test_load_model_reads_diffusers_folders_with_safetensors_only(cog: torch.nn.Module, tmp_path: Path) -> None:
    # imported late: test_kernels_triton's interpreter switch must see triton unimported at collection
    from diffusers import CogVideoXTransformer3DModel

    cog.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = ADAPTER.load_model(str(tmp_path / "pipe"))
    assert isinstance(loaded, CogVideoXTransformer3DModel)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cog.state_dict().values(), strict=True))
    assert ADAPTER.model_config(ADAPTER.build_model(ADAPTER.model_config(cog))) == ADAPTER.model_config(cog)
    with pytest.raises(CheckpointError, match="no diffusers config.json"):
        ADAPTER.load_model(str(tmp_path))
    cog.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(CheckpointError, match="cannot load a CogVideoX transformer"):
        ADAPTER.load_model(str(tmp_path / "pickled"))


def test_ofs_models_are_refused() -> None:
    from dit_adapters.cogvideox.testing import TINY_COGVIDEOX

    with pytest.raises(ConfigError, match="ofs embedding"):
        ADAPTER.build_model({**TINY_COGVIDEOX, "ofs_embed_dim": 32})


def test_guided_reconstruction_combines_the_video_tokens(cog: torch.nn.Module, cog_calibration: CalibrationSet) -> None:
    """The pipeline batches (uncond, cond) halves: every call gives guidance pairs, and guidance
    combines the video tokens alone (the text halves are caption against null caption)."""
    from tfmq_video.calib.reconstruction import embed_calls, guidance_pairs

    pairs = guidance_pairs(cog_calibration)
    assert len(pairs) == sum(len(call.args[0]) for call in cog_calibration.calls) // 2
    rows = embed_calls(ADAPTER, cog, cog_calibration, None)
    text_length = cog_calibration.calls[0].args[1].shape[1]  # encoder_hidden_states (B, L, D)
    assert ADAPTER.prediction_tokens(rows) == slice(text_length, None)
    recipe = method_recipe("qdiffusion", 4, 8, FAST.model_copy(update={"reconstruction": FAST.reconstruction.model_copy(
        update={"guidance_scale": 4.0})}))
    qmodel = tfmq_video.quantize(cog, "cogvideox", cog_calibration, recipe)
    blocks = qmodel.report["reconstruction"]["blocks"]
    assert set(blocks) == set(ADAPTER.block_names(cog))
    assert all(0 < entry["guidance_difference_error"] < 10 for entry in blocks.values())
