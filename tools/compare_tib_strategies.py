"""Compare how methods maintain the temporal features, without the (slow) block reconstruction.

For each method it calibrates only the temporal information block (TIAR or layer-wise
reconstruction, FSC, the cache and the selection, as the method's recipe says) and prints,
per temporal feature, the mean relative error over the calibrated steps of each strategy:
``initial`` (quantizers initialized, round to nearest), ``tib`` (the calibrated quantized TIB),
``cache`` (the quantized feature cache) and ``final`` (what the model serves after selection),
plus the per-step choices. The TIB depends on the timestep alone, so these numbers do not
depend on the calibration prompts' seed.

With ``--videos N`` (the toy world only) every layer outside the TIB and the attention matmuls
stay FP, and each method's model generates the first N videos of the quality table's evaluation
set; they are scored against FP (``psnr_fp``, ``feature_error_fp``, ``fvd_fp``): the effect of
the TIB's quantization alone on the videos.

    python tools/compare_tib_strategies.py --config configs/toy_stdit3_w4a6.yaml \\
        --methods tfmq qdiffusion tfmq-tiar tfmq-fsc --json tib.json
    python tools/compare_tib_strategies.py --config configs/toy_bench_quick.yaml --wbits 4 --abits 8 \\
        --methods rtn qdiffusion tfmq-tiar tfmq-fsc tfmq --videos 32 --fp-cache fp_videos --json tib_only.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import tfmq_video
from dit_adapters.base import DiTAdapter, get_adapter
from eval_video._files import write_text_atomic
from tfmq_video.calib.baselines import METHODS, method_recipe
from tfmq_video.calib.recorder import record_recipe_calibration
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import RecipeConfig, load_config, parse_config

STRATEGIES = ("initial", "tib", "cache", "final")


def tib_only(recipe: RecipeConfig, tib_settings: dict[str, Any]) -> RecipeConfig:
    """``recipe`` with block reconstruction off and ``tib_settings`` applied to its ``tib`` section."""
    raw = recipe.model_dump()
    raw["reconstruction"]["enabled"] = False
    raw["tib"].update(tib_settings)
    return parse_config(raw, f"(TIB-only {recipe.name}, tib settings {tib_settings})")


def only_tib_quantized(recipe: RecipeConfig, model: torch.nn.Module, adapter: DiTAdapter) -> RecipeConfig:
    """``recipe`` with every layer outside the TIB kept FP (by name) and the attention matmuls FP."""
    from tfmq_video.quant.model import plan_layers

    plans = plan_layers(model, adapter, recipe)
    with_blocks = [name for name, plan in plans.items() if adapter.is_temporal(name) and plan.role != "tib"]
    if with_blocks:
        raise ConfigError(f"{recipe.name} calibrates the TIB layers inside blocks ({with_blocks[:2]}, ...) with their "
                          "blocks, so it has no TIB of its own to study alone; use qdiffusion-tib-layerwise")
    raw = recipe.model_dump()
    raw["quant"]["keep_fp"] = [name for name, plan in plans.items() if plan.role != "tib"]
    raw["quant"]["quantize_attention"] = False
    return parse_config(raw, f"(only the TIB of {recipe.name} quantized)")


def video_scores(qmodel: torch.nn.Module, model: torch.nn.Module, count: int, fp_cache: Path | None,
                 adapter: str = "opensora-stdit3") -> dict[str, float]:
    """psnr_fp, feature_error_fp and fvd_fp of ``qmodel``'s first ``count`` evaluation videos (the
    toy model of ``adapter``'s family)."""
    from tfmq_video.calib.quality import ToyEvaluator
    from tfmq_video.toy.families import toy_family_of_adapter

    evaluator = ToyEvaluator(count, seed=0, family=toy_family_of_adapter(adapter))
    fp = evaluator.generate_fp(model, 0, None if fp_cache is None else str(fp_cache))
    scores = evaluator.score(evaluator.generate(qmodel), fp, evaluator.features(fp))
    return {key: scores[key] for key in ("psnr_fp", "feature_error_fp", "fvd_fp")}


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["iterations=4500", "cache_bits=6"]`` -> ``{"iterations": 4500, "cache_bits": 6}`` (YAML values)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--tib expects KEY=VALUE (a key of the recipe's tib section), got {item!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def summarize(temporal: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per strategy and feature, the mean error over steps."""
    return {strategy: {name: sum(values) / len(values) for name, values in temporal[strategy].items()}
            for strategy in STRATEGIES if strategy in temporal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/toy_stdit3_w4a6.yaml"),
                        help="base recipe (model, calibration, bit widths, tib schedule)")
    parser.add_argument("--methods", nargs="+", default=["tfmq", "qdiffusion"], choices=sorted(METHODS))
    parser.add_argument("--wbits", type=int, default=None, help="default: the config's")
    parser.add_argument("--abits", type=int, default=None, help="default: the config's")
    parser.add_argument("--tib", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override keys of the tib section for every method, e.g. iterations=4500 cache_bits=6")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the per-step reports here")
    parser.add_argument("--videos", type=int, default=None,
                        help="toy world: keep everything outside the TIB FP and score this many videos against FP")
    parser.add_argument("--fp-cache", type=Path, default=None, help="folder keeping the FP videos between runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config)
    wbits = args.wbits or base.quant.weight.bits
    abits = args.abits or base.quant.activation.bits
    adapter = get_adapter(base.model.adapter)
    model = adapter.load_model(base.model.path)
    calibration = record_recipe_calibration(model, base.calibration, base.progress, base.model.adapter)
    reports: dict[str, Any] = {}
    print(f"W{wbits}A{abits}: mean relative error of each temporal feature over {len(calibration.timesteps)} steps")
    for method in args.methods:
        recipe = tib_only(method_recipe(method, wbits, abits, base), parse_settings(args.tib))
        if args.videos is not None:
            recipe = only_tib_quantized(recipe, model, adapter)
        start = time.perf_counter()
        qmodel = tfmq_video.quantize(model, adapter, calibration, recipe)
        temporal = qmodel.report["temporal"]
        seconds = time.perf_counter() - start
        reports[method] = {"seconds": seconds, "cache_bits": recipe.cache_bits(), **temporal}
        print(f"\n{method} ({seconds:.0f} s), temporal_feature_error {temporal['temporal_feature_error']:.3g}")
        if args.videos is not None:
            reports[method]["videos"] = video_scores(qmodel, model, args.videos, args.fp_cache, base.model.adapter)
            print("  videos (only the TIB quantized): " + ", ".join(
                f"{key} {value:.4g}" for key, value in reports[method]["videos"].items()))
        for strategy, errors in summarize(temporal).items():
            print(f"  {strategy:8s}" + "".join(f"  {name} {value:.3g}" for name, value in errors.items()))
        for name, choices in temporal.get("choices", {}).items():
            print(f"  choices {name}: " + "".join(choice[0] for choice in choices) + "  (c: cache, t: TIB)")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(reports, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
