"""Video feature extractors for FVD (I3D, or the toy classifier as a labelled proxy) and their cache.

A backbone maps clips of exactly ``num_frames`` frames to one feature vector each. Which one
runs is always the caller's explicit choice (``--fvd-backbone i3d|toy``); nothing falls back
from one to the other, and every result names the backbone via :meth:`VideoBackbone.describe`.

Clip policy (see :mod:`eval_video.io`): one clip per video, its first ``num_frames`` frames; a
shorter video is an error unless ``pad_short`` repeats its last frame. Frames are resized
(bilinear) to the backbone's input size, so videos of any size can be compared.

The cache stores the features of a set of video files once per (backbone weights, clip
settings, file contents): a reference set is encoded once and reused by later runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from eval_video._files import atomic_path, file_sha256, path_sha256
from eval_video.i3d import I3D_NUM_FRAMES, I3DConfig, load_i3d, preprocess_clips
from eval_video.io import Video, VideoError, load_video

logger = logging.getLogger(__name__)


class VideoBackbone(ABC):
    """Clips (uint8 ``(T, H, W, 3)``, ``T == num_frames``) -> ``(N, dim)`` float64 features."""

    name: str
    num_frames: int
    input_size: int
    dim: int
    proxy: bool

    @abstractmethod
    def describe(self) -> str:
        """What the reports print: the backbone and its weights."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the features could change (weights, settings)."""

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (N, 3, T, S, S) in [-1, 1] -> (N, dim)."""

    @torch.no_grad()
    def encode(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Features of a batch of clips (sizes may differ; each is resized on its own)."""
        x = torch.cat([preprocess_clips(clip[None], self.input_size) for clip in clips])
        return self._forward(x).double().numpy()


class ToyBackbone(VideoBackbone):
    """The toy classifier's 128-d penultimate features (8 frames at 32x32): a proxy for I3D."""

    name = "toy"
    proxy = True

    def __init__(self, folder: str | Path | None = None) -> None:
        from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES
        from tfmq_video.toy.world import TOY_CLASSIFIER_DIR, load_toy_classifier

        self.folder = Path(folder or TOY_CLASSIFIER_DIR)
        self.model = load_toy_classifier(self.folder)
        self.num_frames, self.input_size = NUM_FRAMES, FRAME_SIZE
        self.dim = self.model.config.feature_dim

    def describe(self) -> str:
        """Names the toy classifier folder; the value is not comparable with I3D FVD."""
        return f"toy classifier features ({self.dim}-d, {self.num_frames}x{self.input_size}x{self.input_size}; " \
               f"{self.folder.name}) - proxy, not comparable with I3D FVD"

    def fingerprint(self) -> str:
        """Hash of the classifier folder."""
        return f"toy:{path_sha256(self.folder)}"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class I3DBackbone(VideoBackbone):
    """I3D Kinetics-400 logits averaged over time (16 frames at 224x224): the standard FVD space."""

    name = "i3d"
    proxy = False
    num_frames = I3D_NUM_FRAMES
    input_size = 224

    def __init__(self, weights: str | Path, config: I3DConfig | None = None, device: str = "cpu") -> None:
        self.weights = Path(weights)
        self.config = config or I3DConfig()
        self.device = torch.device(device)
        self.model = load_i3d(self.weights, self.config).to(self.device)
        self.dim = self.config.num_classes
        self._sha: str | None = None

    def describe(self) -> str:
        """Names the weights file and the BatchNorm epsilon."""
        form = "state dict" if self.weights.suffix == ".safetensors" else "TorchScript"
        eps = f", BatchNorm eps {self.config.bn_eps:g}" if form == "state dict" else ""
        return f"i3d Kinetics-400 logits ({self.dim}-d, {self.num_frames}x224x224; {self.weights.name}, {form}{eps})"

    def fingerprint(self) -> str:
        """Hash of the weights file plus the BatchNorm epsilon."""
        if self._sha is None:
            self._sha = file_sha256(self.weights)
        return f"i3d:{self._sha}:eps={self.config.bn_eps:g}"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).float().cpu()


def make_backbone(kind: str, i3d_weights: str | Path | None = None, bn_eps: float = 1e-3,
                  device: str = "cpu") -> VideoBackbone:
    """The backbone the user named; ``i3d`` without weights is an error, never a silent swap."""
    if kind == "toy":
        return ToyBackbone()
    if kind == "i3d":
        if i3d_weights is None:
            from tfmq_video.errors import ConfigError

            raise ConfigError("--fvd-backbone i3d needs --i3d-weights FILE (a pytorch-i3d state dict in "
                              "safetensors, or StyleGAN-V's i3d_torchscript.pt); or choose --fvd-backbone toy")
        return I3DBackbone(i3d_weights, I3DConfig(bn_eps=bn_eps), device)
    raise ValueError(f"unknown FVD backbone {kind!r}; expected 'i3d' or 'toy'")


