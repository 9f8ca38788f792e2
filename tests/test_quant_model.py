"""Wrapping a model: same forward, keep-FP patterns, attention matmul quantizers, export records."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dit_adapters.base import get_adapter
from tfmq_video.calib.testing import TINY_LATENT, tiny_stdit3
from tfmq_video.errors import ConfigError
from tfmq_video.kernels.int8_attention import int8_attention_ref
from tfmq_video.quant.config import RecipeConfig, parse_config
from tfmq_video.quant.model import plan_layers, to_records, wrap_model
from tfmq_video.quant.modules import KernelAttention, QuantAttention, QuantConv, QuantLinear

ADAPTER = get_adapter("opensora-stdit3")


def _inputs(batch: int = 2) -> dict:
    return {
        "x": torch.randn(batch, *TINY_LATENT),
        "timestep": torch.full((batch,), 500.0),
        "y": torch.randn(batch, 1, 4, 16),
        "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])[:batch],
        "fps": torch.tensor([8.0]),
    }


def _recipe(**quant: object) -> RecipeConfig:
    return parse_config({"quant": {"weight": {"bits": 8}, **quant}, "progress": False})


def _observe(qmodel, inputs: dict) -> None:
    for quantizer in qmodel.activation_quantizers():
        quantizer.observe()
    with torch.no_grad():
        qmodel(**inputs)
    for quantizer in qmodel.activation_quantizers():
        quantizer.finalize()


def test_wrapped_model_keeps_state_names_and_runs_the_same_forward() -> None:
    model = tiny_stdit3()
    inputs = _inputs()
    with torch.no_grad():
        reference = model(**inputs)
    original_keys = set(model.state_dict())
    # static attention quantizers can be switched off; the kernel's attention (per_block) cannot
    qmodel = wrap_model(model, ADAPTER, _recipe(attention_mode="static"), [1000.0, 500.0])
    assert original_keys <= {k.removeprefix("model.") for k in qmodel.state_dict()}
    for quantizer in qmodel.activation_quantizers():
        quantizer.state = "off"
    for _, layer in qmodel.weight_layers():
        layer.weight_quant = None
    with torch.no_grad():
        assert torch.allclose(qmodel(**inputs), reference, atol=1e-5)


@pytest.mark.parametrize("attention_mode", ["static", "per_block"])
def test_w8a8_fake_quant_output_is_close_to_fp(attention_mode: str) -> None:
    model = tiny_stdit3()
    inputs = _inputs()
    with torch.no_grad():
        reference = model(**inputs)
    qmodel = wrap_model(model, ADAPTER, _recipe(attention_mode=attention_mode), [1000.0, 500.0])
    _observe(qmodel, inputs)
    with torch.no_grad():
        out = qmodel(**inputs)
    assert float((out - reference).pow(2).sum() / reference.pow(2).sum()) < 1e-2
    assert not torch.equal(out, reference)


def test_layer_roles_attention_sites_and_fsc_inside_the_tib() -> None:
    model = tiny_stdit3()
    recipe = parse_config({"tib": {"fsc": True}})
    qmodel = wrap_model(model, ADAPTER, recipe, [1000.0, 500.0, 100.0])
    roles = {name: plan.role for name, plan in qmodel.plans.items()}
    assert roles["t_block.1"] == "tib" and roles["t_embedder.mlp.0"] == "tib"
    assert roles["spatial_blocks.0.attn.qkv"] == "block" and roles["final_layer.linear"] == "other"
    assert isinstance(model.get_submodule("x_embedder.proj"), QuantConv)
    assert model.get_submodule("t_block.1").input_quant.spec.mode == "per_timestep"
    assert model.get_submodule("t_block.1").input_quant.scale.shape == (3,)
    assert model.get_submodule("final_layer.linear").input_quant.spec.mode == "static"
    # attention as the runtime's kernel computes it unless the recipe asks for static quantizers
    assert isinstance(model.get_submodule("temporal_blocks.0.cross_attn.matmul_quant"), KernelAttention)
    assert qmodel.quantized_weight_fraction() == 1.0
    static = tiny_stdit3()
    wrap_model(static, ADAPTER, parse_config({"quant": {"attention_mode": "static"}}), [1000.0])
    assert isinstance(static.get_submodule("temporal_blocks.0.cross_attn.matmul_quant"), QuantAttention)


def test_per_block_attention_computes_what_the_int8_kernel_reference_computes() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 150, 16) for _ in range(3))  # 150 rows: more than one tile of each kind
    k = k + 4.0  # a common offset the kernel's smoothing removes
    key_mask = torch.ones(2, 150, dtype=torch.bool)
    key_mask[0, 100:] = False
    q.requires_grad_(True)
    out = KernelAttention()(q, k, v, key_mask[:, None, None, :])
    assert torch.equal(out, int8_attention_ref(q.detach(), k, v, key_mask))
    exact = torch.nn.functional.scaled_dot_product_attention(q.detach(), k, v, attn_mask=key_mask[:, None, None, :])
    relative = float((out.detach() - exact).pow(2).sum() / exact.pow(2).sum())
    assert 0 < relative < 1e-3
    out.sum().backward()  # the rounding passes gradients straight through
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


def test_per_block_attention_mode_has_nothing_to_calibrate() -> None:
    model = tiny_stdit3()
    inputs = _inputs()
    with torch.no_grad():
        reference = model(**inputs)
    qmodel = wrap_model(model, ADAPTER, _recipe(attention_mode="per_block"), [1000.0, 500.0])
    assert isinstance(model.get_submodule("temporal_blocks.0.cross_attn.matmul_quant"), KernelAttention)
    assert not [name for name in qmodel.state_dict() if ".matmul_quant." in name]
    _observe(qmodel, inputs)
    with torch.no_grad():
        out = qmodel(**inputs)
    assert float((out - reference).pow(2).sum() / reference.pow(2).sum()) < 1e-2
    with pytest.raises(ConfigError, match="attention_mode"):
        _recipe(attention_mode="dynamic")


def test_stdit3_has_no_tib_layer_inside_a_block() -> None:
    """So the two Q-Diffusion treatments of in-block TIB layers give the same plan here, and the
    STDiT3 rows of every session compare with each other."""
    from tfmq_video.calib.baselines import method_recipe

    plans = {method: plan_layers(tiny_stdit3(), ADAPTER, method_recipe(method, 4, 8))
             for method in ("qdiffusion", "qdiffusion-tib-layerwise")}
    assert plans["qdiffusion"] == plans["qdiffusion-tib-layerwise"]


def test_keep_fp_by_name_pattern_and_unknown_names_are_errors() -> None:
    model = tiny_stdit3()
    recipe = parse_config({"quant": {"keep_fp": ["*.mlp.fc2", "spatial_blocks.0"]}, "tib": {"keep_fp": True}})
    qmodel = wrap_model(model, ADAPTER, recipe, [1.0])
    assert type(model.get_submodule("temporal_blocks.0.mlp.fc2")) is nn.Linear
    assert type(model.get_submodule("spatial_blocks.0.attn.qkv")) is nn.Linear
    assert not hasattr(model.get_submodule("spatial_blocks.0.attn"), "matmul_quant")
    assert type(model.get_submodule("t_block.1")) is nn.Linear
    assert isinstance(model.get_submodule("temporal_blocks.0.mlp.fc1"), QuantLinear)
    assert 0 < qmodel.quantized_weight_fraction() < 1
    with pytest.raises(ConfigError, match="names no layer"):
        plan_layers(tiny_stdit3(), ADAPTER, parse_config({"quant": {"keep_fp": ["blocks.9.nothing"]}}))


@pytest.mark.parametrize("group_size", [None, 64])
def test_records_reproduce_the_fake_quant_weights(group_size: int | None) -> None:
    model = tiny_stdit3()
    qmodel = wrap_model(model, ADAPTER, _recipe(weight={"bits": 4, "group_size": group_size}), [500.0])
    # the patch embedding has 16 inputs: it falls back to per-channel scales
    assert qmodel.plans["x_embedder.proj"].weight.group_size is None
    assert qmodel.plans["t_block.1"].weight.group_size == group_size
    _observe(qmodel, _inputs())
    records, cache = to_records(qmodel)
    assert cache == {}
    by_name = dict(qmodel.weight_layers())
    assert {r.name for r in records} == set(by_name)
    for record in records:
        layer = by_name[record.name]
        expected = layer.quantized_weight().detach().reshape(layer.weight.shape[0], -1)
        assert torch.allclose(record.dequantized_weight(), expected, atol=1e-6)
        assert record.weight_codes.dtype == torch.int8
        expected_mode = "per_timestep" if qmodel.plans[record.name].role == "tib" else "static"
        assert record.activation.mode == expected_mode and record.activation.scale is not None
    conv = next(r for r in records if r.name == "x_embedder.proj")
    assert conv.original_shape == tuple(model.x_embedder.proj.weight.shape)
