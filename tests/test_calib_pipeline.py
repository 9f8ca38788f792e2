"""Calibration on a tiny STDiT3: one-pass recording, TIAR, cache and selection, baselines, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tfmq_video
from tfmq_video.calib.baselines import METHODS, method_recipe
from tfmq_video.calib.checkpoint import MANIFEST_NAME, load_calibrated, save_calibrated
from tfmq_video.calib.recorder import CalibrationSet, StepRecorder
from tfmq_video.calib.testing import sample_tiny, tiny_calibration, tiny_stdit3
from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.quant.config import RecipeConfig

FAST = RecipeConfig(progress=False, tib={"iterations": 60}, reconstruction={"iterations": 10, "batch_size": 2})


@pytest.fixture(scope="module")
def tfmq_model(model: torch.nn.Module, calibration: CalibrationSet):
    return tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("tfmq", 4, 8, FAST))


def test_one_pass_records_every_requested_step_with_both_guidance_halves(model: torch.nn.Module) -> None:
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return model(*args, **kwargs)

    recorder = StepRecorder([0, 2, 3])
    sample_tiny(counting, batch=2, recorder=recorder)
    cal = recorder.calibration_set()
    assert len(calls) == 4  # one sampler run: O(T) model calls
    assert [c.step for c in cal.calls] == [0, 1, 2] and cal.sampler_steps == [0, 2, 3]
    assert cal.timesteps == [float(calls[i][0]) for i in (0, 2, 3)]
    for call in cal.calls:
        assert call.args[0].shape[0] == 4 and call.kwargs["y"].shape[0] == 4  # cond + uncond
        assert call.args[0].device.type == "cpu"
    assert cal.nbytes() > 0


def test_a_deep_copy_serves_its_own_cache(tfmq_model) -> None:
    import copy

    from tfmq_video.calib.testing import tiny_model_inputs

    copied = copy.deepcopy(tfmq_model)
    inputs = tiny_model_inputs(float(tfmq_model.context.timesteps[1]))
    with torch.no_grad():
        before = tfmq_model(**inputs)
        assert torch.equal(copied(**inputs), before)
        copied.temporal_cache.t_mlp_codes.zero_()
        changed = copied(**inputs)
        assert torch.equal(tfmq_model(**inputs), before)
    assert not torch.allclose(changed, before)


def test_missing_or_empty_steps_are_errors(model: torch.nn.Module) -> None:
    recorder = StepRecorder([1, 7])
    sample_tiny(model, batch=1, recorder=recorder)
    with pytest.raises(ConfigError, match=r"\[7\] were never reached"):
        recorder.calibration_set()
    with pytest.raises(ConfigError, match="no steps"):
        CalibrationSet([])
    with pytest.raises(ConfigError, match="no recorded calls"):
        tfmq_video.quantize(model, "opensora-stdit3", CalibrationSet([1.0]), FAST)


def test_tiar_lowers_temporal_feature_error_against_rtn(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    rtn = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("rtn", 4, 8, FAST))
    tiar = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("tfmq-tiar", 4, 8, FAST))
    rtn_error = rtn.report["temporal"]["temporal_feature_error"]
    tiar_error = tiar.report["temporal"]["temporal_feature_error"]
    assert tiar_error < 0.9 * rtn_error
    loss = tiar.report["temporal"]["tiar_loss"]
    assert loss[-1] < loss[0]


def test_selection_keeps_the_lower_error_per_feature_and_step(tfmq_model) -> None:
    temporal = tfmq_model.report["temporal"]
    for name in ("t", "t_mlp"):
        for step, choice in enumerate(temporal["choices"][name]):
            tib, cache, final = temporal["tib"][name][step], temporal["cache"][name][step], temporal["final"][name][step]
            assert choice == ("cache" if cache <= tib else "tib")
            assert final == pytest.approx(min(tib, cache), rel=1e-4, abs=1e-9)


def test_selection_mixes_cache_and_tib_when_the_tib_wins(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    # A 2-bit cache is worse than the 8-bit TIB for some features: the choice follows the error.
    recipe = method_recipe("tfmq", 8, 8, FAST.model_copy(update={"tib": FAST.tib.model_copy(update={"cache_bits": 2})}))
    qmodel = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)
    choices = qmodel.report["temporal"]["choices"]
    assert "tib" in choices["t"] + choices["t_mlp"]
    final = qmodel.report["temporal"]["final"]
    for name in ("t", "t_mlp"):
        assert max(final[name]) <= max(max(qmodel.report["temporal"]["tib"][name]), 1e-9) * 1.001


def test_output_errors_measure_each_feature_alone_and_restore_the_model(
    model: torch.nn.Module, calibration: CalibrationSet
) -> None:
    """Serving the FP features changes nothing; perturbing ``t`` alone moves the output at every
    step but leaves ``t_mlp``'s errors at zero; the FP model is restored afterwards."""
    from dit_adapters.base import get_adapter
    from tfmq_video.calib.selection import output_errors
    from tfmq_video.calib.tib import TemporalInformationBlock

    adapter = get_adapter("opensora-stdit3")
    fp_features = TemporalInformationBlock.from_calibration(adapter, calibration).fp_features(model)
    noisy = dict(fp_features)
    noisy["t"] = fp_features["t"] + 0.1 * fp_features["t"].std() * torch.randn_like(fp_features["t"])
    call = calibration.calls[0]
    with torch.no_grad():
        before = model(*call.args, **call.kwargs)
    errors = output_errors(model, adapter, calibration, {"fp": fp_features, "noisy": noisy})
    steps = len(calibration.timesteps)
    assert all(errors["fp"][name].shape == (steps,) and not errors["fp"][name].any() for name in fp_features)
    assert bool((errors["noisy"]["t"] > 0).all()) and not errors["noisy"]["t_mlp"].any()
    with torch.no_grad():
        assert torch.equal(model(*call.args, **call.kwargs), before)


