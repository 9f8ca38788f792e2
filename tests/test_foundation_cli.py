"""The command line and the demo, run as a user runs them (real subprocess, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from eval_video.io import read_video
from tfmq_video.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfmq_video", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "calibrate", "bench", "eval"):
        assert command in result.stdout


def test_demo_writes_videos_strip_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--captions", "a red square moving left", "a blue circle moving up",
                     "--seeds", "3", "4", "--steps", "2", "--threads", "1", "--quantize", "none")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "demo.json").read_text())
    assert [v["seed"] for v in summary["videos"]] == [3, 4]
    for video in summary["videos"]:
        assert video["path"] in result.stdout
        frames = read_video(video["path"])
        assert frames.shape == (8, 32, 32, 3)
    assert (out / "fp_strip.png").stat().st_size > 0


def test_demo_rejects_unknown_words_before_work(tmp_path: Path, capsys) -> None:
    code = main(["demo", "--out", str(tmp_path), "--captions", "a purple square moving left"])
    assert code == 2
    assert "purple" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_demo_needs_one_seed_per_caption(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--captions", "a red square moving left", "--seeds", "1", "2"]) == 2
    assert "one per caption" in capsys.readouterr().err


def test_demo_calibrates_w4a8_and_compares_with_fp(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--captions", "a red square moving left", "a green circle moving up")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "demo.json").read_text())["w4a8"]
    assert Path(summary["checkpoint"]).is_dir()
    assert 0 <= summary["temporal_feature_error"] < 0.01
    report = json.loads((out / "report.json").read_text())
    assert "W4A8 TFMQ" in json.dumps(report) and Path(summary["report"]).is_file()
    for metric in ("fvd_fp", "psnr", "ssim", "temporal_flickering"):
        assert metric in json.dumps(report), metric
    for video in summary["videos"]:
        assert read_video(video["path"]).shape == (8, 32, 32, 3)
        assert Path(video["strip"]).stat().st_size > 0
        # W4A8 stays close to FP (the same seeds): far above the ~13 dB of an unrelated FP video.
        assert video["psnr_vs_fp"] > 18, video


def test_demo_without_opencv_says_so_before_work(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV not installed
    assert main(["demo", "--out", str(tmp_path / "demo"), "--captions", "a red square moving left"]) == 2
    assert "tfmq-video[flow]" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
