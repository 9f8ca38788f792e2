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


def gemm_configs(k_name: str, k_values: tuple[int, ...]) -> list:
    """``triton.Config`` list over :data:`GEMM_TILES` x ``k_values`` of the K-step parameter ``k_name``."""
    import triton

    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, k_name: k}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in GEMM_TILES
        for k in k_values
    ]


def use_autotune(*block_sizes: int | None) -> bool:
    """Autotune the tiles when the caller fixed none of them and the kernel runs on a GPU (the
    interpreter cannot time kernels: it runs the default tiles)."""
    return all(size is None for size in block_sizes) and not interpreting()


MIN_INT8_DOT_K = 32  # NVIDIA's int8 tensor-core MMA consumes K in steps of 32: tl.dot refuses less


def check_tiles(
    block_m: int | None, block_n: int | None, k_step: int | None, k_name: str, codes_per_k: int = 1
) -> None:
    """Refuse GEMM tiles the int8 ``tl.dot`` cannot compile, before Triton fails deep in its compiler.

    M and N tiles must be powers of two of at least 16. Each ``tl.dot`` covers ``k_step *
    codes_per_k`` codes of K (W4A8: ``HALF_K`` bytes hold 2 codes each), which must be a power of
    two of at least :data:`MIN_INT8_DOT_K`. The interpreter would run smaller tiles, but a tile
    that passes only there is a tile that breaks on the GPU, so the rule is the same everywhere.
    """
    dot_k = None if k_step is None else k_step * codes_per_k
    problems = [
        f"{label}={size} (a power of two >= {least})"
        for label, size, least in (("block_m", block_m, 16), ("block_n", block_n, 16))
        if size is not None and (size < least or size & (size - 1))
    ]
    if dot_k is not None and (dot_k < MIN_INT8_DOT_K or dot_k & (dot_k - 1)):
        problems.append(f"{k_name.lower()}={k_step} (each int8 dot then covers {dot_k} codes of K, "
                        f"which must be a power of two >= {MIN_INT8_DOT_K})")
    if problems:
        raise ConfigError("GEMM tiles the int8 tensor cores cannot run: " + ", ".join(problems))


def launch_gemm(
    plain: Any, tuned: Any, M: int, N: int, args: tuple, flags: dict[str, Any],
    block_m: int | None, block_n: int | None, k_name: str, k_step: int | None, default_k: int,
    codes_per_k: int = 1,
) -> None:
    """Launch an integer GEMM kernel over (M, N) output tiles: ``tuned`` (its autotuned form) when
    :func:`use_autotune` says so, else ``plain`` with the given tiles (64 x 64 x ``default_k`` if unset)."""
    import triton

    check_tiles(block_m, block_n, k_step, k_name, codes_per_k)
    if use_autotune(block_m, block_n, k_step):
        tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](*args, **flags)
        return
    block_m, block_n = block_m or 64, block_n or 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    plain[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, **{k_name: k_step or default_k})
