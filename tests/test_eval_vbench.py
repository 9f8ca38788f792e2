"""VBench-style dimensions: formulas on videos with known answers, normalization, skipping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval_video.frame_models import FarnebackFlow
from eval_video.io import Video
from eval_video.results import MetricResult
from eval_video.vbench_metrics import (
    VBenchModels,
    consistency_terms,
    is_dynamic,
    load_vbench_models,
    motion_smoothness,
    normalize,
    quality_score,
    run_vbench_package,
    temporal_flickering,
    vbench_dimension,
)
from tfmq_video.toy.data import make_clips


def moving_square(frames: int = 9, size: int = 64, speed: int = 3) -> np.ndarray:
    video = np.full((frames, size, size, 3), 40, np.uint8)
    for t in range(frames):
        x = 8 + speed * t
        video[t, 20:36, x:x + 16] = (220, 180, 60)
    return video


def noise_video(frames: int = 9, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_flickering_is_one_for_static_and_lower_for_noise() -> None:
    static = np.repeat(noise_video(1), 8, axis=0)
    assert temporal_flickering(static) == 1.0
    assert temporal_flickering(noise_video()) < 0.75


def test_flickering_formula() -> None:
    video = np.zeros((3, 4, 4, 3), np.uint8)
    video[1] = 51  # |diff| = 51 twice -> (255 - 51) / 255
    assert temporal_flickering(video) == pytest.approx((255 - 51) / 255)


def test_motion_smoothness_prefers_smooth_motion() -> None:
    flow = FarnebackFlow()
    smooth = motion_smoothness(moving_square(), flow)
    assert smooth > 0.98
    assert motion_smoothness(noise_video(), flow) < smooth - 0.2


def test_dynamic_degree_decision() -> None:
    flow = FarnebackFlow()
    assert is_dynamic(moving_square(frames=16), fps=8, flow=flow)
    assert not is_dynamic(np.repeat(moving_square()[:1], 16, axis=0), fps=8, flow=flow)


def test_consistency_terms() -> None:
    same = np.tile(np.array([[0.6, 0.8]]), (5, 1))
    assert consistency_terms(same) == pytest.approx((4.0, 4))
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert consistency_terms(opposite) == pytest.approx((0.0, 1))  # negative cosines clip to 0


def test_normalization_and_weights() -> None:
    assert normalize("temporal_flickering", 1.0) == pytest.approx(1.0)
    assert normalize("motion_smoothness", 0.706) == pytest.approx(0.0)
    results = [MetricResult("temporal_flickering", 0.6293, 1, "none", False, True),
               MetricResult("dynamic_degree", 1.0, 1, "flow", True, True)]
    score = quality_score(results)
    assert score.value == pytest.approx((0.0 * 1 + 1.0 * 0.5) / 1.5)
    assert score.proxy and "dynamic_degree" in " ".join(score.notes)


def test_missing_weights_are_skipped_with_the_file_to_provide() -> None:
    models = load_vbench_models(FarnebackFlow())
    videos = [Video(moving_square(), 8, "a.mp4")]
    for metric, flag in (("subject_consistency", "--dino"), ("background_consistency", "--clip-b32"),
                         ("aesthetic_quality", "--aesthetic-head")):
        result = vbench_dimension(metric, videos, models)
        assert result.value is None and flag in (result.skipped or ""), result.skipped


def test_toy_proxy_encoders_are_labelled() -> None:
    clips, _ = make_clips(0, 3)
    videos = [Video(c, 8, f"v{i}.mp4") for i, c in enumerate(clips)]
    models = load_vbench_models(FarnebackFlow(), proxy="toy")
    static = [Video(np.repeat(c[:1], 8, axis=0), 8, f"s{i}.mp4") for i, c in enumerate(clips)]
    for metric in ("subject_consistency", "aesthetic_quality", "motion_smoothness"):
        result = vbench_dimension(metric, videos, models)
        assert result.proxy and result.value is not None and 0.0 <= result.value <= 1.0
        assert result.n == 3 and set(result.per_video or {}) == {"v0", "v1", "v2"}
    assert vbench_dimension("subject_consistency", static, models).value == pytest.approx(1.0, abs=1e-6)


def test_unknown_dimension() -> None:
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        vbench_dimension("imaging", [], VBenchModels())


def test_vbench_package_bridge_skips_when_not_installed(tmp_path: Path) -> None:
    try:
        import vbench  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vbench is installed; the bridge would run it")
    results = run_vbench_package(tmp_path, tmp_path / "out", ["temporal_flickering"])
    assert results[0].value is None and "pip install vbench" in (results[0].skipped or "")
