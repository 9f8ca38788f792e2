"""BRECQ-style reconstruction of everything outside the TIB: the embedding layers, the
transformer blocks and the output layer.

First the quantized layers the adapter's embedding runs (for STDiT3 the patch and caption
embedders; the TIB is handled by :mod:`tfmq_video.calib.temporal`) are reconstructed one by one,
as BRECQ treats layers outside blocks. Then every block, then the adapter's output layer (head),
is calibrated in execution order on the recorded (timestep-aware) calibration rows: its input
comes from the already quantized predecessors, its target is the FP unit's output on the FP
input. AdaRound weights (and optionally LSQ activation steps) minimize the relative output
error; the unit is then frozen and its quantized output feeds the next one. Inputs live on CPU
for all rows (two streams: FP and quantized); minibatches move to the model's device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dit_adapters.base import BlockBatch, DiTAdapter
from tfmq_video.calib.observe import recording_layer_io
from tfmq_video.calib.optimize import RoundingSchedule, optimize_rounding, relative_error
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.devices import model_device
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.quant.model import QuantizedModel
from tfmq_video.quant.modules import QuantConv, QuantWeightLayer, activation_quantizers
from tfmq_video.quant.quantizers import ActQuantizer, StepContext


def embed_calls(adapter: DiTAdapter, model: nn.Module, calibration: CalibrationSet,
                context: StepContext | None) -> BlockBatch:
    """First-block inputs of every recorded call (rows of all calls stacked, on CPU)."""
    batches = []
    device = model_device(model)
    with torch.no_grad():
        for call in calibration.calls:
            if context is not None:
                context.set_index(call.step)
            batch = adapter.embed(model, *call.on(device)).to("cpu")
            batch.steps = torch.full((len(batch),), call.step, dtype=torch.long)
            batches.append(batch)
    return BlockBatch.concat(batches)


UnitRunner = Callable[[nn.Module, BlockBatch], torch.Tensor]


def embedding_layer_names(qmodel: QuantizedModel) -> list[str]:
    """Quantized layers outside the TIB, the blocks and the head (run by the adapter's embedding)."""
    head = qmodel.adapter.head_name(qmodel.model)
    return [name for name, _ in qmodel.weight_layers("other")
            if head is None or not (name == head or name.startswith(head + "."))]


def capture_embed_io(
    adapter: DiTAdapter, model: nn.Module, calibration: CalibrationSet, names: list[str],
    context: StepContext | None,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs and outputs of the layers ``names`` over every recorded call's embedding (rows of
    all calls stacked, on CPU): the layers in execution order, inputs, outputs and each input
    row's step. A layer may see several rows per sample (a patch convolution run per frame), the
    same number for every call."""
    samples = []
    device = model_device(model)
    with recording_layer_io(model, names, store="cpu") as seen, torch.no_grad():
        for call in calibration.calls:
            if context is not None:
                context.set_index(call.step)
            adapter.embed(model, *call.on(device))
            samples.append(len(call.args[0]))
    steps: dict[str, torch.Tensor] = {}
    for name in seen.order:
        per_call = [len(t) for t in seen.inputs[name]]
        ratios = {rows / count for rows, count in zip(per_call, samples, strict=False)}
        if len(per_call) != len(samples) or len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
            raise RuntimeError(f"embedding layer {name} does not run once per call on the same number of rows per "
                               "sample: it cannot be reconstructed layer by layer")
        per_sample = int(ratios.pop())
        steps[name] = torch.cat([torch.full((count * per_sample,), call.step, dtype=torch.long)
                                 for call, count in zip(calibration.calls, samples, strict=True)])
    return (seen.order, {k: torch.cat(v) for k, v in seen.inputs.items()},
            {k: torch.cat(v) for k, v in seen.outputs.items()}, steps)


def reconstruct_embeddings(
    qmodel: QuantizedModel, fp_model: nn.Module, calibration: CalibrationSet, recipe: RecipeConfig,
    schedule: RoundingSchedule, generator: torch.Generator,
) -> dict[str, Any]:
    """Layer-wise reconstruction of :func:`embedding_layer_names` in execution order, each on the
    input its quantized predecessors give (minibatches of the subsampled rows); per-layer losses."""
    adapter, context = qmodel.adapter, qmodel.context
    names = embedding_layer_names(qmodel)
    if not names:
        return {}
    order, _, targets, _ = capture_embed_io(adapter, fp_model, calibration, names, None)
    report: dict[str, Any] = {}
    for name in order:
        start = time.perf_counter()
        layer = qmodel.model.get_submodule(name)
        _, q_inputs, _, steps = capture_embed_io(adapter, qmodel.model, calibration, [name], context)
        keep = subsample_rows(len(steps[name]), recipe.calibration.max_rows, recipe.seed)
        rows = BlockBatch(q_inputs[name][keep], {}, {}, steps[name][keep])
        loss = block_loss(lambda unit, batch: unit(batch.hidden), layer, rows, targets[name][keep], context,
                          generator, recipe.reconstruction.batch_size)
        acts = [layer.input_quant] if layer.input_quant is not None else []
        losses = optimize_rounding([layer], acts, loss, schedule, name, recipe.progress)
        report[name] = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                        "seconds": time.perf_counter() - start}
    return report


def run_rows(runner: UnitRunner, block: nn.Module, batch: BlockBatch, chunk: int,
             context: StepContext | None) -> torch.Tensor:
    """The unit's output for every row, in chunks, without gradients (rows move to the unit's
    device chunk by chunk; the outputs come back to CPU)."""
    outputs = []
    device = model_device(block)
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            rows = batch.select(slice(start, start + chunk)).to(device)
            if context is not None:
                context.row_indices = rows.steps
            outputs.append(runner(block, rows).to("cpu"))
    if context is not None:
        context.row_indices = None
    return torch.cat(outputs)


def block_loss(runner: UnitRunner, block: nn.Module, rows: BlockBatch, target: torch.Tensor, context: StepContext,
               generator: torch.Generator, batch_size: int, pairs: torch.Tensor | None = None,
               guidance_scale: float = 0.0, tokens: slice = slice(None)) -> Callable[[int], torch.Tensor]:
    """The reconstruction loss of ``block`` on a random minibatch of ``rows`` per call (the
    minibatch moves to the block's device). With ``pairs`` ((P, 2) row indices of guidance pairs)
    and ``guidance_scale`` s > 1, a minibatch is ``batch_size // 2`` whole pairs (at least one)
    and the loss is :func:`guided_error` (guidance combining the output ``tokens``)."""
    device = model_device(block)
    paired = pairs is not None and len(pairs) > 0 and guidance_scale > 1

    def loss(_: int) -> torch.Tensor:
        if paired:
            chosen = torch.randperm(len(pairs), generator=generator)[:max(1, batch_size // 2)]
            index = pairs[chosen].reshape(-1)  # a0, b0, a1, b1, ...
        else:
            index = torch.randperm(len(rows), generator=generator)[:batch_size]
        batch = rows.select(index).to(device)
        context.row_indices = batch.steps
        try:
            output, wanted = runner(block, batch), target[index].to(device)
        finally:
            context.row_indices = None
        return guided_error(output, wanted, guidance_scale, tokens) if paired else relative_error(output, wanted)

    return loss


def guided_error(output: torch.Tensor, target: torch.Tensor, scale: float, tokens: slice = slice(None)) -> torch.Tensor:
    """Relative error of the guided combinations ``a + s (b - a)`` of rows paired as (0, 1),
    (2, 3), ..., averaged over both orders of each pair (which half of a pair is conditional is the
    sampler's convention, unknown here). With ``e`` the error of a row, that average is
    ``(|e_a|^2 + |e_b|^2) / 2 + (s^2 - s) |e_a - e_b|^2`` per pair; over the mean energy of the
    pairs' rows, ``(|t_a|^2 + |t_b|^2) / 2``, it is the rows' relative error plus
    ``2 (s^2 - s) |e_a - e_b|^2 / |target|^2``. Guidance combines the ``tokens`` (dim 1) alone;
    the other tokens count with their rows' error."""
    error = output - target
    difference = (error[0::2, tokens] - error[1::2, tokens]).pow(2).sum()
    return (error.pow(2).sum() + 2 * (scale**2 - scale) * difference) / target.pow(2).sum().clamp_min(1e-12)


def guidance_pairs(calibration: CalibrationSet) -> torch.Tensor:
    """(P, 2) indices of the guidance pairs among the rows of all calls stacked in order (as
    :func:`embed_calls` stacks them): in a call of 2B samples whose two halves hold equal samples
    (``args[0]``: how every classifier-free-guidance sampler batches its conditional and
    unconditional pass), row i pairs with row B + i. Which half is conditional does not matter to
    a loss on the pair's difference. (0, 2) when no call has such halves."""
    pairs, offset = [], 0
    for call in calibration.calls:
        sample = call.args[0]
        count = len(sample)
        half = count // 2
        if count and count % 2 == 0 and torch.equal(sample[:half], sample[half:]):
            first = torch.arange(half) + offset
            pairs.append(torch.stack([first, first + half], dim=1))
        offset += count
    return torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)


def subsample_pairs(pairs: torch.Tensor, max_rows: int | None, seed: int) -> torch.Tensor:
    """At most ``max_rows // 2`` of ``pairs`` (at least one), spread uniformly at random."""
    return pairs[subsample_rows(len(pairs), None if max_rows is None else max(1, max_rows // 2), seed)]


def pairs_within(pairs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The pairs whose two rows are both in ``keep``, as positions in ``keep``."""
    if not len(pairs) or not len(keep):
        return torch.zeros(0, 2, dtype=torch.long)
    position = torch.full((int(max(pairs.max(), keep.max())) + 1,), -1, dtype=torch.long)
    position[keep] = torch.arange(len(keep))
    local = position[pairs]
    return local[(local >= 0).all(dim=1)]


def difference_error(output: torch.Tensor, target: torch.Tensor, pairs: torch.Tensor,
                     tokens: slice = slice(None)) -> float | None:
    """Relative error of the pairs' output differences over ``tokens`` (dim 1; None without pairs)."""
    if not len(pairs):
        return None
    a, b = pairs[:, 0], pairs[:, 1]
    return float(relative_error(output[a, tokens] - output[b, tokens], target[a, tokens] - target[b, tokens]))


def subsample_rows(count: int, max_rows: int | None, seed: int) -> torch.Tensor:
    """Indices of at most ``max_rows`` rows, spread uniformly at random."""
    if max_rows is None or max_rows >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values


CONV_TYPES = (QuantConv, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ChannelMeans:
    """Forward hooks summing each named layer's output per output channel (dim 1 of a conv's
    output, the last dim of a linear's), so a mean over many rows never stores the outputs."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        self.order: list[str] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [module.get_submodule(name).register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def add(layer: nn.Module, _: tuple, output: torch.Tensor) -> None:
            channels = output.detach().double().movedim(1 if isinstance(layer, CONV_TYPES) else -1, -1)
            flat = channels.reshape(-1, channels.shape[-1])
            if name not in self.sums:
                self.order.append(name)
                self.sums[name], self.counts[name] = torch.zeros(flat.shape[-1], dtype=torch.float64,
                                                                   device=flat.device), 0
            self.sums[name] += flat.sum(0)
            self.counts[name] += flat.shape[0]

        return add

    def mean(self, name: str) -> torch.Tensor:
        """Mean output of ``name`` per channel over everything seen."""
        return self.sums[name] / max(self.counts[name], 1)

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


def channel_means(runner: UnitRunner, block: nn.Module, rows: BlockBatch, names: list[str], chunk: int,
                  context: StepContext | None) -> ChannelMeans:
    """Per-channel output means of the layers ``names`` of ``block`` over every row."""
    means = ChannelMeans(block, names)
    try:
        run_rows(runner, block, rows, chunk, context)
    finally:
        means.remove()
    return means


def unit_layers(qmodel: QuantizedModel, unit: str) -> dict[str, QuantWeightLayer]:
    """The quantized layers a unit's reconstruction calibrates, by name inside the unit: all of
    them but the TIB's (per-block adaLN linears belong to the TIB, calibrated before the blocks)."""
    prefix = unit + "."
    return {name[len(prefix):]: layer for name, layer in qmodel.weight_layers()
            if name.startswith(prefix) and qmodel.plans[name].role != "tib"}


def unit_activation_quantizers(qmodel: QuantizedModel, unit: str) -> list[ActQuantizer]:
    """The unit's activation quantizers, without those of its TIB layers (per-timestep under FSC)."""
    tib = {id(q) for name, layer in qmodel.weight_layers("tib") if name.startswith(unit + ".")
           for q in activation_quantizers(layer)}
    return [q for q in activation_quantizers(qmodel.model.get_submodule(unit)) if id(q) not in tib]


def correct_biases(runner: UnitRunner, q_block: nn.Module, fp_block: nn.Module, q_rows: BlockBatch,
                   fp_rows: BlockBatch, chunk: int, context: StepContext | None,
                   layers: dict[str, QuantWeightLayer]) -> dict[str, float]:
    """Empirical bias correction of a frozen unit (see ``ReconstructionConfig``): each of its
    ``layers`` (name inside the unit -> layer) with a bias, in execution order, gets the mean
    FP-minus-quantized output added to its bias, measured after its predecessors were corrected.
    Returns each layer's shift (L2 norm) relative to its bias's."""
    names = [name for name, m in layers.items() if m.bias is not None]
    if not names:
        return {}
    fp_means = channel_means(runner, fp_block, fp_rows, names, chunk, None)
    shifts: dict[str, float] = {}
    for name in fp_means.order:
        q_means = channel_means(runner, q_block, q_rows, [name], chunk, context)
        bias = q_block.get_submodule(name).bias
        shift = (fp_means.mean(name) - q_means.mean(name)).to(bias.dtype)
        with torch.no_grad():
            bias.add_(shift)
        shifts[name] = float(shift.norm() / bias.norm().clamp_min(1e-12))
    return shifts


def reconstruction_rows(calibration: CalibrationSet, count: int, recipe: RecipeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (of ``count`` stacked rows) that block reconstruction keeps, and the guidance pairs
    among them as positions in that selection. Without ``guidance_scale`` rows are drawn one by one
    (:func:`subsample_rows`); with it, whole pairs (:func:`subsample_pairs`), and a calibration set
    without guidance pairs is an error."""
    pairs = guidance_pairs(calibration)
    max_rows, seed = recipe.calibration.max_rows, recipe.seed
    if recipe.reconstruction.guidance_scale <= 0:
        keep = subsample_rows(count, max_rows, seed)
        return keep, pairs_within(pairs, keep)
    if not len(pairs):
        raise ConfigError("reconstruction.guidance_scale needs guidance pairs in the calibration set (calls "
                          "holding the same samples twice, conditional and unconditional), and none has them: "
                          "record with classifier-free guidance or set reconstruction.guidance_scale: 0")
    chosen = subsample_pairs(pairs, max_rows, seed)
    return chosen.reshape(-1), torch.arange(2 * len(chosen)).reshape(-1, 2)


def reconstruct_blocks(
    qmodel: QuantizedModel, fp_model: nn.Module, calibration: CalibrationSet, recipe: RecipeConfig,
) -> dict[str, Any]:
    """Calibrate every block of ``qmodel`` in order (see module docstring); returns per-block losses."""
    adapter, context, cfg = qmodel.adapter, qmodel.context, recipe.reconstruction
    generator = torch.Generator().manual_seed(recipe.seed)
    schedule = RoundingSchedule(cfg.iterations if cfg.enabled else 0, cfg.lr_rounding,
                                cfg.lr_scale if cfg.learn_act_scales else 0.0, cfg.rounding_weight, cfg.warmup,
                                cfg.beta_start, cfg.beta_end)
    embeddings = reconstruct_embeddings(qmodel, fp_model, calibration, recipe, schedule, generator)
    fp_rows = embed_calls(adapter, fp_model, calibration, None)
    q_rows = embed_calls(adapter, qmodel.model, calibration, context)
    keep, pairs = reconstruction_rows(calibration, len(fp_rows), recipe)
    fp_rows, q_rows = fp_rows.select(keep), q_rows.select(keep)
    chunk = recipe.calibration.batch_size
    tokens = adapter.prediction_tokens(q_rows)
    store_bytes = 2 * fp_rows.hidden.numel() * fp_rows.hidden.element_size()
    report: dict[str, Any] = {"rows": len(fp_rows), "store_mb": store_bytes / 2**20, "embeddings": embeddings,
                              "blocks": {}}
    units: list[tuple[str, UnitRunner]] = [(name, adapter.run_block) for name in adapter.block_names(qmodel.model)]
    head = adapter.head_name(qmodel.model)
    if head is not None:
        units.append((head, adapter.run_head))
    for name, runner in tqdm(units, desc="blocks", leave=False, disable=not recipe.progress):
        start = time.perf_counter()
        q_block = qmodel.model.get_submodule(name)
        target = run_rows(runner, fp_model.get_submodule(name), fp_rows, chunk, None)
        layers = unit_layers(qmodel, name)
        loss = block_loss(runner, q_block, q_rows, target, context, generator, cfg.batch_size, pairs,
                          cfg.guidance_scale, tokens)
        losses = optimize_rounding(list(layers.values()), unit_activation_quantizers(qmodel, name), loss, schedule,
                                   name, recipe.progress)
        entry: dict[str, Any] = {"first_loss": losses[0] if losses else None,
                                 "last_loss": losses[-1] if losses else None}
        if cfg.bias_correction:
            entry["output_error_before_bias_correction"] = float(relative_error(
                run_rows(runner, q_block, q_rows, chunk, context), target))
            entry["bias_shifts"] = correct_biases(runner, q_block, fp_model.get_submodule(name), q_rows, fp_rows,
                                                  chunk, context, layers)
        q_out = run_rows(runner, q_block, q_rows, chunk, context)
        entry["output_error"] = float(relative_error(q_out, target))
        entry["guidance_difference_error"] = difference_error(q_out, target, pairs, tokens)
        entry["seconds"] = time.perf_counter() - start
        report["blocks"][name] = entry
        if name != head:
            q_rows, fp_rows = q_rows.with_hidden(q_out), fp_rows.with_hidden(target)
    return report
