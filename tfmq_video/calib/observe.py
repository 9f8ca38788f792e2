"""Activation range calibration: one pass over the recorded calls with every quantizer observing.

Static quantizers get one parameter set from all calls; per-timestep (FSC) quantizers one per
calibrated step, keyed by the step of each call. Parameters then come from each quantizer's
init method (min-max, percentile or MSE search).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.devices import model_device
from tfmq_video.quant.model import QuantizedModel


@dataclass
class LayerIO:
    """What :func:`recording_layer_io` saw: the layers in the order they first ran, and every
    input (first positional argument) and output of each, one entry per call, detached."""

    order: list[str] = field(default_factory=list)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def calls(self, name: str) -> int:
        """How many times ``name`` ran."""
        return len(self.inputs.get(name, ()))


@contextmanager
def recording_layer_io(model: nn.Module, names: Sequence[str],
                       store: torch.device | str | None = None) -> Iterator[LayerIO]:
    """Record the inputs and outputs of the submodules ``names`` while the block runs (kept where
    they were computed, or moved to ``store``, e.g. ``"cpu"`` for many calls of a model on a GPU)."""
    seen = LayerIO()

    def hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(_: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name not in seen.inputs:
                seen.order.append(name)
            seen.inputs.setdefault(name, []).append(args[0].detach().to(store or args[0].device))
            seen.outputs.setdefault(name, []).append(output.detach().to(store or output.device))

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def observe_activations(qmodel: QuantizedModel, calibration: CalibrationSet, progress: bool = False) -> None:
    """Set every activation quantizer's parameters from the calibration calls."""
    quantizers = qmodel.activation_quantizers()
    device = model_device(qmodel.model)
    for quantizer in quantizers:
        quantizer.observe()
    try:
        with torch.no_grad():
            for call in tqdm(calibration.calls, desc="activation ranges", leave=False, disable=not progress):
                qmodel.context.set_index(call.step)
                args, kwargs = call.on(device)
                qmodel.model(*args, **kwargs)
    except BaseException:
        for quantizer in quantizers:
            quantizer.state = "quant"
        raise
    for quantizer in quantizers:
        quantizer.finalize()
