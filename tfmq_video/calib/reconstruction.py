"""BRECQ-style block reconstruction of the transformer blocks (and the output layer).

Every block, then the adapter's output layer (head), is calibrated in execution order on the recorded (timestep-aware) calibration
rows: its input comes from the already quantized predecessors, its target is the FP block's
output on the FP input. AdaRound weights (and optionally LSQ activation steps) minimize the
relative output error; the block is then frozen and its quantized output feeds the next one.
Block inputs live on CPU for all rows (two token streams: FP and quantized).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dit_adapters.base import BlockBatch, DiTAdapter
from tfmq_video.calib.optimize import RoundingSchedule, optimize_rounding, relative_error
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.quant.model import QuantizedModel
from tfmq_video.quant.modules import QuantWeightLayer, activation_quantizers
from tfmq_video.quant.quantizers import StepContext


def embed_calls(adapter: DiTAdapter, model: nn.Module, calibration: CalibrationSet,
                context: StepContext | None) -> BlockBatch:
    """First-block inputs of every recorded call (rows of all calls stacked)."""
    batches = []
    with torch.no_grad():
        for call in calibration.calls:
            if context is not None:
                context.set_index(call.step)
            batch = adapter.embed(model, call.args, call.kwargs)
            batch.steps = torch.full((len(batch),), call.step, dtype=torch.long)
            batches.append(batch)
    return BlockBatch.concat(batches)


UnitRunner = Callable[[nn.Module, BlockBatch], torch.Tensor]


def run_rows(runner: UnitRunner, block: nn.Module, batch: BlockBatch, chunk: int,
             context: StepContext | None) -> torch.Tensor:
    """The unit's output for every row, in chunks, without gradients."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            rows = batch.select(slice(start, start + chunk))
            if context is not None:
                context.row_indices = rows.steps
            outputs.append(runner(block, rows))
    if context is not None:
        context.row_indices = None
    return torch.cat(outputs)


def block_loss(runner: UnitRunner, block: nn.Module, rows: BlockBatch, target: torch.Tensor, context: StepContext,
               generator: torch.Generator, batch_size: int) -> Callable[[int], torch.Tensor]:
    """The reconstruction loss of ``block`` on a random minibatch of ``rows`` per call."""

    def loss(_: int) -> torch.Tensor:
        index = torch.randperm(len(rows), generator=generator)[:batch_size]
        batch = rows.select(index)
        context.row_indices = batch.steps
        try:
            return relative_error(runner(block, batch), target[index])
        finally:
            context.row_indices = None

    return loss


def subsample_rows(count: int, max_rows: int | None, seed: int) -> torch.Tensor:
    """Indices of at most ``max_rows`` rows, spread uniformly at random."""
    if max_rows is None or max_rows >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values


def reconstruct_blocks(
    qmodel: QuantizedModel, fp_model: nn.Module, calibration: CalibrationSet, recipe: RecipeConfig,
) -> dict[str, Any]:
    """Calibrate every block of ``qmodel`` in order (see module docstring); returns per-block losses."""
    adapter, context, cfg = qmodel.adapter, qmodel.context, recipe.reconstruction
    fp_rows = embed_calls(adapter, fp_model, calibration, None)
    q_rows = embed_calls(adapter, qmodel.model, calibration, context)
    keep = subsample_rows(len(fp_rows), recipe.calibration.max_rows, recipe.seed)
    fp_rows, q_rows = fp_rows.select(keep), q_rows.select(keep)
    chunk = recipe.calibration.batch_size
    generator = torch.Generator().manual_seed(recipe.seed)
    schedule = RoundingSchedule(cfg.iterations if cfg.enabled else 0, cfg.lr_rounding,
                                cfg.lr_scale if cfg.learn_act_scales else 0.0, cfg.rounding_weight, cfg.warmup,
                                cfg.beta_start, cfg.beta_end)
    store_bytes = 2 * fp_rows.hidden.numel() * fp_rows.hidden.element_size()
    report: dict[str, Any] = {"rows": len(fp_rows), "store_mb": store_bytes / 2**20, "blocks": {}}
    units: list[tuple[str, UnitRunner]] = [(name, adapter.run_block) for name in adapter.block_names(qmodel.model)]
    head = adapter.head_name(qmodel.model)
    if head is not None:
        units.append((head, adapter.run_head))
    for name, runner in tqdm(units, desc="blocks", leave=False, disable=not recipe.progress):
        start = time.perf_counter()
        q_block = qmodel.model.get_submodule(name)
        target = run_rows(runner, fp_model.get_submodule(name), fp_rows, chunk, None)
        layers = [m for m in q_block.modules() if isinstance(m, QuantWeightLayer)]
        loss = block_loss(runner, q_block, q_rows, target, context, generator, cfg.batch_size)
        losses = optimize_rounding(layers, activation_quantizers(q_block), loss, schedule, name, recipe.progress)
        q_out = run_rows(runner, q_block, q_rows, chunk, context)
        report["blocks"][name] = {
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "output_error": float(relative_error(q_out, target)),
            "seconds": time.perf_counter() - start,
        }
        if name != head:
            q_rows, fp_rows = q_rows.with_hidden(q_out), fp_rows.with_hidden(target)
    return report
