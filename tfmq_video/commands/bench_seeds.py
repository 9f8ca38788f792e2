"""``tfmq-video bench seeds RUN.json ...``: methods compared over calibration seeds.

Merges the JSON records of several ``bench quality`` runs (refusing runs scored against other FP
videos), prints each method's per-seed values with mean ± std and, for every pair of methods at
the same setting, the share of seed pairs one wins and the exact one-sided Mann-Whitney p, and
over the seeds both have, the share of seeds it wins and the exact one-sided Wilcoxon
signed-rank p of the paired differences. See :mod:`tfmq_video.calib.seed_stats`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tfmq_video.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench seeds``."""
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by `bench quality --json`")
    parser.add_argument("--metrics", nargs="+", default=["fvd_fp", "fvd", "psnr_fp"],
                        help="row keys to compare (default: fvd_fp fvd psnr_fp)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="keep only these methods, tagged or not (default: all)")
    parser.add_argument("--tag", nargs="+", default=[], metavar="PATTERN=LABEL",
                        help="compare recipes: the methods of runs whose path matches PATTERN (fnmatch) become "
                             "METHOD@LABEL, e.g. --tag '*g64i*=g64i' '*g64_*=g64' (the first match counts)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the merged rows and comparisons")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: per-seed values per method and metric")


def run(args: argparse.Namespace) -> int:
    """Merge, print the tables, write JSON and the plot."""
    from eval_video._files import write_text_atomic
    from tfmq_video.calib.seed_stats import (
        FP_METHODS,
        METRIC_DIRECTION,
        compare_methods,
        comparisons_table,
        load_runs,
        parse_tags,
        plot_seeds,
        seeds_table,
    )

    unknown = sorted(set(args.metrics) - set(METRIC_DIRECTION))
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; available: {sorted(METRIC_DIRECTION)}")
    rows = load_runs(args.runs, parse_tags(args.tag))
    if args.methods:
        names = {name for row in rows for name in (row["method"], row["method"].split("@")[0])}
        missing = sorted(set(args.methods) - names)
        if missing:
            raise ConfigError(f"no rows of {missing} in the given runs")
        keep = (*args.methods, *FP_METHODS)
        rows = [row for row in rows if row["method"] in keep or row["method"].split("@")[0] in keep]
    comparisons = [c for metric in args.metrics for c in compare_methods(rows, metric)]
    print(seeds_table(rows, args.metrics))
    print()
    print(comparisons_table(comparisons))
    if args.json:
        record = {"runs": [str(p) for p in args.runs], "rows": rows,
                  "comparisons": [asdict(c) for c in comparisons]}
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_seeds(rows, args.metrics, str(args.plot))
    return 0
