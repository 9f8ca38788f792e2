"""Fidelity of quantized outputs against the FP outputs from the same seeds.

Per video pair (frames aligned by :func:`eval_video.io.align_pair`), then aggregated as the
mean over videos:

- **PSNR** (dB, peak 255) from the MSE over all frames and pixels; identical videos give +inf.
- **SSIM**: Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, per
  channel on [0, 255] values, averaged over channels and frames (the common Wang et al. setup).
- **relative L2**: ``|q - fp| / |fp|`` and **cosine** of the flattened signals, on pixels mapped
  to [-1, 1] (the model's pixel space), or on latents when both sides provide them.
- **ΔFlow**: mean end-point error between the optical flow of consecutive frames of the
  quantized and of the FP video (pixels; lower is better).
- **CLIPSIM** (mean frame-caption cosine) and **CLIP-Temp** (mean cosine of consecutive frames)
  from a local CLIP folder; they are properties of one video, reported for the quantized set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter

from eval_video.frame_models import FlowEstimator, check_model_folder, import_transformers
from eval_video.io import Video, VideoError, align_pair, pair_videos
from eval_video.results import MetricResult, skipped

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two uint8 videos of equal shape (+inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _ssim_image(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    """SSIM of two float64 (H, W) images."""
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM over frames and channels of two uint8 (T, H, W, 3) videos."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean([_ssim_image(a64[t, ..., c], b64[t, ..., c], peak)
                          for t in range(len(a)) for c in range(a.shape[-1])]))


def relative_l2(x: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """``|x - reference| / |reference|`` of the flattened arrays (float64)."""
    x64, r64 = (torch.as_tensor(np.asarray(v), dtype=torch.float64).flatten() for v in (x, reference))
    return float((x64 - r64).norm() / r64.norm().clamp_min(1e-12))


def cosine(x: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """Cosine similarity of the flattened arrays (float64)."""
    x64, r64 = (torch.as_tensor(np.asarray(v), dtype=torch.float64).flatten() for v in (x, reference))
    return float(F.cosine_similarity(x64, r64, dim=0))


def to_model_space(frames: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float64 in [-1, 1] (x / 127.5 - 1), where relative L2 and cosine are taken."""
    return frames.astype(np.float64) / 127.5 - 1.0


def delta_flow(a: np.ndarray, b: np.ndarray, flow: FlowEstimator) -> float:
    """Mean end-point error between the consecutive-frame flows of two aligned videos."""
    errors = [np.sqrt(((flow(a[i], a[i + 1]) - flow(b[i], b[i + 1])) ** 2).sum(-1)).mean() for i in range(len(a) - 1)]
    return float(np.mean(errors))


PairMetric = Callable[[np.ndarray, np.ndarray], float]


def pixel_metrics(flow: FlowEstimator | None = None) -> dict[str, tuple[PairMetric, bool]]:
    """Name -> (function of (quantized, FP) uint8 frames, higher_is_better)."""
    metrics: dict[str, tuple[PairMetric, bool]] = {
        "psnr": (psnr, True),
        "ssim": (ssim, True),
        "rel_l2_pixels": (lambda q, fp: relative_l2(to_model_space(q), to_model_space(fp)), False),
        "cosine_pixels": (lambda q, fp: cosine(to_model_space(q), to_model_space(fp)), True),
    }
    if flow is not None:
        metrics["delta_flow"] = (lambda q, fp: delta_flow(q, fp, flow), False)
    return metrics


def _aggregate(metric: str, per_video: dict[str, float], higher: bool, backbone: str = "none",
               proxy: bool = False, notes: Sequence[str] = ()) -> MetricResult:
    values = np.array(list(per_video.values()), dtype=np.float64)
    finite = values[np.isfinite(values)]
    notes = list(notes)
    if len(finite) < len(values):
        notes.append(f"{len(values) - len(finite)} identical pairs (infinite PSNR) left out of the mean")
    value = float(finite.mean()) if len(finite) else math.inf
    return MetricResult(metric, value, len(per_video), backbone, proxy, higher, per_video=per_video, notes=notes)


