"""``tfmq-video export CHECKPOINT --out DIR``: a calibrated checkpoint as packed integer weights.

Reads a folder written by ``tfmq-video calibrate`` (or ``save_calibrated``), writes the packed
format of ``docs/quantized_checkpoint.md`` (int4 two per byte, int8, scales, zero points,
static / per-timestep activation parameters, the served temporal features, FP layers, a
manifest with SHA-256 hashes) atomically, reloads it to check it, and prints its weight bytes
against bf16. ``tfmq_video.export.load_quantized(DIR)`` runs it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tfmq_video.quant.model import QuantizedModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tfmq-video export``."""
    parser.add_argument("checkpoint", type=Path, help="calibrated checkpoint folder (from tfmq-video calibrate)")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the packed checkpoint")


def export_and_report(qmodel: QuantizedModel, out: Path) -> dict:
    """Export ``qmodel``, reload the result (hashes, shapes) and return its size summary."""
    from tfmq_video.export import load_quantized, weight_bytes_report
    from tfmq_video.export.calibrated import export_calibrated

    folder = export_calibrated(qmodel, out)
    report = weight_bytes_report(load_quantized(folder, backend="reference", compile=False), folder)
    return {"out": str(folder), **{k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}}


def run(args: argparse.Namespace) -> int:
    """Load, export, verify, print a JSON summary."""
    from tfmq_video.calib.checkpoint import load_calibrated

    print(json.dumps(export_and_report(load_calibrated(args.checkpoint), args.out), indent=2))
    return 0
