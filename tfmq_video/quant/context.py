"""Which sampling step is running: read by per-timestep (FSC) quantizers and the runtime.

A quantized model owns one :class:`TimestepContext`; whoever drives the sampler sets the
current timestep before each model call (``context.set_timestep(t)``), and every
per-timestep quantizer reads ``context.index``. A timestep outside the calibrated set maps
to the nearest calibrated one, with a single warning per context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from tfmq_video.errors import ConfigError

log = logging.getLogger(__name__)


class TimestepContext:
    """The calibrated timesteps (in model units, e.g. [0, 1000]) and the index of the current one."""

    def __init__(self, calibrated_timesteps: Sequence[float], atol: float = 1e-3) -> None:
        if len(calibrated_timesteps) == 0:
            raise ConfigError("a TimestepContext needs at least one calibrated timestep")
        self.timesteps = torch.tensor([float(t) for t in calibrated_timesteps], dtype=torch.float64)
        self.atol = atol
        self._index: int | None = None
        self._warned = False

    def __len__(self) -> int:
        return len(self.timesteps)

    def lookup(self, timestep: float) -> int:
        """Index of ``timestep`` in the calibrated set, or of the nearest one (warning once)."""
        distance = (self.timesteps - float(timestep)).abs()
        index = int(distance.argmin())
        if float(distance[index]) > self.atol and not self._warned:
            self._warned = True
            log.warning(
                "timestep %.4f was not calibrated; using the nearest calibrated timestep %.4f (step %d). "
                "Calibrate with the sampler settings used at inference to avoid this.",
                float(timestep), float(self.timesteps[index]), index,
            )
        return index

    def set_timestep(self, timestep: float | torch.Tensor) -> int:
        """Select the step for ``timestep`` (a scalar, or a batch whose entries are all equal)."""
        if torch.is_tensor(timestep):
            flat = timestep.detach().reshape(-1).double()
            if flat.numel() == 0:
                raise ConfigError("set_timestep got an empty tensor")
            if not bool(torch.all(flat == flat[0])):
                raise ConfigError(
                    "per-timestep quantization needs one timestep per model call; got a batch with "
                    f"different timesteps {flat.unique().tolist()[:8]}"
                )
            timestep = float(flat[0])
        self._index = self.lookup(float(timestep))
        return self._index

    def set_index(self, index: int) -> None:
        """Select calibrated step ``index`` directly."""
        if not 0 <= index < len(self):
            raise ConfigError(f"step index {index} is outside the {len(self)} calibrated steps")
        self._index = index

    @property
    def index(self) -> int:
        """The current step index; an error if no timestep was set."""
        if self._index is None:
            raise ConfigError("no timestep set: call TimestepContext.set_timestep(t) before the quantized forward")
        return self._index
