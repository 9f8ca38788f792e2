"""``tfmq-video bench kernels``: quantized GEMMs and attention against fp32, bf16 and torchao.

GEMM shapes are the Linear layers of STDiT3-XL (hidden 1152), Wan2.1-1.3B (hidden 1536, FFN
8960) and FLUX.1 (hidden 3072, MLP 12288) at 1k to 32k tokens; attention at video sequence
lengths. Every baseline runs in the same process, interleaved, so ratios are comparable.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_video.bench.common import (
    machine_info,
    print_table,
    rel_error,
    time_interleaved_ms,
    write_json,
)
from tfmq_video.devices import pick_device
from tfmq_video.export.rtn import RTNConfig, rtn_linear_record
from tfmq_video.quant.records import ActivationRecord
from tfmq_video.runtime.backends import resolve_backend
from tfmq_video.runtime.linear import QuantLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemmShape:
    """One Linear layer of a model family: ``in_features -> out_features``."""

    model: str
    layer: str
    in_features: int
    out_features: int


GEMM_SHAPES = (
    GemmShape("stdit3-xl", "attn.qkv", 1152, 3456),
    GemmShape("stdit3-xl", "attn.proj", 1152, 1152),
    GemmShape("stdit3-xl", "mlp.fc1", 1152, 4608),
    GemmShape("stdit3-xl", "mlp.fc2", 4608, 1152),
    GemmShape("wan-1.3b", "attn.q", 1536, 1536),
    GemmShape("wan-1.3b", "ffn.0", 1536, 8960),
    GemmShape("wan-1.3b", "ffn.2", 8960, 1536),
    GemmShape("flux", "attn.qkv", 3072, 9216),
    GemmShape("flux", "mlp.0", 3072, 12288),
    GemmShape("flux", "mlp.2", 12288, 3072),
)
# The short default CPU set: every family, >= 4096 tokens where the targets are stated.
QUICK_CPU = (("stdit3-xl", 4096), ("wan-1.3b", 4096), ("flux", 1024))
QUICK_LAYERS = {("stdit3-xl", "attn.qkv"), ("stdit3-xl", "mlp.fc1"), ("stdit3-xl", "mlp.fc2"),
                ("wan-1.3b", "ffn.0"), ("flux", "mlp.0")}
QUICK_CPU_ATTENTION = 2  # the first shapes only: the rest take minutes in fp32 on a small CPU

# (label, heads, head_dim, query tokens, key tokens, batch)
ATTENTION_SHAPES = (
    ("stdit3 spatial 480p (30x53 patches)", 16, 72, 1590, 1590, 1),
    ("stdit3 cross-attn (300 caption tokens)", 16, 72, 4096, 300, 1),
    ("wan-1.3b 480p 17 frames (5x30x52)", 12, 128, 7800, 7800, 1),
    ("head dim 64, 4096 tokens", 16, 64, 4096, 4096, 1),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options of the kernel benchmark."""
    parser.add_argument("--json", dest="json_path", help="write the rows and the machine description here")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--full", action="store_true", help="every shape at 1k, 4k, 16k and 32k tokens (long on CPU)")
    parser.add_argument("--tokens", type=int, nargs="*", help="override the token counts")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--queued", type=int, default=None,
                        help="calls per timed run, synced once at the end (default: 10 on a GPU, where a model "
                             "queues its kernels, 1 on a CPU); 1 times each call's latency")
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao's int8 dynamic quantization")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention rows")


def gemm_cases(args: argparse.Namespace, device: torch.device) -> list[tuple[GemmShape, int]]:
    """(shape, tokens) pairs to measure."""
    if args.tokens:
        return [(s, m) for s in GEMM_SHAPES for m in args.tokens]
    if args.full or device.type == "cuda":
        return [(s, m) for s in GEMM_SHAPES for m in (1024, 4096, 16384, 32768)]
    quick = dict(QUICK_CPU)
    return [(s, quick[s.model]) for s in GEMM_SHAPES if (s.model, s.layer) in QUICK_LAYERS]


