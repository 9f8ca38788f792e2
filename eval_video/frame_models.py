"""Per-frame networks the VBench-style and fidelity metrics use: optical flow and image encoders.

Each has a real version that needs local weights and a labelled proxy that runs offline:

=====================  ===========================================  ==============================
role                   real (local weights)                         proxy (``proxy = True``)
=====================  ===========================================  ==============================
optical flow           RAFT (torchvision, safetensors state dict)   OpenCV Farnebäck
subject consistency    DINO ViT-B/16 (transformers folder)          any image encoder, e.g. toy
background consistency CLIP ViT-B/32 (transformers folder)          any image encoder, e.g. toy
aesthetic quality      CLIP ViT-L/14 folder + LAION linear head     toy classifier confidence
=====================  ===========================================  ==============================

A missing package or file raises :class:`~eval_video.results.MissingWeightsError` naming what to
provide; the command turns that into a skipped metric, never a zero.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from eval_video.i3d import preprocess_clips
from eval_video.results import MissingWeightsError

# ---------------------------------------------------------------- optical flow


class FlowEstimator(ABC):
    """Dense optical flow between two uint8 RGB frames: ``(H, W, 2)`` float32 pixels (dx, dy)."""

    name: str
    proxy: bool

    @abstractmethod
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow that maps ``a`` onto ``b`` (``b(x + flow(x)) ~ a(x)``)."""


class FarnebackFlow(FlowEstimator):
    """OpenCV's Farnebäck flow on grey frames: a classical stand-in for RAFT (labelled proxy)."""

    name = "opencv-farneback"
    proxy = True

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow from ``a`` to ``b`` (pyramid 0.5, 3 levels, window 15; OpenCV's common settings)."""
        import cv2

        grey_a, grey_b = (cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in (a, b))
        return cv2.calcOpticalFlowFarneback(grey_a, grey_b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


class RaftFlow(FlowEstimator):
    """torchvision's RAFT-large with a local safetensors state dict (what VBench uses for dynamics)."""

    name = "raft-large"
    proxy = False

    def __init__(self, weights: str | Path) -> None:
        try:
            from torchvision.models.optical_flow import raft_large
        except ImportError as err:
            raise MissingWeightsError("RAFT needs torchvision: pip install torchvision") from err
        from safetensors.torch import load_file

        weights = Path(weights)
        if not weights.is_file():
            raise MissingWeightsError(f"{weights}: no such RAFT weights file (a raft_large state dict in safetensors)")
        self.model = raft_large(weights=None, progress=False).eval()
        self.model.load_state_dict(load_file(str(weights)))

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """RAFT flow on frames scaled to [-1, 1], padded to a multiple of 8."""
        x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="replicate")
        flow = self.model(x[:1], x[1:])[-1][0, :, :h, :w]
        return flow.permute(1, 2, 0).numpy()


FLOW_METRICS: tuple[str, ...] = ("delta_flow", "motion_smoothness", "dynamic_degree")


def opencv_missing(metrics: Iterable[str], raft: bool) -> str | None:
    """Why some of ``metrics`` cannot run here (OpenCV not installed), or None when they all can.

    Without RAFT weights every flow metric uses OpenCV's Farnebäck flow; with them only
    ``motion_smoothness`` does (its midpoint warp).
    """
    wanted = set(metrics)
    needing = [m for m in FLOW_METRICS if m in wanted and (not raft or m == "motion_smoothness")]
    if not needing:
        return None
    try:
        import cv2  # noqa: F401
    except ImportError:
        return (f"the metrics {', '.join(needing)} need OpenCV: pip install 'tfmq-video[flow]' "
                "(bash tools/setup.sh installs it), or leave those metrics out")
    return None


def make_flow(raft_weights: str | Path | None) -> FlowEstimator:
    """RAFT when weights are given, else the Farnebäck proxy."""
    return RaftFlow(raft_weights) if raft_weights else FarnebackFlow()


def warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out(x) = frame(x + flow(x))`` with bilinear sampling and edge replication."""
    import cv2

    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(frame, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------- image encoders


class FrameEncoder(ABC):
    """uint8 frames ``(T, H, W, 3)`` -> L2-normalized features ``(T, D)``."""

    name: str
    proxy: bool

    @abstractmethod
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Unit-norm features per frame."""


class ToyFrameEncoder(FrameEncoder):
    """The toy classifier on each frame held still (repeated over its 8 frames): a labelled proxy."""

    name = "toy classifier (static frames)"
    proxy = True

    def __init__(self) -> None:
        from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES
        from tfmq_video.toy.world import load_toy_classifier

        self.model = load_toy_classifier()
        self.num_frames, self.size = NUM_FRAMES, FRAME_SIZE

    def _static_clips(self, frames: np.ndarray) -> torch.Tensor:
        clips = np.repeat(frames[:, None], self.num_frames, axis=1)  # (T, num_frames, H, W, 3)
        return preprocess_clips(clips, self.size)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Penultimate classifier features of each frame, unit norm."""
        return F.normalize(self.model.features(self._static_clips(frames)), dim=-1)

    @torch.no_grad()
    def confidence(self, frames: np.ndarray) -> torch.Tensor:
        """Mean over heads of the top softmax probability per frame, (T,), in [0, 1]."""
        logits = self.model(self._static_clips(frames))
        return torch.stack([v.softmax(-1).max(-1).values for v in logits.values()]).mean(0)


def import_transformers() -> ModuleType:
    """The transformers module, or a MissingWeightsError saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise MissingWeightsError("this metric needs the transformers package: pip install transformers") from err
    return transformers


def check_model_folder(folder: str | Path | None, what: str, flag: str) -> Path:
    """A local Hugging Face model folder, or a MissingWeightsError naming the flag to pass."""
    if folder is None:
        raise MissingWeightsError(f"needs {what}: pass {flag} FOLDER (a local Hugging Face folder with "
                                  "config.json and model.safetensors)")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"{folder}: not a model folder (no config.json); {flag} expects {what}")
    return folder


