"""``tfmq-video eval`` end to end on toy videos: JSON fields, readable reports, skips and errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from eval_video import command
from eval_video.frame_models import opencv_missing
from eval_video.io import VideoError, write_video
from tfmq_video.errors import ConfigError
from tfmq_video.toy.data import make_clips

N = 12


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    fp, _ = make_clips(1, N)
    reference, _ = make_clips(2, N)
    noisy = np.clip(fp + np.random.default_rng(0).normal(0, 30, fp.shape), 0, 255).astype(np.uint8)
    for i in range(N):
        write_video(root / "reference" / f"v{i:02d}", reference[i])
        write_video(root / "fp" / f"v{i:02d}", fp[i])
        write_video(root / "w8a8" / f"v{i:02d}", fp[i])
        write_video(root / "w4a8" / f"v{i:02d}.gif", noisy[i])  # any tool's format
    (root / "empty").mkdir()
    return root


def _base(root: Path) -> list[str]:
    return ["--videos", str(root / "w8a8"), str(root / "w4a8"), "--reference", str(root / "reference"),
            "--fp", str(root / "fp"), "--fvd-backbone", "toy", "--no-progress"]


@pytest.mark.filterwarnings("ignore::eval_video.frechet.SmallSampleWarning")
def test_full_run_writes_json_markdown_plots_and_strips(folders: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report" / "eval.json"
    argv = _base(folders) + ["--frame-proxy", "toy", "--metrics", "fvd,fvd_fp", "fidelity", "vbench", "clip",
                             "latents", "--feature-cache", str(tmp_path / "cache"), "--strips", "2", "--out", str(out)]
    assert command.run(_parse(argv)) == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"w8a8", "w4a8"}
    by_metric = {label: {r["metric"]: r for r in results} for label, results in report["methods"].items()}
    for results in by_metric.values():
        for entry in results.values():
            assert {"metric", "value", "n", "backbone", "proxy", "skipped"} <= set(entry)
    w8, w4 = by_metric["w8a8"], by_metric["w4a8"]
    assert w8["fvd_fp"]["value"] == pytest.approx(0.0, abs=1e-6) and w4["fvd_fp"]["value"] > 0.01
    assert w8["fvd"]["n"] == N and w8["fvd"]["proxy"] and "toy" in w8["fvd"]["backbone"]
    assert w8["psnr"]["value"] == "inf" and w4["psnr"]["value"] < 35
    assert w4["ssim"]["value"] < w8["ssim"]["value"] == pytest.approx(1.0)
    assert w4["temporal_flickering"]["value"] < w8["temporal_flickering"]["value"]
    assert not w8["temporal_flickering"]["proxy"] and w8["subject_consistency"]["proxy"]
    assert w8["clip_temp"]["value"] is None and "--clip-b32" in w8["clip_temp"]["skipped"]
    assert "--latents" in w8["rel_l2_latents"]["skipped"]
    assert report["settings"]["fvd_backbone"] == "toy"
    markdown = out.with_suffix(".md").read_text()
    assert "| fvd |" in markdown and "metrics.png" in markdown and "per_video.png" in markdown
    assets = out.parent / "eval_files"
    assert (assets / "metrics.png").stat().st_size > 0 and len(list((assets / "strips" / "w4a8").glob("*.png"))) == 2
    assert "w4a8" in capsys.readouterr().out


def test_html_report_and_skips_without_inputs(folders: Path, tmp_path: Path) -> None:
    out, html = tmp_path / "eval.json", tmp_path / "eval.html"
    argv = ["--videos", str(folders / "w8a8"), "--metrics", "fvd", "psnr", "temporal_flickering",
            "--no-progress", "--out", str(out), "--report", str(html)]
    assert command.run(_parse(argv)) == 0
    results = {r["metric"]: r for r in json.loads(out.read_text())["methods"]["w8a8"]}
    assert "--reference" in results["fvd"]["skipped"] and "--fp" in results["psnr"]["skipped"]
    assert results["temporal_flickering"]["value"] > 0.9
    assert html.read_text().startswith("<!doctype html>")


def test_bad_input_errors_name_the_problem(folders: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "e.json")]
    with pytest.raises(VideoError, match="empty"):
        command.run(_parse(["--videos", str(folders / "empty"), "--metrics", "temporal_flickering", *out]))
    no_backbone = [a for a in _base(folders) if a not in ("--fvd-backbone", "toy")]
    with pytest.raises(ConfigError, match="--fvd-backbone"):
        command.run(_parse([*no_backbone, "--metrics", "fvd", *out]))
    with pytest.raises(ConfigError, match="unknown metric"):
        command.run(_parse([*_base(folders), "--metrics", "fvd,imaging", *out]))
    fewer = tmp_path / "fewer"
    write_video(fewer / "v00", make_clips(1, 1)[0][0])
    with pytest.raises(VideoError, match="got 12 videos but 1 FP"):
        command.run(_parse(["--videos", str(folders / "w8a8"), "--fp", str(fewer), "--fvd-backbone", "toy",
                            "--metrics", "fvd_fp", "--no-progress", *out]))


def test_flow_metrics_without_opencv_fail_before_any_work(folders: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # what `import cv2` sees where OpenCV is not installed
    out = tmp_path / "e.json"
    with pytest.raises(ConfigError, match=r"OpenCV: pip install 'tfmq-video\[flow\]'"):
        command.run(_parse([*_base(folders), "--metrics", "delta_flow", "--out", str(out)]))
    assert not out.exists()
    command.run(_parse([*_base(folders), "--metrics", "psnr", "--out", str(out)]))  # other metrics still run
    assert json.loads(out.read_text())
    # with RAFT only motion_smoothness (its warp) still needs OpenCV
    assert opencv_missing(["delta_flow", "dynamic_degree"], raft=True) is None
    reason = opencv_missing(["delta_flow", "motion_smoothness"], raft=True)
    assert reason is not None and "motion_smoothness need OpenCV" in reason
    assert "delta_flow, motion_smoothness" in str(opencv_missing(["delta_flow", "motion_smoothness"], raft=False))
