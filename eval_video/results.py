"""The record every metric returns, and the one for a metric that could not run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class MetricResult:
    """One metric on one set of videos.

    Attributes:
        metric: the metric's name (``fvd``, ``psnr``, ``temporal_flickering`` ...).
        value: the aggregate value, or ``None`` when the metric was skipped.
        n: the number of videos (or clips) behind ``value``.
        backbone: the network (and weights) that produced it, or ``"none"``.
        proxy: True when a stand-in replaces the network the published metric prescribes.
        higher_is_better: the direction of the metric.
        per_video: video name -> value, where the metric has one value per video.
        notes: conventions and warnings the reader needs (N too small, padding, ...).
        skipped: why the metric did not run (which file to provide); ``value`` is then None.
    """

    metric: str
    value: float | None
    n: int
    backbone: str
    proxy: bool
    higher_is_better: bool
    per_video: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def to_json(self) -> dict:
        """A JSON-safe dict (non-finite floats become the strings "inf", "-inf", "nan")."""
        return _json_safe(asdict(self))


def skipped(metric: str, reason: str, backbone: str = "none", higher_is_better: bool = True) -> MetricResult:
    """A result that says why a metric did not run; never a silent zero."""
    return MetricResult(metric, None, 0, backbone, False, higher_is_better, skipped=reason)


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MissingWeightsError(Exception):
    """A metric needs a file or package the user did not provide; the message says which.

    The command turns it into a :func:`skipped` result; it is not a :class:`TFMQError` because
    it is not bad input, only a metric that cannot run.
    """
