"""VBench-style quality dimensions with VBench's formulas, normalization and weights.

Formulas (per video; the dimension is the mean over videos unless stated):

- **temporal flickering** (no model): ``(255 - mean_i mean|f_i - f_{i+1}|) / 255``.
- **motion smoothness**: the odd frames are re-created from the even ones by frame
  interpolation and compared: ``(255 - mean|f_odd - interp(f_even)|) / 255``. VBench
  interpolates with AMT-S; here a flow-based midpoint warp (RAFT or OpenCV Farnebäck) stands in
  and the result is labelled a proxy.
- **dynamic degree**: frames subsampled to about 8 fps; per consecutive pair the mean of the
  top 5 % flow magnitudes; a video is dynamic when at least ``round(4 * n / 16)`` pairs exceed
  ``6 * min(H, W) / 256`` pixels. The dimension is the fraction of dynamic videos.
- **subject / background consistency**: per frame ``i >= 1`` the mean of
  ``max(0, cos(f_i, f_{i-1}))`` and ``max(0, cos(f_i, f_0))`` on DINO ViT-B/16 (subject) or CLIP
  ViT-B/32 (background) features; the dimension is frame-weighted over all videos.
- **aesthetic quality**: LAION aesthetic head on CLIP ViT-L/14 embeddings / 10, mean over
  frames. The toy proxy is the toy classifier's mean top-class confidence.

Normalization: ``(x - Min) / (Max - Min)`` with VBench's per-dimension constants; the quality
score is the weighted mean (dynamic degree weighs 0.5) over the dimensions computed. VBench's
total, ``(4 quality + 1 semantic) / 5``, also needs semantic dimensions this module does not
compute, so only the (partial) quality score is reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from eval_video.frame_models import FlowEstimator, FrameEncoder, LaionAesthetic, ToyFrameEncoder, warp
from eval_video.io import Video
from eval_video.results import MetricResult, MissingWeightsError, skipped

logger = logging.getLogger(__name__)

# VBench's min-max normalization constants and dimension weights (quality dimensions).
NORMALIZE: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
}
DIM_WEIGHT: dict[str, float] = {name: 1.0 for name in NORMALIZE} | {"dynamic_degree": 0.5}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1
DIMENSIONS: tuple[str, ...] = ("subject_consistency", "background_consistency", "temporal_flickering",
                               "motion_smoothness", "dynamic_degree", "aesthetic_quality")
DYNAMIC_FPS = 8.0


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench temporal flickering of one video: 1 for a static video, lower as frames change."""
    if len(frames) < 2:
        raise ValueError("temporal flickering needs at least 2 frames")
    diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    return float((255.0 - diffs.mean()) / 255.0)


def interpolate_midpoint(a: np.ndarray, b: np.ndarray, flow: FlowEstimator) -> np.ndarray:
    """The frame halfway between ``a`` and ``b``: both warped half-way along the flow, averaged."""
    f = flow(a, b)  # b(x + f) ~ a(x)
    towards_a, towards_b = warp(a, -0.5 * f), warp(b, 0.5 * f)
    return ((towards_a.astype(np.float32) + towards_b.astype(np.float32)) / 2).round().astype(np.uint8)


def motion_smoothness(frames: np.ndarray, flow: FlowEstimator) -> float:
    """``(255 - mean|odd frames - frames interpolated from their even neighbours|) / 255``."""
    if len(frames) < 3:
        raise ValueError("motion smoothness needs at least 3 frames")
    errors = [np.abs(frames[i].astype(np.float32) - interpolate_midpoint(frames[i - 1], frames[i + 1], flow)).mean()
              for i in range(1, len(frames) - 1, 2)]
    return float((255.0 - np.mean(errors)) / 255.0)


def _top_flow_magnitude(flow: np.ndarray) -> float:
    magnitude = np.sqrt((flow**2).sum(axis=-1)).ravel()
    cut = max(1, int(magnitude.size * 0.05))
    return float(np.sort(magnitude)[-cut:].mean())


def is_dynamic(frames: np.ndarray, fps: float, flow: FlowEstimator) -> bool:
    """VBench's dynamic-degree decision for one video (subsampled to ~8 fps)."""
    sampled = frames[:: max(1, round(fps / DYNAMIC_FPS))]
    threshold = 6.0 * min(frames.shape[1:3]) / 256.0
    needed = round(4 * len(sampled) / 16.0)
    moving = sum(_top_flow_magnitude(flow(a, b)) > threshold for a, b in zip(sampled[:-1], sampled[1:], strict=True))
    return moving >= needed


