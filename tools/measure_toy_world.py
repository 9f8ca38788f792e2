"""Measure the toy world's quality bar and write ``docs/toy_world.md`` (+ JSON).

1. Caption following: the FP toy model (STDiT3, or with ``--family cogvideox`` the toy CogVideoX), sampled with the default steps and guidance, on
   held-out captions (combinations never seen in training) and on training captions; the
   bundled classifier labels each video (shape, color, direction).
2. FVD in the toy feature space (the classifier's penultimate features) against fresh
   procedural videos, for: fresh procedural videos of another seed (the noise floor), the FP
   model, and the FP model with its weights perturbed by Gaussian noise (damaged models).

    python tools/measure_toy_world.py --out docs/toy_world.md --json docs/toy_world.json
    python tools/measure_toy_world.py --family cogvideox --out docs/toy_world_cogvideox.md \
        --json docs/toy_world_cogvideox.json --strip docs/toy_world_cogvideox_samples.png
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from eval_video._files import write_text_atomic
from eval_video.frechet import frechet_distance_features
from eval_video.io import make_strip, write_png
from tfmq_video.toy.classifier import ToyVideoClassifier
from tfmq_video.toy.data import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    Caption,
    clips_to_tensor,
    held_out_captions,
    make_clips,
    train_captions,
)
from tfmq_video.toy.families import TOY_FAMILY_NAMES, ToyFamily, toy_family
from tfmq_video.toy.world import load_toy_classifier

log = logging.getLogger("measure_toy_world")
HEADS = ("shape", "color", "direction")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=TOY_FAMILY_NAMES, default="stdit3", help="which toy model family")
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder of --family to measure (default: the bundled one)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="toy classifier folder (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=Path("docs/toy_world.md"))
    parser.add_argument("--json", type=Path, default=Path("docs/toy_world.json"))
    parser.add_argument("--strip", type=Path, default=Path("docs/toy_world_samples.png"))
    parser.add_argument("--held-out-seeds", type=int, default=16, help="videos per held-out caption")
    parser.add_argument("--train-seeds", type=int, default=2, help="videos per training caption")
    parser.add_argument("--fvd-videos", type=int, default=192, help="videos per FVD set")
    parser.add_argument("--damage", type=float, nargs="+", default=[0.05, 0.3],
                        help="relative std of the weight noise of the damaged models")
    return parser.parse_args()


def caption_accuracy(classifier: ToyVideoClassifier, videos: torch.Tensor, captions: Sequence[Caption]) -> dict:
    """Share of videos whose predicted (shape, color, direction) match the caption, per head and all three."""
    predicted = classifier.predict(videos.clamp(-1, 1))
    labels = torch.tensor([c.labels for c in captions])
    correct = torch.stack([predicted[h] == labels[:, i] for i, h in enumerate(HEADS)], 1)
    scores = {h: float(correct[:, i].float().mean()) for i, h in enumerate(HEADS)}
    scores["all"] = float(correct.all(1).float().mean())
    # a sign error (left for right) keeps the axis; the axis shows in the time-averaged layout
    axis = torch.tensor([DIRECTIONS[d][0] != 0 for d in DIRECTIONS])
    scores["direction_axis"] = float((axis[predicted["direction"]] == axis[labels[:, 2]]).float().mean())
    scores["confusion"] = {h: confusion(predicted[h], labels[:, i], len(names)).tolist()
                           for i, (h, names) in enumerate(zip(HEADS, (SHAPES, COLORS, DIRECTIONS), strict=True))}
    scores["n"] = len(captions)
    return scores


def confusion(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``classes`` x ``classes`` counts, rows the caption's label, columns the classifier's."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def sample(family: ToyFamily, model: torch.nn.Module, captions: Sequence[Caption], first_seed: int) -> torch.Tensor:
    """FP samples, one seed per caption, with the family's toy sampler."""
    seeds = list(range(first_seed, first_seed + len(captions)))
    log.info("sampling %d videos", len(captions))
    return family.generate(model, [c.text for c in captions], seeds)


def damaged(model: torch.nn.Module, relative_std: float, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with Gaussian noise of ``relative_std`` x each weight tensor's std added."""
    generator = torch.Generator().manual_seed(seed)
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            if p.requires_grad and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * relative_std)
    return copy_


