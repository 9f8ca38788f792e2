"""Calibrated (fake-quant) checkpoint -> packed integer checkpoint: the hand-off from calibration
to the runtime.

:func:`export_calibrated` writes what :func:`tfmq_video.quant.model.to_records` hands over
(integer weight codes with the calibrated rounding, scales and zero points, static or
per-timestep activation parameters) plus the temporal features the maintained TIB serves per
calibrated step, in the format of :mod:`tfmq_video.export.format`; the layers the recipe kept in
full precision stay in full precision. ``load_quantized`` then runs it with integer kernels.

Not carried over: the attention-matmul quantizers of the fake-quant model (format v1 has no
entry for them). The runtime chooses its own attention (``attention="auto"``: SDPA in
the model's dtype; ``"int8"``: SageAttention-style with per-block scales).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.export.format import save_quantized
from tfmq_video.quant.model import QuantizedModel, to_records
from tfmq_video.runtime.convert import TemporalFeatureCache

log = logging.getLogger(__name__)

#: families the integer runtime can run (its temporal cache format holds STDiT3's ``t``/``t_mlp``)
EXPORTABLE_ADAPTERS = ("opensora-stdit3",)


def check_exportable(adapter: str) -> None:
    """Raise a clear error for a family the integer runtime cannot run."""
    if adapter not in EXPORTABLE_ADAPTERS:
        raise ConfigError(f"export to the integer runtime supports {list(EXPORTABLE_ADAPTERS)}, not {adapter!r}; run "
                          "the calibrated model as it is (fake-quant), or save it with save_calibrated")


def plain_model(qmodel: QuantizedModel) -> nn.Module:
    """A fresh FP model of the calibrated model's family and config, holding its FP weights."""
    adapter = qmodel.adapter
    model = adapter.build_model(adapter.model_config(qmodel.model))
    wrapped = qmodel.model.state_dict()
    model.load_state_dict({name: wrapped[name] for name in model.state_dict()}, strict=True)
    return model.eval()


def runtime_cache(served: dict) -> TemporalFeatureCache | None:
    """The runtime's lookup table from :func:`~tfmq_video.quant.model.served_temporal_features`."""
    if not served:
        return None
    return TemporalFeatureCache(served["timesteps"].double(), float(served["fps"].flatten()[0]),
                                served["t"].float(), served["t_mlp"].float())


def export_calibrated(qmodel: QuantizedModel, folder: str | os.PathLike) -> Path:
    """Write ``qmodel`` as a packed integer checkpoint into ``folder`` (atomically); returns it."""
    check_exportable(qmodel.adapter.name)
    records, served = to_records(qmodel)
    if qmodel.recipe is not None and qmodel.recipe.quant.quantize_attention:
        if qmodel.recipe.quant.attention_mode == "per_block":
            log.info("attention was calibrated as the runtime's INT8 kernel computes it (attention_mode per_block): "
                     "run it with attention int8 for the calibrated numbers")
        else:
            log.info("static attention-matmul quantizers are not exported (format v1); the runtime runs its own "
                     "attention (attention_mode per_block calibrates against it)")
    return save_quantized(folder, plain_model(qmodel), records,
                          calibrated_timesteps=[float(t) for t in qmodel.context.timesteps],
                          temporal_cache=runtime_cache(served))
