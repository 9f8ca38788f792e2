"""Quality rows of several ``bench quality`` runs, compared over calibration seeds.

One run of ``tfmq-video bench quality`` at N = 512 videos takes half an hour per method and
calibration seed on a 2-core CPU, so the seeds of a comparison come from several runs (and
sessions). This module merges their JSON records, checks that they were scored against the same
FP videos, and compares two methods seed against seed:

- ``wins``: the share of (seed of A, seed of B) pairs in which A is better;
- ``p_value``: the exact one-sided Mann-Whitney U test of "A is better than B" (the share of
  the ways to split the pooled values into groups of the two sizes whose U is at least the one
  observed). With 3 or 4 seeds per method the smallest reachable p is 1/35 (3 and 4) or 1/70
  (4 and 4): few seeds cannot give strong evidence, and the table says how much they give.
- ``paired_wins`` and ``paired_p``: the same comparison seed against the same seed, over the
  seeds both methods were calibrated with. A calibration seed draws the reconstruction rows and
  the order of their minibatches (``calib/reconstruction.py``), the same for every method, so
  rows of one seed share that draw and its luck; the exact one-sided Wilcoxon signed-rank test
  of the per-seed differences takes it out. With n common seeds the smallest p is 1 / 2**n.

``tfmq-video bench seeds RUN.json ...`` prints the per-seed values, the mean ± std and the
pairwise comparisons, writes them as JSON and plots the values with the FP noise floor.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfmq_video.errors import ConfigError

# metric -> whether a lower value is better
METRIC_DIRECTION: dict[str, bool] = {"fvd": True, "fvd_fp": True, "psnr_fp": False, "feature_error_fp": True,
                                     "fvd_fp_mean_term": True, "label_flips_fp": True,
                                     "label_flips_fp_shape": True, "label_flips_fp_color": True,
                                     "label_flips_fp_direction": True, "temporal_feature_error": True}
FP_METHODS = ("fp", "fp-reseed")
# the same FP videos scored in two processes agree to about 1e-7 (the matrix square root of FVD
# and threaded BLAS sums are not bit-reproducible); other videos differ in the second digit
FP_MATCH_TOLERANCE = 1e-5

Setting = tuple[str, int, int, int]  # method, wbits, abits, num_videos


@dataclass(frozen=True)
class SeedComparison:
    """Method A against method B on ``metric`` over their calibration seeds."""

    metric: str
    setting: tuple[int, int, int]  # wbits, abits, num_videos
    method_a: str
    method_b: str
    seeds_a: int
    seeds_b: int
    wins: float  # share of seed pairs in which A is better (ties count half)
    p_value: float  # exact one-sided Mann-Whitney: A better than B
    paired_seeds: int  # calibration seeds both methods have
    paired_wins: float | None  # share of those seeds at which A is better (ties count half)
    paired_p: float | None  # exact one-sided Wilcoxon signed-rank over those seeds: A better than B


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["method"], row["wbits"], row["abits"], row.get("num_videos"), row.get("calib_seed"),
            row.get("reseed"))


def merge_runs(records: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of several ``bench quality`` records (``(name, record)``), each once.

    A row measured in two runs (same method, bits, videos, calibration seed and FP re-seed) must
    carry the same ``fvd`` and ``fvd_fp`` in both: the FP rows are how two runs show that they
    scored against the same FP videos, so a mismatch is an error naming both runs. Rows of
    different devices (``device``, CPU when absent) are refused together."""
    merged: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    devices: dict[str, str] = {}  # device type -> first run measured on it
    for name, record in records:
        rows = record.get("rows") if isinstance(record, dict) else None
        if not isinstance(rows, list):
            raise ConfigError(f"{name}: not a `bench quality` record (no list under 'rows')")
        for row in rows:
            missing = [k for k in ("method", "wbits", "abits", "fvd", "fvd_fp") if k not in row]
            if missing:
                raise ConfigError(f"{name}: a row lacks {missing}: {row}")
            devices.setdefault(row.get("device", "cpu"), name)
            if len(devices) > 1:
                (first_device, first_run), (device, run) = list(devices.items())[:2]
                raise ConfigError(f"{first_run} was measured on {first_device} and {run} on {device}: rows of "
                                  "different devices round differently and are scored against other FP videos; "
                                  "compare the runs of one device at a time")
            key = _row_key(row)
            if key in merged:
                first_name, first = merged[key]
                if any(not math.isclose(first[k], row[k], rel_tol=FP_MATCH_TOLERANCE, abs_tol=FP_MATCH_TOLERANCE)
                       for k in ("fvd", "fvd_fp")):
                    why = ("they were not scored against the same FP videos (other model, captions, seeds or "
                           "--num-videos), so their rows cannot be compared" if row["method"] in FP_METHODS else
                           "the same method and calibration seed gave other videos (another machine or code "
                           "version); pass only one of the two runs")
                    raise ConfigError(
                        f"{first_name} and {name} disagree on the row {key[:5]}: fvd {first['fvd']:.9g} vs "
                        f"{row['fvd']:.9g}, fvd_fp {first['fvd_fp']:.9g} vs {row['fvd_fp']:.9g}; {why}")
                continue
            merged[key] = (name, row)
    return [row for _, row in merged.values()]


