"""``tfmq-video bench model``: one full sampling run at fp32, bf16, W8A8 and W4A8 per backend.

Models: the bundled toy STDiT3 (if its folder is present), a mid-size random STDiT3
(STDiT3-XL head dim 72, 2048 video tokens per sample, CFG doubles the batch) and, for GPUs,
``xl``: a random STDiT3 with STDiT3-XL's layer sizes (hidden 1152, 16 heads, 300 caption
tokens of 4096 channels) and only ``--xl-depth`` block pairs (default 4 of 28) at Open-Sora's
480p 51-frame latent (13 x 30 x 53 = 20,670 tokens per sample): the shapes where int8 kernels
pay off, at a depth a short device call can afford. Quantized models
come from RTN records, go through export and ``load_quantized`` (so the on-disk format is what
runs), and use dynamic per-token int8 activations with the TIB and embedders in full precision.
A W8A8 row with static per-tensor activation scales (min-max over one FP step) times the
static-scale kernels, and a W8A8 ``fsc`` row with per-timestep scales (min-max per step over one
FP sampling run, standing in for calibrated FSC parameters) times the per-timestep path. Every
row is measured in the same process; the error column compares each quantized output with the
``reference`` backend of the same scheme (fp rows: bf16 against fp32). ``first_seconds`` is the
first (cold) run, compilation included, and ``compiled_graphs`` the number of graphs Dynamo
compiled for the row (Dynamo is reset before each row).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

from dit_adapters.opensora.rflow import RFlowSampler, SamplerConfig, seeded_noise
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from tfmq_video.bench.common import machine_info, print_table, rel_error, time_ms, write_json
from tfmq_video.devices import pick_device
from tfmq_video.export import RTNConfig, load_quantized, rtn_records, save_quantized
from tfmq_video.quant.records import ActivationRecord
from tfmq_video.runtime.attention import ATTENTION_MODES, resolve_attention_mode
from tfmq_video.runtime.backends import backend_problem

log = logging.getLogger(__name__)

MID_CONFIG = STDiT3Config(
    input_sq_size=256, in_channels=4, patch_size=(1, 2, 2), hidden_size=576, depth=2, num_heads=8,
    caption_channels=512, model_max_length=32, pred_sigma=False,
)
MID_LATENT = (4, 8, 32, 32)  # (C, T, H, W): 8 frames of 16 x 16 patches = 2048 tokens per sample
XL_LATENT = (4, 13, 60, 106)  # Open-Sora 1.2 at 480p x 848, 51 frames: 13 latent frames of 30 x 53 patches


@dataclass
class Workload:
    """A model and everything one sampling run needs."""

    name: str
    model: STDiT3
    latent_shape: tuple[int, ...]
    caption_tokens: int
    sampler: SamplerConfig
    fps: float = 8.0
    pixel_size: int = 256
    extra: dict = field(default_factory=dict)


def toy_workload(steps: int | None) -> Workload | None:
    """The bundled toy model at its own sampler settings, or None when its folder is absent."""
    from tfmq_video.toy import world

    if not (world.TOY_STDIT3_DIR / "config.json").is_file():
        log.warning("bundled toy model not found in %s; skipping it", world.TOY_STDIT3_DIR)
        return None
    sampler = world.TOY_SAMPLER_CONFIG if steps is None else replace(world.TOY_SAMPLER_CONFIG, num_steps=steps)
    return Workload(
        "toy-stdit3", world.load_toy_stdit3(), world.VIDEO_SHAPE, world.TOY_CAPTION_TOKENS, sampler, world.TOY_FPS,
        world.VIDEO_SHAPE[-1],
    )


def mid_workload(steps: int) -> Workload:
    """A mid-size random STDiT3 (hidden 576, 8 heads of 72, 2 + 2 blocks, 2048 tokens per sample)."""
    sampler = SamplerConfig(num_steps=steps, guidance_scale=4.0, fixed_shift=3.0)
    return Workload("mid-stdit3-random", random_stdit3(MID_CONFIG), MID_LATENT, MID_CONFIG.model_max_length, sampler)


def random_stdit3(config: STDiT3Config) -> STDiT3:
    """A seeded random STDiT3 in which every Linear does real work (upstream init zeroes some)."""
    torch.manual_seed(0)
    model = STDiT3(config)
    model.initialize_weights()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.abs().max() == 0:
            nn.init.normal_(module.weight, std=0.02)
    return model.eval()


def xl_workload(steps: int, depth: int = 4) -> Workload:
    """STDiT3-XL layer sizes with ``depth`` block pairs at the 480p 51-frame latent (random weights)."""
    config = STDiT3Config(depth=depth)
    sampler = SamplerConfig(num_steps=steps, guidance_scale=7.0, fixed_shift=3.0)
    return Workload(f"xl{depth}-stdit3-random-480p", random_stdit3(config), XL_LATENT, config.model_max_length,
                    sampler, fps=24.0, pixel_size=480)


def sample_fn(work: Workload, model: nn.Module, device: torch.device) -> Callable[[], torch.Tensor]:
    """A closure running one full guided sampling run from fixed noise and captions."""
    generator = torch.Generator().manual_seed(1)
    channels = work.model.config.caption_channels
    y = torch.randn(1, 1, work.caption_tokens, channels, generator=generator).to(device)
    null = work.model.y_embedder.y_embedding[None, None].float().to(device)
    mask = torch.ones(1, work.caption_tokens, device=device)
    mask[:, work.caption_tokens // 2 + 1:] = 0
    noise = seeded_noise([0], work.latent_shape, device)
    sampler = RFlowSampler(work.sampler)
    size = torch.full((1,), float(work.pixel_size), device=device)
    kwargs = {"fps": torch.tensor([work.fps], device=device), "height": size, "width": size}

    def run() -> torch.Tensor:
        with torch.no_grad():
            return sampler.sample(model, noise, y, null, mask=mask, extra_kwargs=kwargs,
                                  height=work.pixel_size, width=work.pixel_size, num_frames=work.latent_shape[1])

    return run


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (its weights as stored in memory)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def fp_pass(work: Workload, device: torch.device, steps: int | None = None) -> None:
    """One FP sampling run of ``work.model`` on ``device`` (for hooks that record activations); the
    model goes back to the CPU afterwards."""
    sampler = work.sampler if steps is None else replace(work.sampler, num_steps=steps)
    try:
        sample_fn(replace(work, sampler=sampler), work.model.to(device), device)()
    finally:
        work.model.cpu()


@torch.no_grad()
def static_records(work: Workload, bits: int, device: torch.device | None = None) -> list:
    """RTN records with static per-tensor activation scales (max |x| / 127 over one FP sampling step,
    run on ``device``, default CPU).

    A stand-in for calibrated static (FSC) parameters: enough to time the static-scale kernels.
    """
    records = rtn_records(work.model, RTNConfig(weight_bits=bits))
    peaks: dict[str, float] = {}
    hooks = [
        work.model.get_submodule(r.name).register_forward_pre_hook(
            lambda _m, args, name=r.name: peaks.__setitem__(name, max(peaks.get(name, 0.0), float(args[0].abs().max())))
        )
        for r in records
    ]
    try:
        fp_pass(work, device or torch.device("cpu"), steps=1)
    finally:
        for hook in hooks:
            hook.remove()
    for record in records:
        scale = torch.tensor(max(peaks[record.name], 1e-8) / 127.0)
        record.activation = ActivationRecord("static", 8, True, scale, torch.tensor(0.0))
    return records


@torch.no_grad()
def per_timestep_records(work: Workload, bits: int, device: torch.device | None = None) -> tuple[list, list[float]]:
    """RTN records with per-timestep (FSC) activation scales, max |x| / 127 per step of one FP sampling
    run (on ``device``, default CPU).

    Returns the records and the calibrated timesteps (in the order the sampler visits them).
    """
    records = rtn_records(work.model, RTNConfig(weight_bits=bits))
    timesteps: list[float] = []
    peaks: dict[tuple[str, int], float] = {}

    def on_call(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        t = float(kwargs.get("timestep", args[1] if len(args) > 1 else None).reshape(-1)[0])
        if not timesteps or abs(timesteps[-1] - t) > 1e-6:
            timesteps.append(t)

    def on_layer(_m: nn.Module, args: tuple, name: str) -> None:
        key = (name, len(timesteps) - 1)
        peaks[key] = max(peaks.get(key, 0.0), float(args[0].abs().max()))

    hooks = [work.model.register_forward_pre_hook(on_call, with_kwargs=True)]
    for r in records:
        layer = work.model.get_submodule(r.name)
        hooks.append(layer.register_forward_pre_hook(lambda m, a, name=r.name: on_layer(m, a, name)))
    try:
        fp_pass(work, device or torch.device("cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    for record in records:
        peak = [max(peaks.get((record.name, i), 0.0), 1e-8) for i in range(len(timesteps))]
        scale = torch.tensor(peak) / 127.0
        record.activation = ActivationRecord("per_timestep", 8, True, scale, torch.zeros_like(scale))
    return records, timesteps


# RTN weights with dynamic per-token activations, by scheme name
RTN_SCHEMES = {
    "w8a8": RTNConfig(weight_bits=8),
    "w4a8": RTNConfig(weight_bits=4),
    "w4a8_g64": RTNConfig(weight_bits=4, group_size=64),
    "w4a8_g64i": RTNConfig(weight_bits=4, group_size=64, integer_group_scales=True),
}
SCHEMES = ("w8a8", "w4a8", "w4a8_g64", "w4a8_g64i", "w8a8_static", "w8a8_fsc")


def variants(
    work: Workload,
    device: torch.device,
    folder: Path,
    backends: list[str],
    schemes: tuple[str, ...] = SCHEMES,
    attention: str = "auto",
) -> list[tuple[dict, nn.Module]]:
    """(row description, model) for fp32, bf16 and each (scheme, backend); ``attention`` is the
    quantized models' attention mode (``auto``: SDPA; ``int8``: INT8 attention)."""
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    out = [
        ({"backend": "torch", "wbits": 32, "abits": 32, "act": "fp", "dtype": "fp32"}, work.model.to(device)),
        ({"backend": "torch", "wbits": 16, "abits": 16, "act": "fp", "dtype": str(half).split(".")[-1]},
         copy.deepcopy(work.model).to(device, half)),
    ]
    work.model.cpu()
    builders = {
        name: (lambda config=config: (config.weight_bits, "dynamic", rtn_records(work.model, config), None))
        for name, config in RTN_SCHEMES.items()
    }
    builders["w8a8_static"] = lambda: (8, "static", static_records(work, 8, device), None)
    builders["w8a8_fsc"] = lambda: (8, "fsc", *per_timestep_records(work, 8, device))
    for scheme in schemes:
        bits, act, records, timesteps = builders[scheme]()
        path = save_quantized(folder / scheme, work.model, records, calibrated_timesteps=timesteps)
        group = max((r.group_size or 0 for r in records), default=0) or None
        integer = scheme in RTN_SCHEMES and RTN_SCHEMES[scheme].integer_group_scales
        group_scales = None if group is None else ("integer" if integer else "float")
        for backend in backends:
            dtype = torch.float32 if backend == "reference" else half
            model = load_quantized(path, backend=backend, attention=attention, dtype=dtype, device=device)
            row = {"backend": backend, "wbits": bits, "group": group, "group_scales": group_scales, "abits": 8, "act": act,
                   "dtype": str(dtype).split(".")[-1], "attention": resolve_attention_mode(attention, backend)}
            out.append((row, model))
    work.model.to(device)
    return out


