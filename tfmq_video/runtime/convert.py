"""Turn a full-precision model plus quantized-layer records into a runnable integer model.

Also installs what the time path needs at run time: a :class:`TimestepContext` set from each
forward call's ``timestep`` (per-timestep FSC activation parameters), and the temporal feature
cache (precomputed ``(t, t_mlp)`` per calibrated timestep, served instead of the time
embedding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.quant.context import TimestepContext
from tfmq_video.quant.records import QuantizedLinearRecord
from tfmq_video.runtime.attention import install_attention
from tfmq_video.runtime.backends import cpu_compile_enabled, warn_once
from tfmq_video.runtime.conv import CONV_TYPES, QuantPatchConv, patchify_problem
from tfmq_video.runtime.linear import QuantLinear


@dataclass
class TemporalFeatureCache:
    """Time-embedding outputs per calibrated timestep: ``t`` (T, C) and ``t_mlp`` (T, 6C) at one fps."""

    timesteps: torch.Tensor
    fps: float
    t: torch.Tensor
    t_mlp: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """The cache as named tensors (for safetensors)."""
        return {"timesteps": self.timesteps.double(), "t": self.t.float(), "t_mlp": self.t_mlp.float()}


@torch.no_grad()
def compute_temporal_cache(model: nn.Module, timesteps: Sequence[float], fps: float) -> TemporalFeatureCache:
    """Evaluate ``model.time_embedding`` once per timestep (it depends on t and fps only)."""
    steps = torch.tensor([float(t) for t in timesteps], dtype=torch.float32)
    t, t_mlp = model.time_embedding(steps, torch.full_like(steps, float(fps)))
    return TemporalFeatureCache(steps.double(), float(fps), t.float(), t_mlp.float())


def submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute name inside it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_linears(
    model: nn.Module, records: Sequence[QuantizedLinearRecord], context: TimestepContext | None, backend: str
) -> list[QuantLinear]:
    """Swap each recorded ``nn.Linear`` for a :class:`QuantLinear`, each patchify conv (a record with
    ``original_shape``) for a :class:`~tfmq_video.runtime.conv.QuantPatchConv` (shapes checked first)."""
    problems = []
    for record in records:
        try:
            module = model.get_submodule(record.name)
        except AttributeError:
            problems.append(f"{record.name}: no such module")
            continue
        if record.original_shape is not None:
            if not isinstance(module, CONV_TYPES):
                problems.append(f"{record.name}: a conv record, but the module is a {type(module).__name__}")
            elif tuple(module.weight.shape) != tuple(record.original_shape):
                problems.append(f"{record.name}: conv codes of {tuple(record.original_shape)} vs {tuple(module.weight.shape)}")
            elif (problem := patchify_problem(module)) is not None:
                problems.append(f"{record.name}: not a patchify conv ({problem})")
        elif not isinstance(module, nn.Linear):
            problems.append(f"{record.name}: is a {type(module).__name__}, not a Linear")
        elif tuple(record.weight_codes.shape) != (module.out_features, module.in_features):
            problems.append(
                f"{record.name}: codes {tuple(record.weight_codes.shape)} vs Linear "
                f"{(module.out_features, module.in_features)}"
            )
    if problems:
        raise ConfigError("quantized layers do not fit the model:\n  " + "\n  ".join(problems))
    layers = []
    for record in records:
        parent, child = submodule_parent(model, record.name)
        original = getattr(parent, child)
        # Built on the CPU with the backend that runs anywhere, then moved where the layer it
        # replaces lives: only there can the requested backend be checked and prepared.
        if record.original_shape is None:
            layer = QuantLinear(record, context=context, backend="reference")
        else:
            layer = QuantPatchConv(record, context=context, backend="reference", dtype=original.weight.dtype)
        layer.to(original.weight.device)
        layer.set_backend(backend)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def install_timestep_hook(model: nn.Module, context: TimestepContext) -> None:
    """Set ``context`` from every forward call's ``timestep`` (second positional or keyword)."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise ConfigError("a quantized model with per-timestep parameters needs the timestep argument")
        context.set_timestep(timestep)

    model.register_forward_pre_hook(hook, with_kwargs=True)