def parse_tags(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``PATTERN=LABEL`` strings as (fnmatch pattern over run paths, label) pairs."""
    tags = []
    for spec in specs:
        pattern, sep, label = spec.rpartition("=")
        if not sep or not pattern or not label or "@" in label:
            raise ConfigError(f"--tag {spec!r}: use PATTERN=LABEL, e.g. '*g64i*=g64i' (a label without '@')")
        tags.append((pattern, label))
    return tags


def tag_rows(name: str, record: Any, tags: Sequence[tuple[str, str]]) -> Any:
    """``record`` with ``@LABEL`` added to its non-FP methods, LABEL from the first tag whose pattern
    matches the run's path ``name`` (unchanged when none does). FP rows keep their names: tagged runs
    of other recipes still share (and are checked against) the same FP videos."""
    label = next((label for pattern, label in tags if fnmatch.fnmatchcase(name, pattern)), None)
    if label is None or not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        return record
    rows = [row if row.get("method") in FP_METHODS else {**row, "method": f"{row.get('method')}@{label}"}
            for row in record["rows"]]
    return {**record, "rows": rows}


def load_runs(paths: Sequence[Path], tags: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """:func:`merge_runs` of the JSON files at ``paths``, methods tagged by :func:`tag_rows`."""
    records = []
    for path in paths:
        try:
            records.append((str(path), tag_rows(str(path), json.loads(Path(path).read_text()), tags)))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a JSON written by `tfmq-video bench quality --json`)") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not JSON ({err})") from None
    return merge_runs(records)


def values_by_seed(rows: Sequence[dict[str, Any]], metric: str) -> dict[Setting, dict[int, float]]:
    """``metric`` per calibration seed, for every (method, wbits, abits, num_videos)."""
    values: dict[Setting, dict[int, float]] = {}
    for row in rows:
        if row["method"] in FP_METHODS or "calib_seed" not in row or row.get(metric) is None:
            continue
        key = (row["method"], row["wbits"], row["abits"], row.get("num_videos", 0))
        values.setdefault(key, {})[int(row["calib_seed"])] = float(row[metric])
    return values


def mann_whitney_u(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True) -> float:
    """Pairs (x in a, y in b) in which x is better than y; ties count half."""
    sign = 1.0 if lower_is_better else -1.0
    return sum(1.0 if sign * (x - y) < 0 else 0.5 if x == y else 0.0 for x in a for y in b)


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _subset_sum_counts(weights: Sequence[int], size: int | None = None) -> list[dict[int, int]]:
    """``counts[k][s]``: how many subsets of ``weights`` have k members and sum s (k up to
    ``size``, or all of them). Counting instead of listing keeps the exact tests exact at any
    number of seeds (C(34, 17) = 2.3e9 splits are too many to list)."""
    top = len(weights) if size is None else size
    counts: list[dict[int, int]] = [{0: 1}] + [{} for _ in range(top)]
    for weight in weights:
        for k in range(top, 0, -1):
            for total, ways in counts[k - 1].items():
                counts[k][total + weight] = counts[k].get(total + weight, 0) + ways
    return counts


def mann_whitney_p(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True) -> float:
    """Exact one-sided p of "a is better than b": the share of the splits of the pooled values
    into groups of ``len(a)`` and ``len(b)`` whose U is at least the observed one.

    U (ties counting half) is a's rank sum in the pooled values, shifted: a's share of the pairs
    that a wins falls as its rank sum rises (lower is better) or rises with it. So the splits are
    counted by rank sum (doubled ranks: tied values share a half rank)."""
    if not a or not b:
        raise ValueError("both groups need at least one value")
    doubled = [round(2 * r) for r in _average_ranks([*a, *b])]
    observed = sum(doubled[: len(a)])
    by_sum = _subset_sum_counts(doubled, len(a))[len(a)]
    sign = -1 if lower_is_better else 1
    at_least = sum(ways for total, ways in by_sum.items() if sign * (total - observed) >= 0)
    return at_least / math.comb(len(doubled), len(a))


def signed_rank_p(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True) -> float:
    """Exact one-sided p of "a is better than b" for paired values (``a[i]`` and ``b[i]`` at the
    same seed): the Wilcoxon signed-rank statistic (the ranks of the nonzero ``|differences|``
    where a is better, summed) against all 2**n ways to flip the differences' signs."""
    if len(a) != len(b) or not a:
        raise ValueError("signed_rank_p needs two equally long, nonempty lists of paired values")
    sign = 1.0 if lower_is_better else -1.0
    gains = [sign * (y - x) for x, y in zip(a, b, strict=True) if x != y]  # > 0: a better
    if not gains:
        return 1.0
    doubled = [round(2 * r) for r in _average_ranks([abs(g) for g in gains])]
    observed = sum(r for r, g in zip(doubled, gains, strict=True) if g > 0)
    counts = _subset_sum_counts(doubled)
    at_least = sum(ways for by_sum in counts for total, ways in by_sum.items() if total >= observed)
    return at_least / 2 ** len(doubled)


def _paired(seeds_a: dict[int, float], seeds_b: dict[int, float], lower: bool) -> tuple[int, float | None, float | None]:
    common = sorted(set(seeds_a) & set(seeds_b))
    if not common:
        return 0, None, None
    a, b = [seeds_a[s] for s in common], [seeds_b[s] for s in common]
    wins = sum(mann_whitney_u([x], [y], lower) for x, y in zip(a, b, strict=True))  # ties count half
    return len(common), wins / len(common), signed_rank_p(a, b, lower)


def compare_methods(rows: Sequence[dict[str, Any]], metric: str) -> list[SeedComparison]:
    """Every ordered pair of methods measured at the same setting, on ``metric``."""
    if metric not in METRIC_DIRECTION:
        raise ConfigError(f"unknown metric {metric!r}; available: {sorted(METRIC_DIRECTION)}")
    lower = METRIC_DIRECTION[metric]
    values = values_by_seed(rows, metric)
    comparisons = []
    for (method_a, *setting_a), seeds_a in values.items():
        for (method_b, *setting_b), seeds_b in values.items():
            if method_a == method_b or setting_a != setting_b:
                continue
            a, b = list(seeds_a.values()), list(seeds_b.values())
            comparisons.append(SeedComparison(metric, tuple(setting_a), method_a, method_b, len(a), len(b),
                                              mann_whitney_u(a, b, lower) / (len(a) * len(b)),
                                              mann_whitney_p(a, b, lower), *_paired(seeds_a, seeds_b, lower)))
    return comparisons


def seeds_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown: one line per (method, setting), each metric's per-seed values and mean ± std."""
    lines = ["| method | W | A | N | seeds | " + " | ".join(metrics) + " |", "|" + "---|" * (5 + len(metrics))]
    per_metric = {metric: values_by_seed(rows, metric) for metric in metrics}
    keys = sorted({key for values in per_metric.values() for key in values}, key=lambda k: (k[1:], k[0]))
    for key in keys:
        seeds = sorted({s for m in metrics for s in per_metric[m].get(key, {})})
        cells = []
        for metric in metrics:
            by_seed = per_metric[metric].get(key, {})
            vals = [by_seed[s] for s in seeds if s in by_seed]
            spread = f" ({np.mean(vals):.4g} ± {np.std(vals, ddof=1):.2g})" if len(vals) > 1 else ""
            cells.append(" / ".join(f"{by_seed[s]:.4g}" for s in seeds if s in by_seed) + spread)
        method, wbits, abits, videos = key
        lines.append(f"| {method} | {wbits} | {abits} | {videos} | {','.join(map(str, seeds))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_table(comparisons: Sequence[SeedComparison]) -> str:
    """Markdown: one line per comparison."""
    lines = ["| metric | W | A | N | A | B | seeds A, B | A better in (share of seed pairs) | p (one-sided) "
             "| common seeds | A better at the same seed | p paired (one-sided) |",
             "|" + "---|" * 12]
    for c in comparisons:
        wbits, abits, videos = c.setting
        paired = (f"{c.paired_seeds} | {c.paired_wins:.2f} | {c.paired_p:.3f}" if c.paired_p is not None
                  else "0 | - | -")
        lines.append(f"| {c.metric} | {wbits} | {abits} | {videos} | {c.method_a} | {c.method_b} | "
                     f"{c.seeds_a}, {c.seeds_b} | {c.wins:.2f} | {c.p_value:.3f} | {paired} |")
    return "\n".join(lines)


def plot_seeds(rows: Sequence[dict[str, Any]], metrics: Sequence[str], path: str) -> None:
    """One panel per metric: each method's per-seed values (dots) and mean (bar), with the band
    of the re-seeded FP runs (mean ± std) where the rows have them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfmq_video.calib.quality import fp_noise_floor

    reseeded = [row for row in rows if row["method"] == "fp-reseed"]
    floor = fp_noise_floor(rows) if reseeded else None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = values_by_seed(rows, metric)
        keys = sorted(values, key=lambda k: (k[1:], k[0]))
        for x, key in enumerate(keys):
            seeds = sorted(values[key])
            ys = [values[key][s] for s in seeds]
            ax.scatter([x] * len(ys), ys, s=18, zorder=3)
            for s, y in zip(seeds, ys, strict=True):
                ax.annotate(str(s), (x, y), xytext=(4, 0), textcoords="offset points", fontsize=6)
            ax.hlines(np.mean(ys), x - 0.25, x + 0.25, colors="black", linewidth=1.5)
        if floor is not None and metric in ("fvd", "fvd_fp"):  # re-seeded PSNR compares other noise
            mean, std = floor[metric], floor[f"{metric}_std"]
            ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, label="FP noise floor (mean ± std)")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(keys)), [f"{k[0]}\nW{k[1]}A{k[2]} N={k[3]}" for k in keys], fontsize=7)
        ax.set_title(f"{metric} ({'lower' if METRIC_DIRECTION[metric] else 'higher'} is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