@torch.no_grad()
def features(classifier: ToyVideoClassifier, videos: torch.Tensor) -> np.ndarray:
    """Toy FVD features of (N, 3, T, H, W) videos in [-1, 1]."""
    return torch.cat([classifier.features(chunk.clamp(-1, 1)) for chunk in videos.split(64)]).double().numpy()


def cycle(captions: Sequence[Caption], count: int) -> list[Caption]:
    """``count`` captions cycling through ``captions``."""
    return [captions[i % len(captions)] for i in range(count)]


def measure(args: argparse.Namespace) -> dict:
    """Run every measurement; returns the JSON record."""
    started = time.perf_counter()
    family = toy_family(args.family)
    model = family.load(None if args.model is None else str(args.model))
    classifier = load_toy_classifier(args.classifier)
    held = [c for c in held_out_captions() for _ in range(args.held_out_seeds)]
    train = [c for c in train_captions() for _ in range(args.train_seeds)]
    held_videos = sample(family, model, held, 10_000)
    train_videos = sample(family, model, train, 20_000)
    record: dict = {
        "family": family.name, "sampler": family.sampler,
        "accuracy_held_out": caption_accuracy(classifier, held_videos, held),
        "accuracy_train_captions": caption_accuracy(classifier, train_videos, train),
    }
    fvd_captions = cycle(train_captions(), args.fvd_videos)
    reference, _ = make_clips(777_001, args.fvd_videos, fvd_captions)
    floor, _ = make_clips(777_002, args.fvd_videos, fvd_captions)
    reference_features = features(classifier, clips_to_tensor(reference))
    fvd = {"procedural (noise floor)": frechet_distance_features(features(classifier, clips_to_tensor(floor)),
                                                                 reference_features)}
    fp_videos = sample(family, model, fvd_captions, 30_000)
    fvd["FP model"] = frechet_distance_features(features(classifier, fp_videos), reference_features)
    rows = {"FP": fp_videos[:6]}
    for std in args.damage:
        videos = sample(family, damaged(model, std), fvd_captions, 30_000)
        fvd[f"weights + {std:g} x std noise"] = frechet_distance_features(features(classifier, videos), reference_features)
        rows[f"noise {std:g}"] = videos[:6]
    record["fvd_toy"] = fvd
    record["fvd_videos"] = args.fvd_videos
    record["seconds"] = round(time.perf_counter() - started, 1)
    write_samples(args.strip, held_videos[:: args.held_out_seeds], held[:: args.held_out_seeds], rows, fvd_captions)
    return record


def write_samples(path: Path, held_videos: torch.Tensor, held: Sequence[Caption], rows: dict, captions: Sequence[Caption]
                  ) -> None:
    """A PNG strip: one held-out sample per caption, then FP vs damaged samples of the same seeds."""
    from tfmq_video.toy.data import tensor_to_clips

    strip_rows = {f"held-out: {c.text}": clip for c, clip in zip(held, tensor_to_clips(held_videos), strict=True)}
    for name, videos in rows.items():
        for i, clip in enumerate(tensor_to_clips(videos)[:2]):
            strip_rows[f"{name}: {captions[i].text}"] = clip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, make_strip(strip_rows, label_width=300))


def markdown(record: dict, args: argparse.Namespace) -> str:
    """The ``docs/toy_world.md`` measurement section."""
    lines = ["| captions | N | shape | color | direction | all three | direction axis |", "|---|---|---|---|---|---|---|"]
    for key, name in (("accuracy_held_out", "held-out"), ("accuracy_train_captions", "training")):
        a = record[key]
        lines.append(f"| {name} | {a['n']} | {a['shape']:.1%} | {a['color']:.1%} | {a['direction']:.1%} | {a['all']:.1%} "
                     f"| {a['direction_axis']:.1%} |")
    lines += ["", f"| videos vs fresh procedural videos (N = {record['fvd_videos']} each) | toy FVD |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in record["fvd_toy"].items()]
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    record = measure(args)
    write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    table = markdown(record, args)
    print(table)
    marker = "<!-- measured -->"
    if args.out.is_file() and marker in args.out.read_text():
        head = args.out.read_text().split(marker)[0]
        write_text_atomic(args.out, head + marker + "\n" + table + "\n")
    else:
        write_text_atomic(args.out, "# The toy world\n\n" + marker + "\n" + table + "\n")


if __name__ == "__main__":
    main()