def test_selection_by_output_follows_the_output_errors(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    """``tib.select_by: output``: each (feature, step) choice is the strategy with the lower output error."""
    tib = FAST.tib.model_copy(update={"cache_bits": 2, "select_by": "output"})
    qmodel = tfmq_video.quantize(model, "opensora-stdit3", calibration,
                                 method_recipe("tfmq", 8, 8, FAST.model_copy(update={"tib": tib})))
    temporal = qmodel.report["temporal"]
    for name in ("t", "t_mlp"):
        tib_errors, cache_errors = temporal["output_errors"]["tib"][name], temporal["output_errors"]["cache"][name]
        assert temporal["choices"][name] == ["cache" if c <= t else "tib" for t, c in zip(tib_errors, cache_errors,
                                                                                           strict=True)]
    assert "tib" in temporal["choices"]["t"] + temporal["choices"]["t_mlp"]  # a 2-bit cache loses somewhere


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_in_the_same_harness(method: str, model: torch.nn.Module,
                                               calibration: CalibrationSet) -> None:
    recipe = method_recipe(method, 4, 8, FAST)
    qmodel = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)
    fp = sample_tiny(model, seed=3)
    out = sample_tiny(qmodel, seed=3)
    assert float((out - fp).pow(2).sum() / fp.pow(2).sum()) < 0.2
    if method == "viditq":
        assert qmodel.report["temporal"]["temporal_feature_error"] == 0.0
        assert qmodel.quantized_weight_fraction() < 1.0
    assert all(bool(layer.weight_quant.frozen) for _, layer in qmodel.weight_layers() if layer.weight_quant)


def test_calibration_is_reproducible_with_a_fixed_seed(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    recipe = method_recipe("qdiffusion", 4, 8, FAST)
    first = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)
    second = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_round_trip_gives_identical_outputs(tfmq_model, model: torch.nn.Module, tmp_path: Path) -> None:
    folder = save_calibrated(tfmq_model, tmp_path / "ckpt")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["adapter"] == "opensora-stdit3" and manifest["temporal_cache"]["features"]["t_mlp"] == 384
    reference = sample_tiny(tfmq_model, seed=7)
    for loaded in (load_calibrated(folder), load_calibrated(folder, model)):
        assert torch.equal(sample_tiny(loaded, seed=7), reference)


