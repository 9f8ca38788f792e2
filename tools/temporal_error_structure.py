"""How the temporal-feature errors of the quantized TIB and of the cache are spread over the steps.

Calibrates only the TIB of a method (as ``tools/compare_tib_strategies.py`` does: block
reconstruction off, every layer outside the TIB FP) and prints, per temporal feature and
strategy, the relative error, the mean cosine similarity between the error vectors of different
steps, and the share of the error energy in the component common to all steps (1/S for
independent errors, 1 for one error repeated at every step). A repeated error drifts the sampling
trajectory; independent ones partly cancel (``tib.select_by: trajectory``, docs/results.md).

    python tools/temporal_error_structure.py --config configs/toy_bench_quick.yaml --abits 8 --json e.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_tib_strategies import only_tib_quantized, tib_only  # noqa: E402

import tfmq_video  # noqa: E402
from dit_adapters.base import get_adapter  # noqa: E402
from eval_video._files import write_text_atomic  # noqa: E402
from tfmq_video.calib.baselines import METHODS, method_recipe  # noqa: E402
from tfmq_video.calib.recorder import record_recipe_calibration  # noqa: E402
from tfmq_video.calib.tib import TemporalInformationBlock  # noqa: E402
from tfmq_video.quant.config import load_config  # noqa: E402


def error_structure(errors: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Relative error, mean cosine between steps and common-mode share of per-step errors (S, dim)."""
    errors = errors.double()
    steps = errors.shape[0]
    unit = errors / errors.norm(dim=1, keepdim=True).clamp(min=1e-30)
    cosine = unit @ unit.T
    return {
        "rel_err": float((errors.pow(2).sum(1) / reference.double().pow(2).sum(1)).mean()),
        "mean_cos_between_steps": float((cosine.sum() - cosine.diagonal().sum()) / (steps * (steps - 1))),
        "common_share": float(errors.mean(0).pow(2).sum() * steps / errors.pow(2).sum()),
    }


def main() -> None:
    """Calibrate the TIB, print and write the error structure of each strategy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/toy_bench_quick.yaml"))
    parser.add_argument("--method", default="tfmq", choices=sorted(METHODS))
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config)
    adapter = get_adapter(base.model.adapter)
    model = adapter.load_model(base.model.path)
    recipe = only_tib_quantized(tib_only(method_recipe(args.method, args.wbits, args.abits, base), {}), model, adapter)
    calibration = record_recipe_calibration(model, recipe.calibration, recipe.progress, recipe.model.adapter)
    qmodel = tfmq_video.quantize(model, adapter, calibration, recipe)
    tib = TemporalInformationBlock.from_calibration(adapter, calibration)
    fp = tib.fp_features(model)
    cache = qmodel.temporal_cache
    with torch.no_grad():
        qmodel.set_temporal_cache(None)
        strategies = {"tib": tib.features(qmodel.model, qmodel)}
        qmodel.set_temporal_cache(cache)
        if cache is not None:
            strategies["cache"] = cache.all_features()
    report = {
        f"{name}/{strategy}": error_structure(features[name].float() - fp[name].float(), fp[name])
        for strategy, features in strategies.items() for name in fp
    }
    for key, values in report.items():
        print(key, {k: f"{v:.3g}" for k, v in values.items()})
    if args.json:
        write_text_atomic(args.json, json.dumps({"method": args.method, "wbits": args.wbits, "abits": args.abits,
                                                 "steps": len(tib), "strategies": report}, indent=1))


if __name__ == "__main__":
    main()
