"""I3D: pytorch-i3d parameter names and shapes, forward shape, preprocessing, both weight forms."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eval_video.i3d import I3DConfig, TorchScriptI3D, build_i3d, load_i3d, preprocess_clips
from tfmq_video.errors import CheckpointError

# Written out from piergiaj/pytorch-i3d (pytorch_i3d.py): in-channels and the six branch widths
# of each InceptionModule, as listed there (not derived from our code).
PUBLISHED_MIXED = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]),
    "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (128 + 192 + 96 + 64, [192, 96, 208, 16, 48, 64]),
    "Mixed_4c": (192 + 208 + 48 + 64, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (160 + 224 + 64 + 64, [128, 128, 256, 24, 64, 64]),
    "Mixed_4e": (128 + 256 + 64 + 64, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (112 + 288 + 64 + 64, [256, 160, 320, 32, 128, 128]),
    "Mixed_5b": (256 + 320 + 128 + 128, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (256 + 320 + 128 + 128, [384, 192, 384, 48, 128, 128]),
}


def _unit(prefix: str, c_in: int, c_out: int, k: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {f"{prefix}.conv3d.weight": (c_out, c_in, k, k, k)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.bn.{name}"] = (c_out,)
    keys[f"{prefix}.bn.num_batches_tracked"] = ()
    return keys


def published_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of pytorch-i3d's InceptionI3d(400) state dict, with its shape."""
    keys = _unit("Conv3d_1a_7x7", 3, 64, 7) | _unit("Conv3d_2b_1x1", 64, 64, 1) | _unit("Conv3d_2c_3x3", 64, 192, 3)
    for name, (c_in, w) in PUBLISHED_MIXED.items():
        keys |= _unit(f"{name}.b0", c_in, w[0], 1) | _unit(f"{name}.b1a", c_in, w[1], 1)
        keys |= _unit(f"{name}.b1b", w[1], w[2], 3) | _unit(f"{name}.b2a", c_in, w[3], 1)
        keys |= _unit(f"{name}.b2b", w[3], w[4], 3) | _unit(f"{name}.b3b", c_in, w[5], 1)
    keys["logits.conv3d.weight"] = (400, 384 + 384 + 128 + 128, 1, 1, 1)
    keys["logits.conv3d.bias"] = (400,)
    return keys


def test_names_and_shapes_match_pytorch_i3d_on_meta_device() -> None:
    model = build_i3d(device="meta")
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert ours == published_keys()
    assert all(t.is_meta for t in model.state_dict().values())


def test_bn_eps_is_configurable() -> None:
    assert build_i3d(device="meta").Mixed_4c.b1b.bn.eps == pytest.approx(1e-3)
    assert build_i3d(I3DConfig(bn_eps=1e-5), device="meta").Conv3d_1a_7x7.bn.eps == pytest.approx(1e-5)


@pytest.fixture(scope="module")
def random_i3d() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_i3d()
    with torch.no_grad():  # non-trivial BatchNorm statistics so a wrong load would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return torch.rand(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def reference_output(random_i3d: torch.nn.Module, clip: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return random_i3d(clip)


def test_forward_gives_time_averaged_400d_logits(random_i3d: torch.nn.Module, reference_output: torch.Tensor,
                                                 clip: torch.Tensor) -> None:
    assert reference_output.shape == (1, 400)
    assert torch.isfinite(reference_output).all()
    with torch.no_grad():
        per_time = random_i3d.logits_per_time(clip)
    assert per_time.shape == (1, 400, 1)  # 16 frames -> one time step after the 2x7x7 average pool


def test_preprocessing_maps_uint8_to_minus_one_one() -> None:
    clips = np.zeros((2, 16, 40, 60, 3), np.uint8)
    clips[0] = 255
    x = preprocess_clips(clips)
    assert x.shape == (2, 3, 16, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(1.0), atol=1e-6) and torch.allclose(x[1], torch.tensor(-1.0), atol=1e-6)
    mid = preprocess_clips(np.full((1, 1, 224, 224, 3), 128, np.uint8))
    assert torch.allclose(mid, torch.tensor(128 / 127.5 - 1), atol=1e-6)


def test_safetensors_round_trip(random_i3d: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "i3d.safetensors"
    state = {k: v for k, v in random_i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(path))  # old checkpoints have no num_batches_tracked: still accepted
    loaded = load_i3d(path)
    for name, tensor in random_i3d.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_round_trip(random_i3d: torch.nn.Module, reference_output: torch.Tensor, clip: torch.Tensor,
                                tmp_path: Path) -> None:
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(random_i3d).save(str(path))
    loaded = load_i3d(path)
    assert isinstance(loaded, TorchScriptI3D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clip), reference_output, rtol=1e-4, atol=1e-4)


def test_weights_that_do_not_fit_name_the_file(random_i3d: torch.nn.Module, tmp_path: Path) -> None:
    state = dict(random_i3d.state_dict())
    state.pop("Mixed_4c.b0.conv3d.weight")
    state["logits.conv3d.bias"] = torch.zeros(600)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_i3d(path)
    message = str(info.value)
    assert str(path) in message and "Mixed_4c.b0.conv3d.weight" in message
    assert "logits.conv3d.bias" in message and "extra.weight" in message


def test_pickles_and_garbage_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "rgb_imagenet.pt"
    with zipfile.ZipFile(pickled, "w") as archive:  # the layout of a torch.save zip (no code/ folder)
        archive.writestr("archive/data.pkl", b"not unpickled")
    with pytest.raises(CheckpointError, match="convert"):
        load_i3d(pickled)
    garbage = tmp_path / "i3d.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="i3d.safetensors"):
        load_i3d(garbage)
    with pytest.raises(CheckpointError, match="no such"):
        load_i3d(tmp_path / "missing.safetensors")
