"""Video input/output: one in-memory convention, several file formats.

In memory a video is a ``uint8`` RGB array of shape ``(T, H, W, 3)`` (the project-wide
convention). Files:

- ``.mp4 .webm .mkv .avi .mov .m4v``: read with decord when installed, else PyAV;
  ``.mp4`` is written with libx264 (``yuv420p``; ``yuv444p`` when a side is odd), ``.webm``
  with VP9.
- ``.gif``: read and written with Pillow (palette-quantized, so lossy for rich colors).
- a folder of frame images (``.png .jpg .jpeg .bmp .webp .tif .tiff``), sorted by name with
  numbers compared as numbers (``frame_2.png`` before ``frame_10.png``); written as PNGs.

Policy for videos that differ (applied by the metrics, never silently on read):

- **frame rate**: frames are never resampled in time; the frame index is the time axis. The
  rate is kept as metadata (``Video.fps``) and used only where a metric defines it (dynamic
  degree thresholds, VBench's subsampling to ~8 fps). Folders of frames have no rate: they get
  ``fps`` from the caller (default 8).
- **length**: FVD encodes one clip per video, its first ``num_frames`` frames (16 for I3D, 8
  for the toy backbone). A shorter video is an error naming the file, unless the caller asks to
  pad it by repeating its last frame (``pad_short``; the report counts padded videos).
  Pairwise metrics (fidelity against FP) compare the first ``min(T_a, T_b)`` frames and log a
  warning when the lengths differ.
- **size**: FVD resizes every frame (bilinear) to the backbone's input size. Pairwise metrics
  are pixel-aligned, so a size mismatch between a video and its FP counterpart is an error
  naming both files.

Every write is atomic (a temporary file in the destination folder, then a rename).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageSequence, UnidentifiedImageError

from eval_video._files import atomic_path, give_default_modes
from tfmq_video.errors import TFMQError

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
GIF_SUFFIX = ".gif"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FOLDER_FPS = 8.0
DEFAULT_CRF = 17  # libx264 "visually lossless"; 0 is lossless in luma but still chroma-subsampled


class VideoError(TFMQError, ValueError):
    """A video file or folder is missing, unreadable, empty or not in the expected layout."""


@dataclass(frozen=True)
class Video:
    """Decoded frames plus where they came from.

    Attributes:
        frames: uint8 RGB ``(T, H, W, 3)``.
        fps: frames per second (from the container, or the caller's default for frame folders).
        source: the file or folder read, or ``"<array>"``.
    """

    frames: np.ndarray
    fps: float
    source: str = "<array>"

    @property
    def name(self) -> str:
        """The file name without its suffix (how videos are paired across folders)."""
        return Path(self.source).stem if self.source != "<array>" else self.source

    @property
    def num_frames(self) -> int:
        """Number of frames T."""
        return int(self.frames.shape[0])


def check_frames(frames: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Validate the in-memory convention and return a C-contiguous uint8 (T, H, W, 3) array.

    Raises :class:`VideoError` naming ``source`` for any other dtype, rank or channel count.
    """
    if not isinstance(frames, np.ndarray):
        raise VideoError(f"{source}: expected a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise VideoError(
            f"{source}: expected uint8 RGB frames (T, H, W, 3), got dtype {frames.dtype}; "
            "convert float videos in [-1, 1] with tfmq_video.toy.data.tensor_to_clips or ((x + 1) * 127.5).round()"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{source}: expected shape (T, H, W, 3), got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise VideoError(f"{source}: the video is empty (shape {tuple(frames.shape)})")
    return np.ascontiguousarray(frames)


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _read_frame_folder(folder: Path) -> np.ndarray:
    files = _image_files(folder)
    if not files:
        raise VideoError(f"{folder}: no frame images found (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                frame = _to_rgb(image)
        except (UnidentifiedImageError, OSError) as err:
            raise VideoError(f"{file}: not a readable image ({err})") from err
        if frames and frame.shape != frames[0].shape:
            raise VideoError(f"{file}: frame size {frame.shape[1]}x{frame.shape[0]} differs from "
                             f"{files[0].name} ({frames[0].shape[1]}x{frames[0].shape[0]}); all frames must match")
        frames.append(frame)
    return np.stack(frames)


def _read_gif(path: Path) -> tuple[np.ndarray, float | None]:
    try:
        with Image.open(path) as image:
            frames, durations = [], []
            for frame in ImageSequence.Iterator(image):
                frames.append(_to_rgb(frame))
                durations.append(frame.info.get("duration", 0) or 0)
    except (UnidentifiedImageError, OSError) as err:
        raise VideoError(f"{path}: not a readable GIF ({err})") from err
    mean_ms = float(np.mean(durations)) if durations else 0.0
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), (1000.0 / mean_ms if mean_ms > 0 else None)


def _read_decord(path: Path) -> tuple[np.ndarray, float | None]:
    import decord  # optional

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        return frames, float(reader.get_avg_fps()) or None
    except Exception as err:  # decord raises its own DECORDError, not exported by every version
        raise VideoError(f"{path}: decord could not decode it ({err})") from err


def _read_pyav(path: Path) -> tuple[np.ndarray, float | None]:
    try:
        import av
    except ImportError as err:  # pragma: no cover - av is a declared extra
        raise VideoError(f"{path}: reading {path.suffix} files needs PyAV: pip install 'tfmq-video[video]'") from err
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as err:
        raise VideoError(f"{path}: not a decodable video ({err}); expected one of {', '.join(VIDEO_SUFFIXES)}") from err
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8), None
    return np.stack(frames), float(rate) if rate else None


def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _read_container(path: Path, backend: str) -> tuple[np.ndarray, float | None]:
    """Decode with the chosen backend; ``auto`` tries decord first and falls back to PyAV with a warning.

    decord 0.6 fails on some small libx264 files (a chroma buffer size check) that PyAV reads.
    """
    if backend == "pyav" or (backend == "auto" and not _decord_available()):
        return _read_pyav(path)
    try:
        return _read_decord(path)
    except VideoError as err:
        if backend == "decord":
            raise
        logger.warning("%s; reading it with PyAV instead", err)
        return _read_pyav(path)


def load_video(path: str | os.PathLike, fps: float | None = None, backend: str = "auto") -> Video:
    """Read a video file or a folder of frames into a :class:`Video`.

    Args:
        path: a video file (mp4, webm, mkv, avi, mov, m4v, gif) or a folder of frame images.
        fps: the rate to report when the source has none (frame folders, some GIFs); default 8.
        backend: ``"auto"`` (decord if installed, else PyAV), ``"decord"`` or ``"pyav"``;
            only used for container formats.

    Raises:
        VideoError: the path is missing, of an unknown kind, unreadable or has no frames.
    """
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file or folder")
    found_fps: float | None
    if path.is_dir():
        frames, found_fps = _read_frame_folder(path), None
    elif path.suffix.lower() == GIF_SUFFIX:
        frames, found_fps = _read_gif(path)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        frames, found_fps = _read_container(path, backend)
    else:
        raise VideoError(f"{path}: unknown video format {path.suffix!r}; expected a folder of frames or one of "
                         f"{', '.join(VIDEO_SUFFIXES + (GIF_SUFFIX,))}")
    if frames.shape[0] == 0:
        raise VideoError(f"{path}: the video has no frames")
    return Video(check_frames(frames, str(path)), float(found_fps or fps or DEFAULT_FOLDER_FPS), str(path))


def read_video(path: str | os.PathLike, backend: str = "auto") -> np.ndarray:
    """Read a video file or a folder of frames as uint8 RGB ``(T, H, W, 3)``."""
    return load_video(path, backend=backend).frames


def _write_png_frames(folder: Path, frames: np.ndarray) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        width = max(5, len(str(len(frames) - 1)))
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"frame_{index:0{width}d}.png")
        give_default_modes(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, round(1000.0 / fps)), loop=0, optimize=False)
    return path


