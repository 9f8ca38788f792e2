"""The optimization loop shared by TIAR and block reconstruction.

Learnable weight rounding (AdaRound: rounding variables, a regularizer annealed from
``beta_start`` to ``beta_end`` after a warm-up without it) and optionally learnable activation
step sizes (LSQ), minimizing a caller-given reconstruction loss.

``lr_scale`` is relative: each step-size tensor gets the learning rate ``lr_scale`` times its
own mean magnitude, so Adam moves it by about that fraction per iteration whatever the
activation's range. With one absolute rate, the TIB's small step sizes (the sinusoid input of
the timestep embedder at 6 bits: ~0.03) moved by a few percent per iteration and the TIAR loss
jumped between 2e-5 and 7e-4 from one iteration to the next (see docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tfmq_video.quant.modules import QuantWeightLayer
from tfmq_video.quant.quantizers import ActQuantizer


@dataclass(frozen=True)
class RoundingSchedule:
    """Iterations, learning rates and regularizer schedule of one optimization."""

    iterations: int
    lr_rounding: float
    lr_scale: float = 0.0
    rounding_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def beta(self, step: int) -> float:
        """The regularizer exponent at ``step`` (decays linearly after the warm-up)."""
        start = self.warmup * self.iterations
        progress = max(0.0, (step - start) / max(self.iterations - start, 1))
        return self.beta_end + (self.beta_start - self.beta_end) * (1 - progress)

    def regularized(self, step: int) -> bool:
        """Whether the rounding regularizer is on at ``step``."""
        return step >= self.warmup * self.iterations


def relative_error(prediction: torch.Tensor, target: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``|pred - target|^2 / |target|^2``, over all elements or per index of ``dim``."""
    if dim is None:
        return (prediction - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
    reduce = [d for d in range(target.dim()) if d != dim]
    return (prediction - target).pow(2).sum(reduce) / target.pow(2).sum(reduce).clamp_min(1e-12)


def relative_lr_unit(scale: torch.Tensor) -> float:
    """The magnitude a step size's learning rate is relative to: its mean absolute value now."""
    return max(float(scale.detach().abs().mean()), 1e-8)


def learnable_act_scales(quantizers: Sequence[ActQuantizer]) -> list[torch.nn.Parameter]:
    """Step sizes of the static and per-timestep quantizers (dynamic ones have none)."""
    return [q.scale for q in quantizers if q.spec.mode != "dynamic_per_token"]


def optimize_rounding(
    layers: Sequence[QuantWeightLayer],
    act_quantizers: Sequence[ActQuantizer],
    loss_fn: Callable[[int], torch.Tensor],
    schedule: RoundingSchedule,
    description: str = "reconstruction",
    progress: bool = False,
) -> list[float]:
    """Minimize ``loss_fn(step)`` over the layers' rounding (and step sizes); freeze the layers after.

    Returns the reconstruction loss of every step.
    """
    weighted = [layer for layer in layers if layer.weight_quant is not None]
    alphas = [layer.weight_quant.start_adaround(layer.weight) for layer in weighted]  # type: ignore[union-attr]
    scales = learnable_act_scales(act_quantizers) if schedule.lr_scale > 0 else []
    groups = []
    if alphas:
        groups.append({"params": alphas, "lr": schedule.lr_rounding})
    for scale in scales:
        scale.requires_grad_(True)
        groups.append({"params": [scale], "lr": schedule.lr_scale * relative_lr_unit(scale)})
    losses: list[float] = []
    if groups and schedule.iterations > 0:
        optimizer = torch.optim.Adam(groups)
        total_weights = sum(layer.weight.numel() for layer in weighted) or 1
        bar = tqdm(range(schedule.iterations), desc=description, leave=False, disable=not progress)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            rec = loss_fn(step)
            loss = rec
            if schedule.regularized(step) and weighted:
                beta = schedule.beta(step)
                reg = sum(layer.weight_quant.rounding_regularizer(beta) for layer in weighted)  # type: ignore[union-attr]
                loss = rec + schedule.rounding_weight * reg / total_weights
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for scale in scales:
                    scale.clamp_(min=1e-8)
            losses.append(float(rec.detach()))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3e}")
    for scale in scales:
        scale.requires_grad_(False)
    for layer in weighted:
        layer.weight_quant.freeze(layer.weight)  # type: ignore[union-attr]
    return losses
