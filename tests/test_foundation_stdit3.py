"""Our STDiT3 port: key compatibility with the published XL/2 checkpoint, forward/backward, loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_adapters.opensora.loading import load_stdit3, save_stdit3
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config
from tfmq_video.errors import CheckpointError

TINY = STDiT3Config(input_sq_size=16, in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2,
                    caption_channels=24, model_max_length=6, pred_sigma=True)


def tiny_inputs(batch: int = 2, frames: int = 3, size: int = 8) -> dict:
    return {
        "x": torch.randn(batch, 4, frames, size, size),
        "timestep": torch.tensor([900.0, 120.0])[:batch],
        "y": torch.randn(batch, 1, 6, 24),
        "mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])[:batch],
        "fps": torch.tensor([24.0]),
    }


def test_xl2_names_shapes_and_kinds_match_published_checkpoint(shared_dir: Path) -> None:
    reference = json.loads((shared_dir / "reference" / "stdit3_xl_keys.json").read_text())
    config = STDiT3Config.from_dict(reference["config"])
    with torch.device("meta"):
        model = STDiT3(config)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert ours == reference["keys"]
    buffers = {name for name, _ in model.named_buffers() if name in ours}
    kinds = {name: "buffer" if name in buffers else "parameter" for name in ours}
    assert kinds == reference["kind"]
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(reference["parameters_with_requires_grad_false"])
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameter_elements"]


def test_tiny_forward_shape_and_backward_reaches_every_trainable_parameter() -> None:
    model = STDiT3(TINY)
    model.initialize_weights()
    # Zero-initialized output layers would block gradients to the rest: give them values.
    for p in model.parameters():
        if p.requires_grad and not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    out = model(**tiny_inputs())
    assert out.shape == (2, 8, 3, 8, 8)  # pred_sigma doubles the channels
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    # The null caption is a buffer; every trainable tensor must get a gradient.
    assert missing == []


def test_caption_padding_is_masked() -> None:
    model = STDiT3(TINY).eval()
    inputs = tiny_inputs()
    base = model(**inputs)
    inputs["y"][0, 0, 3:] = torch.randn(3, 24) * 10  # only padded tokens of sample 0 change
    assert torch.allclose(model(**inputs)[0], base[0], atol=1e-5)
    inputs["y"][1, 0, 3:] += 1.0  # sample 1 has no padding: its output must change
    assert not torch.allclose(model(**inputs)[1], base[1], atol=1e-4)


def test_temporal_attention_sees_frame_order() -> None:
    """RoPE makes temporal attention order-aware: reversing frames is not just reversing the output."""
    model = STDiT3(TINY).eval()
    for block in model.temporal_blocks:  # upstream zero-inits these; give them weight to matter
        torch.nn.init.normal_(block.attn.proj.weight, std=0.2)
    inputs = tiny_inputs(frames=4)
    out = model(**inputs)
    inputs["x"] = inputs["x"].flip(2)
    assert not torch.allclose(model(**inputs).flip(2), out, atol=1e-4)


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = STDiT3(TINY).eval()
    save_stdit3(model, tmp_path / "ckpt")
    loaded = load_stdit3(tmp_path / "ckpt")
    inputs = tiny_inputs()
    assert torch.equal(loaded(**inputs), model(**inputs))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["hidden_size"] == 32


def test_load_reports_every_missing_extra_and_misshaped_tensor(tmp_path: Path) -> None:
    folder = save_stdit3(STDiT3(TINY), tmp_path / "ckpt")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["t_block.1.weight"]
    weights["extra.tensor"] = torch.zeros(3)
    weights["final_layer.linear.bias"] = torch.zeros(5)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_stdit3(folder)
    message = str(info.value)
    for expected in ("t_block.1.weight", "extra.tensor", "final_layer.linear.bias", str(folder)):
        assert expected in message


def test_bad_folders_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_stdit3(tmp_path)
    folder = save_stdit3(STDiT3(TINY), tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_stdit3(folder)
    config = json.loads((folder / "config.json").read_text())
    config["hiden_size"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hiden_size"):
        load_stdit3(folder)


def test_invalid_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        STDiT3Config(hidden_size=30, num_heads=4)
