"""Hold the blocks fixed, swap the temporal information block: how much can a TIB treatment move
the videos of a whole quantized model?

Across calibration seeds, whole-model ``fvd_fp`` at W4A8 varies more than any TIB treatment
could explain (docs/results.md, sessions 7-12). This study removes that noise: for each seed it
calibrates one whole model with ``--blocks-method`` and then serves it with each TIB of
``--tib`` in turn, grafted by :func:`tfmq_video.calib.tib.graft_tib`, so the variants of a seed
share every block and differ in their TIB alone:

- ``fp``: the FP TIB (the best any TIB treatment can do);
- a method name: the TIB as that method calibrates it (alone, with every other layer FP, as in
  ``tools/compare_tib_strategies.py``; the TIB depends on the timestep alone, so this is the same
  TIB as the method's whole-model calibration gives); the blocks method's own TIB is not grafted
  but served as calibrated (``native``).

The blocks are reconstructed on the features of the native TIB, which gives it a home advantage
over grafted ones (each grafted TIB also differs from the one the blocks saw).
``--blocks-method fp-tib`` removes it: the blocks are reconstructed with the TIB kept FP (the
``tfmq`` recipe otherwise), so every quantized TIB is a graft and ``fp`` is the native one.

Each variant generates the first N evaluation videos of the quality table and is scored against
FP; the table adds, per variant, the mean and range over seeds of its difference to the native
TIB (paired: same blocks, same seeds, same videos). Writes JSON and a plot of ``fvd_fp`` per
seed and variant.

    python tools/swap_tib_study.py --config configs/toy_stdit3_w4a8.yaml --tib fp rtn qdiffusion tfmq \\
        --seeds 0 1 2 --videos 128 --threads 2 --fp-cache fp_videos --json swap.json --plot swap.png
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compare_tib_strategies import only_tib_quantized, tib_only  # tools/ is on sys.path when run as a script

import tfmq_video
from dit_adapters.base import get_adapter
from eval_video._files import write_text_atomic
from tfmq_video.calib.baselines import METHODS, TIB_OFF, method_recipe
from tfmq_video.calib.quality import ToyEvaluator
from tfmq_video.calib.recorder import CalibrationSet, record_recipe_calibration
from tfmq_video.calib.tib import TemporalInformationBlock, feature_errors, graft_tib, mean_error
from tfmq_video.quant.config import RecipeConfig, load_config
from tfmq_video.quant.model import QuantizedModel
from tfmq_video.toy.families import toy_family_of_adapter

SCORES = ("fvd_fp", "fvd_fp_mean_term", "psnr_fp", "feature_error_fp", "fvd")
log = logging.getLogger("swap_tib_study")


FP_TIB_BLOCKS = "fp-tib"  # --blocks-method: blocks reconstructed with the TIB kept FP


def native_tib(blocks_method: str) -> str:
    """The TIB the blocks were reconstructed with: ``fp`` for ``fp-tib``, else the method's own."""
    return "fp" if blocks_method == FP_TIB_BLOCKS else blocks_method


def blocks_recipe(blocks_method: str, base: RecipeConfig, seed: int) -> RecipeConfig:
    """The whole-model recipe that gives the blocks (``fp-tib``: tfmq's with the TIB kept FP)."""
    bits = base.quant.weight.bits, base.quant.activation.bits
    recipe = method_recipe("tfmq" if blocks_method == FP_TIB_BLOCKS else blocks_method, *bits,
                           base.model_copy(update={"seed": seed}))
    if blocks_method == FP_TIB_BLOCKS:
        recipe = recipe.model_copy(update={"tib": recipe.tib.model_copy(update={**TIB_OFF, "keep_fp": True})})
    return recipe


def tib_donors(model: torch.nn.Module, calibration: CalibrationSet, base: RecipeConfig, methods: list[str],
               blocks_method: str) -> dict[str, QuantizedModel | None]:
    """Per TIB variant, the TIB-only calibration that donates it (None: FP, or the native TIB)."""
    adapter = get_adapter(base.model.adapter)
    donors: dict[str, QuantizedModel | None] = {}
    for method in methods:
        if method in ("fp", native_tib(blocks_method)):
            donors[method] = None
            continue
        wbits, abits = base.quant.weight.bits, base.quant.activation.bits
        recipe = only_tib_quantized(tib_only(method_recipe(method, wbits, abits, base), {}), model, adapter)
        start = time.perf_counter()
        donors[method] = tfmq_video.quantize(model, adapter, calibration, recipe)
        log.info("TIB of %s calibrated in %.0f s", method, time.perf_counter() - start)
    return donors


def served_error(qmodel: QuantizedModel, model: torch.nn.Module, tib: TemporalInformationBlock) -> float:
    """Temporal-feature error of what ``qmodel`` serves (mean over features and steps)."""
    with torch.no_grad():
        return mean_error(feature_errors(tib.features(qmodel.model, qmodel), tib.fp_features(model)))


def variant(qmodel: QuantizedModel, model: torch.nn.Module, tib_name: str, donor: QuantizedModel | None,
            blocks_method: str) -> QuantizedModel:
    """``qmodel`` served with the TIB ``tib_name``."""
    if tib_name == native_tib(blocks_method):
        return qmodel
    if tib_name == "fp":
        return graft_tib(qmodel, model)
    assert donor is not None
    return graft_tib(qmodel, donor.model, donor.temporal_cache)


