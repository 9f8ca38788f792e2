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
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_adapters.opensora.loading import load_stdit3, save_stdit3
from dit_adapters.opensora.rflow import RFlowSampler
from dit_adapters.opensora.stdit3 import STDiT3
from eval_video._files import write_text_atomic
from tfmq_video.devices import pick_device
from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES, clips_to_tensor, make_clips
from tfmq_video.toy.training import EMA, RunState, load_run, prefetched, save_run
from tfmq_video.toy.world import TOY_SAMPLER_CONFIG, TOY_STDIT3_CONFIG, model_kwargs, toy_text_encoder

log = logging.getLogger("train_toy_stdit3")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/toy_stdit3"))
    parser.add_argument("--export", type=Path, default=None, help="write the EMA model folder here at the end")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and export) after this much time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (slower on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from the weights of an exported model folder (a warm start; fresh optimizer)")
    parser.add_argument("--data-workers", type=int, default=1, help="threads that build batches ahead")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (about 20%% faster steps on CPU after a ~1.5 min compile)")
    parser.add_argument("--t-location", type=float, default=0.0,
                        help="mean of the logit-normal training timesteps (0 as upstream; > 0 weights high noise)")
    return parser.parse_args()


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def training_batch(step: int, seed: int, batch_size: int, t_location: float = 0.0) -> dict[str, torch.Tensor]:
    """The batch of ``step`` (clips, captions, noise, t): a deterministic function of (seed, step),
    built on the CPU, so resuming is exact and the data do not depend on the device."""
    clips, specs = make_clips(seed * 1_000_003 + step, batch_size)
    x0 = clips_to_tensor(clips)
    y, mask = toy_text_encoder().encode([s.caption.text for s in specs])
    generator = torch.Generator().manual_seed(seed * 7919 + step)
    noise = torch.randn(x0.shape, generator=generator)
    t = RFlowSampler(TOY_SAMPLER_CONFIG).sample_training_t(len(x0), FRAME_SIZE, FRAME_SIZE, NUM_FRAMES, generator=generator,
                                                          logit_location=t_location)
    return {"x0": x0, "y": y, "mask": mask, "noise": noise, "t": t}


def train(args: argparse.Namespace) -> STDiT3:
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model = STDiT3(TOY_STDIT3_CONFIG)
    model.initialize_weights()
    if args.init_from is not None:
        model.load_state_dict(load_stdit3(args.init_from).state_dict())
        log.info("warm start from %s", args.init_from)
    model.to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = load_run(args.run_dir, model, ema, optimizer) or RunState()
    if run.step:
        log.info("resumed %s at step %d (%.0f s trained)", args.run_dir, run.step, run.seconds)
    sampler = RFlowSampler(TOY_SAMPLER_CONFIG)
    extra = {k: v.to(device) for k, v in model_kwargs(args.batch_size).items()}
    model.train()
    forward = torch.compile(model) if args.compile else model
    started = time.time()
    seconds_before = run.seconds
    progress = tqdm(total=args.steps, initial=run.step, desc=f"train toy STDiT3 ({device})")
    batches = prefetched(lambda step: training_batch(step, args.seed, args.batch_size, args.t_location), range(run.step, args.steps),
                         workers=args.data_workers)
    for step, cpu_batch in batches:
        if args.max_minutes is not None and (time.time() - started) / 60 > args.max_minutes:
            log.info("time budget of %.1f min reached at step %d", args.max_minutes, step)
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        x_t = sampler.add_noise(batch["x0"], batch["noise"], batch["t"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup, args.steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
            pred = forward(x_t, batch["t"], batch["y"], mask=batch["mask"], **extra)
        loss = (pred.float() - sampler.velocity_target(batch["x0"], batch["noise"])).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        run.step = step + 1
        ema.update(model, run.step)
        run.losses.append((run.step, loss.item()))
        progress.update(1)
        progress.set_postfix(loss=f"{run.losses[-1][1]:.4f}")
        if run.step % args.checkpoint_every == 0 or run.step == args.steps:
            run.seconds = seconds_before + time.time() - started
            save_run(args.run_dir, model, ema, optimizer, run)
    batches.close()
    run.seconds = seconds_before + time.time() - started
    save_run(args.run_dir, model, ema, optimizer, run)
    progress.close()

    final = STDiT3(TOY_STDIT3_CONFIG)
    final.load_state_dict({k: v.cpu() for k, v in ema.shadow.items()}, strict=True)
    if args.export is not None:
        save_stdit3(final, args.export)
        recent = [loss for _, loss in run.losses[-200:]]
        record = {
            "steps": run.step, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
            "t_location": args.t_location,
            "train_seconds": round(run.seconds, 1), "final_loss_mean_last_200": float(np.mean(recent)) if recent else None,
            "seed": args.seed, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "command": "python tools/train_toy_stdit3.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
        }
        lineage = None if args.init_from is None else args.init_from / "training.json"
        if lineage is not None and lineage.is_file():
            record["initialized_from"] = json.loads(lineage.read_text())  # how the warm-start weights were made
        write_text_atomic(args.export / "training.json", json.dumps(record, indent=2) + "\n")
        log.info("exported EMA model to %s", args.export)
    return final


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_args())


if __name__ == "__main__":
    main()
