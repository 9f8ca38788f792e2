"""Shared fixtures: paths of the shared reference material and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.calib.testing import tiny_calibration, tiny_stdit3

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("TFMQ_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` beside the checkout (reference key lists); skipped where absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared reference folder {SHARED_DIR} is missing (set TFMQ_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny random STDiT3 (one per test module; modules with their own ``model`` fixture override it)."""
    return tiny_stdit3()


@pytest.fixture(scope="module")
def calibration(model: torch.nn.Module) -> CalibrationSet:
    """A one-pass calibration recording of the module's ``model``."""
    return tiny_calibration(model)