def install_temporal_cache(model: nn.Module, cache: TemporalFeatureCache, context: TimestepContext) -> None:
    """Serve ``model.time_embedding`` from ``cache`` (computing it when fps differs from the cache's).

    The row is selected with the context's index tensor from a copy of the tables kept on the
    model's device and dtype (made once), not with a Python int.
    """
    compute = model.time_embedding
    tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def cached(timestep: torch.Tensor, fps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fps_values = fps.reshape(-1).float()
        if not bool(torch.all((fps_values - cache.fps).abs() < 1e-6)):
            warn_once(f"fps {fps_values.tolist()} differs from the temporal cache's {cache.fps}; computing the time embedding")
            return compute(timestep, fps)
        context.set_timestep(timestep)
        batch = timestep.shape[0]
        dtype = model.t_block[1].weight.dtype if hasattr(model, "t_block") else torch.float32
        key = (timestep.device, dtype)
        if key not in tables:
            tables[key] = (cache.t.to(timestep.device, dtype), cache.t_mlp.to(timestep.device, dtype))
        t_table, t_mlp_table = tables[key]
        index = context.index_tensor.to(timestep.device).reshape(1)
        t = t_table.index_select(0, index).expand(batch, -1)
        return t, t_mlp_table.index_select(0, index).expand(batch, -1)

    object.__setattr__(model, "time_embedding", cached)


def check_step_counts(
    records: Sequence[QuantizedLinearRecord], cache: TemporalFeatureCache | None, num_steps: int
) -> None:
    """Per-timestep parameters and the temporal cache must cover every calibrated step.

    Checked once here, so the forward (and a compiled graph) can select rows by an index tensor
    without a per-call range check.
    """
    problems = [
        f"{r.name}: {r.activation.scale.numel()} per-timestep activation scales"
        for r in records
        if r.activation.mode == "per_timestep"
        and r.activation.scale is not None
        and r.activation.scale.numel() < num_steps
    ]
    if cache is not None and len(cache.timesteps) < num_steps:
        problems.append(f"temporal cache: {len(cache.timesteps)} timesteps")
    if problems:
        raise ConfigError(f"{num_steps} calibrated timesteps, but only:\n  " + "\n  ".join(problems))


def compile_blocks(model: nn.Module, backend: str | Callable = "inductor") -> int:
    """``torch.compile`` every repeated block (a ModuleList entry) that holds a :class:`QuantLinear`.

    Inductor then fuses the activation quantization into the preceding LayerNorm + adaLN
    modulate (and GELU), and the dequantization epilogue into the following bias, gate and
    residual add, around the ``torch._int_mm`` calls. Per-timestep parameters are read through
    the context's index tensor, so one graph per block serves every sampling step. ``backend``
    is the ``torch.compile`` backend (tests count graphs with a counting backend). Returns the
    number of compiled blocks.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(isinstance(m, QuantLinear) for m in block.modules()):
                    block.compile(dynamic=True, backend=backend)
                    count += 1
    return count


def build_runtime_model(
    model: nn.Module,
    records: Sequence[QuantizedLinearRecord],
    backend: str = "auto",
    attention: str = "auto",
    calibrated_timesteps: Sequence[float] | None = None,
    temporal_cache: TemporalFeatureCache | None = None,
    compile: bool | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Make ``model`` (modified in place) run its recorded layers with integer kernels.

    ``device``: where the model runs (default: where it is now). The backend is chosen and its
    weights prepared there, so a CPU-built model meant for the ``triton`` backend needs
    ``device="cuda"`` here (or to be moved to the GPU before this call).
    ``compile`` (default: on for the cpu backend unless ``TFMQ_CPU_COMPILE=0``) compiles the
    transformer blocks whole (see :func:`compile_blocks`); the first forward pass then takes
    tens of seconds.
    """
    if device is not None:
        model.to(device)
    needs_context = any(r.activation.mode == "per_timestep" for r in records) or temporal_cache is not None
    context = None
    if needs_context:
        if calibrated_timesteps is None and temporal_cache is not None:
            calibrated_timesteps = cache_timesteps(temporal_cache)
        if calibrated_timesteps is None:
            raise ConfigError("per-timestep activation parameters need the calibrated timesteps")
        context = TimestepContext(calibrated_timesteps)
        check_step_counts(records, temporal_cache, len(context))
    layers = replace_linears(model, records, context, backend)
    used = layers[0].backend if layers else "reference"
    install_attention(model, attention, used)
    if context is not None:
        install_timestep_hook(model, context)
        if temporal_cache is not None:
            install_temporal_cache(model, temporal_cache, context)
    model.timestep_context = context  # type: ignore[assignment]
    if compile if compile is not None else (used == "cpu" and cpu_compile_enabled()):
        compile_blocks(model)
    return model


def cache_timesteps(cache: TemporalFeatureCache) -> list[float]:
    """The calibrated timesteps of a temporal cache."""
    return [float(t) for t in cache.timesteps]


def set_backend(model: nn.Module, backend: str, attention: str = "auto") -> str:
    """Switch every :class:`QuantLinear` (and the attention) of ``model`` to ``backend``; returns it."""
    used = "reference"
    for module in model.modules():
        if isinstance(module, QuantLinear):
            used = module.set_backend(backend)
    install_attention(model, attention, used)
    return used
