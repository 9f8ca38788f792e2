"""Weight rounding error of a model's Linear layers per output channel, per group (float scales) and
per group with integer group scales, before any calibration (round to nearest on searched scales).

For every Linear whose fan-in is a multiple of the group, the relative squared error
``|Q(W) - W|^2 / |W|^2`` of each scheme; prints the mean over the layers, the share of the group
gain (per channel minus float groups) that integer scales keep, and the histogram of the integer
multipliers; writes JSON.

    python tools/group_scale_error.py --model toy --bits 4 --group-size 64 --init mse --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from eval_video._files import write_text_atomic
from tfmq_video.quant.affine import factor_group_scales, group_multiplier_limit
from tfmq_video.quant.quantizers import WeightQuantizer, WeightSpec


def relative_error(spec: WeightSpec, weight: torch.Tensor) -> tuple[float, WeightQuantizer]:
    """Relative squared rounding error of ``weight`` under ``spec``, and the initialized quantizer."""
    quantizer = WeightQuantizer(spec, weight.shape)
    quantizer.initialize(weight)
    with torch.no_grad():
        return float((quantizer(weight) - weight).pow(2).sum() / weight.pow(2).sum()), quantizer


def measure(model: nn.Module, bits: int, group_size: int, init: str) -> dict:
    """Per-scheme mean relative error over the model's groupable Linear layers, and the multipliers."""
    specs = {
        "per_channel": WeightSpec(bits, init=init),  # type: ignore[arg-type]
        "float_groups": WeightSpec(bits, group_size=group_size, init=init),  # type: ignore[arg-type]
        "integer_groups": WeightSpec(bits, group_size=group_size, init=init, integer_group_scales=True),  # type: ignore[arg-type]
    }
    errors: dict[str, list[float]] = {name: [] for name in specs}
    multipliers: list[torch.Tensor] = []
    for _, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.shape[1] % group_size:
            continue
        weight = module.weight.detach().float()
        for name, spec in specs.items():
            error, quantizer = relative_error(spec, weight)
            errors[name].append(error)
            if name == "integer_groups":
                factors = factor_group_scales(quantizer.scale.reshape(weight.shape[0], -1),
                                              group_multiplier_limit(quantizer.grid))
                assert factors is not None, "integer group scales must factor"
                multipliers.append(factors[1].flatten())
    if not errors["per_channel"]:
        raise SystemExit(f"no Linear layer with a fan-in that is a multiple of {group_size}")
    mean = {name: sum(values) / len(values) for name, values in errors.items()}
    gain = mean["per_channel"] - mean["float_groups"]
    kept = (mean["per_channel"] - mean["integer_groups"]) / gain if gain > 0 else float("nan")
    counts = torch.bincount(torch.cat(multipliers)).tolist()
    return {"bits": bits, "group_size": group_size, "init": init, "layers": len(errors["per_channel"]),
            "mean_relative_error": mean, "group_gain_kept": kept,
            "multiplier_counts": {str(k): c for k, c in enumerate(counts) if c}}


def load_model(name: str) -> nn.Module:
    """The bundled toy STDiT3 (``toy``) or the bundled toy CogVideoX (``toy-cogvideox``)."""
    if name == "toy":
        from tfmq_video.toy.world import load_toy_stdit3

        return load_toy_stdit3()
    if name == "toy-cogvideox":
        from tfmq_video.toy.cogvideox_world import load_toy_cogvideox

        return load_toy_cogvideox()
    raise SystemExit(f"unknown model {name!r}: use toy or toy-cogvideox")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="toy (STDiT3) or toy-cogvideox")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64, choices=(64, 128))
    parser.add_argument("--init", default="mse", choices=("minmax", "percentile", "mse"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"model": args.model, **measure(load_model(args.model), args.bits, args.group_size, args.init)}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
