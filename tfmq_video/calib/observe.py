"""Activation range calibration: one pass over the recorded calls with every quantizer observing.

Static quantizers get one parameter set from all calls; per-timestep (FSC) quantizers one per
calibrated step, keyed by the step of each call. Parameters then come from each quantizer's
init method (min-max, percentile or MSE search).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.quant.model import QuantizedModel


def observe_activations(qmodel: QuantizedModel, calibration: CalibrationSet, progress: bool = False) -> None:
    """Set every activation quantizer's parameters from the calibration calls."""
    quantizers = qmodel.activation_quantizers()
    for quantizer in quantizers:
        quantizer.observe()
    try:
        with torch.no_grad():
            for call in tqdm(calibration.calls, desc="activation ranges", leave=False, disable=not progress):
                qmodel.context.set_index(call.step)
                qmodel.model(*call.args, **call.kwargs)
    except BaseException:
        for quantizer in quantizers:
            quantizer.state = "quant"
        raise
    for quantizer in quantizers:
        quantizer.finalize()
