"""A real diffusers ``CogVideoXPipeline`` (tiny random parts): record its sampling loop, calibrate
its transformer and put the quantized model back into the pipeline."""

from __future__ import annotations

import pytest
import torch

import tfmq_video
from dit_adapters.cogvideox import CogVideoXAdapter
from dit_adapters.cogvideox.testing import TINY_PIPELINE_CALL, tiny_cogvideox_pipeline
from tfmq_video.calib.baselines import method_recipe
from tfmq_video.calib.recorder import record_calls
from tfmq_video.quant.config import RecipeConfig

FAST = RecipeConfig(progress=False, tib={"iterations": 60}, reconstruction={"iterations": 10, "batch_size": 2})


def generate(pipe, seed: int) -> torch.Tensor:
    return pipe(["a red ball moves left"], generator=torch.Generator().manual_seed(seed), **TINY_PIPELINE_CALL).frames


def test_pipeline_calibration_and_quantized_generation() -> None:
    # imported here, not at collection: triton's interpreter switch (test_kernels_triton) must come first
    pytest.importorskip("transformers", reason="the tiny pipeline's T5 encoder needs transformers (dev extra)")
    pipe = tiny_cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = CogVideoXAdapter()
    prompts = ["a red ball moves left", "a blue square moves up"]
    calibration = record_calls(pipe.transformer, adapter.timestep_of, lambda: pipe(
        prompts, generator=torch.Generator().manual_seed(0), **TINY_PIPELINE_CALL))
    steps = TINY_PIPELINE_CALL["num_inference_steps"]
    assert len(calibration.timesteps) == steps and len(calibration.calls) == steps
    assert calibration.calls[0].args[0].shape[0] == 2 * len(prompts)  # both guidance halves in one call
    fp = generate(pipe, seed=1)
    fp_transformer = pipe.transformer
    errors = {}
    for method, wbits in (("tfmq", 8), ("rtn", 4)):
        qmodel = tfmq_video.quantize(fp_transformer, adapter, calibration, method_recipe(method, wbits, 8, FAST))
        pipe.transformer = qmodel  # the pipeline reads config and dtype through the quantized model
        assert qmodel.config.patch_size == fp_transformer.config.patch_size
        videos = generate(pipe, seed=1)
        assert videos.shape == fp.shape and torch.isfinite(videos).all()
        errors[method] = float((videos - fp).pow(2).mean() / fp.pow(2).mean())
    pipe.transformer = fp_transformer
    assert torch.equal(generate(pipe, seed=1), fp)  # calibration left the FP transformer untouched
    assert 0 < errors["tfmq"] < errors["rtn"], errors