def fidelity(videos: Sequence[Video], fp_videos: Sequence[Video], flow: FlowEstimator | None = None,
             metrics: Sequence[str] | None = None) -> list[MetricResult]:
    """Pixel fidelity metrics of each video against its FP counterpart (paired by file name)."""
    table = pixel_metrics(flow)
    names = list(metrics) if metrics is not None else list(table)
    pairs = [align_pair(v, fp) for v, fp in pair_videos(videos, fp_videos)]
    results = []
    for name in names:
        function, higher = table[name]
        per_video = {v.name: function(q, fp) for v, (q, fp) in zip(videos, pairs, strict=True)}
        is_flow = name == "delta_flow" and flow is not None
        notes = [f"proxy: {flow.name} optical flow instead of RAFT"] if is_flow and flow.proxy else []
        results.append(_aggregate(name, per_video, higher, flow.name if is_flow else "none",
                                  bool(is_flow and flow.proxy), notes))
    return results


def latent_fidelity(latents: dict[str, torch.Tensor], fp_latents: dict[str, torch.Tensor]) -> list[MetricResult]:
    """Relative L2 and cosine of latents, paired by name."""
    missing = sorted(set(latents) ^ set(fp_latents))
    if missing:
        raise VideoError(f"latents and FP latents must share names; unmatched: {', '.join(missing[:10])}")
    rel = {k: relative_l2(latents[k], fp_latents[k]) for k in latents}
    cos = {k: cosine(latents[k], fp_latents[k]) for k in latents}
    return [_aggregate("rel_l2_latents", rel, False), _aggregate("cosine_latents", cos, True)]


def read_latents(folder: str | Path) -> dict[str, torch.Tensor]:
    """``<name>.safetensors`` files of a folder, each holding one tensor (the video's latent)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise VideoError(f"{folder}: no <name>.safetensors latent files")
    latents = {}
    for file in files:
        tensors = load_file(str(file))
        if len(tensors) != 1:
            raise VideoError(f"{file}: expected exactly one tensor (the latent), found {sorted(tensors)}")
        latents[file.stem] = next(iter(tensors.values()))
    return latents


class ClipScorer:
    """CLIPSIM and CLIP-Temp with a local transformers CLIP folder (ViT-B/32 is the convention)."""

    def __init__(self, folder: str | Path | None) -> None:
        folder = check_model_folder(folder, "a CLIP model (openai/clip-vit-base-patch32)", "--clip-b32")
        transformers = import_transformers()
        self.name = f"clip ({folder.name})"
        self.processor = transformers.CLIPProcessor.from_pretrained(folder)
        self.model = transformers.CLIPModel.from_pretrained(folder, use_safetensors=True).eval()

    @torch.no_grad()
    def image_features(self, frames: np.ndarray) -> torch.Tensor:
        """Unit-norm CLIP image embeddings per frame."""
        inputs = self.processor(images=list(frames), return_tensors="pt")
        return F.normalize(self.model.get_image_features(**inputs), dim=-1)

    @torch.no_grad()
    def clipsim(self, frames: np.ndarray, caption: str) -> float:
        """Mean cosine between each frame and the caption."""
        inputs = self.processor(text=[caption], return_tensors="pt", padding=True, truncation=True)
        text = F.normalize(self.model.get_text_features(**inputs), dim=-1)
        return float((self.image_features(frames) @ text.T).mean())

    def clip_temp(self, frames: np.ndarray) -> float:
        """Mean cosine between consecutive frames' embeddings."""
        features = self.image_features(frames)
        return float((features[1:] * features[:-1]).sum(-1).mean())


def clip_metrics(videos: Sequence[Video], scorer: ClipScorer, captions: dict[str, str] | None) -> list[MetricResult]:
    """CLIP-Temp for every video; CLIPSIM where a caption is known (else skipped, naming the file)."""
    temp = {v.name: scorer.clip_temp(v.frames) for v in videos}
    results = [_aggregate("clip_temp", temp, True, scorer.name)]
    if not captions:
        results.append(skipped("clipsim", "CLIPSIM needs captions: pass --prompts FILE.json ({video name: caption})"))
        return results
    sims = {v.name: scorer.clipsim(v.frames, captions[v.name]) for v in videos if v.name in captions}
    notes = [] if len(sims) == len(videos) else [f"{len(videos) - len(sims)} videos without a caption left out"]
    results.append(_aggregate("clipsim", sims, True, scorer.name, notes=notes))
    return results