def test_static_attention_checkpoint_round_trip(model: torch.nn.Module, calibration: CalibrationSet,
                                                tmp_path: Path) -> None:
    """The default attention (per_block, the kernel's) has no state; static quantizers have ranges
    that the checkpoint must bring back."""
    from tfmq_video.quant.modules import KernelAttention, QuantAttention

    assert FAST.quant.attention_mode == "per_block"
    base = FAST.model_copy(update={"quant": FAST.quant.model_copy(update={"attention_mode": "static"})})
    qmodel = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("rtn", 8, 8, base))
    reference = sample_tiny(qmodel, seed=3)
    loaded = load_calibrated(save_calibrated(qmodel, tmp_path / "ckpt"))
    assert any(isinstance(m, QuantAttention) for m in loaded.modules())
    assert not any(isinstance(m, KernelAttention) for m in loaded.modules())
    assert torch.equal(sample_tiny(loaded, seed=3), reference)


def test_checkpoint_of_another_model_is_rejected(tfmq_model, tmp_path: Path) -> None:
    folder = save_calibrated(tfmq_model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="calibrated for another model"):
        load_calibrated(folder, tiny_stdit3(seed=1))
    with pytest.raises(CheckpointError, match="not a calibrated"):
        load_calibrated(tmp_path)


