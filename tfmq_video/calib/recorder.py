"""Calibration data from one FP sampling pass.

The sampler runs once per batch of calibration prompts; at every requested step the
:class:`StepRecorder` callback keeps the model call exactly as the sampler made it (latents,
timestep and keyword inputs, conditional and unconditional halves of guidance together), on
CPU. Cost: one sampler run, i.e. O(T) model calls, for the whole calibration set.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dit_adapters.opensora.rflow import RFlowSampler, SamplerConfig, StepState, seeded_noise
from tfmq_video.devices import model_device, move
from tfmq_video.errors import ConfigError

if TYPE_CHECKING:
    from tfmq_video.quant.config import CalibrationConfig


@dataclass
class RecordedCall:
    """One model call of the sampler: ``model(*args, **kwargs)`` at calibrated step ``step``."""

    step: int
    args: tuple
    kwargs: dict[str, Any]

    def on(self, device: torch.device | str) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` with every tensor on ``device`` (the recording stays on CPU)."""
        return move(self.args, device), move(self.kwargs, device)


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
        self.add(state.index, float(state.timestep.reshape(-1)[0]), (state.model_input, state.model_timestep),
                 dict(state.model_kwargs))

    def add(self, index: int, timestep: float, args: tuple, kwargs: dict[str, Any]) -> None:
        """Keep the call ``model(*args, **kwargs)`` of sampler step ``index`` (on CPU) when requested."""
        self.num_steps_seen = max(self.num_steps_seen, index + 1)
        if self.steps is not None and index not in self.steps:
            return
        self.timesteps.setdefault(index, timestep)
        self.raw.append((index, move(args, "cpu"), move(kwargs, "cpu")))

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


