"""``tfmq-video calibrate CONFIG --out DIR``: calibrate a model with a YAML recipe and save it.

The recipe (see ``configs/``) names the model (``model.path: toy`` for the bundled toy
STDiT3), the calibration prompts and every quantization setting. The output folder holds
``config.json`` + ``model.safetensors`` + ``quantization.json`` and loads with
:func:`tfmq_video.calib.checkpoint.load_calibrated`; ``--export DIR`` also writes the packed
integer checkpoint that :func:`tfmq_video.export.load_quantized` runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tfmq-video calibrate``."""
    parser.add_argument("config", type=Path, help="YAML recipe, e.g. configs/toy_stdit3_w4a8.yaml")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--device", default="auto",
                        help="where the model records and calibrates: auto (CUDA when present, default), cpu, cuda, "
                             "cuda:N (TF32 off); the recording stays on CPU either way")
    parser.add_argument("--export", type=Path, default=None,
                        help="also write the packed integer checkpoint here (as tfmq-video export)")


def run(args: argparse.Namespace) -> int:
    """Record the calibration set, calibrate, save; print a summary."""
    from tfmq_video.calib.api import calibrate_recipe
    from tfmq_video.calib.checkpoint import save_calibrated
    from tfmq_video.devices import describe_device, full_float32, pick_device
    from tfmq_video.quant.config import load_config

    recipe = load_config(args.config)  # validate before any work
    if args.export is not None:
        from tfmq_video.export.calibrated import check_exportable

        check_exportable(recipe.model.adapter)
    device = pick_device(args.device)
    full_float32(device)
    if args.no_progress:
        recipe = recipe.model_copy(update={"progress": False})
    if args.threads:
        torch.set_num_threads(args.threads)
    qmodel = calibrate_recipe(recipe, device=device)
    folder = save_calibrated(qmodel, args.out)
    summary = {
        "out": str(folder),
        "method": recipe.name,
        "seconds": {k: round(v, 1) for k, v in qmodel.report["seconds"].items()},
        "temporal_feature_error": qmodel.report["temporal"]["temporal_feature_error"],
        "quantized_weight_fraction": round(qmodel.report["quantized_weight_fraction"], 4),
        "device": describe_device(device),
    }
    if args.export is not None:
        from tfmq_video.commands.export import export_and_report

        summary["export"] = export_and_report(qmodel, args.export)
    print(json.dumps(summary, indent=2))
    return 0
