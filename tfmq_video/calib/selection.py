"""Disturbance-aware selection: per temporal feature and step, the strategy with the lower error."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def select_strategies(
    tib_errors: Mapping[str, torch.Tensor], cache_errors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{feature: (S,) bool}``: True where the cache's error is not above the quantized TIB's."""
    return {name: cache_errors[name] <= tib_errors[name] for name in cache_errors}


def describe_choices(use_cache: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """JSON-friendly record of the choices: ``{feature: ["cache" | "tib", ...] per step}``."""
    return {name: ["cache" if bool(flag) else "tib" for flag in flags] for name, flags in use_cache.items()}