def _canonical_call(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """A call as leading positional arguments (every parameter given, up to the first one left
    out) plus keywords, whatever mix the caller used: the sample is then always ``args[0]``."""
    bound = signature.bind(*args, **kwargs)
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    leading = True
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            keywords.update(bound.arguments.get(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            positional.extend(bound.arguments.get(name, ()))
        elif name not in bound.arguments:
            leading = False
        elif leading and param.kind is not inspect.Parameter.KEYWORD_ONLY:
            positional.append(bound.arguments[name])
        else:
            leading = False
            keywords[name] = bound.arguments[name]
    return tuple(positional), keywords


@torch.no_grad()
def record_calls(model: torch.nn.Module, timestep_of: Callable[[tuple, dict[str, Any]], torch.Tensor],
                 run: Callable[[], Any], steps: Iterable[int] | None = None) -> CalibrationSet:
    """Calibration data from any sampling loop (a diffusers pipeline, say): ``run()`` samples with
    ``model`` once, and a forward pre-hook keeps the model's calls (on CPU).

    The sampler steps are numbered by the order in which their timesteps first appear, so several
    sampling runs inside ``run`` (batches of prompts) share the numbering, and the calls of one
    timestep (conditional and unconditional halves, or a second-order solver's two evaluations)
    belong to one step. ``timestep_of``: the adapter's, reading a call's timestep. ``steps``:
    sampler step indices to keep (None = all). Calls are stored with the sample as ``args[0]``.
    """
    signature = inspect.signature(model.forward)
    recorder = StepRecorder(steps)
    order: dict[float, int] = {}

    def keep(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        args, kwargs = _canonical_call(signature, args, kwargs)
        timestep = float(torch.as_tensor(timestep_of(args, kwargs)).reshape(-1)[0])
        index = order.setdefault(timestep, len(order))
        recorder.add(index, timestep, args, kwargs)

    handle = model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return recorder.calibration_set()


def calibration_seeds(seed: int, count: int) -> list[int]:
    """The noise seed of every calibration prompt (one per prompt, independent of batching)."""
    return [seed * 100_003 + i for i in range(count)]


@torch.no_grad()
def record_calibration(
    model: torch.nn.Module,
    y: torch.Tensor,
    mask: torch.Tensor | None,
    null_y: torch.Tensor,
    latent_shape: Sequence[int],
    extra_kwargs: Callable[[int], dict] | dict | None,
    seeds: Sequence[int],
    sampler_config: SamplerConfig,
    video_size: tuple[int, int, int] | None = None,
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> CalibrationSet:
    """Calibration set of encoded prompts: the FP sampler runs once per batch of ``batch_size``
    prompts, and a :class:`StepRecorder` keeps the model call of every requested step.

    ``y`` (N, 1, L, C_cap) and ``mask`` (N, L) are the encoded prompts, ``null_y`` (L, C_cap) the
    null caption of guidance (the model's ``y_embedder.y_embedding``); ``latent_shape`` is the
    (C, T, H, W) of the sampled latents, each prompt's noise drawn from its seed in ``seeds``.
    ``extra_kwargs`` (e.g. fps, pixel height and width) go to the model; a callable receives the
    batch size. ``video_size`` (num_frames, height, width) in pixels drives the timestep shift.
    Inputs move to the model's device; the recording is kept on CPU.
    """
    if len(y) != len(seeds):
        raise ConfigError(f"got {len(y)} encoded prompts but {len(seeds)} seeds; give one seed per prompt")
    if len(y) == 0:
        raise ConfigError("no calibration prompts to sample")
    if steps is not None and max(steps) >= sampler_config.num_steps:
        raise ConfigError(
            f"calibration steps {sorted(steps)} exceed the sampler's {sampler_config.num_steps} steps"
        )
    device = model_device(model)
    frames, height, width = video_size if video_size is not None else (None, None, None)
    sampler = RFlowSampler(sampler_config)
    recorder = StepRecorder(steps)
    for start in range(0, len(y), batch_size):
        chunk = slice(start, start + batch_size)
        y_b = y[chunk].to(device)
        mask_b = None if mask is None else mask[chunk].to(device)
        count = len(y_b)
        noise = seeded_noise(seeds[chunk], tuple(latent_shape), device=device)
        null = null_y.to(device)[None, None].expand(count, 1, *null_y.shape)
        extra = extra_kwargs(count) if callable(extra_kwargs) else dict(extra_kwargs or {})
        extra = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in extra.items()}
        sampler.sample(model, noise, y_b, null, mask=mask_b, extra_kwargs=extra, height=height, width=width,
                       num_frames=frames, callback=recorder, progress=progress)
    return recorder.calibration_set()


def toy_calibration_captions(num_prompts: int, seed: int, sampler_steps: int, steps: Sequence[int] | None
                             ) -> list[str]:
    """``num_prompts`` training captions of the toy world drawn by ``seed`` (every caption, then
    repeats, when more are asked for than exist); checks ``steps`` against ``sampler_steps``."""
    from tfmq_video.toy.data import train_captions

    captions = [c.text for c in train_captions()]
    generator = torch.Generator().manual_seed(seed)
    chosen = [captions[int(i)] for i in torch.randperm(len(captions), generator=generator)[:num_prompts]]
    if num_prompts > len(captions):
        chosen = [captions[i % len(captions)] for i in range(num_prompts)]
    if steps is not None and max(steps) >= sampler_steps:
        raise ConfigError(f"calibration steps {sorted(steps)} exceed the toy sampler's {sampler_steps} steps")
    return chosen


def record_toy_calibration(
    model: torch.nn.Module, num_prompts: int, seed: int = 0, steps: Sequence[int] | None = None,
    batch_size: int = 8, progress: bool = False,
) -> CalibrationSet:
    """Calibration set of the toy world: ``num_prompts`` training captions, one FP sampling pass."""
    from tfmq_video.toy.data import FRAME_SIZE, NUM_FRAMES
    from tfmq_video.toy.world import TOY_SAMPLER_CONFIG, VIDEO_SHAPE, model_kwargs, toy_text_encoder

    chosen = toy_calibration_captions(num_prompts, seed, TOY_SAMPLER_CONFIG.num_steps, steps)
    y, mask = toy_text_encoder().encode(chosen)
    return record_calibration(
        model, y, mask, model.y_embedder.y_embedding, VIDEO_SHAPE, model_kwargs, calibration_seeds(seed, len(chosen)),
        TOY_SAMPLER_CONFIG, video_size=(NUM_FRAMES, FRAME_SIZE, FRAME_SIZE), steps=steps, batch_size=batch_size,
        progress=progress,
    )


def record_recipe_calibration(model: torch.nn.Module, calibration: CalibrationConfig, progress: bool = False,
                              adapter: str = "opensora-stdit3") -> CalibrationSet:
    """The calibration set a recipe's ``calibration`` section asks for: the toy prompts sampled by
    the toy world's loop of ``adapter``'s family, or (STDiT3 only) a prompts file encoded by its
    text encoder (:func:`tfmq_video.calib.prompts.record_prompt_calibration`)."""
    cal = calibration
    if cal.prompts_file is None:
        from tfmq_video.toy.families import toy_family_of_adapter

        return toy_family_of_adapter(adapter).record(model, cal.num_prompts, cal.seed, cal.steps, cal.batch_size,
                                                     progress)
    from tfmq_video.calib.prompts import record_prompt_calibration
    from tfmq_video.quant.config import check_prompt_file_adapter

    check_prompt_file_adapter(adapter)

    return record_prompt_calibration(model, cal, progress)
