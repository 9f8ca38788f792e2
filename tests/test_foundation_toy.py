"""The toy world: procedural data, text encoder, bundled models, training helpers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.toy.data import (
    COLORS,
    CROSS_AXIS_JITTER,
    DIRECTIONS,
    FRAME_SIZE,
    LANE_OFFSET,
    LANE_SIDE,
    NUM_FRAMES,
    Caption,
    all_captions,
    clips_to_tensor,
    draw_specs,
    held_out_captions,
    make_clips,
    render_clip,
    tensor_to_clips,
    train_captions,
)
from tfmq_video.toy.world import (
    TOY_SAMPLER_CONFIG,
    TOY_STDIT3_CONFIG,
    generate_clips,
    load_toy_classifier,
    load_toy_stdit3,
    toy_text_encoder,
)


def test_clips_are_deterministic_and_differ_by_seed() -> None:
    a, specs = make_clips(7, 6)
    b, _ = make_clips(7, 6)
    c, _ = make_clips(8, 6)
    assert a.dtype == np.uint8 and a.shape == (6, NUM_FRAMES, 32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(s.caption in train_captions() for s in specs)


def test_objects_move_as_captioned() -> None:
    clips, specs = make_clips(3, 24, all_captions())
    for clip, spec in zip(clips, specs, strict=True):
        # The object is the set of pixels closest to its color; its centroid moves along the caption's direction.
        color = np.array(COLORS[spec.caption.color])
        centroids = []
        for frame in clip.astype(int):
            near = np.abs(frame - color).sum(-1) < 40
            ys, xs = np.nonzero(near)
            centroids.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centroids[-1], centroids[0])
        ex, ey = DIRECTIONS[spec.caption.direction]
        assert np.sign(round(dx)) == ex and np.sign(round(dy)) == ey, spec


def test_a_fading_trail_follows_the_object_in_its_direction_lane() -> None:
    for spec in draw_specs(11, 12, all_captions()):
        spec = replace(spec, background="solid", background_colors=((40, 40, 40), (40, 40, 40)))
        frame = render_clip(spec)[NUM_FRAMES // 2].astype(int)
        color = np.array(COLORS[spec.caption.color])
        solid = np.abs(frame - color).sum(-1) < 40
        tinted = (np.abs(frame - 40).sum(-1) > 30) & ~solid
        ex, ey = DIRECTIONS[spec.caption.direction]
        along = [float(np.nonzero(m)[1].mean() * ex + np.nonzero(m)[0].mean() * ey) for m in (tinted, solid)]
        assert tinted.sum() > 10 and along[0] < along[1] - 1, spec  # the trail lies behind the object
        cross = spec.start[1] if ex else spec.start[0]
        lane = FRAME_SIZE / 2 + LANE_SIDE[spec.caption.direction] * LANE_OFFSET
        assert abs(cross - lane) <= CROSS_AXIS_JITTER, spec


def test_lanes_separate_opposite_directions_and_can_be_switched_off() -> None:
    """With lanes, the time-averaged layout of 'left' differs from 'right' (the sign is part of
    the layout); without, tracks spread across both lanes."""
    left, right = Caption("square", "red", "left"), Caption("square", "red", "right")
    red = np.array(COLORS["red"])
    centroid = {}
    for caption in (left, right):
        clips = make_clips(5, 64, [caption])[0].astype(int)
        object_rows = np.nonzero(np.abs(clips - red).sum(-1) < 60)[2]  # (N, T, H, W) -> row index
        centroid[caption.direction] = float(object_rows.mean())
    assert centroid["left"] < FRAME_SIZE / 2 - 2 < FRAME_SIZE / 2 + 2 < centroid["right"], centroid
    crosses = [s.start[1] for s in draw_specs(3, 200, [left], lanes=False)]
    reach = LANE_OFFSET + CROSS_AXIS_JITTER
    assert min(crosses) < FRAME_SIZE / 2 - LANE_OFFSET and max(crosses) > FRAME_SIZE / 2 + LANE_OFFSET - 1
    assert all(abs(c - FRAME_SIZE / 2) <= reach for c in crosses)


def test_circles_are_outlines_and_squares_are_filled() -> None:
    """A circle's centre shows the background (its hole); a square's centre is its color."""
    for shape, filled in (("circle", False), ("square", True), ("triangle", True)):
        spec = draw_specs(2, 1, [Caption(shape, "red", "left")])[0]
        spec = replace(spec, background="solid", background_colors=((40, 40, 40), (40, 40, 40)), size=14.0)
        frame = render_clip(spec)[0].astype(int)
        centre = frame[int(spec.start[1]), int(spec.start[0])]
        assert (np.abs(centre - np.array(COLORS["red"])).sum() < 60) == filled, (shape, centre)


def test_held_out_captions_never_appear_in_training_but_their_words_do() -> None:
    held, train = set(held_out_captions()), set(train_captions())
    assert held.isdisjoint(train) and len(held) + len(train) == len(all_captions())
    for caption in held:
        assert any(c.shape == caption.shape for c in train)
        assert any(c.color == caption.color for c in train)
        assert any(c.direction == caption.direction for c in train)


def test_tensor_round_trip() -> None:
    clips, _ = make_clips(1, 2)
    x = clips_to_tensor(clips)
    assert x.shape == (2, 3, NUM_FRAMES, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_clips(x), clips)


def test_text_encoder_masks_padding_and_rejects_unknown_words() -> None:
    encoder = toy_text_encoder()
    y, mask = encoder.encode(["a red square moving left", "a red square moving up"])
    assert y.shape == (2, 1, 8, 64) and mask.tolist()[0] == [1] * 5 + [0] * 3
    assert torch.equal(y[0, 0, :4], y[1, 0, :4]) and not torch.equal(y[0, 0, 4], y[1, 0, 4])
    assert not y[0, 0, 5:].any()
    with pytest.raises(ConfigError, match="purple"):
        encoder.encode(["a purple square moving left"])


def test_bundled_models_load_and_classifier_reads_fresh_clips() -> None:
    model = load_toy_stdit3()
    assert model.config == TOY_STDIT3_CONFIG
    assert len(model.spatial_blocks) >= 4 and len(model.temporal_blocks) >= 4
    classifier = load_toy_classifier()
    clips, specs = make_clips(424242, 48, all_captions())
    predicted = classifier.predict(clips_to_tensor(clips))
    labels = torch.tensor([s.caption.labels for s in specs])
    for i, head in enumerate(("shape", "color", "direction")):
        accuracy = (predicted[head] == labels[:, i]).float().mean().item()
        assert accuracy >= 0.95, (head, accuracy)
    assert classifier.features(clips_to_tensor(clips[:2])).shape == (2, classifier.config.feature_dim)


def test_generation_is_reproducible_per_seed() -> None:
    model = load_toy_stdit3()
    config = replace(TOY_SAMPLER_CONFIG, num_steps=3)
    a = generate_clips(model, ["a red square moving left", "a blue circle moving up"], [1, 2], sampler_config=config)
    b = generate_clips(model, ["a blue circle moving up"], [2], sampler_config=config)
    assert a.shape == (2, NUM_FRAMES, 32, 32, 3)
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 1  # batch composition barely matters


def test_classifier_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_toy_classifier(tmp_path)