def consistency_terms(features: np.ndarray) -> tuple[float, int]:
    """Sum over frames ``i >= 1`` of ``(max(0, cos_prev) + max(0, cos_first)) / 2``, and the count.

    ``features`` are unit-norm ``(T, D)``.
    """
    prev = np.clip((features[1:] * features[:-1]).sum(-1), 0, None)
    first = np.clip(features[1:] @ features[0], 0, None)
    return float(((prev + first) / 2).sum()), len(features) - 1


@dataclass
class VBenchModels:
    """The networks each dimension uses; None where the user gave neither weights nor a proxy."""

    flow: FlowEstimator | None = None
    subject: FrameEncoder | None = None
    background: FrameEncoder | None = None
    aesthetic: LaionAesthetic | ToyFrameEncoder | None = None
    missing: dict[str, str] | None = None  # dimension -> what to provide


def _build(missing: dict[str, str], dims: Sequence[str], factory: Callable[[], object]) -> object | None:
    try:
        return factory()
    except MissingWeightsError as err:
        for dim in dims:
            missing[dim] = str(err)
        return None


def load_vbench_models(flow: FlowEstimator, dino: str | Path | None = None, clip_b32: str | Path | None = None,
                       clip_l14: str | Path | None = None, aesthetic_head: str | Path | None = None,
                       proxy: str | None = None) -> VBenchModels:
    """Real encoders from local folders where given; else the ``proxy`` (``"toy"``) or nothing."""
    from eval_video.frame_models import HFImageEncoder

    missing: dict[str, str] = {}
    toy = ToyFrameEncoder() if proxy == "toy" else None

    def encoder(folder: str | Path | None, kind: str, flag: str) -> Callable[[], object]:
        return lambda: HFImageEncoder(folder, kind, flag) if folder is not None or toy is None else toy

    subject = _build(missing, ["subject_consistency"], encoder(dino, "dino", "--dino"))
    background = _build(missing, ["background_consistency"], encoder(clip_b32, "clip", "--clip-b32"))
    use_toy_aesthetic = clip_l14 is None and aesthetic_head is None and toy is not None
    aesthetic = toy if use_toy_aesthetic else _build(missing, ["aesthetic_quality"],
                                                    lambda: LaionAesthetic(clip_l14, aesthetic_head))
    return VBenchModels(flow, subject, background, aesthetic, missing)  # type: ignore[arg-type]


def _per_video(videos: Sequence[Video], score: Callable[[Video], float], desc: str, progress: bool) -> dict[str, float]:
    return {v.name: score(v) for v in tqdm(videos, desc=desc, unit="video", disable=not progress)}


def _mean_result(metric: str, values: dict[str, float], backbone: str, proxy: bool, notes: list[str]) -> MetricResult:
    return MetricResult(metric, float(np.mean(list(values.values()))), len(values), backbone, proxy, True,
                        per_video=values, notes=notes)


def _consistency(metric: str, videos: Sequence[Video], encoder: FrameEncoder, progress: bool) -> MetricResult:
    totals: dict[str, tuple[float, int]] = {}
    for video in tqdm(videos, desc=metric, unit="video", disable=not progress):
        totals[video.name] = consistency_terms(encoder.encode(video.frames).double().numpy())
    overall = sum(s for s, _ in totals.values()) / sum(c for _, c in totals.values())
    per_video = {name: s / c for name, (s, c) in totals.items()}
    proxy_note = ["proxy: the encoder is not the one VBench prescribes"] if encoder.proxy else []
    return MetricResult(metric, overall, len(videos), encoder.name, encoder.proxy, True, per_video=per_video,
                        notes=["frame-weighted mean over all videos (VBench)", *proxy_note])


def _aesthetic(videos: Sequence[Video], model: LaionAesthetic | ToyFrameEncoder, progress: bool) -> MetricResult:
    if isinstance(model, ToyFrameEncoder):
        values = _per_video(videos, lambda v: float(model.confidence(v.frames).mean()), "aesthetic (toy)", progress)
        return _mean_result("aesthetic_quality", values, "toy classifier confidence", True,
                            ["proxy: mean top-class confidence of the toy classifier, not the LAION aesthetic score"])
    values = _per_video(videos, lambda v: float(model.scores(v.frames).mean()), "aesthetic", progress)
    return _mean_result("aesthetic_quality", values, model.name, False, [])