def test_saving_an_uncalibrated_model_writes_nothing(model: torch.nn.Module, tmp_path: Path) -> None:
    from dit_adapters.base import get_adapter
    from tfmq_video.quant.model import wrap_model

    qmodel = wrap_model(tiny_stdit3(), get_adapter("opensora-stdit3"), FAST, [1.0])
    with pytest.raises(ConfigError, match="only models returned"):
        save_calibrated(qmodel, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_quantized_model_warns_once_off_the_calibrated_steps(tfmq_model, caplog: pytest.LogCaptureFixture) -> None:
    from tfmq_video.calib.testing import TINY_SAMPLER

    tfmq_model.context._warned = False
    other = TINY_SAMPLER.__class__(num_steps=6, guidance_scale=3.0, fixed_shift=2.0)
    out = sample_tiny(tfmq_model, seed=1, sampler=other)
    assert torch.isfinite(out).all()
    assert sum("not calibrated" in r.message for r in caplog.records) == 1


def test_cache_falls_back_to_the_quantized_tib_for_other_conditions(tfmq_model, caplog: pytest.LogCaptureFixture) -> None:
    from tfmq_video.calib.testing import tiny_call_inputs

    noise, y, null, _ = tiny_call_inputs(2)
    timestep = torch.full((2,), tfmq_model.context.timesteps[1].item())
    with torch.no_grad():
        same = tfmq_model(noise, timestep, y, fps=torch.tensor([8.0]))
        other = tfmq_model(noise, timestep, y, fps=torch.tensor([24.0]))
    assert torch.isfinite(other).all() and not torch.equal(same, other)
    assert any("using the quantized TIB" in r.message for r in caplog.records)


@pytest.mark.slow
def test_calibrate_command_on_the_toy_model_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    from tfmq_video.cli import main

    config = tmp_path / "quick.yaml"
    config.write_text(
        "calibration: {num_prompts: 1, steps: [0, 10, 19], batch_size: 1}\n"
        "quant: {weight: {bits: 4}}\n"
        "tib: {iterations: 50}\n"
        "reconstruction: {iterations: 5, batch_size: 2}\n"
    )
    assert main(["calibrate", str(config), "--out", str(tmp_path / "ckpt"), "--no-progress",
                 "--export", str(tmp_path / "packed")]) == 0
    qmodel = load_calibrated(tmp_path / "ckpt")
    assert len(qmodel.context) == 3 and qmodel.report["seconds"]["calibration_total"] > 0
    from tfmq_video.export import load_quantized

    packed = load_quantized(tmp_path / "packed", backend="reference", attention="fp")
    assert packed.timestep_context is not None and len(packed.timestep_context) == 3


def test_records_hand_off_the_served_temporal_features(tfmq_model) -> None:
    from tfmq_video.quant.model import to_records

    records, cache = to_records(tfmq_model)
    assert len(records) == len(tfmq_model.weight_layers())
    assert set(cache) == {"timesteps", "fps", "t", "t_mlp", "t_use_cache", "t_mlp_use_cache"}
    steps = len(tfmq_model.context)
    assert cache["t"].shape == (steps, 64) and cache["t_mlp"].shape == (steps, 384)
    tfmq_model.context.set_index(1)
    with torch.no_grad():
        t, t_mlp = tfmq_model.model.time_embedding(tfmq_model.context.timesteps[1:2].float(), torch.tensor([8.0]))
    assert torch.allclose(t[0], cache["t"][1]) and torch.allclose(t_mlp[0], cache["t_mlp"][1])


@pytest.mark.parametrize("group_size", [None, 16, 48])
def test_cache_scales_per_channel_group_fit_outlier_channels(group_size: int | None) -> None:
    from tfmq_video.calib.cache import TemporalFeatureCache
    from tfmq_video.calib.tib import feature_errors
    from tfmq_video.quant.quantizers import StepContext

    generator = torch.Generator().manual_seed(0)
    features = {"t_mlp": torch.randn(5, 64, generator=generator)}
    features["t_mlp"][:, 3] *= 40  # one outlier channel, as adaLN shifts have
    errors = {}
    for size in (None, group_size):
        cache = TemporalFeatureCache(StepContext([900.0, 700.0, 500.0, 300.0, 100.0]), {"t_mlp": 64}, {}, 8, size)
        cache.fill(features)
        groups = 1 if size is None or 64 % size else 64 // size
        assert cache.t_mlp_scale.shape == (5, groups)
        assert cache.lookup("t_mlp", 2).shape == (64,) and cache.lookup("t_mlp", torch.tensor([0, 4])).shape == (2, 64)
        errors[size] = float(feature_errors(cache.all_features(), features)["t_mlp"].mean())
    if group_size == 16:
        assert errors[16] < errors[None] / 3
    else:  # 48 does not divide 64: one group per step, the same cache as None
        assert errors[group_size] == errors[None]


def test_bias_correction_matches_every_layer_mean_to_fp(model: torch.nn.Module, calibration: CalibrationSet,
                                                        tmp_path: Path) -> None:
    from tfmq_video.calib.reconstruction import channel_means, embed_calls

    recipe = FAST.model_copy(update={"reconstruction": FAST.reconstruction.model_copy(
        update={"bias_correction": True})}).model_copy(update={"calibration": FAST.calibration.model_copy(
            update={"max_rows": None})})
    plain = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("qdiffusion", 4, 8, FAST))
    qmodel = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("qdiffusion", 4, 8, recipe))
    adapter, block = qmodel.adapter, qmodel.adapter.block_names(model)[0]
    entry = qmodel.report["reconstruction"]["blocks"][block]
    names = list(entry["bias_shifts"])
    assert "mlp.fc2" in names and all(shift > 0 for shift in entry["bias_shifts"].values())
    fp_rows = embed_calls(adapter, model, calibration, None)
    q_rows = embed_calls(adapter, qmodel.model, calibration, qmodel.context)
    fp_means = channel_means(adapter.run_block, model.get_submodule(block), fp_rows, names, 8, None)
    q_means = channel_means(adapter.run_block, qmodel.model.get_submodule(block), q_rows, names, 8, qmodel.context)
    plain_means = channel_means(adapter.run_block, plain.model.get_submodule(block), q_rows, names, 8, plain.context)
    for name in names:
        gap, plain_gap = (fp_means.mean(name) - q_means.mean(name)).abs().max(), (
            fp_means.mean(name) - plain_means.mean(name)).abs().max()
        assert gap < 1e-5 * max(float(fp_means.mean(name).abs().max()), 1.0) and gap < plain_gap / 10, name
    reference = sample_tiny(qmodel, seed=3)
    assert torch.equal(sample_tiny(load_calibrated(save_calibrated(qmodel, tmp_path / "ckpt")), seed=3), reference)


