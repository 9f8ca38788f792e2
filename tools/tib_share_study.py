"""How much of a DiT its temporal information block is, and how each method's TIB fares on CogVideoX.

Two tables (docs/results.md, session 14), both on this CPU in seconds:

1. The TIB's share of the Linear/Conv weights, by the adapters' own ``is_temporal``: the bundled
   toy STDiT3, STDiT3-XL/2 and CogVideoX-2B at their published sizes (built on the meta device:
   shapes only, no weights), and the tests' tiny CogVideoX.
2. W4A8 temporal-feature error and quantized-weight fraction of each method on the tests' tiny
   **random** CogVideoX, calibrated on a guided DDIM recording (``record_calls``) with the tests'
   fast recipe. Random weights: this shows the method runs on the family and how far apart the
   TIB treatments are there, not what a trained model's videos do.

    python tools/tib_share_study.py --json docs/results_tib_share_session14.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

import tfmq_video
from dit_adapters.base import DiTAdapter
from dit_adapters.cogvideox import CogVideoXAdapter
from dit_adapters.cogvideox.testing import sample_tiny_cogvideox, tiny_cogvideox
from dit_adapters.opensora.adapter import STDiT3Adapter
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from eval_video._files import atomic_path
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.calib.recorder import record_calls
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.toy.world import load_toy_stdit3

FAST = RecipeConfig(progress=False, tib={"iterations": 60}, reconstruction={"iterations": 10, "batch_size": 2})
METHODS = ("rtn", "qdiffusion", "viditq", "tfmq")


def tib_share(model: nn.Module, adapter: DiTAdapter) -> dict[str, float]:
    """TIB and total Linear/Conv weight elements of ``model``, and their ratio."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))]
    total = sum(m.weight.numel() for _, m in layers)
    tib = sum(m.weight.numel() for name, m in layers if adapter.is_temporal(name))
    return {"tib_weights": tib, "total_weights": total, "share": tib / total}


def shares() -> dict[str, dict[str, float]]:
    """Table 1: the TIB's weight share per model."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        stdit3_xl = STDiT3(STDiT3Config())
        cogvideox_2b = CogVideoXTransformer3DModel(num_attention_heads=30, attention_head_dim=64, num_layers=30,
                                                   time_embed_dim=512, text_embed_dim=4096)
    return {
        "toy STDiT3 (bundled)": tib_share(load_toy_stdit3(), STDiT3Adapter()),
        "STDiT3-XL/2 (published size, meta device)": tib_share(stdit3_xl, STDiT3Adapter()),
        "CogVideoX-2B (published size, meta device)": tib_share(cogvideox_2b, CogVideoXAdapter()),
        "tiny random CogVideoX of the tests": tib_share(tiny_cogvideox(), CogVideoXAdapter()),
    }


def method_rows(seed: int) -> list[dict[str, Any]]:
    """Table 2: every method at W4A8 on the tiny random CogVideoX."""
    model = tiny_cogvideox(seed)
    adapter = CogVideoXAdapter()
    calibration = record_calls(model, adapter.timestep_of, lambda: sample_tiny_cogvideox(model))
    rows = []
    for method in METHODS:
        qmodel = tfmq_video.quantize(model, adapter, calibration, method_recipe(method, 4, 8, FAST))
        rows.append({"method": method, "wbits": 4, "abits": 8,
                     "temporal_feature_error": qmodel.report["temporal"]["temporal_feature_error"],
                     "quantized_weight_fraction": qmodel.report["quantized_weight_fraction"],
                     "calib_seconds": qmodel.report["seconds"]["total"]})
    return rows


def main() -> None:
    """Print both tables and write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="output JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random CogVideoX")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table = shares()
    print("| model | TIB weights | all weights | TIB share |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['tib_weights'] / 1e6:.2f} M | {row['total_weights'] / 1e6:.1f} M | {row['share']:.1%} |")
    rows = method_rows(args.seed)
    print("\n| method | temporal_feature_error | quantized_weight_fraction |\n|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['temporal_feature_error']:.3g} | {row['quantized_weight_fraction']:.3f} |")
    with atomic_path(args.json) as path:
        path.write_text(json.dumps({"tib_share": table, "tiny_cogvideox_w4a8": rows, "seed": args.seed}, indent=2)
                        + "\n")


if __name__ == "__main__":
    main()
