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


def test_xl_workload_has_stdit3_xl_layers_and_runs_a_480p_frame() -> None:
    """``bench model --models xl``: STDiT3-XL layer sizes; one guided sampling step at one latent
    frame of the 480p grid (30 x 53 patches) runs and keeps the latent's shape."""
    from dataclasses import replace

    from tfmq_video.bench.model import XL_LATENT, sample_fn, xl_workload

    work = xl_workload(steps=1, depth=1)
    config = work.model.config
    assert (config.hidden_size, config.num_heads, config.caption_channels, work.caption_tokens) == (1152, 16, 4096, 300)
    assert XL_LATENT[1] * (XL_LATENT[2] // 2) * (XL_LATENT[3] // 2) == 20670
    one_frame = replace(work, latent_shape=(XL_LATENT[0], 1, XL_LATENT[2], XL_LATENT[3]))
    out = sample_fn(one_frame, work.model, torch.device("cpu"))()
    assert out.shape[1:] == one_frame.latent_shape and torch.isfinite(out).all()


def test_bench_model_attention_option_reaches_the_quantized_rows() -> None:
    """``bench model --attention``: the quantized rows load with the chosen attention mode and say
    so; INT8 attention changes their output (the GPU runs compare it with fp attention)."""
    from tfmq_video.bench.model import benchmark_workload, toy_workload

    work = toy_workload(steps=1)
    assert work is not None
    errors = {}
    for mode in ("fp", "int8"):
        rows = benchmark_workload(work, torch.device("cpu"), ["reference"], 1, ("w8a8",), attention=mode)
        quantized = [r for r in rows if r["wbits"] == 8]
        assert [r["attention"] for r in quantized] == [mode]
        errors[mode] = quantized[0]["rel_err_vs_fp32"]
    assert 0 < errors["fp"] < 0.1 and 0 < errors["int8"] < 0.1
    assert errors["int8"] != errors["fp"]


def test_bench_model_w4a8_g64_rows_are_per_group_and_compared_with_their_own_reference() -> None:
    """``bench model --schemes w4a8 w4a8_g64 w4a8_g64i``: the group rows carry ``group`` 64 (and
    float or integer ``group_scales``), their error vs
    reference is against the g64 reference (not the per-channel one), and finer scales bring the
    W4 output closer to fp32 than per-channel scales."""
    from tfmq_video.bench.model import benchmark_workload, toy_workload

    work = toy_workload(steps=1)
    assert work is not None
    rows = benchmark_workload(work, torch.device("cpu"), ["reference", "cpu"], 1, ("w4a8", "w4a8_g64", "w4a8_g64i"))
    w4 = {(r["backend"], r["group"], r["group_scales"]): r for r in rows if r["wbits"] == 4}
    assert set(w4) == {(backend, group, kind) for backend in ("reference", "cpu")
                       for group, kind in ((None, None), (64, "float"), (64, "integer"))}
    assert w4[("reference", 64, "float")]["rel_err_vs_reference"] == 0.0
    assert w4[("reference", 64, "integer")]["rel_err_vs_reference"] == 0.0  # its own reference, not float g64's
    assert 0 < w4[("cpu", 64, "integer")]["rel_err_vs_reference"] < 2 * next(
        r for r in rows if r["wbits"] == 16)["rel_err_vs_fp32"]
    w4 = {(backend, group): row for (backend, group, kind), row in w4.items() if kind != "integer"}
    # the cpu rows run in bf16: against their float32 reference they differ as much as bf16 from fp32
    bf16_error = next(r for r in rows if r["wbits"] == 16)["rel_err_vs_fp32"]
    assert 0 < w4[("cpu", 64)]["rel_err_vs_reference"] < 2 * bf16_error
    assert w4[("reference", 64)]["rel_err_vs_fp32"] < w4[("reference", None)]["rel_err_vs_fp32"]
    assert w4[("reference", 64)]["weight_bytes"] > w4[("reference", None)]["weight_bytes"]
