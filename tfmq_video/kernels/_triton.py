"""Whether triton is installed, without importing it.

Triton reads ``TRITON_INTERPRET`` when it is first imported (its own library functions are
decorated then), so nothing here imports it: the kernel modules do, and the runtime imports
them only when the triton backend (or INT8 attention) is used.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from tfmq_video.errors import ConfigError

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_IMPORT_ERROR = "" if HAS_TRITON else "No module named 'triton'"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def require_triton() -> None:
    """Raise a clear error when a Triton launcher is called without triton installed."""
    if not HAS_TRITON:
        raise ConfigError(f"this kernel needs triton ({TRITON_IMPORT_ERROR}); pip install 'tfmq-video[kernels]'")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the integer GEMM tiles tried by the GPU autotuner:
# the large tiles feed the int8 tensor cores at long token counts, the small ones keep every SM
# busy when M or N is small.
GEMM_TILES: tuple[tuple[int, int, int, int], ...] = (
    (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 3), (128, 128, 4, 4),
    (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
)


def gemm_configs(k_name: str | None = None, k_values: tuple[int, ...] = ()) -> list:
    """``triton.Config`` list over :data:`GEMM_TILES` x ``k_values`` of the K-step parameter ``k_name``
    (the tiles alone when the kernel's K step is not tuned)."""
    import triton

    k_choices: list[dict[str, int]] = [{k_name: k} for k in k_values] if k_name else [{}]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **k_choice}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in GEMM_TILES
        for k_choice in k_choices
    ]


AUTOTUNE_ENV = "TFMQ_VIDEO_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether the GEMM tiles may be autotuned: ``TFMQ_VIDEO_AUTOTUNE=0`` turns it off.

    Autotuning compiles and times every candidate tile once per new (M, N, K): worth it for a long
    generation run, not for tests or a quick try on a new model (the default tiles are used instead).
    """
    return os.environ.get(AUTOTUNE_ENV, "1") not in ("", "0")


def use_autotune(*block_sizes: int | None) -> bool:
    """Autotune the tiles when the caller fixed none of them, the kernel runs on a GPU (the
    interpreter cannot time kernels: it runs the default tiles) and :func:`autotune_enabled`."""
    return all(size is None for size in block_sizes) and not interpreting() and autotune_enabled()


MIN_INT8_DOT_K = 32  # NVIDIA's int8 tensor-core MMA consumes K in steps of 32: tl.dot refuses less


def check_tiles(
    block_m: int | None, block_n: int | None, k_step: int | None = None, k_name: str = "block_k"
) -> None:
    """Refuse GEMM tiles the int8 ``tl.dot`` cannot compile, before Triton fails deep in its compiler.

    M and N tiles must be powers of two of at least 16; the K step of one ``tl.dot`` a power of two
    of at least :data:`MIN_INT8_DOT_K` (W4A8's dots cover half a step of its weight layout, which
    :func:`~tfmq_video.kernels.w4a8_gemm.split_step` keeps at 32 or 64). The interpreter would run
    smaller tiles, but a tile that passes only there breaks on the GPU, so the rule is the same everywhere.
    """
    dot_k = k_step
    problems = [
        f"{label}={size} (a power of two >= {least})"
        for label, size, least in (("block_m", block_m, 16), ("block_n", block_n, 16))
        if size is not None and (size < least or size & (size - 1))
    ]
    if dot_k is not None and (dot_k < MIN_INT8_DOT_K or dot_k & (dot_k - 1)):
        problems.append(f"{k_name.lower()}={k_step} (the K of an int8 dot must be a power of two >= {MIN_INT8_DOT_K})")
    if problems:
        raise ConfigError("GEMM tiles the int8 tensor cores cannot run: " + ", ".join(problems))


def launch_gemm(
    plain: Any, tuned: Any, M: int, N: int, args: tuple, flags: dict[str, Any],
    block_m: int | None, block_n: int | None, k_name: str | None = None, k_step: int | None = None,
    default_k: int = 64, grouped: bool = False,
) -> None:
    """Launch an integer GEMM kernel over (M, N) output tiles: ``tuned`` (its autotuned form) when
    :func:`use_autotune` says so, else ``plain`` with the given tiles (64 x 64 x ``default_k`` if unset).
    ``k_name``: the kernel's tuned K-step parameter, if it has one (W4A8's step is fixed by its layout).
    ``grouped``: the kernel orders its tiles itself from a 1-D grid (else the grid is (M tiles, N tiles))."""
    import triton

    def grid_for(bm: int, bn: int) -> tuple[int, ...]:
        tiles = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        return (tiles[0] * tiles[1],) if grouped else tiles

    check_tiles(block_m, block_n, k_step, k_name or "block_k")
    if use_autotune(block_m, block_n, k_step):
        tuned[lambda meta: grid_for(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags)
        return
    block_m, block_n = block_m or 64, block_n or 64
    grid = grid_for(block_m, block_n)
    k_choice = {k_name: k_step or default_k} if k_name else {}
    plain[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, **k_choice)
