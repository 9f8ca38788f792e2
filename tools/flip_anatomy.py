"""Which videos carry a quantized model's ``fvd_fp``, and do they show something else than FP?

``fvd_fp`` at W4A8 is heavy tailed over calibration seeds (docs/results.md, session 17): at rare
seeds the whole set of videos moves in the toy classifier's feature space (the mean term) while
per-call errors and PSNR stay ordinary. This tool calibrates each ``--runs`` entry (method and
calibration seed, as ``bench quality`` does), generates the evaluation videos and splits that
shift over the videos:

- per video, its part of the mean term (:func:`tfmq_video.calib.quality.mean_term_parts`: the
  parts sum to 1) and whether the classifier reads its shape, color or direction otherwise than in
  the FP video of the same caption and seed (a flip);
- per run, the flips per head, the transitions (``color: red -> orange``), the flipped videos'
  share of the mean term, the share carried by the ``--top`` videos with the largest parts, and how
  often FP and the quantized model show what the caption asks;
- a PNG strip per run of the videos with the largest parts: FP and quantized, labelled with what
  the classifier reads.

    python tools/flip_anatomy.py --config configs/toy_cogvideox_w4a8_per_block.yaml \\
        --runs tfmq:5 qdiffusion:5 --videos 128 --threads 2 --fp-cache runs/fp_cog \\
        --json flips.json --strips flips/
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tfmq_video
from dit_adapters.base import get_adapter
from eval_video._files import write_text_atomic
from eval_video.io import make_strip, write_png
from tfmq_video.calib.baselines import METHODS, method_recipe
from tfmq_video.calib.quality import ToyEvaluator, mean_term_parts
from tfmq_video.calib.recorder import record_recipe_calibration
from tfmq_video.quant.config import RecipeConfig, load_config
from tfmq_video.toy.classifier import HEADS
from tfmq_video.toy.data import COLORS, DIRECTIONS, SHAPES, all_captions, tensor_to_clips
from tfmq_video.toy.families import toy_family_of_adapter

CLASS_NAMES: dict[str, list[str]] = {"shape": list(SHAPES), "color": list(COLORS), "direction": list(DIRECTIONS)}
log = logging.getLogger("flip_anatomy")


def parse_run(text: str) -> tuple[str, int]:
    """``method:seed`` -> (method, seed)."""
    method, _, seed = text.partition(":")
    if method not in METHODS or not seed.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD:SEED with METHOD one of {sorted(METHODS)}")
    return method, int(seed)


def read_as(labels: np.ndarray) -> str:
    """Class indices (one per head) as words, e.g. ``square red left``."""
    return " ".join(CLASS_NAMES[head][int(index)] for head, index in zip(HEADS, labels, strict=True))


def caption_labels(captions: list[str]) -> np.ndarray:
    """(N, 3) class indices that each caption asks for."""
    by_text = {caption.text: caption.labels for caption in all_captions()}
    return np.array([by_text[text] for text in captions])


def anatomy(evaluator: ToyEvaluator, feats: np.ndarray, fp_features: np.ndarray, top: int) -> dict[str, Any]:
    """The split of the mean term over videos and the flips (see module docstring)."""
    read, fp_read = evaluator.labels(feats), evaluator.labels(fp_features)
    differs = read != fp_read
    flipped = differs.any(axis=1)
    parts = mean_term_parts(feats, fp_features)
    asked = caption_labels(evaluator.captions)
    transitions = Counter(f"{head}: {CLASS_NAMES[head][fp_read[i, h]]} -> {CLASS_NAMES[head][read[i, h]]}"
                          for i in np.flatnonzero(flipped) for h, head in enumerate(HEADS) if differs[i, h])
    order = np.argsort(-parts)
    videos = [{"index": int(i), "caption": evaluator.captions[i], "seed": evaluator.seeds[i],
               "fp_reads": read_as(fp_read[i]), "reads": read_as(read[i]), "flipped": bool(flipped[i]),
               "mean_term_part": float(parts[i])} for i in order[:top]]
    return {
        "flips": int(flipped.sum()),
        "flips_by_head": {head: int(differs[:, h].sum()) for h, head in enumerate(HEADS)},
        "transitions": dict(transitions.most_common()),
        "mean_term_share_flipped": float(parts[flipped].sum()),
        f"mean_term_share_top{top}": float(parts[order[:top]].sum()),
        "caption_match_fp": float(np.mean(np.all(fp_read == asked, axis=1))),
        "caption_match": float(np.mean(np.all(read == asked, axis=1))),
        "top_videos": videos,
    }


def write_strip(path: Path, latents: torch.Tensor, fp: torch.Tensor, videos: list[dict[str, Any]],
                label: str) -> Path:
    """PNG: per listed video, its FP row and its quantized row, labelled with what is read."""
    clips, fp_clips = tensor_to_clips(latents), tensor_to_clips(fp)
    rows: dict[str, np.ndarray] = {}
    for video in videos:
        i = video["index"]
        rows[f"#{i} FP: {video['fp_reads']}"] = fp_clips[i]
        mark = " *" if video["flipped"] else ""
        rows[f"#{i} {label}: {video['reads']}{mark} ({video['mean_term_part']:.0%})"] = clips[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, make_strip(rows, max_frames=8, min_height=64, label_width=300))


def run(model: torch.nn.Module, calibration: Any, base: RecipeConfig, method: str, seed: int,
        evaluator: ToyEvaluator, fp: torch.Tensor, top: int, strips: Path | None) -> dict[str, Any]:
    """Calibrate ``method`` at ``seed``, generate, score and split its ``fvd_fp``."""
    wbits, abits = base.quant.weight.bits, base.quant.activation.bits
    recipe = method_recipe(method, wbits, abits, base.model_copy(update={"seed": seed}))
    start = time.perf_counter()
    qmodel = tfmq_video.quantize(model, base.model.adapter, calibration, recipe)
    seconds = time.perf_counter() - start
    latents = evaluator.generate(qmodel)
    fp_features = evaluator.features(fp)
    feats = evaluator.features(latents)
    record = {"method": method, "calib_seed": seed, "wbits": wbits, "abits": abits, "calib_seconds": seconds,
              **evaluator.score(latents, fp, fp_features), **anatomy(evaluator, feats, fp_features, top)}
    if strips is not None:
        record["strip"] = str(write_strip(strips / f"{method}_s{seed}.png", latents, fp, record["top_videos"],
                                          f"W{wbits}A{abits}"))
    return record


def markdown(records: list[dict[str, Any]], top: int) -> str:
    """One line per run."""
    keys = ("fvd_fp", "fvd_fp_mean_term", "psnr_fp", "flips", "mean_term_share_flipped", f"mean_term_share_top{top}",
            "caption_match_fp", "caption_match")
    lines = ["| method | seed | " + " | ".join(keys) + " | flips by head |", "|---|---|" + "---|" * (len(keys) + 1)]
    for r in records:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        by_head = ", ".join(f"{h} {n}" for h, n in r["flips_by_head"].items())
        lines.append(f"| {r['method']} | {r['calib_seed']} | " + " | ".join(cells) + f" | {by_head} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="base recipe (its bits are the setting)")
    parser.add_argument("--runs", nargs="+", type=parse_run, required=True, help="METHOD:SEED entries")
    parser.add_argument("--videos", type=int, default=128, help="evaluation videos per run")
    parser.add_argument("--top", type=int, default=8, help="videos listed (and drawn) per run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fp-cache", type=Path, default=None, help="folder keeping the FP videos between runs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--strips", type=Path, default=None, help="folder for one PNG strip per run")
    args = parser.parse_args()
    if args.top < 1 or args.videos < 2:
        parser.error("--top must be >= 1 and --videos >= 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config).model_copy(update={"progress": False})
    family = toy_family_of_adapter(base.model.adapter)
    model = get_adapter(base.model.adapter).load_model(base.model.path)
    calibration = record_recipe_calibration(model, base.calibration, False, base.model.adapter)
    evaluator = ToyEvaluator(args.videos, seed=0, family=family)
    fp = evaluator.generate_fp(model, 0, None if args.fp_cache is None else str(args.fp_cache))
    records: list[dict[str, Any]] = []
    for method, seed in args.runs:
        records.append(run(model, calibration, base, method, seed, evaluator, fp, args.top, args.strips))
        log.info("%s seed %d: %s", method, seed, {k: v for k, v in records[-1].items() if k != "top_videos"})
        write_text_atomic(args.json, json.dumps({"config": str(args.config), "videos": args.videos,
                                                 "runs": records}, indent=1) + "\n")  # a cut run keeps its rows
    print(markdown(records, args.top))


if __name__ == "__main__":
    main()
