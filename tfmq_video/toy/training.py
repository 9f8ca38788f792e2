"""Resumable training runs for the bundled toy models (no pickle: safetensors + JSON only).

A run folder holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights),
``optimizer.safetensors`` + ``state.json`` (optimizer tensors, param groups, step, losses).
Everything is written to a temporary file and renamed, so an interrupted run resumes from
its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tfmq_video.devices import pick_device

log = logging.getLogger(__name__)


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer state into named tensors plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            tensors[f"state.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class EMA:
    """Exponential moving average of a model's floating-point state, with a warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend the current weights in; early steps use a smaller decay."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)


@dataclass
class RunState:
    """Progress of a training run besides the tensors."""

    step: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def save_run(folder: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, run: RunState) -> None:
    """Write a complete, resumable checkpoint of the run into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save_tensors(model.state_dict(), folder / "model.safetensors")
    _atomic_save_tensors(ema.shadow, folder / "ema.safetensors")
    tensors, groups = optimizer_tensors(optimizer)
    _atomic_save_tensors(tensors, folder / "optimizer.safetensors")
    record = {"step": run.step, "seconds": run.seconds, "losses": run.losses, "extra": run.extra, "param_groups": groups}
    _atomic_write_text(json.dumps(record), folder / "state.json")


def load_run(folder: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> RunState | None:
    """Restore a run saved by :func:`save_run`; ``None`` when ``folder`` holds no checkpoint.

    Tensors land on the device of ``model``'s parameters.
    """
    state_path = folder / "state.json"
    if not state_path.is_file():
        return None
    device = str(next(model.parameters()).device)
    record = json.loads(state_path.read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=device))
    ema.shadow = load_file(str(folder / "ema.safetensors"), device=device)
    restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors"), device=device), record["param_groups"])
    return RunState(record["step"], record["seconds"], [tuple(x) for x in record["losses"]], record.get("extra", {}))


Batch = TypeVar("Batch")


def prefetched(make_batch: Callable[[int], Batch], steps: range, workers: int = 2) -> Iterator[tuple[int, Batch]]:
    """Yield ``(step, make_batch(step))`` in order while later batches are built in threads.

    Batch building (procedural clips, numpy) would otherwise leave a GPU idle between steps.
    """
    ahead = max(1, workers * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [(step, pool.submit(make_batch, step)) for step in steps[:ahead]]
        next_index = ahead
        while pending:
            step, future = pending.pop(0)
            if next_index < len(steps):
                pending.append((steps[next_index], pool.submit(make_batch, steps[next_index])))
                next_index += 1
            yield step, future.result()



def add_training_arguments(parser: argparse.ArgumentParser, run_dir: str, steps: int, batch_size: int,
                           ema_decay: float) -> None:
    """The command-line options every toy training script shares (its defaults given)."""
    parser.add_argument("--run-dir", type=Path, default=Path(run_dir))
    parser.add_argument("--export", type=Path, default=None, help="write the EMA model folder here at the end")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and export) after this much time")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=ema_decay)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (slower on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from the weights of an exported model folder (a warm start; fresh optimizer)")
    parser.add_argument("--data-workers", type=int, default=1, help="threads that build batches ahead")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (about 20%% faster steps on CPU after a ~1.5 min compile)")


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def run_training(model: nn.Module, args: argparse.Namespace, make_batch: Callable[[int], dict[str, torch.Tensor]],
                 loss_of: Callable[[Callable[..., Any], dict[str, torch.Tensor]], torch.Tensor], name: str
                 ) -> tuple[RunState, dict[str, torch.Tensor]]:
    """Train ``model`` (AdamW, :func:`learning_rate`, gradient clipping at 1, EMA, bf16 autocast
    unless ``args.no_bf16``) on ``make_batch(step)`` (built on the CPU, a deterministic function of
    the step) with the loss ``loss_of(forward, batch)``; resumes from and checkpoints to
    ``args.run_dir``. Returns the run and the EMA weights (on the CPU)."""
    device = pick_device(args.device)
    model.to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = load_run(args.run_dir, model, ema, optimizer) or RunState()
    if run.step:
        log.info("resumed %s at step %d (%.0f s trained)", args.run_dir, run.step, run.seconds)
    model.train()
    forward = torch.compile(model) if args.compile else model
    started = time.time()
    seconds_before = run.seconds
    progress = tqdm(total=args.steps, initial=run.step, desc=f"train {name} ({device})")
    batches = prefetched(make_batch, range(run.step, args.steps), workers=args.data_workers)
    for step, cpu_batch in batches:
        if args.max_minutes is not None and (time.time() - started) / 60 > args.max_minutes:
            log.info("time budget of %.1f min reached at step %d", args.max_minutes, step)
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup, args.steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
            loss = loss_of(forward, batch)
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
    return run, {k: v.cpu() for k, v in ema.shadow.items()}


def training_record(args: argparse.Namespace, run: RunState, tool: str) -> dict[str, Any]:
    """What an exported model's ``training.json`` says about its run (settings, time, final loss,
    the command that reproduces it, and the warm start's own record when there was one)."""
    device = pick_device(args.device)
    recent = [loss for _, loss in run.losses[-200:]]
    record: dict[str, Any] = {
        "steps": run.step, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
        "train_seconds": round(run.seconds, 1), "final_loss_mean_last_200": float(np.mean(recent)) if recent else None,
        "seed": args.seed, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": f"python tools/{tool}.py " + " ".join(_option(k, v) for k, v in vars(args).items()
                                                          if v is not None and v is not False),
    }
    lineage = None if args.init_from is None else args.init_from / "training.json"
    if lineage is not None and lineage.is_file():
        record["initialized_from"] = json.loads(lineage.read_text())  # how the warm-start weights were made
    return record


def _option(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


def clip_batch(step: int, seed: int, batch_size: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """The toy clips (B, 3, T, H, W) and captions of training step ``step`` and the generator that
    draws the step's noise and timesteps: a deterministic function of (seed, step), so a resumed
    run sees the same data."""
    from tfmq_video.toy.data import clips_to_tensor, make_clips

    clips, specs = make_clips(seed * 1_000_003 + step, batch_size)
    return clips_to_tensor(clips), [s.caption.text for s in specs], torch.Generator().manual_seed(seed * 7919 + step)
