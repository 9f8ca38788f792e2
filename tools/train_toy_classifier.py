"""Train the bundled toy video classifier (shape, color, direction) on procedural clips.

Clips are augmented with noise, blur and brightness changes so that the classifier also
reads the slightly imperfect videos a generator produces. Resumable like the DiT trainer.

    python tools/train_toy_classifier.py --run-dir runs/toy_classifier --steps 1000 \
        --export tfmq_video/assets/toy_classifier
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tfmq_video.checkpoint import write_folder
from tfmq_video.devices import pick_device
from tfmq_video.toy.classifier import ToyVideoClassifier
from tfmq_video.toy.data import all_captions, clips_to_tensor, make_clips
from tfmq_video.toy.training import EMA, RunState, load_run, prefetched, save_run

log = logging.getLogger("train_toy_classifier")
EVAL_SEED = 987_654


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/toy_classifier"))
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--eval-clips", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    parser.add_argument("--data-workers", type=int, default=1, help="threads that build batches ahead")
    return parser.parse_args()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random noise, blur and brightness on (N, 3, T, H, W) clips in [-1, 1]."""
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, 1, generator=generator) * 0.15
    x = x + sigma * torch.randn(x.shape, generator=generator)
    blur_rows = torch.rand(n, generator=generator) < 0.3
    if blur_rows.any():
        frames = x[blur_rows].transpose(1, 2).flatten(0, 1)  # (N'*T, 3, H, W)
        blurred = F.avg_pool2d(frames, 3, stride=1, padding=1, count_include_pad=False)
        x[blur_rows] = blurred.view(-1, x.shape[2], 3, *x.shape[3:]).transpose(1, 2)
    gain = 1 + (torch.rand(n, 1, 1, 1, 1, generator=generator) - 0.5) * 0.2
    return (x * gain).clamp(-1.2, 1.2)


def labelled_batch(seed: int, count: int, lanes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips over all captions and their (N, 3) labels (shape, color, direction).

    Training clips put each track anywhere across the lanes (``lanes=False``), so the
    direction head must judge the motion, not which lane the object is in."""
    clips, specs = make_clips(seed, count, all_captions(), lanes=lanes)
    return clips_to_tensor(clips), torch.tensor([s.caption.labels for s in specs])


def training_batch(step: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented batch of ``step``, built on the CPU from (seed, step) alone."""
    x, labels = labelled_batch(seed * 1_000_003 + step + 10_000_000, batch_size)
    return augment(x, torch.Generator().manual_seed(seed * 104729 + step)), labels


@torch.no_grad()
def accuracy(model: ToyVideoClassifier, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-head and all-three-correct accuracy."""
    model.eval()
    predicted = model.predict(x)
    correct = torch.stack([predicted[name] == labels[:, i] for i, name in enumerate(("shape", "color", "direction"))], 1)
    out = {name: float(correct[:, i].float().mean()) for i, name in enumerate(("shape", "color", "direction"))}
    out["all"] = float(correct.all(dim=1).float().mean())
    return out


def train(args: argparse.Namespace) -> ToyVideoClassifier:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    model = ToyVideoClassifier().to(device)
    ema = EMA(model, 0.995)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    run = load_run(args.run_dir, model, ema, optimizer) or RunState()
    started, seconds_before = time.time(), run.seconds
    model.train()
    batches = prefetched(lambda step: training_batch(step, args.seed, args.batch_size), range(run.step, args.steps),
                         workers=args.data_workers)
    for step, (x, labels) in tqdm(batches, initial=run.step, total=args.steps, desc=f"train toy classifier ({device})"):
        x, labels = x.to(device), labels.to(device)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(("shape", "color", "direction")))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.step = step + 1
        ema.update(model, run.step)
        run.losses.append((run.step, loss.item()))
        if run.step % args.checkpoint_every == 0:
            run.seconds = seconds_before + time.time() - started
            save_run(args.run_dir, model, ema, optimizer, run)
    run.seconds = seconds_before + time.time() - started
    save_run(args.run_dir, model, ema, optimizer, run)

    final = ToyVideoClassifier()
    final.load_state_dict({k: v.cpu() for k, v in ema.shadow.items()})
    scores = accuracy(final, *labelled_batch(EVAL_SEED, args.eval_clips))
    scores_lanes = accuracy(final, *labelled_batch(EVAL_SEED, args.eval_clips, lanes=True))
    log.info("accuracy on %d fresh clips: %s; in their lanes: %s", args.eval_clips, scores, scores_lanes)
    if args.export is not None:
        record = {"steps": run.step, "batch_size": args.batch_size, "train_seconds": round(run.seconds, 1),
                  "eval_clips": args.eval_clips, "eval_seed": EVAL_SEED, "accuracy_clean": scores,
                  "accuracy_clean_in_lanes": scores_lanes, "train_tracks": "anywhere across the lanes",
                  "device": str(device), "lr": args.lr, "seed": args.seed}
        write_folder(args.export, final.config.to_dict(), final.state_dict(),
                     extra_files={"training.json": json.dumps(record, indent=2) + "\n"})
        log.info("exported classifier to %s", args.export)
    return final


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_args())


if __name__ == "__main__":
    main()