def output_key(row: dict) -> tuple:
    """What identifies a row's model: backend, weight bits, weight group (and its kind of scales), activation scheme."""
    return row["backend"], row["wbits"], row.get("group"), row.get("group_scales"), row["act"]


def benchmark_workload(
    work: Workload, device: torch.device, backends: list[str], repeat: int, schemes: tuple[str, ...] = SCHEMES,
    attention: str = "auto",
) -> list[dict]:
    """Time one sampling run per variant; fill in speedups, bytes, compilations and errors."""
    rows = []
    outputs: dict[tuple, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row, model in variants(work, device, Path(tmp), backends, schemes, attention):
            run = sample_fn(work, model, device)
            log.info("%s: %s", work.name, row)
            # every row compiles from scratch, as in its own process: graphs of earlier rows would
            # count against Dynamo's recompile limit (the code objects are shared) and push later
            # rows' blocks into eager fallback
            torch._dynamo.reset()
            row.update(model=work.name, steps=work.sampler.num_steps, weight_bytes=state_bytes(model))
            graphs = counters["stats"]["unique_graphs"]
            row["first_seconds"] = time_ms(run, device, 1, warmup=0) / 1e3
            row["seconds"] = time_ms(run, device, repeat, warmup=0) / 1e3
            row["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs
            outputs[output_key(row)] = run().float().cpu()
            rows.append(row)
    fp32 = next(r for r in rows if r["wbits"] == 32)
    bf16 = next(r for r in rows if r["wbits"] == 16)
    for row in rows:
        row["speedup_vs_fp32"] = fp32["seconds"] / row["seconds"]
        row["speedup_vs_bf16"] = bf16["seconds"] / row["seconds"]
        key = output_key(row)
        fp32_out = outputs[output_key(fp32)]
        reference = outputs.get(output_key({**row, "backend": "reference"})) if row["wbits"] <= 8 else fp32_out
        row["rel_err_vs_reference"] = None if reference is None else rel_error(outputs[key], reference)
        row["rel_err_vs_fp32"] = rel_error(outputs[key], fp32_out)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options of the model benchmark."""
    parser.add_argument("--json", dest="json_path", help="write the rows and the machine description here")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--models", nargs="*", default=["toy", "mid"], choices=["toy", "mid", "xl"],
                        help="xl: STDiT3-XL layer sizes at 480p, 51 frames (for GPUs; minutes per row on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps of the mid-size and xl models (default 3)")
    parser.add_argument("--xl-depth", type=int, default=4, help="block pairs of the xl model (STDiT3-XL has 28)")
    parser.add_argument("--toy-steps", type=int, default=None, help="sampling steps of the toy model (default: its own)")
    parser.add_argument("--repeat", type=int, default=1, help="timed sampling runs per row (median)")
    parser.add_argument("--backends", nargs="*", default=None, help="default: every backend that can run here")
    parser.add_argument(
        "--schemes",
        nargs="*",
        default=list(SCHEMES),
        choices=SCHEMES,
        help="quantized rows (default: all; w4a8_g64: weights per group of 64; w4a8_g64i: the same with integer group scales; w8a8_fsc: per-timestep activation scales)",
    )
    parser.add_argument("--attention", default="auto", choices=ATTENTION_MODES,
                        help="attention of the quantized rows (auto = fp: SDPA; int8: INT8 Q/K)")


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON."""
    device = pick_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backends = args.backends or [b for b in ("reference", "cpu", "triton") if backend_problem(b, device) is None]
    workloads = []
    if "toy" in args.models:
        workloads.append(toy_workload(args.toy_steps))
    if "mid" in args.models:
        workloads.append(mid_workload(args.steps))
    if "xl" in args.models:
        workloads.append(xl_workload(args.steps, args.xl_depth))
    rows = []
    for work in workloads:
        if work is not None:
            rows += benchmark_workload(work, device, backends, args.repeat, tuple(args.schemes), args.attention)
    print_table(rows, ("model", "steps", "backend", "wbits", "group", "group_scales", "abits", "act", "attention", "dtype", "first_seconds", "seconds",
                       "compiled_graphs", "speedup_vs_fp32", "speedup_vs_bf16", "weight_bytes", "rel_err_vs_reference",
                       "rel_err_vs_fp32"))
    write_json(args.json_path, {"benchmark": "model", "machine": machine_info(device), "backends": backends, "rows": rows})
    return 0