def test_trajectory_selection_trades_a_repeated_bias_for_independent_errors() -> None:
    """One TIB error repeated at every step (|b|^2 = 1) against larger independent cache errors
    (|e_s|^2 = 2, orthogonal): per step the TIB wins everywhere, but its drift over 4 steps costs
    more. The trajectory choice mixes, and its cost is below either strategy everywhere."""
    from tfmq_video.calib.selection import select_for_trajectory, select_strategies, trajectory_cost

    steps, dim = 4, 16
    fp = torch.zeros(steps, dim)
    bias = torch.zeros(dim)
    bias[0] = 1.0
    tib = fp + bias
    cache = torch.zeros(steps, dim)
    for step in range(steps):
        cache[step, 1 + step] = 2.0 ** 0.5
    per_step = select_strategies({"f": tib.pow(2).sum(1)}, {"f": cache.pow(2).sum(1)})["f"]
    assert not per_step.any()  # the per-step criterion keeps the TIB at every step
    choices, costs = select_for_trajectory({"f": tib}, {"f": cache}, {"f": fp})
    assert costs["f"]["tib"] == pytest.approx(float(trajectory_cost(tib - fp))) == pytest.approx(20.0)
    assert costs["f"]["cache"] == pytest.approx(16.0)
    assert costs["f"]["selected"] < min(costs["f"]["tib"], costs["f"]["cache"])
    assert 1 <= int(choices["f"].sum()) <= 3  # a mix: k TIB steps cost 16 - 3k + k^2, least at k = 1, 2


def test_selection_by_trajectory_records_its_costs(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    """``tib.select_by: trajectory`` in the pipeline (the ``tfmq-trajectory`` method): the report
    holds the three costs per feature and the selection is never worse than serving one strategy
    at every step."""
    recipe = method_recipe("tfmq-trajectory", 4, 8, FAST)
    assert recipe.tib.select_by == "trajectory" and method_recipe("tfmq", 4, 8, FAST).tib.select_by == "feature"
    qmodel = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe)
    costs = qmodel.report["temporal"]["trajectory_costs"]
    for name in ("t", "t_mlp"):
        assert costs[name]["selected"] <= min(costs[name]["tib"], costs[name]["cache"]) + 1e-12
        assert len(qmodel.report["temporal"]["choices"][name]) == len(calibration.timesteps)


