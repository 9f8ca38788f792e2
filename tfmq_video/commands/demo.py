"""``tfmq-video demo``: the main job on the bundled toy world, end to end on a CPU.

1. generates a few captioned videos with the bundled toy STDiT3 in full precision;
2. calibrates a W4A8 TFMQ model of it with a short recipe (``configs/toy_demo_w4a8.yaml``:
   TIAR + FSC + temporal feature cache + selection, then block reconstruction) and saves the
   calibrated checkpoint;
3. generates the same captions and seeds with the quantized model and compares them with FP
   (PSNR per video, one strip per video: FP | W4A8 | difference).

Videos are written as mp4 (GIF when PyAV is missing), with PNG strips and a ``demo.json``
summary; the command prints where everything is. ``--quantize none`` stops after step 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dit_adapters.opensora.rflow import SamplerConfig
from eval_video._files import write_text_atomic
from tfmq_video.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO_ROOT / "configs" / "toy_demo_w4a8.yaml"
REPORT_METRICS = ("fvd_fp", "fidelity", "vbench")  # `tfmq-video eval` groups of the W4A8 report

DEFAULT_CAPTIONS = (
    "a red square moving left",
    "a blue circle moving down",
    "a yellow triangle moving right",
    "a green square moving up",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tfmq-video demo``."""
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    parser.add_argument("--captions", nargs="+", default=list(DEFAULT_CAPTIONS),
                        help="captions in the toy vocabulary, e.g. 'a red square moving left'")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="one noise seed per caption (default: 0, 1, 2, ...)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the toy recipe's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--model", type=Path, default=None, help="an STDiT3 folder (default: the bundled toy model)")
    parser.add_argument("--format", choices=("mp4", "gif"), default="mp4", help="video file format (default: mp4)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quantize", choices=("w4a8", "none"), default="w4a8",
                        help="calibrate and run a quantized model too (default: w4a8)")
    parser.add_argument("--recipe", type=Path, default=None,
                        help=f"calibration recipe (default: {DEMO_RECIPE.relative_to(REPO_ROOT)})")


def video_suffix(requested: str) -> str:
    """``.mp4`` when PyAV can encode, else ``.gif`` with a warning."""
    if requested == "gif":
        return ".gif"
    try:
        import av  # noqa: F401
    except ImportError:
        log.warning("PyAV is not installed (pip install 'tfmq-video[video]'): writing GIFs instead of mp4")
        return ".gif"
    return ".mp4"


def file_stem(index: int, caption: str, seed: int) -> str:
    """A readable, filesystem-safe name for one generated video."""
    return f"{index:02d}_{caption.replace(' ', '-')}_seed{seed}"


def sampler_config_from(args: argparse.Namespace) -> SamplerConfig:
    """The toy sampler with the command line's overrides."""
    from tfmq_video.toy.world import TOY_SAMPLER_CONFIG

    config = TOY_SAMPLER_CONFIG
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        config = dataclasses.replace(config, num_steps=args.steps)
    if args.guidance is not None:
        config = dataclasses.replace(config, guidance_scale=args.guidance)
    return config


def check_inputs(args: argparse.Namespace) -> list[int]:
    """Validate captions, seeds and the recipe path before any work; returns the seeds."""
    from tfmq_video.toy.world import toy_text_encoder

    seeds = list(range(len(args.captions))) if args.seeds is None else args.seeds
    if len(seeds) != len(args.captions):
        raise ConfigError(f"--seeds gives {len(seeds)} seeds for {len(args.captions)} captions; give one per caption")
    encoder = toy_text_encoder()
    for caption in args.captions:
        encoder.tokenize(caption)
    if args.quantize != "none":
        recipe = args.recipe or DEMO_RECIPE
        if not Path(recipe).is_file():
            raise ConfigError(f"calibration recipe {recipe} not found; pass --recipe FILE.yaml (see configs/)")
        _check_report_dependencies()
    return seeds


def _check_report_dependencies() -> None:
    """The W4A8 report's flow metrics need OpenCV: say so before minutes of work, not after."""
    from eval_video.evaluate import expand_metrics
    from eval_video.frame_models import opencv_missing

    reason = opencv_missing(expand_metrics(list(REPORT_METRICS)), raft=False)
    if reason is not None:
        raise ConfigError(f"the demo's evaluation report: {reason}; or run with --quantize none")


def write_videos(out: Path, tag: str, captions: list[str], seeds: list[int], clips: np.ndarray, suffix: str
                 ) -> list[dict]:
    """One video file per clip under ``out/tag/`` (same names for FP and quantized); returns their records."""
    (out / tag).mkdir(parents=True, exist_ok=True)
    from eval_video.io import write_video
    from tfmq_video.toy.world import TOY_FPS

    records = []
    for index, (caption, seed, clip) in enumerate(zip(captions, seeds, clips, strict=True)):
        path = write_video(out / tag / f"{file_stem(index, caption, seed)}{suffix}", clip, fps=TOY_FPS)
        records.append({"caption": caption, "seed": seed, "path": str(path)})
    return records


