"""Train the bundled toy STDiT3 on procedural videos (rectified flow, as Open-Sora 1.2).

Resumable: re-running with the same ``--run-dir`` continues from the last checkpoint.
The EMA weights are exported as an STDiT3 folder (``config.json`` + ``model.safetensors``).

    python tools/train_toy_stdit3.py --run-dir runs/toy_stdit3 --steps 3000 \
        --export tfmq_video/assets/toy_stdit3
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from dit_adapters.opensora.loading import load_stdit3, save_stdit3
from dit_adapters.opensora.rflow import RFlowSampler
from dit_adapters.opensora.stdit3 import STDiT3
from eval_video._files import write_text_atomic
from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES
from tfmq_video.toy.training import add_training_arguments, clip_batch, run_training, training_record
from tfmq_video.toy.world import TOY_SAMPLER_CONFIG, TOY_STDIT3_CONFIG, model_kwargs, toy_text_encoder

log = logging.getLogger("train_toy_stdit3")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, run_dir="runs/toy_stdit3", steps=3000, batch_size=32, ema_decay=0.998)
    parser.add_argument("--t-location", type=float, default=0.0,
                        help="mean of the logit-normal training timesteps (0 as upstream; > 0 weights high noise)")
    return parser.parse_args()


def training_batch(step: int, seed: int, batch_size: int, t_location: float = 0.0) -> dict[str, torch.Tensor]:
    """The batch of ``step`` (clips, captions, noise, t): a deterministic function of (seed, step),
    built on the CPU, so resuming is exact and the data do not depend on the device."""
    x0, captions, generator = clip_batch(step, seed, batch_size)
    y, mask = toy_text_encoder().encode(captions)
    noise = torch.randn(x0.shape, generator=generator)
    t = RFlowSampler(TOY_SAMPLER_CONFIG).sample_training_t(len(x0), FRAME_SIZE, FRAME_SIZE, NUM_FRAMES, generator=generator,
                                                          logit_location=t_location)
    return {"x0": x0, "y": y, "mask": mask, "noise": noise, "t": t}


def train(args: argparse.Namespace) -> STDiT3:
    torch.manual_seed(args.seed)
    model = STDiT3(TOY_STDIT3_CONFIG)
    model.initialize_weights()
    if args.init_from is not None:
        model.load_state_dict(load_stdit3(args.init_from).state_dict())
        log.info("warm start from %s", args.init_from)
    sampler = RFlowSampler(TOY_SAMPLER_CONFIG)

    def loss_of(forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x_t = sampler.add_noise(batch["x0"], batch["noise"], batch["t"])
        extra = {k: v.to(x_t.device) for k, v in model_kwargs(len(x_t)).items()}
        pred = forward(x_t, batch["t"], batch["y"], mask=batch["mask"], **extra)
        return (pred.float() - sampler.velocity_target(batch["x0"], batch["noise"])).pow(2).mean()

    run, ema_weights = run_training(
        model, args, lambda step: training_batch(step, args.seed, args.batch_size, args.t_location), loss_of, "toy STDiT3")
    final = STDiT3(TOY_STDIT3_CONFIG)
    final.load_state_dict(ema_weights, strict=True)
    if args.export is not None:
        save_stdit3(final, args.export)
        record = {**training_record(args, run, "train_toy_stdit3"), "t_location": args.t_location}
        write_text_atomic(args.export / "training.json", json.dumps(record, indent=2) + "\n")
        log.info("exported EMA model to %s", args.export)
    return final


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_args())


if __name__ == "__main__":
    main()
