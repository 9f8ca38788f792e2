"""Fidelity against FP: PSNR, SSIM, relative L2, cosine, ΔFlow, latents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval_video.fidelity import cosine, delta_flow, fidelity, latent_fidelity, psnr, relative_l2, ssim
from eval_video.frame_models import FarnebackFlow
from eval_video.io import Video, VideoError


def _video(seed: int, frames: int = 4, size: int = 32) -> np.ndarray:
    base = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3))
    drift = np.arange(frames)[:, None, None, None] * 4
    return np.clip(base + drift, 0, 255).astype(np.uint8)


def test_psnr_known_value_and_identity() -> None:
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a + 5
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, a) == math.inf


def test_ssim_identity_and_ordering() -> None:
    a = _video(0)
    rng = np.random.default_rng(1)
    light = np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 1.0 > ssim(a, light) > ssim(a, heavy)


def test_relative_l2_and_cosine() -> None:
    x = torch.tensor([3.0, 4.0])
    assert relative_l2(x * 1.1, x) == pytest.approx(0.1)
    assert cosine(x * 2, x) == pytest.approx(1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)


def test_delta_flow_zero_for_identical() -> None:
    a = _video(2, frames=3, size=48)
    assert delta_flow(a, a, FarnebackFlow()) == pytest.approx(0.0)


def test_fidelity_per_video_and_aggregate() -> None:
    fp = [Video(_video(i), 8, f"fp/v{i}.mp4") for i in range(3)]
    same = [Video(v.frames.copy(), 8, f"q/v{i}.mp4") for i, v in enumerate(fp)]
    results = {r.metric: r for r in fidelity(same, fp, FarnebackFlow())}
    assert results["psnr"].value == math.inf and results["psnr"].n == 3
    assert results["ssim"].value == pytest.approx(1.0)
    assert results["rel_l2_pixels"].value == pytest.approx(0.0)
    assert results["delta_flow"].proxy
    with pytest.raises(VideoError, match="no FP video named"):
        fidelity([Video(_video(0), 8, "q/other.mp4")] + same[1:], fp)


def test_latent_fidelity() -> None:
    fp = {"a": torch.ones(4), "b": torch.arange(4.0)}
    results = {r.metric: r for r in latent_fidelity({k: v * 1.5 for k, v in fp.items()}, fp)}
    assert results["rel_l2_latents"].value == pytest.approx(0.5)
    assert results["cosine_latents"].value == pytest.approx(1.0)
    with pytest.raises(VideoError, match="share names"):
        latent_fidelity({"a": torch.ones(4)}, fp)
