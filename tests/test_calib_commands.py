"""The ``calibrate`` and ``bench quality`` commands: argument handling, errors, table helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tfmq_video.calib.quality import ROW_KEYS, markdown_table, per_step_error, seed_summary, summary_table
from tfmq_video.cli import main


def test_calibrate_with_an_invalid_config_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("quant:\n  weight:\n    bits: 12\n")
    out = tmp_path / "out"
    assert main(["calibrate", str(config), "--out", str(out)]) == 2
    assert "quant.weight.bits: unsupported bit width 12" in capsys.readouterr().err
    assert not out.exists()


def test_bench_quality_rejects_unknown_methods(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["bench", "quality", "--json", str(tmp_path / "q.json"), "--methods", "gptq"])
    assert code == 2
    assert "unknown methods ['gptq']" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


def test_markdown_table_has_every_key_and_formats_missing_values() -> None:
    rows = [{"method": "fp", "wbits": 32, "abits": 32, "fvd": 1.23456, "fvd_fp": 0.0, "psnr_fp": None,
             "temporal_feature_error": 0.0, "calib_seconds": 0.0, "quantized_weight_fraction": 0.0}]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| " + " | ".join(ROW_KEYS) + " |"
    assert "| fp | 32 | 32 | 1.235 | 0 | - |" in table[2]
    assert per_step_error({"t": [1.0, 3.0], "t_mlp": [3.0, 5.0]}) == [2.0, 4.0]


def test_seed_summary_gives_mean_and_spread_per_method_and_setting() -> None:
    rows = [{"method": "fp", "wbits": 32, "abits": 32, "fvd_fp": 0.0, "psnr_fp": None}]
    rows += [{"method": m, "wbits": 4, "abits": 8, "calib_seed": seed, "fvd_fp": v, "psnr_fp": p}
             for m, seed, v, p in (("rtn", 0, 1.0, 20.0), ("rtn", 1, 3.0, 22.0), ("tfmq", 0, 0.5, 30.0))]
    summary = seed_summary(rows, keys=("fvd_fp", "psnr_fp"))
    assert [(e["method"], e["seeds"]) for e in summary] == [("rtn", 2), ("tfmq", 1)]
    assert summary[0]["fvd_fp"] == 2.0 and summary[0]["fvd_fp_std"] == pytest.approx(2 ** 0.5)
    assert summary[1]["psnr_fp_std"] == 0.0
    assert "| rtn | 4 | 8 | 2 | 2 ± 1.4 | 21 ± 1.4 |" in summary_table(summary, keys=("fvd_fp", "psnr_fp"))


def test_bench_quality_rejects_repeated_seeds_and_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "quality", "--json", str(tmp_path / "q.json"), "--methods", "rtn"]
    assert main([*args, "--calib-seeds", "0", "0"]) == 2
    assert "repeats a seed" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path / "nowhere")]) == 2
    assert "not a stdit3 model folder" in capsys.readouterr().err
    assert main([*args, "--fp-reseeds", "0"]) == 2
    assert "--fp-reseeds must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


@pytest.mark.slow
def test_bench_quality_end_to_end_small(tmp_path: Path) -> None:
    import json

    out = tmp_path / "q.json"
    assert main(["bench", "quality", "--json", str(out), "--methods", "rtn", "--settings", "W8A8",
                 "--num-videos", "4", "--plot", str(tmp_path / "q.png"), "--calib-seeds", "0", "1",
                 "--fp-reseeds", "2"]) == 0
    record = json.loads(out.read_text())
    assert [(r["method"], r.get("calib_seed"), r.get("reseed")) for r in record["rows"]] == [
        ("fp", None, None), ("fp-reseed", None, 1), ("fp-reseed", None, 2), ("rtn", 0, None), ("rtn", 1, None)]
    fvds = [r["fvd"] for r in record["rows"][:3]]
    floor = record["fp_noise_floor"]
    assert floor["seed_sets"] == 3 and floor["fvd"] == pytest.approx(sum(fvds) / 3)
    assert floor["fvd_std"] > 0 and floor["fvd_fp"] > 0  # other seeds: other videos
    assert [(e["method"], e["seeds"]) for e in record["seed_summary"]] == [("rtn", 2)]
    # the recipe's weight granularity travels with its rows (the default toy recipe: per channel)
    assert {(r["weight_group_size"], r["integer_group_scales"]) for r in record["rows"][3:]} == {(None, False)}
    assert (tmp_path / "q.png").is_file()
    assert record["rows"][0]["label_flips_fp"] == 0.0  # FP against itself
    assert all(r["label_flips_fp"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in record["rows"])  # shares of 4 videos


def test_fp_videos_are_cached_by_model_and_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tfmq_video.calib.quality import ToyEvaluator
    from tfmq_video.toy.world import load_toy_stdit3

    model = load_toy_stdit3()
    evaluator = ToyEvaluator(2, seed=0)
    sampled = []
    generate = evaluator.generate
    monkeypatch.setattr(evaluator, "generate", lambda *args: sampled.append(args[1]) or generate(*args))

    first = evaluator.generate_fp(model, 0, str(tmp_path))
    assert sampled == [0] and len(list(tmp_path.glob("fp_*.safetensors"))) == 1
    again = evaluator.generate_fp(model, 0, str(tmp_path))
    assert sampled == [0]  # read from the cache, not sampled again
    assert torch.equal(first, again)
    evaluator.generate_fp(model, 1, str(tmp_path))
    assert sampled == [0, 1] and len(list(tmp_path.glob("fp_*.safetensors"))) == 2
    evaluator.generate_fp(model, 2, str(tmp_path))  # a second re-seeded set: its own file
    assert sampled == [0, 1, 2] and len(list(tmp_path.glob("fp_*.safetensors"))) == 3
    seed_sets = [set(evaluator.seeds_for(k)) for k in range(3)]
    assert all(not (a & b) for i, a in enumerate(seed_sets) for b in seed_sets[i + 1:])
    assert evaluator.seeds_for(True) == evaluator.seeds_for(1)  # keys of caches written before stay valid
    key = evaluator.cache_key(model, False)
    with torch.no_grad():
        model.final_layer.linear.bias.add_(1e-3)
    assert evaluator.cache_key(model, False) != key  # other weights: other videos
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_block_output_errors_lists_every_reconstructed_unit() -> None:
    from tfmq_video.calib.quality import block_output_errors

    report = {"reconstruction": {"blocks": {"blocks.0": {"output_error": 0.1}, "head": {"output_error": 0.2}}}}
    assert block_output_errors(report) == {"blocks.0": 0.1, "head": 0.2}
    assert block_output_errors({"reconstruction": {}}) == {}


def test_label_flips_count_videos_the_classifier_reads_otherwise() -> None:
    import numpy as np

    from tfmq_video.calib.quality import ToyEvaluator
    from tfmq_video.toy.data import clips_to_tensor, make_clips

    evaluator = ToyEvaluator(2, seed=0)
    clips, _ = make_clips(3, 6)
    videos = clips_to_tensor(clips)
    feats = evaluator.features(videos)
    read = evaluator.labels(feats)
    assert read.shape == (6, 3)
    assert evaluator.score(videos, videos, feats)["label_flips_fp"] == 0.0
    flipped = videos.flip(-1)  # mirrored left-right: a left/right moving clip now moves the other way
    expected = float(np.mean(np.any(evaluator.labels(evaluator.features(flipped)) != read, axis=1)))
    assert expected > 0
    scores = evaluator.score(flipped, videos, feats)
    assert scores["label_flips_fp"] == pytest.approx(expected)
    flipped_read = evaluator.labels(evaluator.features(flipped))
    for i, head in enumerate(("shape", "color", "direction")):
        assert scores[f"label_flips_fp_{head}"] == pytest.approx(float(np.mean(flipped_read[:, i] != read[:, i])))
    assert scores["label_flips_fp_direction"] > 0  # mirroring reverses left/right motion
    assert evaluator.score(videos, videos, feats)["mean_term_share_flipped"] == 0.0


def test_mean_shift_share_splits_the_mean_term_over_videos() -> None:
    import numpy as np

    from tfmq_video.calib.quality import mean_shift_share

    reference = np.random.default_rng(0).normal(size=(4, 3))
    moved = reference.copy()
    moved[1] += [2.0, 0.0, 0.0]  # only video 1 moves: it carries the whole shift
    everyone = np.ones(4, dtype=bool)
    only = np.array([False, True, False, False])
    assert mean_shift_share(moved, reference, only) == pytest.approx(1.0)
    assert mean_shift_share(moved, reference, ~only) == pytest.approx(0.0)
    moved[2] += [-1.0, 0.0, 0.0]  # video 2 moves against the common shift: a negative part
    assert mean_shift_share(moved, reference, only) == pytest.approx(2.0)
    assert mean_shift_share(moved, reference, np.array([False, False, True, False])) == pytest.approx(-1.0)
    assert mean_shift_share(moved, reference, everyone) == pytest.approx(1.0)
    assert mean_shift_share(reference, reference, everyone) == 0.0


def test_paired_feature_error_is_zero_for_identical_and_about_two_for_independent_sets() -> None:
    import numpy as np

    from tfmq_video.calib.quality import paired_feature_error

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4000, 8))
    assert paired_feature_error(reference, reference) == 0.0
    assert paired_feature_error(rng.normal(size=(4000, 8)), reference) == pytest.approx(2.0, rel=0.05)
    assert paired_feature_error(reference + 0.1, reference) == pytest.approx(8 * 0.1**2 / 8, rel=0.1)  # shift^2 summed over 8 dims / spread 8


def test_flip_anatomy_splits_the_mean_term_and_names_the_flips(tmp_path: Path) -> None:
    """``tools/flip_anatomy.py``: per-video parts sum to 1, the flipped videos are the ones the
    classifier reads otherwise, the transitions name them, and the strip is a real PNG."""
    import importlib.util

    import numpy as np
    from PIL import Image

    from tfmq_video.calib.quality import ToyEvaluator, mean_shift_share, mean_term_parts
    from tfmq_video.toy.data import clips_to_tensor, make_clips

    tool = Path(__file__).resolve().parents[1] / "tools" / "flip_anatomy.py"
    spec = importlib.util.spec_from_file_location("flip_anatomy", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    evaluator = ToyEvaluator(6, seed=0)
    clips, _ = make_clips(3, 6)
    fp = clips_to_tensor(clips)
    quantized = fp.clone()
    quantized[:3] = fp[:3].flip(-1)  # mirror three videos: left/right motion reverses
    fp_feats, feats = evaluator.features(fp), evaluator.features(quantized)
    result = module.anatomy(evaluator, feats, fp_feats, top=4)
    differs = evaluator.labels(feats) != evaluator.labels(fp_feats)
    flipped = differs.any(axis=1)
    assert result["flips"] == int(flipped.sum()) > 0
    assert sum(result["flips_by_head"].values()) == int(differs.sum()) == sum(result["transitions"].values())
    assert all(" -> " in name for name in result["transitions"])
    assert mean_term_parts(feats, fp_feats).sum() == pytest.approx(1.0)
    assert result["mean_term_share_flipped"] == pytest.approx(mean_shift_share(feats, fp_feats, flipped))
    assert len(result["top_videos"]) == 4
    parts = [video["mean_term_part"] for video in result["top_videos"]]
    assert parts == sorted(parts, reverse=True)
    asked = module.caption_labels(evaluator.captions)
    assert result["caption_match"] == pytest.approx(np.mean(np.all(evaluator.labels(feats) == asked, axis=1)))
    strip = module.write_strip(tmp_path / "s.png", quantized, fp, result["top_videos"], "W4A8")
    with Image.open(strip) as image:
        assert image.size[1] > 8 * 64  # two rows per listed video, each at least 64 pixels high
    with pytest.raises(Exception, match="METHOD:SEED"):
        module.parse_run("nomethod:1")
    assert module.parse_run("tfmq:5") == ("tfmq", 5)


def test_guidance_error_study_measures_what_guidance_amplifies() -> None:
    """``tools/guidance_error_study.py``: an error shared by both halves leaves the difference exact
    and is not amplified; an error in one half is multiplied by the scale in the guided output."""
    import importlib.util

    import torch

    tool = Path(__file__).resolve().parents[1] / "tools" / "guidance_error_study.py"
    spec = importlib.util.spec_from_file_location("guidance_error_study", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fp = torch.stack([torch.ones(8), torch.ones(8) * 1.5])  # uncond, cond: difference energy 0.25 / 2.25 of cond
    shared = module.guidance_errors(fp + 0.1, fp, scale=4.0)
    assert shared["difference"] == 0.0 and shared["difference_energy"] == pytest.approx(0.25 / 2.25)
    assert shared["guided"] == pytest.approx(0.01 / 3.0**2)  # guided FP output: 1 + 4 * 0.5 = 3
    one_half = fp.clone()
    one_half[1] += 0.1  # only cond is off: the guided output is off by 4 * 0.1
    errors = module.guidance_errors(one_half, fp, scale=4.0)
    assert errors["uncond"] == 0.0 and errors["cond"] == pytest.approx(0.01 / 1.5**2)
    assert errors["difference"] == pytest.approx(0.01 / 0.5**2) and errors["guided"] == pytest.approx(0.16 / 9.0)
    assert module.parse_run("tfmq:3:4") == ("tfmq", 3, 4.0)
    with pytest.raises(Exception, match="METHOD:SEED:GUIDANCE_SCALE"):
        module.parse_run("tfmq:3")
