"""``tfmq-video demo``: the main job on the bundled toy world, end to end on a CPU.

Generates a few captioned videos with the bundled toy STDiT3 (full precision), writes each
as an mp4 (GIF when PyAV is missing), one PNG strip with a labelled row per video and a
``demo.json`` summary, and prints where they are. Calibration, quantized generation and
evaluation join this command as those stages land.
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

from tfmq_video.errors import ConfigError

log = logging.getLogger(__name__)

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


def run(args: argparse.Namespace) -> int:
    """Generate, write and report the demo videos."""
    from eval_video.io import make_strip, write_png, write_video
    from tfmq_video.toy.world import (
        TOY_FPS,
        TOY_SAMPLER_CONFIG,
        generate_clips,
        load_toy_stdit3,
        toy_text_encoder,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(len(args.captions))) if args.seeds is None else args.seeds
    if len(seeds) != len(args.captions):
        raise ConfigError(f"--seeds gives {len(seeds)} seeds for {len(args.captions)} captions; give one per caption")
    encoder = toy_text_encoder()
    for caption in args.captions:
        encoder.tokenize(caption)  # fail on an unknown word before any work
    sampler_config = TOY_SAMPLER_CONFIG
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        sampler_config = dataclasses.replace(sampler_config, num_steps=args.steps)
    if args.guidance is not None:
        sampler_config = dataclasses.replace(sampler_config, guidance_scale=args.guidance)

    model = load_toy_stdit3(args.model)
    log.info("generating %d videos (%d steps, guidance %.1f) on %s", len(seeds), sampler_config.num_steps,
             sampler_config.guidance_scale, "CPU" if not torch.cuda.is_available() else "CPU (demo runs on CPU)")
    started = time.perf_counter()
    clips = generate_clips(model, args.captions, seeds, sampler_config=sampler_config, progress=True)
    seconds = time.perf_counter() - started

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    suffix = video_suffix(args.format)
    videos = []
    for index, (caption, seed, clip) in enumerate(zip(args.captions, seeds, clips, strict=True)):
        path = write_video(out / (file_stem(index, caption, seed) + suffix), clip, fps=TOY_FPS)
        videos.append({"caption": caption, "seed": seed, "path": str(path)})
    strip = write_png(out / "fp_strip.png", make_strip({v["caption"]: c for v, c in zip(videos, clips, strict=True)}))
    summary = {
        "model": str(args.model or "bundled toy STDiT3"),
        "sampler": dataclasses.asdict(sampler_config),
        "generation_seconds": round(seconds, 2),
        "videos": videos,
        "strip": str(strip),
        "mean_pixel": float(np.mean(clips)),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"generated {len(videos)} videos in {seconds:.1f} s")
    for video in videos:
        print(f"  {video['path']}  ({video['caption']}, seed {video['seed']})")
    print(f"frame strip: {strip}")
    print(f"summary:     {out / 'demo.json'}")
    return 0
