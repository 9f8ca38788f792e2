"""Which sampling step is running: read by per-timestep (FSC) quantizers and the runtime.

A quantized model owns one :class:`TimestepContext`; whoever drives the sampler sets the
current timestep before each model call (``context.set_timestep(t)``), and every
per-timestep quantizer reads ``context.index``. A timestep outside the calibrated set maps
to the nearest calibrated one, with a single warning per context.

Compiled code reads ``context.index_tensor`` instead: a 0-d int64 tensor updated in place
by every ``set_timestep``/``set_index``, so a ``torch.compile``d block sees the step as tensor
data (one graph for every step) rather than as a Python int it would guard on (one
recompilation per step). The range checks run here, when the index is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from tfmq_video.errors import ConfigError

log = logging.getLogger(__name__)

NO_TIMESTEP = "no timestep set: call TimestepContext.set_timestep(t) before the quantized forward"


class TimestepContext:
    """The calibrated timesteps (in model units, e.g. [0, 1000]) and the index of the current one."""

    def __init__(self, calibrated_timesteps: Sequence[float], atol: float = 1e-3) -> None:
        if len(calibrated_timesteps) == 0:
            raise ConfigError("a TimestepContext needs at least one calibrated timestep")
        self.timesteps = torch.tensor([float(t) for t in calibrated_timesteps], dtype=torch.float64)
        self.atol = atol
        self._index: int | None = None
        self._index_tensor: torch.Tensor | None = None  # created at the first set, then updated in place
        self._device = torch.device("cpu")
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
                float(timestep),
                float(self.timesteps[index]),
                index,
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
            timestep_tensor = timestep
            timestep = float(flat[0])
            if self._device != timestep_tensor.device:
                self.to(timestep_tensor.device)  # keep the index where the model runs (once per device)
        self.set_index(self.lookup(float(timestep)))
        return self.index

    def set_index(self, index: int) -> None:
        """Select calibrated step ``index`` directly."""
        index = int(index)
        if not 0 <= index < len(self):
            raise ConfigError(f"step index {index} is outside the {len(self)} calibrated steps")
        self._index = index
        if self._index_tensor is None:
            self._index_tensor = torch.tensor(index, dtype=torch.int64, device=self._device)
        else:
            self._index_tensor.fill_(index)  # in place: compiled graphs keep reading the same tensor

    def to(self, device: torch.device | str) -> TimestepContext:
        """Keep ``index_tensor`` on ``device`` (a new tensor there, so compiled code sees it once per device)."""
        self._device = torch.device(device)
        if self._index_tensor is not None and self._index_tensor.device != self._device:
            self._index_tensor = self._index_tensor.to(self._device)
        return self

    @property
    def index(self) -> int:
        """The current step index; an error if no timestep was set."""
        if self._index is None:
            raise ConfigError(NO_TIMESTEP)
        return self._index

    @property
    def index_tensor(self) -> torch.Tensor:
        """The current step index as a 0-d int64 tensor (updated in place); an error if no timestep was set."""
        # _index_tensor is set together with _index; reading the int here would make Dynamo guard on its value
        if self._index_tensor is None:
            raise ConfigError(NO_TIMESTEP)
        return self._index_tensor
