"""The compared methods as recipes over one harness (same calibration data, same code path).

- ``rtn``: min-max per-channel weights, static per-tensor min-max activations, TIB quantized.
- ``qdiffusion``: block reconstruction (AdaRound) on the timestep-aware set, one static
  activation parameter set for all timesteps, and the TIB's layers treated like any other layer
  (BRECQ): those outside the blocks reconstructed each on its own output
  (``tib.layerwise_reconstruction``), those inside a block with that block
  (``tib.in_block_layers: block``); no TIAR, FSC, cache or selection.
- ``qdiffusion-tib-layerwise``: ``qdiffusion`` with the TIB layers inside blocks also
  reconstructed each on its own output over the calibrated timesteps (a direct objective on
  temporal features that Q-Diffusion does not have; the ``qdiffusion`` of sessions 14-15).
- ``viditq``: dynamic per-token activations, TIB kept FP, min-max per-channel weights.
- ``tfmq-tiar``: TIAR only (static TIB activations), plus block reconstruction.
- ``tfmq-fsc``: FSC per-timestep TIB activations and the cache with selection, no TIAR.
- ``tfmq``: TIAR + FSC + cache + disturbance-aware selection + block reconstruction (the
  selection criterion is the base recipe's ``tib.select_by``).
- ``tfmq-trajectory``: ``tfmq`` with ``tib.select_by: trajectory`` (the per-step choices that
  minimize the served errors plus their drift over the steps; docs/calibration.md).
- ``tfmq-dynamic``: ``tfmq`` in the TIB, dynamic per-token activations everywhere else
  (per-timestep static parameters where the input set is finite, dynamic ones elsewhere).
"""

from __future__ import annotations

import logging
from typing import Any

from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import RecipeConfig, parse_config

LOGGER = logging.getLogger(__name__)

TIB_OFF = {"keep_fp": False, "tiar": False, "fsc": False, "cache": False, "select": False,
           "layerwise_reconstruction": False, "in_block_layers": "tib"}

# method -> overrides of the base recipe, by section
METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "rtn": {
        "tib": TIB_OFF,
        "reconstruction": {"enabled": False},
        "weight": {"init": "minmax"},
        "activation": {"init": "minmax", "mode": "static"},
    },
    "qdiffusion": {"tib": {**TIB_OFF, "layerwise_reconstruction": True, "in_block_layers": "block"},
                   "reconstruction": {"enabled": True}, "activation": {"mode": "static"}},
    "qdiffusion-tib-layerwise": {"tib": {**TIB_OFF, "layerwise_reconstruction": True},
                                 "reconstruction": {"enabled": True}, "activation": {"mode": "static"}},
    "viditq": {
        "tib": {**TIB_OFF, "keep_fp": True},
        "reconstruction": {"enabled": False},
        "weight": {"init": "minmax"},
        "activation": {"mode": "dynamic_per_token"},
    },
    "tfmq-tiar": {"tib": {**TIB_OFF, "tiar": True}, "reconstruction": {"enabled": True}},
    "tfmq-fsc": {"tib": {**TIB_OFF, "fsc": True, "cache": True, "select": True}, "reconstruction": {"enabled": True}},
    "tfmq": {"tib": {**TIB_OFF, "tiar": True, "fsc": True, "cache": True, "select": True},
             "reconstruction": {"enabled": True}},
    "tfmq-trajectory": {"tib": {**TIB_OFF, "tiar": True, "fsc": True, "cache": True, "select": True,
                                "select_by": "trajectory"},
                        "reconstruction": {"enabled": True}},
    "tfmq-dynamic": {"tib": {**TIB_OFF, "tiar": True, "fsc": True, "cache": True, "select": True},
                     "reconstruction": {"enabled": True}, "activation": {"mode": "dynamic_per_token"}},
}


def method_recipe(method: str, wbits: int, abits: int, base: RecipeConfig | None = None) -> RecipeConfig:
    """The recipe of ``method`` at ``wbits``/``abits``, other settings taken from ``base``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    raw = (base or RecipeConfig()).model_dump()
    overrides = METHODS[method]
    raw["name"] = method
    raw["tib"].update(overrides["tib"])
    raw["reconstruction"].update(overrides["reconstruction"])
    raw["quant"]["weight"].update({"bits": wbits, **overrides.get("weight", {})})
    if wbits >= 8 and raw["quant"]["weight"].get("integer_group_scales"):
        # 8-bit codes times a multiplier leave int8: a W8 setting of the recipe keeps float group scales
        LOGGER.info("W%d: integer group scales need codes below 8 bits; %s uses float group scales", wbits, method)
        raw["quant"]["weight"]["integer_group_scales"] = False
    raw["quant"]["activation"].update({"bits": abits, **overrides.get("activation", {})})
    return parse_config(raw, f"(method {method} W{wbits}A{abits})")
