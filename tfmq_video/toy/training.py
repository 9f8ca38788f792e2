"""Resumable training runs for the bundled toy models (no pickle: safetensors + JSON only).

A run folder holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights),
``optimizer.safetensors`` + ``state.json`` (optimizer tensors, param groups, step, losses).
Everything is written to a temporary file and renamed, so an interrupted run resumes from
its last complete checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn


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

