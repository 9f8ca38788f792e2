"""``tfmq-video bench quality --json FILE [--family cogvideox]``: the quality table on the toy world.

FP, ``fp-reseed`` (noise floor) and every method of :mod:`tfmq_video.calib.baselines` at each
(wbits, abits) setting, with fixed seeds; prints a markdown table, writes the rows as JSON and
plots the temporal-feature error per timestep per method. See :mod:`tfmq_video.calib.quality`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tfmq_video.devices import describe_device, full_float32, pick_device
from tfmq_video.errors import ConfigError
from tfmq_video.toy.families import TOY_FAMILY_NAMES


def _setting(text: str) -> tuple[int, int]:
    try:
        w, a = text.upper().removeprefix("W").split("A")
        return int(w), int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r} is not of the form W4A8") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench quality``."""
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows (JSON)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of temporal-feature error per timestep")
    parser.add_argument("--methods", nargs="+", default=None, help="methods (default: all)")
    parser.add_argument("--settings", nargs="+", type=_setting, default=None,
                        help="bit settings, e.g. W8A8 W4A8 W4A6 (default)")
    parser.add_argument("--num-videos", type=int, default=32, help="videos per method (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=None,
                        help="base recipe YAML (default: built-in toy recipe); its model section is not used: "
                             "--family and --model choose the model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu",
                        help="where models sample and calibrate: cpu (default), cuda, cuda:N or auto; on CUDA, TF32 "
                             "is switched off so the GPU computes in float32 like the CPU. Rows of different devices "
                             "are not comparable (other rounding, other FP videos)")
    parser.add_argument("--calib-seeds", nargs="+", type=int, default=None,
                        help="calibrate every method once per recipe seed and report mean ± std (calibration noise)")
    parser.add_argument("--family", choices=TOY_FAMILY_NAMES, default="stdit3",
                        help="which toy model family: stdit3 (default; one shared t_block) or cogvideox (adaLN linears "
                             "in every block)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model folder of --family (default: the bundled toy model of that family)")
    parser.add_argument("--fp-cache", type=Path, default=None,
                        help="folder keeping the FP and re-seeded FP videos between runs (keyed by a hash of the "
                             "model, captions, seeds and sampler); default: generate them every run")
    parser.add_argument("--fp-reseeds", type=int, default=1,
                        help="FP runs with other seeds (rows fp-reseed, default 1); with more than one the FP "
                             "noise floor (fvd mean ± std over the FP seed sets) is printed and saved")


def run(args: argparse.Namespace) -> int:
    """Build the table, print it, write JSON (and the plot)."""
    from eval_video._files import write_text_atomic
    from tfmq_video.calib.baselines import METHODS
    from tfmq_video.calib.quality import (
        DEFAULT_SETTINGS,
        QualityPlan,
        fp_noise_floor,
        markdown_table,
        plot_curves,
        quality_table,
        seed_summary,
        summary_table,
    )
    from tfmq_video.quant.config import RecipeConfig, load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    full_float32(device)
    methods = tuple(args.methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; available: {sorted(METHODS)}")
    if args.num_videos < 2:
        raise ConfigError("--num-videos must be at least 2 (a covariance needs two samples)")
    base = load_config(args.config) if args.config else RecipeConfig()
    if args.fp_reseeds < 1:
        raise ConfigError(f"--fp-reseeds must be at least 1, got {args.fp_reseeds}")
    if args.calib_seeds is not None and len(set(args.calib_seeds)) != len(args.calib_seeds):
        raise ConfigError(f"--calib-seeds repeats a seed: {args.calib_seeds}")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: not a {args.family} model folder (no config.json)")
    plan = QualityPlan(methods, tuple(args.settings or DEFAULT_SETTINGS), args.num_videos, args.seed,
                       base.model_copy(update={"progress": False}),
                       None if args.calib_seeds is None else tuple(args.calib_seeds),
                       None if args.model is None else str(args.model),
                       None if args.fp_cache is None else str(args.fp_cache), args.fp_reseeds, str(device),
                       args.family)
    rows, curves = quality_table(plan)
    print(markdown_table(rows))
    record: dict = {"rows": rows, "temporal_feature_error_per_step": curves, "fp_noise_floor": fp_noise_floor(rows),
                    "device": describe_device(device), "family": args.family}
    floor = record["fp_noise_floor"]
    print(f"\nFP noise floor over {floor['seed_sets']} seed sets: fvd {floor['fvd']:.4g} ± {floor['fvd_std']:.2g}, "
          f"re-seeded fvd_fp {floor['fvd_fp']:.4g} ± {floor['fvd_fp_std']:.2g}")
    if args.calib_seeds is not None and len(args.calib_seeds) > 1:
        record["seed_summary"] = seed_summary(rows)
        print()
        print(summary_table(record["seed_summary"]))
    write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(curves, str(args.plot))
    return 0
