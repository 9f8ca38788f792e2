"""FVD on the toy world: separation of clean from damaged clips, FVD-FP, cache, backbone choice, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.ndimage import uniform_filter

from eval_video.backbones import (
    FeatureCache,
    I3DBackbone,
    ToyBackbone,
    encode_paths,
    make_backbone,
    select_clip,
)
from eval_video.frechet import SmallSampleWarning
from eval_video.fvd import fvd, fvd_fp
from eval_video.i3d import build_i3d
from eval_video.io import Video, VideoError, list_videos, write_video
from tfmq_video.errors import ConfigError
from tfmq_video.toy.data import make_clips


def _videos(clips: np.ndarray, prefix: str = "v") -> list[Video]:
    return [Video(c, 8.0, f"{prefix}/{i:03d}.png") for i, c in enumerate(clips)]


def damage(clips: np.ndarray, noise: float, blur: int, seed: int = 0) -> np.ndarray:
    """Gaussian noise of std ``noise`` and a ``blur`` x ``blur`` box blur per frame."""
    x = uniform_filter(clips.astype(np.float32), size=(1, 1, blur, blur, 1)) if blur > 1 else clips.astype(np.float32)
    x = x + np.random.default_rng(seed).normal(0, noise, clips.shape)
    return np.clip(x.round(), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def toy() -> ToyBackbone:
    return ToyBackbone()


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    clean, _ = make_clips(1, 96)
    reference, _ = make_clips(2, 96)
    shuffled = np.stack([clip[np.random.default_rng(i).permutation(len(clip))] for i, clip in enumerate(clean)])
    return {"clean": clean, "reference": reference, "blurred": damage(clean, 0, 5),
            "reversed": np.ascontiguousarray(clean[:, ::-1]), "shuffled": shuffled}


@pytest.mark.filterwarnings("ignore::eval_video.frechet.SmallSampleWarning")
def test_toy_fvd_separates_clean_from_damaged(toy: ToyBackbone, clips: dict[str, np.ndarray]) -> None:
    ref = _videos(clips["reference"], "ref")
    values = {name: fvd(_videos(clips[name]), ref, toy).value for name in ("clean", "blurred", "reversed", "shuffled")}
    # time reversal keeps every frame (and, with the trail, still shows motion) but moves each
    # object against its lane's direction: a video metric must see it
    assert values["reversed"] > 1.8 * values["clean"], values  # type: ignore[operator]
    assert values["shuffled"] > 5 * values["clean"], values  # type: ignore[operator]
    assert values["blurred"] > 5 * values["clean"], values  # type: ignore[operator]


@pytest.mark.filterwarnings("ignore::eval_video.frechet.SmallSampleWarning")
def test_fvd_fp_is_zero_for_identical_outputs_and_grows_with_damage(toy: ToyBackbone,
                                                                    clips: dict[str, np.ndarray]) -> None:
    fp = _videos(clips["clean"], "fp")
    same = fvd_fp(_videos(clips["clean"], "q"), fp, toy)
    damaged = fvd_fp(_videos(clips["blurred"], "q"), fp, toy)
    assert same.value == pytest.approx(0.0, abs=1e-6)
    assert damaged.value > 1.0  # type: ignore[operator]
    assert same.metric == "fvd_fp" and same.n == 96 and same.proxy and "toy" in same.backbone
    assert not same.higher_is_better and any("N-1" in note for note in same.notes)


def test_small_n_warns_and_is_noted(toy: ToyBackbone, clips: dict[str, np.ndarray]) -> None:
    with pytest.warns(SmallSampleWarning):
        result = fvd(_videos(clips["clean"][:10]), _videos(clips["reference"][:10], "ref"), toy)
    assert any("N=10" in note for note in result.notes)


def test_fvd_fp_needs_matching_sets(toy: ToyBackbone, clips: dict[str, np.ndarray]) -> None:
    with pytest.raises(VideoError, match="got 4 videos but 3 FP"):
        fvd_fp(_videos(clips["clean"][:4]), _videos(clips["clean"][:3], "fp"), toy)
    renamed = [Video(c, 8.0, f"fp/x{i}.png") for i, c in enumerate(clips["clean"][:4])]
    with pytest.raises(VideoError, match="share file names"):
        fvd_fp(_videos(clips["clean"][:4]), renamed, toy)


def test_clip_policy(clips: dict[str, np.ndarray]) -> None:
    short = Video(clips["clean"][0][:5], 8.0, "dir/short.mp4")
    with pytest.raises(VideoError, match="short.mp4 has 5 frames"):
        select_clip(short, 8)
    padded, was_padded = select_clip(short, 8, pad_short=True)
    assert was_padded and padded.shape[0] == 8 and np.array_equal(padded[5:], np.repeat(padded[4:5], 3, axis=0))
    assert select_clip(Video(clips["clean"][0], 8.0), 4)[0].shape[0] == 4


def test_feature_cache_encodes_a_set_once(toy: ToyBackbone, clips: dict[str, np.ndarray], tmp_path: Path) -> None:
    for i, clip in enumerate(clips["reference"][:6]):
        write_video(tmp_path / "ref" / f"{i}", clip)
    paths = list_videos(tmp_path / "ref")
    cache = FeatureCache(tmp_path / "cache")
    first = encode_paths(toy, paths, cache)
    second = encode_paths(toy, paths, cache)
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.features, second.features)
    write_video(tmp_path / "ref" / "0", clips["clean"][0])  # a changed file is a new set
    assert not encode_paths(toy, paths, cache).from_cache


def test_backbone_is_never_swapped_silently() -> None:
    with pytest.raises(ConfigError, match="--i3d-weights"):
        make_backbone("i3d")
    with pytest.raises(ValueError, match="unknown FVD backbone"):
        make_backbone("inception")


def test_i3d_backbone_with_local_weights(tmp_path: Path, clips: dict[str, np.ndarray]) -> None:
    torch.manual_seed(0)
    path = tmp_path / "i3d_random.safetensors"
    save_file(build_i3d().state_dict(), str(path))
    backbone = I3DBackbone(path)
    assert not backbone.proxy and "i3d_random.safetensors" in backbone.describe() and "eps 0.001" in backbone.describe()
    video = Video(np.concatenate([clips["clean"][0]] * 2), 8.0, "v.mp4")  # 16 frames of 32x32, resized to 224
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = backbone.encode([select_clip(video, backbone.num_frames)[0]])
    assert features.shape == (1, 400) and features.dtype == np.float64


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::eval_video.frechet.SmallSampleWarning")
def test_toy_fvd_fp_on_generated_videos(toy: ToyBackbone) -> None:
    """Videos sampled from the bundled toy STDiT3: FVD-FP ranks damaged outputs behind near-copies."""
    from tfmq_video.toy.data import train_captions
    from tfmq_video.toy.world import generate_clips, load_toy_stdit3

    captions = [c.text for c in train_captions()[:8]]
    generated = generate_clips(load_toy_stdit3(), captions, list(range(8)), batch_size=8)
    fp = _videos(generated, "fp")
    light = fvd_fp(_videos(damage(generated, 3, 1), "q"), fp, toy).value
    heavy = fvd_fp(_videos(damage(generated, 30, 3), "q"), fp, toy).value
    assert light < heavy, (light, heavy)  # type: ignore[operator]
