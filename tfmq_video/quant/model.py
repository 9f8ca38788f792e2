"""Wrap a model into a fake-quant model according to its adapter and a recipe.

:func:`plan_layers` decides per Linear/Conv layer what is quantized: layers matching a keep-FP
pattern (the adapter's or the recipe's ``quant.keep_fp``, ``fnmatch`` syntax over module names,
a pattern also covering everything below the module it names) stay FP; TIB layers follow the
``tib`` section (per-timestep activation parameters under FSC); the rest follows ``quant``.
:class:`QuantizedModel` runs the original forward and selects the sampler step from the
timestep of every call. :func:`to_records` hands the calibrated layers to export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_adapters.base import DiTAdapter, TemporalOverride, matches_module_pattern
from tfmq_video.devices import model_device
from tfmq_video.errors import ConfigError
from tfmq_video.quant.affine import code_dtype
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.quant.modules import (
    CONV_TYPES,
    KernelAttention,
    QuantAttention,
    QuantConv,
    QuantWeightLayer,
    wrap_weight_layer,
)
from tfmq_video.quant.quantizers import ActQuantizer, ActSpec, StepContext, WeightSpec, group_size_for
from tfmq_video.quant.records import ActivationRecord, QuantizedLinearRecord


@dataclass(frozen=True)
class LayerPlan:
    """The quantization of one layer: ``role`` is ``tib``, ``block`` or ``other``; None specs mean FP."""

    name: str
    role: str
    weight: WeightSpec | None
    activation: ActSpec | None


def keep_fp_patterns(adapter: DiTAdapter, recipe: RecipeConfig, names: Sequence[str]) -> tuple[str, ...]:
    """The adapter's and the recipe's keep-FP patterns; an error names recipe patterns matching nothing."""
    unknown = [p for p in recipe.quant.keep_fp if not any(matches_module_pattern(n, p) for n in names)]
    if unknown:
        raise ConfigError(
            f"quant.keep_fp names no layer of this model: {unknown}; use module names such as "
            f"{list(names)[:4]} (fnmatch patterns allowed, e.g. 'spatial_blocks.*.mlp.fc2')"
        )
    return (*adapter.keep_fp_patterns, *recipe.quant.keep_fp)


def _weight_spec(recipe: RecipeConfig, layer: nn.Module) -> WeightSpec:
    """The recipe's weight spec; per channel for layers whose input size is not a multiple of the group."""
    spec = recipe.quant.weight.spec()
    return dataclasses.replace(spec, group_size=group_size_for(layer.weight[0].numel(), spec.group_size))


def plan_layers(model: nn.Module, adapter: DiTAdapter, recipe: RecipeConfig) -> dict[str, LayerPlan]:
    """One :class:`LayerPlan` per Linear/Conv layer of ``model``, by module name."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *CONV_TYPES))]
    patterns = keep_fp_patterns(adapter, recipe, layers)
    blocks = adapter.block_names(model)
    act = recipe.quant.activation
    plans = {}
    for name in layers:
        in_block = any(matches_module_pattern(name, b) for b in blocks)
        temporal = adapter.is_temporal(name) and not (in_block and recipe.tib.in_block_layers == "block")
        role = "tib" if temporal else ("block" if in_block else "other")
        if any(matches_module_pattern(name, p) for p in patterns) or (temporal and recipe.tib.keep_fp):
            plans[name] = LayerPlan(name, role, None, None)
            continue
        mode = "per_timestep" if temporal and recipe.tib.fsc else act.mode
        plans[name] = LayerPlan(name, role, _weight_spec(recipe, model.get_submodule(name)), act.spec(mode))
    return plans


def _install_attention(site: nn.Module, recipe: RecipeConfig, context: StepContext) -> None:
    """Replace ``site.attention`` by the recipe's fake-quant attention (:class:`QuantAttention`, or
    :class:`KernelAttention` for ``attention_mode: per_block``) registered as ``site.matmul_quant``."""
    if not callable(getattr(site, "attention", None)):
        raise ConfigError(f"attention site {type(site).__name__} has no attention(q, k, v) method to wrap")
    if recipe.quant.attention_mode == "per_block":
        quant: nn.Module = KernelAttention()
    else:
        quant = QuantAttention(recipe.quant.activation.spec(), context).to(model_device(site))
    site.add_module("matmul_quant", quant)
    object.__setattr__(site, "attention", quant.forward)


class QuantizedModel(nn.Module):
    """A fake-quant model: the wrapped ``model``, its :class:`StepContext` and the temporal cache.

    ``forward`` takes the model's own arguments, selects the step of the call's timestep
    (nearest calibrated step with a one-time warning outside the calibrated set) and runs the
    original forward.
    """

    def __init__(
        self, model: nn.Module, adapter: DiTAdapter, context: StepContext, plans: dict[str, LayerPlan]
    ) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.context = context
        self.plans = plans
        self.temporal_cache: nn.Module | None = None
        self.report: dict[str, Any] = {}
        self.recipe: RecipeConfig | None = None  # set by quantize() / load_calibrated()
        self.fingerprint: str | None = None  # of the FP model it was calibrated from

    def __getattr__(self, name: str) -> Any:
        """Attributes not found here come from the wrapped model (``config``, ``dtype``), so the
        quantized model drops into a pipeline that reads them (a diffusers pipeline's ``transformer``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("_modules", {}).get("model")
            if wrapped is None or name.startswith("_"):
                raise
            return getattr(wrapped, name)

    def set_temporal_cache(self, cache: nn.Module | None) -> None:
        """Serve the temporal features through ``cache`` (a :class:`TemporalOverride` module) or stop."""
        self.temporal_cache = cache
        override: TemporalOverride | None = cache  # type: ignore[assignment]
        self.adapter.override_temporal_features(self.model, override)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped model's forward at the step of ``timestep``."""
        self.context.set_timestep(self.adapter.timestep_of(args, kwargs))
        return self.model(*args, **kwargs)

    def weight_layers(self, role: str | None = None) -> list[tuple[str, QuantWeightLayer]]:
        """Quantized weight layers (optionally of one role), by name."""
        return [
            (name, m) for name, m in self.model.named_modules()
            if isinstance(m, QuantWeightLayer) and (role is None or self.plans[name].role == role)
        ]

    def activation_quantizers(self) -> list[ActQuantizer]:
        """Every activation quantizer of the model."""
        return [m for m in self.model.modules() if isinstance(m, ActQuantizer)]

    def quantized_weight_fraction(self) -> float:
        """Fraction of the model's weight elements (Linear/Conv) that are quantized."""
        quantized = sum(m.weight.numel() for _, m in self.weight_layers() if m.weight_quant is not None)
        total = sum(self.model.get_submodule(name).weight.numel() for name in self.plans)
        return quantized / max(total, 1)


def wrap_model(
    model: nn.Module, adapter: DiTAdapter, recipe: RecipeConfig, timesteps: Sequence[float], initialize: bool = True
) -> QuantizedModel:
    """Replace the model's layers in place by fake-quant ones (weight scales set by the init method
    unless ``initialize`` is False, e.g. when a checkpoint supplies them)."""
    context = StepContext(list(timesteps))
    adapter.prepare(model)
    plans = plan_layers(model, adapter, recipe)
    for name, plan in plans.items():
        if plan.weight is None and plan.activation is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrap_weight_layer(model.get_submodule(name), plan.weight, plan.activation, context,
                                                   initialize))
    if recipe.quant.quantize_attention:
        patterns = (*adapter.keep_fp_patterns, *recipe.quant.keep_fp)  # validated by plan_layers
        for site_name in adapter.attention_sites(model):
            if not any(matches_module_pattern(site_name, p) for p in patterns):
                _install_attention(model.get_submodule(site_name), recipe, context)
    return QuantizedModel(model, adapter, context, plans)


