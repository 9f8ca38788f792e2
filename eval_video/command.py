"""``tfmq-video eval``: evaluate folders of generated videos and write JSON + markdown/HTML reports.

Example (toy world, offline)::

    tfmq-video eval --videos out/w4a8 out/w8a8 --reference out/real --fp out/fp \\
        --fvd-backbone toy --metrics fvd fvd_fp fidelity vbench --frame-proxy toy \\
        --out eval.json --report eval.md
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eval_video.evaluate import (
    DEFAULT_METRICS,
    GROUPS,
    METRICS,
    EvalConfig,
    evaluate,
    expand_metrics,
    write_reports,
)
from tfmq_video.errors import ConfigError

logger = logging.getLogger(__name__)


def _inputs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("videos")
    group.add_argument("--videos", type=Path, nargs="+", required=True, metavar="DIR",
                       help="folder(s) of videos to evaluate, one per method (mp4/webm/gif or sub-folders of frames)")
    group.add_argument("--labels", nargs="+", metavar="LABEL", help="a name per --videos folder (default: folder names)")
    group.add_argument("--reference", type=Path, metavar="DIR", help="reference (real) videos for FVD")
    group.add_argument("--fp", type=Path, metavar="DIR",
                       help="full-precision videos from the same seeds (same file names) for FVD-FP and fidelity")
    group.add_argument("--fps", type=float, help="frame rate of frame folders (default 8)")
    group.add_argument("--pad-short", action="store_true",
                       help="repeat the last frame of videos shorter than the FVD clip (default: error)")
    group.add_argument("--latents", type=Path, nargs="+", metavar="DIR",
                       help="folders of <name>.safetensors latents, one per --videos (for rel_l2/cosine of latents)")
    group.add_argument("--fp-latents", type=Path, metavar="DIR", help="folder of the FP latents")
    group.add_argument("--prompts", type=Path, metavar="FILE.json", help="{video name: caption} for CLIPSIM")


def _networks(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("networks (local files only; nothing is downloaded)")
    group.add_argument("--fvd-backbone", choices=("i3d", "toy"),
                       help="FVD feature network: i3d (needs --i3d-weights) or toy (toy-world proxy); required for FVD")
    group.add_argument("--i3d-weights", type=Path, metavar="FILE",
                       help="pytorch-i3d state dict as .safetensors, or StyleGAN-V's i3d_torchscript.pt")
    group.add_argument("--i3d-bn-eps", type=float, default=1e-3,
                       help="BatchNorm epsilon of the I3D state dict (pytorch-i3d: 1e-3; some FVD copies: 1e-5)")
    group.add_argument("--feature-cache", type=Path, metavar="DIR", help="cache FVD features of video sets here")
    group.add_argument("--raft", type=Path, metavar="FILE", help="RAFT-large safetensors (default: OpenCV flow proxy)")
    group.add_argument("--dino", type=Path, metavar="DIR", help="DINO ViT-B/16 folder (subject consistency)")
    group.add_argument("--clip-b32", type=Path, metavar="DIR", help="CLIP ViT-B/32 folder (background consistency, CLIP*)")
    group.add_argument("--clip-l14", type=Path, metavar="DIR", help="CLIP ViT-L/14 folder (aesthetic quality)")
    group.add_argument("--aesthetic-head", type=Path, metavar="FILE", help="LAION aesthetic linear head (.safetensors)")
    group.add_argument("--frame-proxy", choices=("toy",),
                       help="use the toy classifier as a labelled proxy encoder where no weights are given")
    group.add_argument("--device", default="cpu", help="torch device for I3D (default cpu)")
    group.add_argument("--batch-size", type=int, default=8, help="clips per FVD forward pass (default 8)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``eval`` options."""
    _inputs(parser)
    _networks(parser)
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                        help=f"metrics or groups ({', '.join(GROUPS)}); metrics: {', '.join(METRICS)}")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="the JSON report")
    parser.add_argument("--report", type=Path, metavar="FILE.md|FILE.html",
                        help="readable report with plots (default: --out with .md)")
    parser.add_argument("--strips", type=int, default=4, help="FP | quantized | difference strips per method")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` the options describe."""
    if args.out.suffix != ".json":
        raise ConfigError(f"--out {args.out}: the report file must end in .json")
    return EvalConfig(
        videos=list(args.videos), labels=args.labels, reference=args.reference, fp=args.fp,
        metrics=expand_metrics(args.metrics), fvd_backbone=args.fvd_backbone, i3d_weights=args.i3d_weights,
        i3d_bn_eps=args.i3d_bn_eps, feature_cache=args.feature_cache, pad_short=args.pad_short,
        raft_weights=args.raft, dino=args.dino, clip_b32=args.clip_b32, clip_l14=args.clip_l14,
        aesthetic_head=args.aesthetic_head, frame_proxy=args.frame_proxy, latents=args.latents,
        fp_latents=args.fp_latents, prompts=args.prompts, fps=args.fps, strips=args.strips,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the reports, print a one-line summary per metric; 0 on success."""
    config = config_from_args(args)
    readable = args.report or args.out.with_suffix(".md")
    assets = readable.with_name(readable.stem + "_files")
    report = evaluate(config, assets)
    for path in write_reports(report, args.out, readable, assets):
        print(f"wrote {path}")
    for label, results in report.methods.items():
        for r in results:
            value = f"{r.value:.4g}" if r.value is not None else f"skipped ({r.skipped})"
            print(f"{label:>16}  {r.metric:<24} {value}{'  [proxy]' if r.proxy else ''}  N={r.n}")
    return 0
