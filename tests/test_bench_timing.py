"""The benchmarks' timer: interleaved rounds, and queued calls per sample."""

from __future__ import annotations

import time

import torch

from tfmq_video.bench.common import time_interleaved_ms


def test_queued_samples_time_each_call_and_divide() -> None:
    """``queued=4``: each sample runs 4 calls, and the reported time is per call, not per sample."""
    calls = {"sleep": 0, "fast": 0}

    def sleep() -> None:
        calls["sleep"] += 1
        time.sleep(0.01)

    def fast() -> None:
        calls["fast"] += 1

    timings = time_interleaved_ms({"sleep": sleep, "fast": fast}, torch.device("cpu"), repeat=3, warmup=1, queued=4)
    assert calls == {"sleep": 1 + 3 * 4, "fast": 1 + 3 * 4}
    assert 9.0 < timings["sleep"] < 40.0  # ~10 ms per call, not ~40 ms per sample of 4
    assert timings["fast"] < timings["sleep"]
