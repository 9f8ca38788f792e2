"""``tfmq-video bench {kernels,model,quality}``: each benchmark prints a table and writes JSON."""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> (module exposing add_arguments/run, help)
BENCHMARKS: dict[str, tuple[str, str]] = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one sub-parser per available benchmark."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen benchmark."""
    return int(args._bench_run(args) or 0)
