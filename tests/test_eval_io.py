"""Video I/O: round trips within codec tolerance, folder listing, pairing and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval_video.io import (
    Video,
    VideoError,
    align_pair,
    list_videos,
    load_video,
    load_videos,
    pair_videos,
    read_video,
    write_comparison_strip,
    write_video,
)


def smooth_video(frames: int = 8, size: int = 64) -> np.ndarray:
    """A moving colour gradient: smooth content codecs reproduce well."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0] = 128 + 100 * np.sin((x + 3 * t) / 10)
        out[t, ..., 1] = 128 + 100 * np.cos((y - 2 * t) / 12)
        out[t, ..., 2] = (x + y) / 2 + 40
    return out


def _mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize(("suffix", "tolerance"), [(".mp4", 3.0), (".webm", 4.0), (".gif", 6.0)])
def test_codec_round_trip(tmp_path: Path, suffix: str, tolerance: float) -> None:
    video = smooth_video()
    path = write_video(tmp_path / f"clip{suffix}", video, fps=12)
    loaded = load_video(path)
    assert loaded.frames.shape == video.shape and loaded.frames.dtype == np.uint8
    assert _mean_abs_error(loaded.frames, video) < tolerance
    assert loaded.fps == pytest.approx(12, rel=0.05)


def test_frame_folder_round_trip_is_exact(tmp_path: Path) -> None:
    video = smooth_video(frames=12)
    folder = write_video(tmp_path / "clip", video)
    assert np.array_equal(read_video(folder), video)
    assert load_video(folder, fps=24).fps == 24


def test_frame_folder_uses_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in (10, 2, 1):
        Image.fromarray(np.full((4, 4, 3), index, np.uint8)).save(folder / f"f{index}.png")
    assert read_video(folder)[:, 0, 0, 0].tolist() == [1, 2, 10]


def test_odd_sized_mp4_is_written(tmp_path: Path) -> None:
    video = smooth_video(size=33)
    assert load_video(write_video(tmp_path / "odd.mp4", video)).frames.shape == video.shape


def test_unreadable_and_empty_inputs_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a not really")
    (tmp_path / "no_frames").mkdir()
    for path in (empty, broken, tmp_path / "no_frames", tmp_path / "missing.mp4", tmp_path / "notes.txt"):
        if path.suffix == ".txt":
            path.write_text("x")
        with pytest.raises(VideoError, match=path.name):
            load_video(path)


def test_list_videos_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not a folder"):
        list_videos(tmp_path / "absent")
    with pytest.raises(VideoError, match="no videos found"):
        list_videos(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "frame_0.png")
    with pytest.raises(VideoError, match="loose frame images"):
        list_videos(tmp_path)


def test_list_and_load_mixed_folder(tmp_path: Path) -> None:
    video = smooth_video(frames=4, size=16)
    write_video(tmp_path / "b.gif", video)
    write_video(tmp_path / "a", video)
    write_video(tmp_path / "c.mp4", video)
    assert [p.name for p in list_videos(tmp_path)] == ["a", "b.gif", "c.mp4"]
    assert [v.name for v in load_videos(tmp_path)] == ["a", "b", "c"]


def test_pairing_by_name_and_count() -> None:
    frames = smooth_video(frames=4, size=8)
    ours = [Video(frames, 8, "q/x.mp4"), Video(frames, 8, "q/y.mp4")]
    with pytest.raises(VideoError, match="no FP video named y"):
        pair_videos(ours, [Video(frames, 8, "fp/x.mp4")])
    with pytest.raises(VideoError, match="got 2 videos but 1 FP"):
        pair_videos([Video(frames, 8), Video(frames, 8)], [Video(frames, 8)])
    pairs = pair_videos(ours, list(reversed([Video(frames, 8, "fp/x.png"), Video(frames, 8, "fp/y.png")])))
    assert [(a.name, b.name) for a, b in pairs] == [("x", "x"), ("y", "y")]


def test_align_pair_policy() -> None:
    a = Video(smooth_video(frames=6, size=8), 8, "a.mp4")
    b = Video(smooth_video(frames=4, size=8), 8, "b.mp4")
    x, y = align_pair(a, b)
    assert len(x) == len(y) == 4
    with pytest.raises(VideoError, match="equal frame sizes"):
        align_pair(a, Video(smooth_video(frames=4, size=16), 8, "c.mp4"))


def test_comparison_strip(tmp_path: Path) -> None:
    fp = smooth_video(frames=8, size=32)
    quantized = np.clip(fp.astype(np.int16) + 10, 0, 255).astype(np.uint8)
    path = write_comparison_strip(tmp_path / "strip.png", fp, quantized, max_frames=4)
    image = np.asarray(Image.open(path))
    assert image.ndim == 3 and image.shape[0] >= 3 * 96  # three rows enlarged to >= 96 px
    assert image.shape[1] > 4 * 96


def test_in_memory_convention_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(VideoError, match="shape"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8), np.uint8))
