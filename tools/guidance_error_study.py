"""How much does classifier-free guidance amplify a quantized model's error, step by step?

A guidance sampler steps along ``uncond + s * (cond - uncond)``. This study calibrates each
``--runs`` entry (method and calibration seed, optionally with ``reconstruction.guidance_scale``)
and, on every recorded calibration call (FP inputs, both halves of guidance), compares the
quantized model's outputs with FP's:

- ``uncond``, ``cond``: relative squared error of each half;
- ``difference``: of ``cond - uncond`` (what guidance multiplies by s);
- ``guided``: of ``uncond + s (cond - uncond)`` at the sampler's scale (``--scale``);
- ``difference_energy``: ``|cond - uncond|^2 / |cond|^2`` of FP, how small the difference is.

The halves are split as the toy CogVideoX sampler batches them (unconditional first); pass
``--cond-first`` for a sampler that puts the conditional half first (the STDiT3 sampler).

    python tools/guidance_error_study.py --config configs/toy_cogvideox_w4a8_per_block.yaml \\
        --runs qdiffusion:2:0 qdiffusion:2:4 --scale 4 --json guidance.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tfmq_video
from dit_adapters.base import get_adapter
from eval_video._files import write_text_atomic
from tfmq_video.calib.baselines import METHODS, method_recipe
from tfmq_video.calib.recorder import CalibrationSet, record_recipe_calibration
from tfmq_video.quant.config import RecipeConfig, load_config

KEYS = ("uncond", "cond", "difference", "guided", "difference_energy")
log = logging.getLogger("guidance_error_study")


def parse_run(text: str) -> tuple[str, int, float]:
    """``method:seed:guidance_scale`` -> (method, seed, scale); the scale 0 is the plain loss."""
    parts = text.split(":")
    try:
        method, seed, scale = parts[0], int(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD:SEED:GUIDANCE_SCALE, e.g. tfmq:0:4") from None
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown method; available: {sorted(METHODS)}")
    return method, seed, scale


def relative(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """``|prediction - target|^2 / |target|^2``."""
    return float((prediction - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))


def guidance_errors(output: torch.Tensor, fp_output: torch.Tensor, scale: float) -> dict[str, float]:
    """The :data:`KEYS` of one call whose rows are (uncond, cond) halves."""
    uncond, cond = output.double().chunk(2)
    fp_uncond, fp_cond = fp_output.double().chunk(2)
    return {
        "uncond": relative(uncond, fp_uncond),
        "cond": relative(cond, fp_cond),
        "difference": relative(cond - uncond, fp_cond - fp_uncond),
        "guided": relative(uncond + scale * (cond - uncond), fp_uncond + scale * (fp_cond - fp_uncond)),
        "difference_energy": float((fp_cond - fp_uncond).pow(2).sum() / fp_cond.pow(2).sum()),
    }


@torch.no_grad()
def per_step_errors(qmodel: Any, model: torch.nn.Module, calibration: CalibrationSet, scale: float,
                    cond_first: bool = False) -> list[dict[str, float]]:
    """:func:`guidance_errors` of every recorded call, in recording order, with its step
    (``cond_first``: the sampler batches the conditional half first, as Open-Sora's does)."""
    rows = []
    for call in calibration.calls:
        args, kwargs = call.on("cpu")
        qmodel.context.set_index(call.step)
        outputs = [qmodel.adapter.output_tensor(m(*args, **kwargs)) for m in (qmodel, model)]
        if cond_first:
            outputs = [torch.cat(out.chunk(2)[::-1]) for out in outputs]
        rows.append({"step": call.step, **guidance_errors(*outputs, scale)})
    return rows


def summary(rows: list[dict[str, float]], early: int) -> dict[str, float]:
    """Mean of each key over all calls and over the calls of the first ``early`` steps."""
    out = {key: float(np.mean([r[key] for r in rows])) for key in KEYS}
    out.update({f"{key}_first{early}": float(np.mean([r[key] for r in rows if r["step"] < early])) for key in KEYS})
    return out


def run(model: torch.nn.Module, calibration: CalibrationSet, base: RecipeConfig, method: str, seed: int,
        guidance_scale: float, scale: float, cond_first: bool) -> dict[str, Any]:
    """Calibrate one entry and measure it."""
    reconstruction = base.reconstruction.model_copy(update={"guidance_scale": guidance_scale})
    recipe = method_recipe(method, base.quant.weight.bits, base.quant.activation.bits,
                           base.model_copy(update={"seed": seed, "reconstruction": reconstruction}))
    qmodel = tfmq_video.quantize(model, base.model.adapter, calibration, recipe)
    rows = per_step_errors(qmodel, model, calibration, scale, cond_first)
    return {"method": method, "calib_seed": seed, "guidance_scale": guidance_scale, **summary(rows, 5),
            "calls": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", type=parse_run, required=True, help="METHOD:SEED:GUIDANCE_SCALE")
    parser.add_argument("--scale", type=float, default=4.0, help="the sampler's guidance scale (toy CogVideoX: 4)")
    parser.add_argument("--cond-first", action="store_true",
                        help="the sampler batches the conditional half first (the STDiT3 sampler; the toy "
                             "CogVideoX's and diffusers' pipelines put the unconditional half first)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config).model_copy(update={"progress": False})
    model = get_adapter(base.model.adapter).load_model(base.model.path)
    calibration = record_recipe_calibration(model, base.calibration, False, base.model.adapter)
    records = []
    for method, seed, guidance_scale in args.runs:
        records.append(run(model, calibration, base, method, seed, guidance_scale, args.scale, args.cond_first))
        log.info("%s", {k: v for k, v in records[-1].items() if k != "calls"})
        write_text_atomic(args.json, json.dumps({"config": str(args.config), "scale": args.scale, "runs": records},
                                                indent=1) + "\n")
    header = ["method", "seed", "guidance_scale", *KEYS, *(f"{k}_first5" for k in KEYS)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in records:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in
                                 ["method", "calib_seed", "guidance_scale", *KEYS, *(f"{k}_first5" for k in KEYS)]) + " |")


if __name__ == "__main__":
    main()