def test_error_structure_tells_a_repeated_error_from_independent_ones() -> None:
    """``tools/temporal_error_structure.py``: one error at every step has cosine 1 between steps and
    all its energy in the common component; orthogonal per-step errors have cosine 0 and 1/S."""
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "temporal_error_structure.py"
    spec = importlib.util.spec_from_file_location("temporal_error_structure", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = torch.ones(4, 8)
    repeated = module.error_structure(torch.full((4, 8), 0.1), reference)
    independent = module.error_structure(torch.eye(4, 8) * 0.1, reference)
    assert repeated["mean_cos_between_steps"] == pytest.approx(1.0) and repeated["common_share"] == pytest.approx(1.0)
    assert independent["mean_cos_between_steps"] == pytest.approx(0.0, abs=1e-12)
    assert independent["common_share"] == pytest.approx(0.25)
    assert repeated["rel_err"] == pytest.approx(0.01) and independent["rel_err"] == pytest.approx(0.01 / 8)


def test_grafted_tib_serves_the_donor_features_and_keeps_the_blocks(tfmq_model, model: torch.nn.Module,
                                                                     calibration: CalibrationSet) -> None:
    from tfmq_video.calib.tib import TemporalInformationBlock, graft_tib

    tib = TemporalInformationBlock.from_calibration(tfmq_model.adapter, calibration)
    reference = sample_tiny(tfmq_model, seed=4)
    # grafting a model's own TIB and cache gives the model back, and leaves the original untouched
    itself = graft_tib(tfmq_model, tfmq_model.model, tfmq_model.temporal_cache)
    assert torch.equal(sample_tiny(itself, seed=4), reference)
    with_fp_tib = graft_tib(tfmq_model, model)
    assert with_fp_tib.temporal_cache is None and torch.equal(sample_tiny(tfmq_model, seed=4), reference)
    fp_features = tib.fp_features(model)
    for name, value in tib.features(with_fp_tib.model, with_fp_tib).items():
        assert torch.equal(value, fp_features[name])
    # a Q-Diffusion TIB: its per-layer static quantizers, the same blocks as before
    qdiffusion = tfmq_video.quantize(model, "opensora-stdit3", calibration, method_recipe("qdiffusion", 4, 8, FAST))
    with_qd_tib = graft_tib(tfmq_model, qdiffusion.model)
    served = tib.features(with_qd_tib.model, with_qd_tib)
    for name, value in tib.features(qdiffusion.model, qdiffusion).items():
        assert torch.equal(served[name], value)
    blocks = [name for name, _ in tfmq_model.weight_layers("block")]
    assert blocks and all(torch.equal(with_qd_tib.model.get_submodule(n).weight_quant.codes,
                                      tfmq_model.model.get_submodule(n).weight_quant.codes) for n in blocks)
    assert not torch.equal(sample_tiny(with_qd_tib, seed=4), reference)
    other = tfmq_video.quantize(model, "opensora-stdit3", tiny_calibration(model, steps=[0, 1]), FAST)
    with pytest.raises(ConfigError, match="other timesteps"):
        graft_tib(tfmq_model, other.model, other.temporal_cache)


def one_row_per_call(calibration: CalibrationSet) -> CalibrationSet:
    """The calibration set with only the first row of every call (no guidance pairs left)."""
    def first(value):
        return value[:1] if torch.is_tensor(value) and value.dim() and len(value) > 1 else value

    return CalibrationSet(calibration.timesteps, [
        type(call)(call.step, tuple(first(v) for v in call.args), {k: first(v) for k, v in call.kwargs.items()})
        for call in calibration.calls])


def test_guidance_pairs_are_the_two_halves_of_each_guided_call(calibration: CalibrationSet) -> None:
    from tfmq_video.calib.reconstruction import guidance_pairs, pairs_within, subsample_pairs

    pairs = guidance_pairs(calibration)
    rows = torch.cat([call.args[0] for call in calibration.calls])
    assert len(pairs) == len(rows) // 2  # every recorded call holds both guidance halves
    for a, b in pairs.tolist():
        assert torch.equal(rows[a], rows[b]) and a != b
    y = torch.cat([call.kwargs["y"] for call in calibration.calls])
    assert all(not torch.equal(y[a], y[b]) for a, b in pairs.tolist())  # caption against null caption
    assert guidance_pairs(one_row_per_call(calibration)).shape == (0, 2)
    chosen = subsample_pairs(pairs, 4, seed=0)
    assert chosen.shape == (2, 2) and all(p in pairs.tolist() for p in chosen.tolist())
    keep = torch.tensor([int(pairs[0, 0]), int(pairs[0, 1]), int(pairs[1, 0])])
    assert pairs_within(pairs, keep).tolist() == [[0, 1]]  # the second pair lost a row


def test_guided_error_averages_both_orders_of_each_pair() -> None:
    from tfmq_video.calib.reconstruction import guided_error

    generator = torch.Generator().manual_seed(0)
    target = torch.randn(4, 3, 5, generator=generator)
    output = target + 0.1 * torch.randn(4, 3, 5, generator=generator)
    scale = 4.0

    def guided(rows: torch.Tensor, first: int, second: int) -> torch.Tensor:
        return rows[first::2] + scale * (rows[second::2] - rows[first::2])

    both = [(guided(output, i, j) - guided(target, i, j)).pow(2).sum() for i, j in ((0, 1), (1, 0))]
    # the average over orders of |guided error|^2, over the mean energy of a pair's two rows
    assert float(guided_error(output, target, scale)) == pytest.approx(float(sum(both) / target.pow(2).sum()))
    head_tokens = slice(1, None)  # guidance combines tokens 1.. alone: token 0 counts with its rows' error only
    only_token0 = target.clone()
    only_token0[1::2, 0] += 0.1
    assert float(guided_error(only_token0, target, scale, head_tokens)) == pytest.approx(
        float((only_token0 - target).pow(2).sum() / target.pow(2).sum()))
    assert float(guided_error(only_token0, target, scale)) > float(guided_error(only_token0, target, scale, head_tokens))
    same_error = target + 0.1  # equal errors within each pair: guidance does not amplify them
    assert float(guided_error(same_error, target, scale)) == pytest.approx(
        float((same_error - target).pow(2).sum() / target.pow(2).sum()))


def test_guidance_scale_lowers_the_error_of_guidance_differences(model: torch.nn.Module,
                                                                calibration: CalibrationSet) -> None:
    """The guided loss trades some row error for a smaller error in what guidance amplifies."""
    def recipe(scale: float) -> RecipeConfig:
        return method_recipe("qdiffusion", 4, 8, FAST.model_copy(update={
            "reconstruction": FAST.reconstruction.model_copy(update={"guidance_scale": scale, "iterations": 40,
                                                                     "batch_size": 4})}))

    plain = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe(0.0))
    guided = tfmq_video.quantize(model, "opensora-stdit3", calibration, recipe(4.0))
    head = plain.adapter.head_name(model)
    plain_err = plain.report["reconstruction"]["blocks"][head]["guidance_difference_error"]
    guided_err = guided.report["reconstruction"]["blocks"][head]["guidance_difference_error"]
    assert plain_err is not None and guided_err < plain_err
    reference = sample_tiny(guided, seed=3)
    assert torch.isfinite(reference).all()


