"""The toy world's model families: the toy CogVideoX's sampling and one-pass calibration, and the
quality table run on it through the ``cogvideox`` adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tfmq_video.errors import ConfigError
from tfmq_video.toy.families import TOY_FAMILY_NAMES, toy_family


def test_the_toy_cogvideox_tib_holds_about_cogvideox_2b_share_of_the_weights() -> None:
    from dit_adapters.base import get_adapter
    from tfmq_video.toy.cogvideox_world import build_toy_cogvideox

    model = build_toy_cogvideox()
    adapter = get_adapter("cogvideox")
    adapter.prepare(model)
    tib = set(adapter.temporal_module_names(model))
    weights = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                                             torch.nn.Conv2d))}
    share = sum(n for name, n in weights.items() if name in tib) / sum(weights.values())
    assert 0.15 < share < 0.3  # CogVideoX-2B: 21% (docs/results.md, session 14)
    assert any(name.endswith("norm1.linear") for name in tib) and "norm_out.linear" in tib


def test_toy_cogvideox_videos_depend_on_the_seed_not_on_the_batching() -> None:
    from tfmq_video.toy.cogvideox_world import build_toy_cogvideox, generate_cogvideox_latents

    model = build_toy_cogvideox()
    captions, seeds = ["a red square moving left", "a blue circle moving up"], [3, 4]
    together = generate_cogvideox_latents(model, captions, seeds, num_steps=3)
    alone = torch.cat([generate_cogvideox_latents(model, captions[i:i + 1], seeds[i:i + 1], num_steps=3)
                       for i in range(2)])
    assert together.shape == (2, 3, 8, 32, 32)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="one seed per caption"):
        generate_cogvideox_latents(model, captions, seeds[:1])


def test_cogvideox_calibration_records_the_requested_steps_in_one_pass() -> None:
    from dit_adapters.cogvideox.sampling import cogvideox_scheduler
    from tfmq_video.toy.cogvideox_world import TOY_COGVIDEOX_STEPS, build_toy_cogvideox

    model = build_toy_cogvideox()
    family = toy_family("cogvideox")
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    calibration = family.record(model, 3, 0, [0, 7, 19], 2, False)
    handle.remove()
    assert len(calls) == 2 * TOY_COGVIDEOX_STEPS  # two batches of prompts, one sampling pass each
    scheduler = cogvideox_scheduler()
    scheduler.set_timesteps(TOY_COGVIDEOX_STEPS)
    assert calibration.timesteps == [float(scheduler.timesteps[i]) for i in (0, 7, 19)]
    assert len(calibration.calls) == 6  # 3 steps x 2 batches
    rows = sum(call.args[0].shape[0] for call in calibration.calls)
    assert rows == 3 * 2 * 3  # 3 prompts, cond and uncond halves, 3 steps
    with pytest.raises(ConfigError, match="exceed the toy sampler's 20 steps"):
        family.record(model, 2, 0, [20], 2, False)


def test_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown toy family 'flux'"):
        toy_family("flux")
    assert TOY_FAMILY_NAMES == ("stdit3", "cogvideox")


def test_quality_table_runs_every_method_kind_on_a_cogvideox(tmp_path: Path) -> None:
    from tfmq_video.calib.quality import QualityPlan, quality_table
    from tfmq_video.quant.config import RecipeConfig, parse_config
    from tfmq_video.toy.cogvideox_world import build_toy_cogvideox

    build_toy_cogvideox(seed=1).save_pretrained(str(tmp_path / "model"), safe_serialization=True)
    raw = RecipeConfig().model_dump()
    raw["calibration"].update({"num_prompts": 2, "steps": [0, 10, 19], "max_rows": 8})
    raw["tib"]["iterations"] = 40
    raw["reconstruction"]["iterations"] = 4
    raw["progress"] = False
    plan = QualityPlan(("viditq", "tfmq"), ((4, 8),), num_videos=2, base=parse_config(raw, "(test)"),
                       model_path=str(tmp_path / "model"), family="cogvideox")
    rows, curves = quality_table(plan)
    assert [row["method"] for row in rows] == ["fp", "fp-reseed", "viditq", "tfmq"]
    assert {row["family"] for row in rows} == {"cogvideox"}
    by_method = {row["method"]: row for row in rows}
    assert by_method["fp"]["fvd_fp"] == pytest.approx(0.0, abs=1e-9)
    assert by_method["viditq"]["temporal_feature_error"] == 0.0  # TIB kept FP
    assert 0 < by_method["tfmq"]["temporal_feature_error"] < 1e-2
    assert by_method["viditq"]["quantized_weight_fraction"] < by_method["tfmq"]["quantized_weight_fraction"]
    assert len(curves["tfmq W4A8"]) == 3


def test_toy_prompts_need_a_family_with_a_toy_model_and_prompt_files_are_stdit3_only(tmp_path: Path) -> None:
    from tfmq_video.quant.config import RecipeConfig, parse_config
    from tfmq_video.toy.families import toy_family_of_adapter

    assert toy_family_of_adapter("opensora-stdit3").name == "stdit3"
    assert toy_family_of_adapter("cogvideox").name == "cogvideox"
    with pytest.raises(ConfigError, match="the toy world has no 'flux' model"):
        toy_family_of_adapter("flux")
    raw = RecipeConfig().model_dump()
    raw["model"] = {"adapter": "cogvideox", "path": "toy"}
    raw["calibration"].update({"prompts_file": str(tmp_path / "prompts.txt"),
                               "text_encoder": {"kind": "t5", "path": str(tmp_path / "t5")}})
    with pytest.raises(ConfigError, match="prompts_file is encoded with Open-Sora's T5 for opensora-stdit3 only"):
        parse_config(raw, "(test)")


def test_calibrate_command_runs_the_bundled_toy_cogvideox(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tfmq_video.calib.checkpoint import load_calibrated
    from tfmq_video.cli import main
    from tfmq_video.toy.cogvideox_world import caption_embeddings, load_toy_cogvideox

    config = tmp_path / "cog.yaml"
    config.write_text(
        "model: {adapter: cogvideox, path: toy}\n"
        "calibration: {num_prompts: 1, steps: [0, 10, 19], batch_size: 1}\n"
        "tib: {iterations: 20}\n"
        "reconstruction: {iterations: 3, batch_size: 2}\n"
    )
    assert main(["calibrate", str(config), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    assert '"quantized_weight_fraction"' in capsys.readouterr().out
    qmodel = load_calibrated(tmp_path / "ckpt")
    assert qmodel.adapter.name == "cogvideox" and len(qmodel.context) == 3
    fp = load_toy_cogvideox()
    inputs = dict(hidden_states=torch.randn(1, 8, 3, 32, 32), encoder_hidden_states=caption_embeddings(["a red square"]),
                  timestep=qmodel.context.timesteps[1:2].long(), return_dict=False)
    with torch.no_grad():
        quantized, reference = qmodel(**inputs)[0], fp(**inputs)[0]
    error = float((quantized - reference).norm() / reference.norm())
    assert 0 < error < 0.5
    assert main(["calibrate", str(config), "--out", str(tmp_path / "again"), "--no-progress",
                 "--export", str(tmp_path / "packed")]) == 2
    assert "integer runtime" in capsys.readouterr().err  # refused before any work: nothing written
    assert not (tmp_path / "packed").exists() and not (tmp_path / "again").exists()


def test_recording_from_a_prompts_file_is_refused_for_cogvideox(tmp_path: Path) -> None:
    from tfmq_video.calib.recorder import record_recipe_calibration
    from tfmq_video.quant.config import CalibrationConfig

    calibration = CalibrationConfig(prompts_file=str(tmp_path / "prompts.txt"),
                                    text_encoder={"kind": "t5", "path": str(tmp_path / "t5")})
    with pytest.raises(ConfigError, match="for opensora-stdit3 only, not for 'cogvideox'"):
        record_recipe_calibration(torch.nn.Linear(1, 1), calibration, adapter="cogvideox")