class HFImageEncoder(FrameEncoder):
    """A local transformers CLIP (image embeddings) or DINO ViT (CLS token) folder; not a proxy."""

    proxy = False

    def __init__(self, folder: str | Path | None, kind: str, flag: str) -> None:
        what = {"clip": "a CLIP model", "dino": "DINO ViT-B/16 (facebook/dino-vitb16)"}[kind]
        folder = check_model_folder(folder, what, flag)
        transformers = import_transformers()
        self.kind, self.name = kind, f"{kind} ({folder.name})"
        self.processor = transformers.AutoImageProcessor.from_pretrained(folder)
        model_class = transformers.CLIPVisionModelWithProjection if kind == "clip" else transformers.ViTModel
        self.model = model_class.from_pretrained(folder, use_safetensors=True).eval()

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Image embeddings (CLIP) or CLS tokens (DINO) per frame, unit norm."""
        inputs = self.processor(images=list(frames), return_tensors="pt")
        out = self.model(**inputs)
        features = out.image_embeds if self.kind == "clip" else out.last_hidden_state[:, 0]
        return F.normalize(features, dim=-1)


class LaionAesthetic:
    """CLIP ViT-L/14 image embeddings -> LAION linear aesthetic head (score / 10), as VBench does."""

    name = "CLIP ViT-L/14 + LAION aesthetic head"
    proxy = False

    def __init__(self, clip_folder: str | Path | None, head_file: str | Path | None) -> None:
        if head_file is None or not Path(head_file).is_file():
            raise MissingWeightsError("aesthetic quality needs the LAION head: pass --aesthetic-head FILE.safetensors "
                                      "(sa_0_4_vit_l_14_linear converted to safetensors: weight (1, 768), bias (1,))")
        from safetensors.torch import load_file

        self.encoder = HFImageEncoder(clip_folder, "clip", "--clip-l14")
        head = load_file(str(head_file))
        self.weight, self.bias = head["weight"].float(), head["bias"].float()

    def scores(self, frames: np.ndarray) -> torch.Tensor:
        """Aesthetic score per frame in about [0, 1]."""
        return (self.encoder.encode(frames) @ self.weight.T + self.bias).squeeze(-1) / 10.0