# --------------------------------------------------------------------------- hand-off to export


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy: records go to disk, whatever device the model calibrated on."""
    return tensor.detach().to("cpu", copy=True)


def _activation_record(quantizer: ActQuantizer | None) -> ActivationRecord:
    if quantizer is None:
        return ActivationRecord(mode="none")
    spec = quantizer.spec
    if spec.mode == "dynamic_per_token":
        return ActivationRecord(mode="dynamic_per_token", bits=spec.bits, signed=spec.symmetric)
    scale, zero = _host_copy(quantizer.scale), _host_copy(quantizer.zero_point)
    if spec.mode == "static":
        scale, zero = scale[0], zero[0]
    return ActivationRecord(mode=spec.mode, bits=spec.bits, signed=spec.symmetric, scale=scale, zero_point=zero)


@torch.no_grad()
def served_temporal_features(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    """What the maintained TIB serves at every calibrated step, for a lookup at run time.

    ``timesteps`` (S,) float64; each TIB condition (e.g. ``fps``) as calibrated; each temporal
    feature (S, dim) float32 (cache or quantized TIB per the selection, both sample-independent);
    ``{feature}_use_cache`` (S,) bool, the recorded choices. Empty without a cache. All on CPU.
    """
    cache = qmodel.temporal_cache
    if cache is None:
        return {}
    conditions = {name: getattr(cache, f"condition_{name}") for name in cache.condition_names}
    qmodel.context.row_indices = torch.arange(len(qmodel.context))
    try:
        timesteps = qmodel.context.timesteps.float().to(model_device(qmodel.model))
        features = qmodel.adapter.temporal_features(qmodel.model, timesteps, conditions)
    finally:
        qmodel.context.row_indices = None
    out: dict[str, torch.Tensor] = {"timesteps": qmodel.context.timesteps.clone(),
                                    **{name: _host_copy(value) for name, value in conditions.items()}}
    for name, value in features.items():
        out[name] = _host_copy(value.float())
        out[f"{name}_use_cache"] = _host_copy(getattr(cache, f"{name}_use_cache"))
    return out


def to_records(qmodel: QuantizedModel) -> tuple[list[QuantizedLinearRecord], dict[str, torch.Tensor]]:
    """Every weight-quantized layer as a :class:`QuantizedLinearRecord`, plus the temporal cache tensors.

    Conv weights are flattened to (out, in * kernel) with ``original_shape`` set. The cache
    tensors are :func:`served_temporal_features` (``timesteps``, ``fps``, ``t``, ``t_mlp`` for STDiT3).
    Every tensor is a CPU copy, whatever device the model is on.
    """
    records = []
    for name, layer in qmodel.weight_layers():
        wq = layer.weight_quant
        if wq is None:
            continue
        out_features = layer.weight.shape[0]
        codes = wq.integer_codes(layer.weight).reshape(out_features, -1).to("cpu", code_dtype(wq.grid))
        records.append(QuantizedLinearRecord(
            name=name,
            weight_codes=codes,
            weight_scale=_host_copy(wq.scale).reshape(out_features, -1),
            weight_zero_point=_host_copy(wq.zero_point).reshape(out_features, -1),
            weight_bits=wq.spec.bits,
            weight_signed=wq.spec.symmetric,
            group_size=wq.spec.group_size,
            bias=None if layer.bias is None else _host_copy(layer.bias),
            activation=_activation_record(layer.input_quant),
            original_shape=tuple(layer.weight.shape) if isinstance(layer, QuantConv) else None,
        ))
    return records, served_temporal_features(qmodel)
