"""What calibration needs to know about a diffusion transformer: the :class:`DiTAdapter` interface.

An adapter describes one model family without changing it:

- the **temporal information block** (TIB): the module names (or ``fnmatch`` patterns) that
  turn the timestep (and other sample-independent conditions such as fps) into temporal
  features, and how to evaluate them for a batch of timesteps. The features may be produced
  before the first block (STDiT3's ``t``/``t_mlp``) or inside every block (the per-block adaLN
  linears of CogVideoX, FLUX or HunyuanVideo): :func:`serve_module_outputs` routes the latter
  through an override one module at a time;
- the **transformer blocks** in execution order and how to run one of them on recorded
  inputs (:class:`BlockBatch`), plus everything before the first block (``embed``);
- the **attention sites** whose matmul inputs can be quantized;
- the layers kept in full precision, by name pattern (``fnmatch`` syntax).

PixArt (``adaln_single``), FLUX (``time_text_embed`` and every block's ``norm1.linear``) or Wan
(``condition_embedder``) adapters implement the same methods with their own module names.
"""

from __future__ import annotations

import fnmatch
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tfmq_video.errors import ConfigError

TemporalFeatures = dict[str, torch.Tensor]
# (batch, conditions, compute, names) -> features ``names`` (every feature when None), (batch, dim)
# each; ``compute()`` evaluates the model's own TIB for (at least) those features.
TemporalOverride = Callable[
    [int, Mapping[str, torch.Tensor], Callable[[], TemporalFeatures], Sequence[str] | None], TemporalFeatures
]


def matches_module_pattern(name: str, pattern: str) -> bool:
    """Whether module ``name`` or one of its parents matches the ``fnmatch`` ``pattern``
    (``blocks.*.attn`` covers ``blocks.3.attn.qkv``)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _static_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equality of two ``BlockBatch.static`` dicts whose values may hold tensors (rotary tables)."""
    def same(x: Any, y: Any) -> bool:
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y, strict=True))
        return bool(x == y)

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@dataclass
class BlockBatch:
    """Inputs of a transformer block for a batch of rows.

    ``hidden`` (R, ...) is the token stream; ``rows`` holds the other per-row tensors (caption,
    masks, temporal features: dim 0 is the row); ``static`` holds values shared by all rows
    (grid sizes). ``steps`` (R,) is the sampler step index of every row.
    """

    hidden: torch.Tensor
    rows: dict[str, torch.Tensor | None]
    static: dict[str, Any]
    steps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def select(self, index: torch.Tensor | slice) -> BlockBatch:
        """The rows at ``index``."""
        rows = {k: (None if v is None else v[index]) for k, v in self.rows.items()}
        return BlockBatch(self.hidden[index], rows, self.static, self.steps[index])

    def to(self, device: torch.device | str) -> BlockBatch:
        """The same rows with every per-row tensor on ``device`` (the token stream, ``rows``, ``steps``)."""
        rows = {k: (None if v is None else v.to(device)) for k, v in self.rows.items()}
        return BlockBatch(self.hidden.to(device), rows, self.static, self.steps.to(device))

    def with_hidden(self, hidden: torch.Tensor) -> BlockBatch:
        """The same rows with another token stream."""
        return BlockBatch(hidden, self.rows, self.static, self.steps)

    @staticmethod
    def concat(batches: list[BlockBatch]) -> BlockBatch:
        """Stack batches recorded separately; their static values must agree."""
        if not batches:
            raise ConfigError("no calibration data: the calibration set has no recorded steps")
        static = batches[0].static
        for other in batches[1:]:
            if not _static_equal(other.static, static):
                raise ConfigError(f"calibration inputs of different shapes cannot be mixed: {static} vs {other.static}")
        rows = {
            k: (None if batches[0].rows[k] is None else torch.cat([b.rows[k] for b in batches]))  # type: ignore[misc]
            for k in batches[0].rows
        }
        return BlockBatch(torch.cat([b.hidden for b in batches]), rows, static, torch.cat([b.steps for b in batches]))

    def __len__(self) -> int:
        return self.hidden.shape[0]