def test_guidance_scale_needs_guidance_pairs(model: torch.nn.Module, calibration: CalibrationSet) -> None:
    unguided = one_row_per_call(calibration)
    recipe = FAST.model_copy(update={"reconstruction": FAST.reconstruction.model_copy(update={"guidance_scale": 4.0})})
    with pytest.raises(ConfigError, match="guidance_scale: 0"):
        tfmq_video.quantize(model, "opensora-stdit3", unguided, method_recipe("qdiffusion", 4, 8, recipe))
    from tfmq_video.quant.config import parse_config

    for bad in (-1, 0.5, 1):
        with pytest.raises(ConfigError, match="guidance_scale"):
            parse_config({"reconstruction": {"guidance_scale": bad}})


def test_guidance_error_study_reads_the_halves_in_the_samplers_order(tfmq_model, model: torch.nn.Module,
                                                                     calibration: CalibrationSet) -> None:
    """``tools/guidance_error_study.py`` on the tiny STDiT3 (its sampler puts the conditional half
    first): ``--cond-first`` swaps which half is called cond, and only the guided error depends on it."""
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "guidance_error_study.py"
    spec = importlib.util.spec_from_file_location("guidance_error_study", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    as_recorded = module.per_step_errors(tfmq_model, model, calibration, 4.0, cond_first=False)
    swapped = module.per_step_errors(tfmq_model, model, calibration, 4.0, cond_first=True)
    assert len(as_recorded) == len(calibration.calls)
    for a, b in zip(as_recorded, swapped, strict=True):
        assert a["uncond"] == pytest.approx(b["cond"]) and a["cond"] == pytest.approx(b["uncond"])
        assert a["difference"] == pytest.approx(b["difference"])
        assert a["guided"] != pytest.approx(b["guided"])
        assert 0 < b["guided"] < 1