def select_clip(video: Video, num_frames: int, pad_short: bool = False) -> tuple[np.ndarray, bool]:
    """The clip FVD encodes: the first ``num_frames`` frames, and whether it had to be padded."""
    frames = video.frames
    if len(frames) >= num_frames:
        return frames[:num_frames], False
    if not pad_short:
        raise VideoError(f"{video.source} has {len(frames)} frames but the FVD backbone needs {num_frames}; "
                         "use longer videos or pass --pad-short to repeat the last frame")
    padding = np.repeat(frames[-1:], num_frames - len(frames), axis=0)
    return np.concatenate([frames, padding]), True


@dataclass
class EncodedSet:
    """Features of a set of videos: ``(N, dim)`` float64, their names and how many were padded."""

    features: np.ndarray
    names: list[str]
    padded: int = 0
    from_cache: bool = False


def encode_videos(backbone: VideoBackbone, videos: Sequence[Video], pad_short: bool = False,
                  batch_size: int = 8, progress: bool = False, desc: str = "encoding") -> EncodedSet:
    """Encode decoded videos in batches (no cache)."""
    if not videos:
        raise VideoError("no videos to encode")
    selected = [select_clip(v, backbone.num_frames, pad_short) for v in videos]
    chunks = []
    for start in tqdm(range(0, len(selected), batch_size), desc=f"{desc} ({backbone.name})", unit="batch",
                      disable=not progress):
        chunks.append(backbone.encode([clip for clip, _ in selected[start:start + batch_size]]))
    padded = sum(flag for _, flag in selected)
    return EncodedSet(np.concatenate(chunks), [v.name for v in videos], padded)


class FeatureCache:
    """Features of video-file sets on disk, one safetensors file per (backbone, settings, files)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def key(self, backbone: VideoBackbone, paths: Sequence[Path], pad_short: bool) -> str:
        """Hash of the backbone fingerprint, the clip settings and every file's content."""
        digest = hashlib.sha256(f"{backbone.fingerprint()}|frames={backbone.num_frames}|pad={pad_short}".encode())
        for path in paths:
            digest.update(f"|{path.stem}:{path_sha256(path)}".encode())
        return digest.hexdigest()

    def load(self, key: str) -> tuple[np.ndarray, int] | None:
        """Cached features and their padded-video count, or None."""
        file = self.root / f"{key}.safetensors"
        if not file.is_file():
            return None
        with safe_open(str(file), framework="pt") as handle:
            padded = int((handle.metadata() or {}).get("padded", "0"))
            return handle.get_tensor("features").numpy(), padded

    def save(self, key: str, features: np.ndarray, padded: int) -> Path:
        """Store features atomically."""
        file = self.root / f"{key}.safetensors"
        with atomic_path(file) as tmp:
            save_file({"features": torch.from_numpy(np.ascontiguousarray(features))}, str(tmp),
                      metadata={"padded": str(padded)})
        return file


def encode_paths(backbone: VideoBackbone, paths: Sequence[Path], cache: FeatureCache | None = None,
                 pad_short: bool = False, batch_size: int = 8, progress: bool = False,
                 desc: str = "encoding") -> EncodedSet:
    """Encode video files, reading them only when the cache does not hold their features."""
    paths = [Path(p) for p in paths]
    names = [p.stem for p in paths]
    key = cache.key(backbone, paths, pad_short) if cache is not None else None
    if cache is not None and key is not None:
        cached = cache.load(key)
        if cached is not None:
            logger.info("%s: %d videos' features read from the cache %s", desc, len(paths), cache.root)
            return EncodedSet(cached[0], names, cached[1], from_cache=True)
    features, padded = [], 0
    for start in tqdm(range(0, len(paths), batch_size), desc=f"{desc} ({backbone.name})", unit="batch",
                      disable=not progress):
        videos = [load_video(p) for p in paths[start:start + batch_size]]
        encoded = encode_videos(backbone, videos, pad_short, batch_size)
        features.append(encoded.features)
        padded += encoded.padded
    result = EncodedSet(np.concatenate(features), names, padded)
    if cache is not None and key is not None:
        cache.save(key, result.features, padded)
    return result