def torchao_linear(linear: nn.Linear) -> tuple[nn.Module | None, str]:
    """torchao's int8 dynamic-activation int8-weight Linear under torch.compile, or None and why not."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as err:
        return None, f"torchao not importable ({err})"
    try:
        wrapper = nn.Sequential(linear)
        quantize_(wrapper, Int8DynamicActivationInt8WeightConfig())
        return torch.compile(wrapper), ""
    except Exception as err:  # torchao's support differs between versions and devices
        return None, f"torchao failed: {type(err).__name__}: {err}"


def gemm_rows(shape: GemmShape, tokens: int, device: torch.device, backend: str, args: argparse.Namespace) -> list[dict]:
    """Time one GEMM shape with every method; speedups against fp32 and bf16 of the same run."""
    torch.manual_seed(0)
    linear = nn.Linear(shape.in_features, shape.out_features).to(device)
    x = torch.randn(tokens, shape.in_features, device=device)
    x[:, :4] *= 20.0  # a few outlier channels, as real activations have
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    methods: dict[str, tuple] = {}
    linear_bf16 = nn.Linear(shape.in_features, shape.out_features).to(device, torch.bfloat16)
    linear_bf16.load_state_dict(linear.state_dict())
    methods["fp32"] = (lambda: linear(x), torch.float32)
    methods["bf16"] = (lambda: linear_bf16(x_bf16), torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    x_half = x.to(half)
    for bits in (8, 4):
        layer = QuantLinear(rtn_linear_record("bench", linear, RTNConfig(weight_bits=bits)), backend=backend)
        methods[f"w{bits}a8_{layer.backend}"] = (lambda layer=layer: layer(x_half), half)
    # a calibrated per-tensor activation scale (TFMQ's static / per-timestep FSC parameters)
    static = ActivationRecord("static", 8, True, x.abs().max().cpu() / 127, torch.tensor(0.0))
    layer = QuantLinear(rtn_linear_record("bench", linear.cpu(), RTNConfig(weight_bits=8), static), backend="reference")
    linear.to(device)
    layer.to(device).set_backend(backend)
    methods[f"w8a8_static_{layer.backend}"] = (lambda layer=layer: layer(x_half), half)
    if not args.no_torchao:
        ao_source = nn.Linear(shape.in_features, shape.out_features).to(device, torch.bfloat16)
        ao_source.load_state_dict(linear.state_dict())
        ao, why = torchao_linear(ao_source)
        if ao is None:
            log.warning("no torchao row: %s", why)
        else:
            methods["torchao_int8_dyn_compiled"] = (lambda: ao(x_bf16), torch.bfloat16)
    with torch.no_grad():
        reference = linear(x)
        timings = time_interleaved_ms({name: fn for name, (fn, _) in methods.items()}, device, args.repeat, warmup=1,
                                      queued=queued_calls(args, device))
        errors = {name: rel_error(fn().float(), reference) for name, (fn, _) in methods.items()}
    flops = 2.0 * tokens * shape.in_features * shape.out_features
    return [
        {
            "kind": "gemm", "model": shape.model, "layer": shape.layer, "M": tokens, "K": shape.in_features,
            "N": shape.out_features, "method": name, "ms": ms, "tops": flops / ms / 1e9,
            "speedup_vs_fp32": timings["fp32"] / ms, "speedup_vs_bf16": timings["bf16"] / ms,
            "rel_err_vs_fp32": errors.get(name),
        }
        for name, ms in timings.items()
    ]


def queued_calls(args: argparse.Namespace, device: torch.device) -> int:
    """Calls per timed sample (``--queued``; by default 10 on a GPU, 1 on a CPU)."""
    if args.queued is not None:
        return max(1, args.queued)
    return 10 if device.type == "cuda" else 1


def attention_rows(device: torch.device, backend: str, repeat: int, full: bool, queued: int = 1) -> list[dict]:
    """SDPA (fp32, bf16/fp16) against INT8 attention (Triton on GPU, the PyTorch reference on CPU)."""
    from tfmq_video.kernels import int8_attention as int8_attn

    rows = []
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    shapes = ATTENTION_SHAPES if full or device.type == "cuda" else ATTENTION_SHAPES[:QUICK_CPU_ATTENTION]
    for label, heads, dim, n_q, n_k, batch in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, dim, device=device) for n in (n_q, n_k, n_k))
        qh, kh, vh = q.to(half), k.to(half), v.to(half)
        int8_fn = int8_attn.int8_attention if backend == "triton" else int8_attn.int8_attention_ref
        methods = {
            "sdpa_fp32": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            f"sdpa_{str(half).split('.')[-1]}": lambda qh=qh, kh=kh, vh=vh: F.scaled_dot_product_attention(qh, kh, vh),
            f"int8_{'triton' if backend == 'triton' else 'reference'}": (
                lambda qh=qh, kh=kh, vh=vh, fn=int8_fn: fn(qh if backend == "triton" else qh.float(), kh, vh)
            ),
        }
        try:
            import xformers.ops as xops  # noqa: F401

            if device.type == "cuda":
                methods["xformers_fp16"] = lambda qh=qh, kh=kh, vh=vh: xops.memory_efficient_attention(
                    qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
                )
        except ImportError:
            pass
        with torch.no_grad():
            reference = F.scaled_dot_product_attention(q, k, v)
            timings = time_interleaved_ms(methods, device, repeat, warmup=1, queued=queued)
            errors = {name: rel_error(fn().float().reshape(reference.shape) if "xformers" not in name
                                      else fn().transpose(1, 2).float(), reference) for name, fn in methods.items()}
        base = timings["sdpa_fp32"]
        half_name = f"sdpa_{str(half).split('.')[-1]}"
        rows += [
            {"kind": "attention", "shape": label, "heads": heads, "head_dim": dim, "n_q": n_q, "n_k": n_k,
             "method": name, "ms": ms, "speedup_vs_fp32": base / ms, "speedup_vs_bf16": timings[half_name] / ms,
             "rel_err_vs_fp32": errors[name]}
            for name, ms in timings.items()
        ]
    return rows


def run(args: argparse.Namespace) -> int:
    """Measure, print the tables, write the JSON."""
    device = pick_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backend = resolve_backend("auto", device)
    rows: list[dict] = []
    for shape, tokens in gemm_cases(args, device):
        log.info("gemm %s %s M=%d", shape.model, shape.layer, tokens)
        rows += gemm_rows(shape, tokens, device, backend, args)
    print_table([r for r in rows if r["kind"] == "gemm"],
                ("model", "layer", "M", "K", "N", "method", "ms", "speedup_vs_fp32", "speedup_vs_bf16", "rel_err_vs_fp32"))
    if not args.no_attention:
        rows += attention_rows(device, backend, args.repeat, args.full, queued_calls(args, device))
        print()
        print_table([r for r in rows if r["kind"] == "attention"],
                    ("shape", "n_q", "n_k", "head_dim", "method", "ms", "speedup_vs_fp32", "speedup_vs_bf16", "rel_err_vs_fp32"))
    write_json(args.json_path, {"benchmark": "kernels", "backend": backend, "machine": machine_info(device),
                                "queued_calls_per_sample": queued_calls(args, device), "rows": rows})
    return 0
