"""The shared optimization loop: activation step sizes learn at a rate relative to their magnitude."""

from __future__ import annotations

import pytest
import torch

from tfmq_video.calib.optimize import RoundingSchedule, optimize_rounding
from tfmq_video.quant.quantizers import ActQuantizer, ActSpec


def static_quantizer(scale: float) -> ActQuantizer:
    quantizer = ActQuantizer(ActSpec(bits=6, mode="static"))
    with torch.no_grad():
        quantizer.scale.fill_(scale)
    return quantizer


@pytest.mark.parametrize("lr_scale", [1e-3, 1e-2])
def test_step_sizes_move_by_the_same_fraction_whatever_their_magnitude(lr_scale: float) -> None:
    small, large = static_quantizer(0.01), static_quantizer(3.0)

    def loss(_: int) -> torch.Tensor:  # pulls both step sizes up to twice their start
        return (small.scale / 0.01 - 2).pow(2).sum() + (large.scale / 3.0 - 2).pow(2).sum()

    optimize_rounding([], [small, large], loss, RoundingSchedule(iterations=1, lr_rounding=0.05, lr_scale=lr_scale))
    # Adam's first step has the size of the learning rate: lr_scale times the tensor's magnitude
    assert float(small.scale) == pytest.approx(0.01 * (1 + lr_scale), rel=1e-4)
    assert float(large.scale) == pytest.approx(3.0 * (1 + lr_scale), rel=1e-4)
    assert not small.scale.requires_grad and not large.scale.requires_grad


def test_no_step_size_learning_when_its_rate_is_zero() -> None:
    quantizer = static_quantizer(0.5)
    optimize_rounding([], [quantizer], lambda _: (quantizer.scale - 1).pow(2).sum(),
                      RoundingSchedule(iterations=5, lr_rounding=0.05, lr_scale=0.0))
    assert float(quantizer.scale) == 0.5