def run_seed(model: torch.nn.Module, calibration: CalibrationSet, base: RecipeConfig, seed: int, blocks_method: str,
             donors: dict[str, QuantizedModel | None], evaluator: ToyEvaluator, fp: torch.Tensor,
             tib: TemporalInformationBlock) -> list[dict[str, Any]]:
    """One whole-model calibration at ``seed`` and the scores of each TIB variant."""
    recipe = blocks_recipe(blocks_method, base, seed)
    start = time.perf_counter()
    qmodel = tfmq_video.quantize(model, base.model.adapter, calibration, recipe)
    log.info("seed %d: %s calibrated in %.0f s", seed, blocks_method, time.perf_counter() - start)
    fp_features = evaluator.features(fp)
    rows = []
    for tib_name, donor in donors.items():
        served = variant(qmodel, model, tib_name, donor, blocks_method)
        scores = evaluator.score(evaluator.generate(served), fp, fp_features)
        rows.append({"seed": seed, "tib": tib_name, "native": tib_name == native_tib(blocks_method),
                     "temporal_feature_error": served_error(served, model, tib),
                     **{key: scores[key] for key in SCORES}})
        log.info("%s", rows[-1])
    return rows


def paired_differences(rows: list[dict[str, Any]], native: str) -> dict[str, dict[str, list[float]]]:
    """Per variant and score, the differences to the native TIB of the same seed."""
    by_seed = {(row["seed"], row["tib"]): row for row in rows}
    out: dict[str, dict[str, list[float]]] = {}
    for (seed, tib_name), row in by_seed.items():
        reference = by_seed[(seed, native)]
        for key in SCORES:
            out.setdefault(tib_name, {}).setdefault(key, []).append(row[key] - reference[key])
    return out


def markdown(rows: list[dict[str, Any]], native: str) -> str:
    """The per-seed table and the paired differences to the native TIB."""
    lines = ["| seed | TIB | temporal_feature_error | " + " | ".join(SCORES) + " |",
             "|---|---|---|" + "---|" * len(SCORES)]
    for row in rows:
        label = f"{row['tib']} (native)" if row["native"] else row["tib"]
        lines.append(f"| {row['seed']} | {label} | {row['temporal_feature_error']:.3g} | "
                     + " | ".join(f"{row[key]:.4g}" for key in SCORES) + " |")
    lines += ["", f"Paired differences to the {native} TIB (same seed and blocks): mean [min, max] over seeds", "",
              "| TIB | " + " | ".join(f"Δ {key}" for key in SCORES) + " |", "|---|" + "---|" * len(SCORES)]
    for tib_name, diffs in paired_differences(rows, native).items():
        lines.append(f"| {tib_name} | " + " | ".join(
            f"{np.mean(v):+.4g} [{min(v):+.3g}, {max(v):+.3g}]" for v in diffs.values()) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """fvd_fp per TIB variant, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(row["tib"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for seed in sorted({row["seed"] for row in rows}):
        by_tib = {row["tib"]: row for row in rows if row["seed"] == seed}
        for ax, key in zip(axes, ("fvd_fp", "psnr_fp"), strict=True):
            ax.plot(variants, [by_tib[v][key] for v in variants], marker="o", label=f"blocks of seed {seed}")
            ax.set_title(f"{key}: the same blocks, each TIB")
            ax.set_xlabel("TIB served")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/toy_stdit3_w4a8.yaml"))
    parser.add_argument("--blocks-method", default="tfmq", choices=sorted(METHODS) + [FP_TIB_BLOCKS],
                        help="the method whose whole-model calibration gives the blocks (default tfmq); fp-tib: "
                             "tfmq's blocks reconstructed with the TIB kept FP (no TIB has a home advantage)")
    parser.add_argument("--tib", nargs="+", default=["fp", "rtn", "qdiffusion", "tfmq"],
                        help="TIB variants: fp or method names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--videos", type=int, default=128, help="evaluation videos per variant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fp-cache", type=Path, default=None, help="folder keeping the FP videos between runs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.tib) - set(METHODS) - {"fp"})
    if unknown:
        parser.error(f"unknown TIB variants {unknown}: use fp or one of {sorted(METHODS)}")
    native = native_tib(args.blocks_method)
    if native not in args.tib:
        parser.error(f"--tib must include {native}: the native TIB of --blocks-method {args.blocks_method}, which "
                     "the others are compared with")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config).model_copy(update={"progress": False})
    adapter = get_adapter(base.model.adapter)
    model = adapter.load_model(base.model.path)
    calibration = record_recipe_calibration(model, base.calibration, False, base.model.adapter)
    tib = TemporalInformationBlock.from_calibration(adapter, calibration)
    evaluator = ToyEvaluator(args.videos, seed=0, family=toy_family_of_adapter(base.model.adapter))
    fp = evaluator.generate_fp(model, 0, None if args.fp_cache is None else str(args.fp_cache))
    donors = tib_donors(model, calibration, base, args.tib, args.blocks_method)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows += run_seed(model, calibration, base, seed, args.blocks_method, donors, evaluator, fp, tib)
        record = {"config": str(args.config), "blocks_method": args.blocks_method, "videos": args.videos,
                  "rows": rows, "paired_differences": paired_differences(rows, native)}
        write_text_atomic(args.json, json.dumps(record, indent=1) + "\n")  # after every seed: a cut run keeps its rows
    print(markdown(rows, native))
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
