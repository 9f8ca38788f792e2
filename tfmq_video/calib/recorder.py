"""Calibration data from one FP sampling pass.

The sampler runs once per batch of calibration prompts; at every requested step the
:class:`StepRecorder` callback keeps the model call exactly as the sampler made it (latents,
timestep and keyword inputs, conditional and unconditional halves of guidance together), on
CPU. Cost: one sampler run, i.e. O(T) model calls, for the whole calibration set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_adapters.opensora.rflow import StepState
from tfmq_video.errors import ConfigError


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


@dataclass
class RecordedCall:
    """One model call of the sampler: ``model(*args, **kwargs)`` at calibrated step ``step``."""

    step: int
    args: tuple
    kwargs: dict[str, Any]


@dataclass
class CalibrationSet:
    """Recorded model calls and the calibrated timesteps (index = calibrated step index)."""

    timesteps: list[float]
    calls: list[RecordedCall] = field(default_factory=list)
    sampler_steps: list[int] = field(default_factory=list)  # sampler step index of each calibrated step

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ConfigError("calibration set has no steps: record at least one sampler step")

    def nbytes(self) -> int:
        """Memory held by the recorded tensors (shared tensors counted once)."""
        seen: dict[int, int] = {}
        for call in self.calls:
            for value in (*call.args, *call.kwargs.values()):
                if torch.is_tensor(value):
                    seen[id(value)] = value.numel() * value.element_size()
        return sum(seen.values())


class StepRecorder:
    """A sampler step callback that records the model call of every requested step.

    ``steps``: sampler step indices to keep (None = all). Use one recorder for every batch of
    prompts; ``calibration_set()`` then returns all calls.
    """

    def __init__(self, steps: Iterable[int] | None = None) -> None:
        self.steps = None if steps is None else sorted(set(steps))
        self.timesteps: dict[int, float] = {}
        self.raw: list[tuple[int, tuple, dict]] = []
        self.num_steps_seen = 0

    def __call__(self, state: StepState) -> None:
        """Keep ``state``'s model call when its step is requested."""
        self.num_steps_seen = max(self.num_steps_seen, state.index + 1)
        if self.steps is not None and state.index not in self.steps:
            return
        self.timesteps.setdefault(state.index, float(state.timestep.reshape(-1)[0]))
        args = (_to_cpu(state.model_input), _to_cpu(state.model_timestep))
        self.raw.append((state.index, args, _to_cpu(dict(state.model_kwargs))))

    def calibration_set(self) -> CalibrationSet:
        """The recorded calls, with sampler steps renumbered as calibrated step indices."""
        if self.steps is not None:
            missing = [s for s in self.steps if s not in self.timesteps]
            if missing:
                raise ConfigError(
                    f"calibration steps {missing} were never reached: the sampler ran {self.num_steps_seen} steps"
                )
        order = sorted(self.timesteps)
        if not order:
            raise ConfigError("calibration recorded no steps: the sampler never called back")
        index = {s: i for i, s in enumerate(order)}
        calls = [RecordedCall(index[s], args, kwargs) for s, args, kwargs in self.raw]
        return CalibrationSet([self.timesteps[s] for s in order], calls, order)


def record_toy_calibration(
    model: torch.nn.Module, num_prompts: int, seed: int = 0, steps: Sequence[int] | None = None,
    batch_size: int = 8, progress: bool = False,
) -> CalibrationSet:
    """Calibration set of the toy world: ``num_prompts`` training captions, one FP sampling pass."""
    from tfmq_video.toy.data import train_captions
    from tfmq_video.toy.world import TOY_SAMPLER_CONFIG, generate_latents

    captions = [c.text for c in train_captions()]
    generator = torch.Generator().manual_seed(seed)
    chosen = [captions[int(i)] for i in torch.randperm(len(captions), generator=generator)[:num_prompts]]
    if num_prompts > len(captions):
        chosen = [captions[i % len(captions)] for i in range(num_prompts)]
    if steps is not None and max(steps) >= TOY_SAMPLER_CONFIG.num_steps:
        raise ConfigError(
            f"calibration steps {sorted(steps)} exceed the toy sampler's {TOY_SAMPLER_CONFIG.num_steps} steps"
        )
    recorder = StepRecorder(steps)
    seeds = [seed * 100_003 + i for i in range(len(chosen))]
    generate_latents(model, model.y_embedder.y_embedding, chosen, seeds, batch_size=batch_size, callback=recorder,
                     progress=progress)
    return recorder.calibration_set()
