"""Atomically written files and folders get the mode a plain ``open``/``mkdir`` would give them.

``tempfile`` creates 0600 files and 0700 folders; a result renamed into place from there would
be readable by its owner only (on a shared cluster, not by the people who evaluate it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_video._files import write_text_atomic
from eval_video.io import write_video
from tfmq_video.checkpoint import write_folder


@pytest.fixture
def umask_027() -> Iterator[int]:
    """A umask other than the usual 022, so that the test cannot pass by a fixed mode."""
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_text_file_follows_umask(tmp_path: Path, umask_027: int) -> None:
    path = write_text_atomic(tmp_path / "rows.json", "[]\n")
    assert _mode(path) == 0o666 & ~umask_027


def test_rewritten_file_keeps_its_mode(tmp_path: Path, umask_027: int) -> None:
    path = write_text_atomic(tmp_path / "rows.json", "[]\n")
    path.chmod(0o604)
    write_text_atomic(path, "[1]\n")
    assert path.read_text() == "[1]\n"
    assert _mode(path) == 0o604


def test_checkpoint_folder_follows_umask(tmp_path: Path, umask_027: int) -> None:
    folder = write_folder(tmp_path / "model", {"hidden": 2}, {"w": torch.zeros(2)})
    assert _mode(folder) == 0o777 & ~umask_027
    for child in folder.iterdir():
        assert _mode(child) == 0o666 & ~umask_027, child.name


def test_frame_folder_follows_umask(tmp_path: Path, umask_027: int) -> None:
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    folder = tmp_path / "frames"
    write_video(folder, frames)
    assert _mode(folder) == 0o777 & ~umask_027