def quantized_stage(args: argparse.Namespace, model: torch.nn.Module, seeds: list[int], sampler: SamplerConfig,
                    fp_clips: np.ndarray, suffix: str) -> dict:
    """Calibrate W4A8 TFMQ, save it, generate the same videos and compare them with FP."""
    from eval_video.fidelity import psnr
    from eval_video.io import write_comparison_strip
    from tfmq_video.calib.api import calibrate_recipe
    from tfmq_video.calib.checkpoint import save_calibrated
    from tfmq_video.quant.config import load_config
    from tfmq_video.toy.data import tensor_to_clips
    from tfmq_video.toy.world import generate_latents

    recipe_path = args.recipe or DEMO_RECIPE
    log.info("calibrating W4A8 TFMQ with %s", recipe_path)
    started = time.perf_counter()
    qmodel = calibrate_recipe(load_config(recipe_path), model=model)
    calib_seconds = time.perf_counter() - started
    checkpoint = save_calibrated(qmodel, args.out / "w4a8_checkpoint")
    started = time.perf_counter()
    latents = generate_latents(qmodel, model.y_embedder.y_embedding, args.captions, seeds,
                               sampler_config=sampler, progress=True)
    seconds = time.perf_counter() - started
    clips = tensor_to_clips(latents)
    videos = write_videos(args.out, "w4a8", args.captions, seeds, clips, suffix)
    for index, (video, fp, quantized) in enumerate(zip(videos, fp_clips, clips, strict=True)):
        video["psnr_vs_fp"] = round(psnr(quantized, fp), 2)
        video["strip"] = str(write_comparison_strip(args.out / f"compare_{index:02d}.png", fp, quantized,
                                                    labels=("FP", "W4A8 TFMQ")))
    report = evaluation_report(args.out)
    return {
        "report": report,
        "recipe": str(recipe_path),
        "checkpoint": str(checkpoint),
        "calibration_seconds": round(calib_seconds, 1),
        "generation_seconds": round(seconds, 2),
        "temporal_feature_error": qmodel.report["temporal"]["temporal_feature_error"],
        "mean_psnr_vs_fp": round(float(np.mean([v["psnr_vs_fp"] for v in videos])), 2),
        "videos": videos,
    }


def evaluation_report(out: Path) -> str:
    """``tfmq-video eval`` of the W4A8 videos against FP (toy backbone and proxies); returns the report path."""
    from eval_video.evaluate import EvalConfig, evaluate, expand_metrics, write_reports

    config = EvalConfig(videos=[out / "w4a8"], labels=["W4A8 TFMQ"], fp=out / "fp",
                        metrics=expand_metrics(list(REPORT_METRICS)), fvd_backbone="toy", frame_proxy="toy", progress=False)
    written = write_reports(evaluate(config, out / "report"), out / "report.json", out / "report.md", out / "report")
    return str(written[-1])


def run(args: argparse.Namespace) -> int:
    """Generate, (calibrate, compare,) write and report the demo videos."""
    from eval_video.io import make_strip, write_png
    from tfmq_video.toy.world import generate_clips, load_toy_stdit3

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = check_inputs(args)
    sampler = sampler_config_from(args)
    model = load_toy_stdit3(args.model)
    log.info("generating %d FP videos (%d steps, guidance %.1f) on the CPU", len(seeds), sampler.num_steps,
             sampler.guidance_scale)
    started = time.perf_counter()
    clips = generate_clips(model, args.captions, seeds, sampler_config=sampler, progress=True)
    seconds = time.perf_counter() - started

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    suffix = video_suffix(args.format)
    videos = write_videos(out, "fp", args.captions, seeds, clips, suffix)
    strip = write_png(out / "fp_strip.png", make_strip({v["caption"]: c for v, c in zip(videos, clips, strict=True)}))
    summary: dict = {
        "model": str(args.model or "bundled toy STDiT3"),
        "sampler": dataclasses.asdict(sampler),
        "generation_seconds": round(seconds, 2),
        "videos": videos,
        "strip": str(strip),
    }
    print(f"generated {len(videos)} FP videos in {seconds:.1f} s")
    for video in videos:
        print(f"  {video['path']}  ({video['caption']}, seed {video['seed']})")
    print(f"frame strip: {strip}")
    if args.quantize != "none":
        summary["w4a8"] = quantized_stage(args, model, seeds, sampler, clips, suffix)
        q = summary["w4a8"]
        print(f"calibrated W4A8 TFMQ in {q['calibration_seconds']:.0f} s -> {q['checkpoint']}")
        print(f"evaluation report (W4A8 vs FP): {q['report']}")
        for video in q["videos"]:
            print(f"  {video['path']}  PSNR vs FP {video['psnr_vs_fp']:.1f} dB, strip {video['strip']}")
    write_text_atomic(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    print(f"summary:     {out / 'demo.json'}")
    return 0
