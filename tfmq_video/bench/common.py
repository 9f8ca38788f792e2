"""Shared helpers of the benchmarks: timing, machine description, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, repeat: int, warmup: int = 2, queued: int = 1
) -> dict[str, float]:
    """Median wall time (ms) of each function, timed in interleaved rounds.

    Round-robin timing spreads load changes from other processes over every method instead of
    penalizing whichever ran during a busy moment. ``queued`` > 1: each sample times that many calls
    back to back with one sync at the end (divided by the count), as a model queues its layers on a
    GPU: the per-call Python and launch cost then overlaps the previous call's GPU work and counts
    only where it is longer. With ``queued=1`` every call is synced: its latency.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(queued):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / queued)
    return {name: statistics.median(values) for name, values in samples.items()}


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matrix-relevant ISA flags of this CPU (AMX, AVX512 VNNI/BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("amx_int8", "amx_bf16", "amx_tile", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx512f")
    return [f for f in wanted if f in flags]


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp(min=1e-30))


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    """Write ``payload`` as indented JSON (atomically: temporary file then rename)."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(target)
    print(f"wrote {target}")