def _write_container(path: Path, frames: np.ndarray, fps: float, crf: int) -> Path:
    import av

    height, width = frames.shape[1:3]
    codec = "libx264" if path.suffix.lower() != ".webm" else "libvpx-vp9"
    pix_fmt = "yuv420p" if (height % 2 == 0 and width % 2 == 0) else "yuv444p"
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf), "b": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = DEFAULT_FOLDER_FPS, crf: int = DEFAULT_CRF) -> Path:
    """Write uint8 RGB ``(T, H, W, 3)`` frames; the format follows the suffix of ``path``.

    ``.mp4``/``.mkv``/``.mov``/``.avi``/``.m4v`` use libx264 at ``crf`` (lower is better, 17 is
    visually lossless), ``.webm`` VP9, ``.gif`` Pillow; a path without a suffix becomes a folder
    of ``frame_00000.png`` files (lossless). Returns the written path.
    """
    path = Path(path)
    frames = check_frames(frames, str(path))
    if fps <= 0:
        raise VideoError(f"{path}: fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    if suffix == "":
        return _write_png_frames(path, frames)
    if suffix == GIF_SUFFIX:
        return _write_gif(path, frames, fps)
    if suffix in VIDEO_SUFFIXES:
        return _write_container(path, frames, fps, crf)
    raise VideoError(f"{path}: cannot write {suffix!r}; use .mp4, .webm, .gif or a folder path without suffix")


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The videos of a folder: video/GIF files and sub-folders of frame images, naturally sorted.

    Raises :class:`VideoError` if the folder is missing, empty, or holds loose frame images
    (each video's frames must be in its own sub-folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder}: not a folder (expected a folder of videos)")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    videos = [p for p in entries if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + (GIF_SUFFIX,)]
    videos += [p for p in entries if p.is_dir() and _image_files(p)]
    if not videos:
        loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise VideoError(f"{folder}: holds {len(loose)} loose frame images; put each video's frames in its own "
                             "sub-folder (folder/video_name/frame_00000.png)")
        raise VideoError(f"{folder}: no videos found (expected files ending in "
                         f"{', '.join(VIDEO_SUFFIXES + (GIF_SUFFIX,))} or sub-folders of frame images)")
    return sorted(videos, key=_natural_key)


def load_videos(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    fps: float | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> list[Video]:
    """Read every video of a folder (see :func:`list_videos`) or of a list of paths."""
    from tqdm.auto import tqdm

    paths = list_videos(source) if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if limit is not None:
        paths = paths[:limit]
    return [load_video(p, fps=fps) for p in tqdm(paths, desc="reading videos", unit="video", disable=not progress)]


def pair_videos(videos: Sequence[Video], references: Sequence[Video], what: str = "FP") -> list[tuple[Video, Video]]:
    """Pair two sets of videos by file name (stem); arrays without names are paired by position.

    Raises :class:`VideoError` listing the names present on one side only, or on count mismatch.
    """
    named = all(v.source != "<array>" for v in (*videos, *references))
    if not named:
        if len(videos) != len(references):
            raise VideoError(f"got {len(videos)} videos but {len(references)} {what} videos; give one {what} "
                             "video per video (same seeds, same order)")
        return list(zip(videos, references, strict=True))
    by_name = {v.name: v for v in references}
    missing = sorted(v.name for v in videos if v.name not in by_name)
    extra = sorted(set(by_name) - {v.name for v in videos})
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no {what} video named {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if extra:
            parts.append(f"{what} videos without a counterpart: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
        raise VideoError("videos are paired by file name: " + "; ".join(parts))
    return [(v, by_name[v.name]) for v in videos]


def align_pair(video: Video, reference: Video) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a pair on a common length (the shorter one); error on different frame sizes."""
    a, b = video.frames, reference.frames
    if a.shape[1:] != b.shape[1:]:
        raise VideoError(f"{video.source} is {a.shape[2]}x{a.shape[1]} but {reference.source} is "
                         f"{b.shape[2]}x{b.shape[1]}: pixel-aligned metrics need equal frame sizes")
    if len(a) != len(b):
        logger.warning("%s has %d frames, %s has %d: comparing the first %d", video.source, len(a),
                       reference.source, len(b), min(len(a), len(b)))
    length = min(len(a), len(b))
    if abs(video.fps - reference.fps) > 1e-3:
        logger.warning("%s is %.3g fps but %s is %.3g fps; frames are compared by index", video.source,
                       video.fps, reference.source, reference.fps)
    return a[:length], b[:length]


def _upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    return frame.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else frame


def make_strip(
    rows: Mapping[str, np.ndarray],
    max_frames: int = 8,
    min_height: int = 96,
    gap: int = 2,
    label_width: int = 120,
) -> np.ndarray:
    """One RGB image: a labelled row per video, time running left to right.

    Args:
        rows: label -> uint8 ``(T, H, W, 3)``; all rows must share H and W.
        max_frames: at most this many frames per row, evenly spaced over the shortest video.
        min_height: small frames are enlarged (nearest neighbour, integer factor) to this height.
    """
    if not rows:
        raise VideoError("make_strip needs at least one video")
    checked = {label: check_frames(frames, label) for label, frames in rows.items()}
    shapes = {frames.shape[1:] for frames in checked.values()}
    if len(shapes) != 1:
        raise VideoError(f"make_strip: all videos must share one frame size, got {sorted(shapes)}")
    length = min(len(frames) for frames in checked.values())
    picks = np.unique(np.linspace(0, length - 1, min(max_frames, length)).round().astype(int))
    height, width = next(iter(shapes))[:2]
    factor = max(1, -(-min_height // height))
    cell_h, cell_w = height * factor, width * factor
    canvas = np.full((len(checked) * (cell_h + gap) + gap, label_width + len(picks) * (cell_w + gap) + gap, 3),
                     255, dtype=np.uint8)
    for r, frames in enumerate(checked.values()):
        top = gap + r * (cell_h + gap)
        for c, index in enumerate(picks):
            left = label_width + gap + c * (cell_w + gap)
            canvas[top:top + cell_h, left:left + cell_w] = _upscale(frames[index], factor)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for r, label in enumerate(checked):
        draw.text((4, gap + r * (cell_h + gap) + cell_h // 2 - 6), label, fill=(0, 0, 0))
    return np.asarray(image)


def difference_video(a: np.ndarray, b: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """``|a - b| * gain`` per pixel and channel, clipped to uint8 (a visual, not a metric)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.float32) * gain
    return np.clip(diff, 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 RGB ``(H, W, 3)`` image as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def write_comparison_strip(
    path: str | os.PathLike,
    fp: np.ndarray,
    quantized: np.ndarray,
    labels: tuple[str, str] = ("FP", "quantized"),
    gain: float = 4.0,
    max_frames: int = 8,
) -> Path:
    """PNG with three rows: FP, quantized and ``|FP - quantized| x gain`` (first common frames)."""
    length = min(len(fp), len(quantized))
    fp, quantized = check_frames(fp)[:length], check_frames(quantized)[:length]
    if fp.shape != quantized.shape:
        raise VideoError(f"{path}: FP frames {fp.shape[1:3]} and quantized frames {quantized.shape[1:3]} differ in size")
    rows = {labels[0]: fp, labels[1]: quantized, f"|diff| x{gain:g}": difference_video(fp, quantized, gain)}
    return write_png(path, make_strip(rows, max_frames=max_frames))