def _flow_dimension(metric: str, videos: Sequence[Video], flow: FlowEstimator, progress: bool) -> MetricResult:
    note = [f"proxy: {flow.name} optical flow instead of "
            + ("AMT-S frame interpolation" if metric == "motion_smoothness" else "RAFT")] if flow.proxy else []
    if metric == "motion_smoothness":
        values = _per_video(videos, lambda v: motion_smoothness(v.frames, flow), metric, progress)
        return _mean_result(metric, values, flow.name, flow.proxy, note)
    values = _per_video(videos, lambda v: float(is_dynamic(v.frames, v.fps, flow)), metric, progress)
    return _mean_result(metric, values, flow.name, flow.proxy, ["fraction of videos judged dynamic", *note])


def vbench_dimension(metric: str, videos: Sequence[Video], models: VBenchModels, progress: bool = False) -> MetricResult:
    """One VBench-style dimension on a set of videos; skipped (with the reason) when its model is missing."""
    missing = (models.missing or {}).get(metric)
    if metric == "temporal_flickering":
        values = _per_video(videos, lambda v: temporal_flickering(v.frames), metric, progress)
        return _mean_result(metric, values, "none", False, ["VBench applies it to static-camera prompts"])
    if metric in ("motion_smoothness", "dynamic_degree") and models.flow is not None:
        return _flow_dimension(metric, videos, models.flow, progress)
    encoder = {"subject_consistency": models.subject, "background_consistency": models.background}.get(metric)
    if encoder is not None:
        return _consistency(metric, videos, encoder, progress)
    if metric == "aesthetic_quality" and models.aesthetic is not None:
        return _aesthetic(videos, models.aesthetic, progress)
    if metric not in DIMENSIONS:
        raise ValueError(f"unknown VBench dimension {metric!r}; expected one of {', '.join(DIMENSIONS)}")
    return skipped(metric, missing or f"{metric} needs model weights; see docs/evaluation.md")


def normalize(metric: str, value: float) -> float:
    """VBench's min-max normalization of one dimension."""
    low, high = NORMALIZE[metric]
    return (value - low) / (high - low)


def quality_score(results: Sequence[MetricResult]) -> MetricResult:
    """Weighted mean of the normalized quality dimensions that ran (VBench weights)."""
    usable = [r for r in results if r.metric in NORMALIZE and r.value is not None and math.isfinite(r.value)]
    if not usable:
        return skipped("vbench_quality", "no VBench quality dimension ran")
    weights = np.array([DIM_WEIGHT[r.metric] for r in usable])
    normalized = np.array([normalize(r.metric, r.value) for r in usable])  # type: ignore[arg-type]
    value = float((weights * normalized).sum() / weights.sum())
    proxies = [r.metric for r in usable if r.proxy]
    notes = [f"over {', '.join(r.metric for r in usable)} (VBench min-max normalization and weights)",
             "partial: VBench's total also needs imaging quality and the semantic dimensions"]
    if proxies:
        notes.append(f"includes proxy dimensions: {', '.join(proxies)}")
    backbones = sorted({r.backbone for r in usable})
    return MetricResult("vbench_quality", value, min(r.n for r in usable), "; ".join(backbones), bool(proxies), True,
                        notes=notes)


def run_vbench_package(videos_dir: str | Path, out_dir: str | Path, dimensions: Sequence[str],
                       device: str = "cpu") -> list[MetricResult]:
    """Run the ``vbench`` package itself on a folder (custom-input mode), when it is installed.

    Its models must already be cached where VBench looks for them (``~/.cache/vbench``); this
    bridge neither downloads nor edits anything. Returns one result per dimension (VBench's
    raw score, not normalized), or skipped results naming what is missing.
    """
    try:
        from vbench import VBench
    except ImportError:
        reason = "the vbench package is not installed (pip install vbench; it pins old transformers and numpy<2)"
        return [skipped(f"vbench:{d}", reason) for d in dimensions]
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = out_dir / "vbench_full_info.json"
    import torch

    bench = VBench(torch.device(device), str(info), str(out_dir))
    bench.evaluate(videos_path=str(videos_dir), name="tfmq_eval", dimension_list=list(dimensions),
                   local=True, mode="custom_input")  # local=True: use cached weights, no downloads
    raw = json.loads((out_dir / "tfmq_eval_eval_results.json").read_text())
    return [MetricResult(f"vbench:{d}", float(raw[d][0]), len(raw[d][1]), "vbench package", False, True)
            for d in dimensions if d in raw]