class DiTAdapter(ABC):
    """Describes a diffusion transformer family to the calibration code (see module docstring)."""

    name: str = ""
    #: module names (or ``fnmatch`` patterns, e.g. ``transformer_blocks.*.norm1.linear``) that make
    #: up the temporal information block; a name covers everything below the module
    temporal_modules: tuple[str, ...] = ()
    #: layers that always stay FP for this family (fnmatch patterns over module names)
    keep_fp_patterns: tuple[str, ...] = ()

    # ---------------------------------------------------------------- model I/O
    @abstractmethod
    def build_model(self, config: Mapping[str, Any]) -> nn.Module:
        """An uninitialized model of this family from its config dict (weights loaded separately)."""

    @abstractmethod
    def load_model(self, path: str) -> nn.Module:
        """The FP model stored at ``path`` (eval mode)."""

    @abstractmethod
    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """The JSON config that rebuilds ``model`` with :meth:`build_model`."""

    def prepare(self, model: nn.Module) -> None:
        """Make ``model`` quantizable in place without changing its outputs (e.g. give its attention
        sites an ``attention(q, k, v)`` method); called before it is wrapped. Nothing by default."""
        return None

    # ---------------------------------------------------------------- temporal information block
    @abstractmethod
    def timestep_of(self, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The timestep tensor (B,) of a model call."""

    @abstractmethod
    def temporal_conditions(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The sample-independent inputs of the TIB besides the timestep (e.g. fps) of a model call."""

    @abstractmethod
    def temporal_features(
        self, model: nn.Module, timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor]
    ) -> TemporalFeatures:
        """Evaluate the model's TIB (as currently quantized) for a batch of timesteps."""

    @abstractmethod
    def override_temporal_features(self, model: nn.Module, override: TemporalOverride | None) -> None:
        """Route the model's TIB through ``override`` (a cache lookup) or restore it (None).

        The override also applies when a block runs alone on recorded rows (block reconstruction):
        features computed inside a block must be routed there, not only in the model's forward."""

    # ---------------------------------------------------------------- blocks
    @abstractmethod
    def block_names(self, model: nn.Module) -> list[str]:
        """Module names of the transformer blocks in execution order."""

    @abstractmethod
    def attention_sites(self, model: nn.Module) -> list[str]:
        """Module names of attention layers whose ``attention(q, k, v[, mask])`` method is wrapped."""

    @abstractmethod
    def embed(self, model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> BlockBatch:
        """Run everything before the first block for one model call."""

    @abstractmethod
    def run_block(self, block: nn.Module, batch: BlockBatch) -> torch.Tensor:
        """One block's output token stream for ``batch``."""

    def output_tensor(self, output: Any) -> torch.Tensor:
        """The prediction in a model call's result: the tensor itself, the first item of a tuple, or
        the ``sample`` of a diffusers output object."""
        if torch.is_tensor(output):
            return output
        if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
            return output[0]
        sample = getattr(output, "sample", None)
        if torch.is_tensor(sample):
            return sample
        raise TypeError(f"{type(self).__name__}: cannot find the prediction in a {type(output).__name__} result")

    def prediction_tokens(self, batch: BlockBatch) -> slice:
        """The tokens (dim 1) of a block's output that the model's prediction is made from: all of
        them by default; a joint text + video stream keeps its video tokens. Guidance-aware
        reconstruction combines these alone (the text halves of a guidance pair differ by design)."""
        return slice(None)

    def head_name(self, model: nn.Module) -> str | None:
        """Module name of the output layer run after the last block (reconstructed like a block), if any."""
        return None

    def run_head(self, head: nn.Module, batch: BlockBatch) -> torch.Tensor:
        """The output layer's result for ``batch`` (before any reshaping into the sample layout)."""
        raise NotImplementedError(f"{type(self).__name__} has no output layer to reconstruct")

    # ---------------------------------------------------------------- shared helpers
    def is_temporal(self, module_name: str) -> bool:
        """Whether ``module_name`` lies inside the TIB."""
        return any(matches_module_pattern(module_name, p) for p in self.temporal_modules)

    def temporal_module_names(self, model: nn.Module) -> list[str]:
        """The TIB's top-level modules in ``model`` (patterns expanded; modules below a TIB module left out)."""
        names = [name for name, _ in model.named_modules() if name and self.is_temporal(name)]
        return [name for name in names if not any(name.startswith(other + ".") for other in names)]

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The transformer blocks with their names, in execution order."""
        return [(name, model.get_submodule(name)) for name in self.block_names(model)]


def serve_module_outputs(model: nn.Module, feature_modules: Mapping[str, str], override: TemporalOverride | None) -> None:
    """Route temporal features that are outputs of single modules (per-block adaLN linears) through
    ``override``, or restore the modules (None).

    ``feature_modules``: feature name -> module name. Each module's ``forward`` is shadowed by a
    :class:`ServedForward` asking ``override`` for its one feature, with ``compute`` running the
    module; so the override applies wherever the module runs, in the model's forward as in a
    block run alone. The override is told no TIB conditions: the timestep is the only input.
    """
    for feature, module_name in feature_modules.items():
        module = model.get_submodule(module_name)
        module.__dict__.pop("forward", None)
        if override is not None:
            module.__dict__["forward"] = ServedForward(module, feature, override)


class ServedForward:
    """A module's forward that serves its output as temporal feature ``feature`` through ``override``.

    Holds the module and the override as attributes (no closure), so a deep copy of the model
    serves the copied module through the copied cache."""

    def __init__(self, module: nn.Module, feature: str, override: TemporalOverride) -> None:
        self.module, self.feature, self.override = module, feature, override

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The served feature for the rows of ``x`` (the module's own output where the override computes)."""
        def compute() -> TemporalFeatures:
            return {self.feature: type(self.module).forward(self.module, x)}

        return self.override(x.shape[0], {}, compute, (self.feature,))[self.feature]


# adapter name -> "module:Class"; imported only when used
ADAPTERS: dict[str, str] = {
    "opensora-stdit3": "dit_adapters.opensora.adapter:STDiT3Adapter",
    "cogvideox": "dit_adapters.cogvideox.adapter:CogVideoXAdapter",
}


def get_adapter(name: str) -> DiTAdapter:
    """The registered adapter called ``name``."""
    if name not in ADAPTERS:
        raise ConfigError(f"unknown model adapter {name!r}; available: {sorted(ADAPTERS)}")
    module_name, class_name = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
