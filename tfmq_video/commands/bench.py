"""``tfmq-video bench {kernels,model,quality,seeds}``: each benchmark prints a table and writes JSON."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tfmq_video.cli import register_subcommands

# benchmark name -> (module exposing add_arguments/run, help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("tfmq_video.bench.kernels", "quantized GEMM and attention kernels against fp32, bf16 and torchao"),
    "model": ("tfmq_video.bench.model", "full sampling runs at fp32, bf16, W8A8 and W4A8 on every backend"),
    "quality": ("tfmq_video.commands.bench_quality", "quality table on the toy world: FP, baselines, TFMQ (FVD, PSNR)"),
    "seeds": ("tfmq_video.commands.bench_seeds", "methods compared over calibration seeds, from several quality runs"),
}


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    """Register one sub-parser per benchmark; only the one named in ``argv`` is imported."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    register_subcommands(sub, BENCHMARKS, argv, "_bench_run")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen benchmark."""
    return int(args._bench_run(args) or 0)
