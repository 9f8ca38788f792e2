"""The ``tfmq-video`` command line: one subcommand per module, imported only when used.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; adding a
command means adding one line to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Mapping, Sequence

from tfmq_video.errors import TFMQError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tfmq_video.commands.demo", "generate videos with the bundled toy model (and quantize it)"),
    "calibrate": ("tfmq_video.commands.calibrate", "calibrate a model with a YAML recipe and save the checkpoint"),
    "export": ("tfmq_video.commands.export", "write a calibrated checkpoint as packed integer weights"),
    "bench": ("tfmq_video.commands.bench", "benchmarks: kernels, model, quality"),
    "eval": ("eval_video.command", "evaluate generated videos (FVD, VBench-style, fidelity vs FP)"),
}


def first_positional(argv: Sequence[str]) -> str | None:
    """The first argument that is not an option (the chosen subcommand), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def register_subcommands(
    subparsers: argparse._SubParsersAction,
    registry: Mapping[str, tuple[str, str]],
    argv: Sequence[str],
    run_attribute: str,
) -> None:
    """Add one sub-parser per registry entry; import only the module of the command in ``argv``.

    Unchosen commands get an argument-less parser, so ``--help`` lists every command
    without importing heavy modules, and a missing optional module only breaks its own
    command. A module whose ``add_arguments`` takes a second parameter (a command group
    such as ``bench``) receives the arguments that follow its name.
    """
    chosen = first_positional(argv)
    rest = list(argv[argv.index(chosen) + 1:]) if chosen is not None else []
    for name, (module_name, help_text) in registry.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise SystemExit(f"'{name}' is not available in this installation: {err}") from err
        if len(inspect.signature(module.add_arguments).parameters) > 1:
            module.add_arguments(parser, rest)
        else:
            module.add_arguments(parser)
        parser.set_defaults(**{run_attribute: module.run})


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The top-level parser; the module of the subcommand named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(prog="tfmq-video", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_subcommands(sub, SUBCOMMANDS, argv, "_run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except TFMQError as err:
        print(f"tfmq-video {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
