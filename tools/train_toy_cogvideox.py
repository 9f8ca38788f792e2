"""Train the bundled toy CogVideoX on procedural videos (v-prediction, CogVideoX's DDPM schedule).

Resumable: re-running with the same ``--run-dir`` continues from the last checkpoint. The EMA
weights are exported as a diffusers transformer folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) that the ``cogvideox`` adapter loads.

    python tools/train_toy_cogvideox.py --run-dir runs/toy_cogvideox --steps 9000 --compile \
        --export tfmq_video/assets/toy_cogvideox
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch import nn

from dit_adapters.cogvideox.sampling import cogvideox_scheduler
from tfmq_video.checkpoint import atomic_folder
from tfmq_video.toy.cogvideox_world import (
    TOY_COGVIDEOX_CONFIG,
    build_toy_cogvideox,
    caption_embeddings,
    load_toy_cogvideox,
    to_model_layout,
)
from tfmq_video.toy.training import add_training_arguments, clip_batch, run_training, training_record

log = logging.getLogger("train_toy_cogvideox")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, run_dir="runs/toy_cogvideox", steps=9000, batch_size=8, ema_decay=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1,
                        help="share of training captions replaced by the empty prompt (for guidance)")
    return parser.parse_args()


def training_batch(step: int, seed: int, batch_size: int, caption_dropout: float = 0.1) -> dict[str, torch.Tensor]:
    """The batch of ``step`` (clips, caption embeddings, noise, integer timesteps), a deterministic
    function of (seed, step) built on the CPU; dropped captions become the zero (empty) prompt."""
    videos, captions, generator = clip_batch(step, seed, batch_size)
    x0 = to_model_layout(videos).contiguous()
    text = caption_embeddings(captions)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, cogvideox_scheduler().config.num_train_timesteps, (batch_size,), generator=generator)
    dropped = torch.rand(batch_size, generator=generator) < caption_dropout
    text[dropped] = 0.0
    return {"x0": x0, "text": text, "noise": noise, "t": t}


def save_transformer(model: nn.Module, folder: Path, record: dict) -> None:
    """Write a diffusers transformer folder (safetensors) with ``training.json``, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    atomic_folder(folder, write)


def train(args: argparse.Namespace) -> nn.Module:
    model = build_toy_cogvideox(args.seed)
    if args.init_from is not None:
        model.load_state_dict(load_toy_cogvideox(args.init_from).state_dict())
        log.info("warm start from %s", args.init_from)
    scheduler = cogvideox_scheduler()

    def loss_of(forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x_t = scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])
        target = scheduler.get_velocity(batch["x0"], batch["noise"], batch["t"])
        pred = forward(hidden_states=x_t, encoder_hidden_states=batch["text"], timestep=batch["t"], return_dict=False)[0]
        return (pred.float() - target.float()).pow(2).mean()

    run, ema_weights = run_training(
        model, args, lambda step: training_batch(step, args.seed, args.batch_size, args.caption_dropout), loss_of,
        "toy CogVideoX")
    final = build_toy_cogvideox(args.seed)
    final.load_state_dict(ema_weights, strict=True)
    if args.export is not None:
        record = {**training_record(args, run, "train_toy_cogvideox"), "caption_dropout": args.caption_dropout,
                  "config": TOY_COGVIDEOX_CONFIG, "objective": "v-prediction, CogVideoX DDIM schedule (SNR shift 3)"}
        save_transformer(final, args.export, record)
        log.info("exported EMA model to %s", args.export)
    return final


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_args())


if __name__ == "__main__":
    main()
