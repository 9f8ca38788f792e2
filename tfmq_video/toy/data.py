"""The procedural toy video world: colored shapes moving over varied backgrounds.

Every clip is a deterministic function of a :class:`ClipSpec`, and specs are drawn
deterministically from a seed, so any set of videos can be regenerated exactly.
Clips are uint8 RGB arrays of shape (T, H, W, 3), the project's in-memory video convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 40),
    "green": (40, 205, 70),
    "blue": (45, 95, 240),
    "yellow": (240, 215, 40),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS: tuple[str, ...] = ("solid", "horizontal-gradient", "vertical-gradient", "stripes")

NUM_FRAMES = 8
FRAME_SIZE = 32
SUPERSAMPLE = 4
# Each direction has its own lane: left-moving objects travel above the horizontal centre line,
# right-moving ones below it, up-moving ones left of the vertical centre line, down-moving ones
# right of it (LANE_OFFSET px from the centre line, within CROSS_AXIS_JITTER px). Why: STDiT3's
# temporal attention has only relative (RoPE) positions, so at high noise the model can lay out
# where a track runs but not which way along it; the lane makes the sign part of the layout.
LANE_OFFSET = 6.0
CROSS_AXIS_JITTER = 2.0
LANE_SIDE: dict[str, int] = {"left": -1, "right": 1, "up": -1, "down": 1}
# A circle is drawn as an outline whose hole has this fraction of its radius. Filled circles and
# squares were told apart by their corners alone, which the 4x4-patch toy model rounded off.
CIRCLE_HOLE = 0.5
# Fading afterimages (a motion trail): (frames behind the object, opacity), drawn oldest first.
TRAIL: tuple[tuple[int, float], ...] = ((2, 0.2), (1, 0.45))


@dataclass(frozen=True)
class Caption:
    """The captioned attributes of a clip: ``a {color} {shape} moving {direction}``."""

    shape: str
    color: str
    direction: str

    @property
    def text(self) -> str:
        """The caption sentence."""
        return f"a {self.color} {self.shape} moving {self.direction}"

    @property
    def labels(self) -> tuple[int, int, int]:
        """(shape, color, direction) class indices, as the toy classifier predicts them."""
        return SHAPES.index(self.shape), list(COLORS).index(self.color), list(DIRECTIONS).index(self.direction)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (caption attributes plus uncaptioned nuisances)."""

    caption: Caption
    size: float  # object diameter in pixels
    speed: float  # pixels per frame
    start: tuple[float, float]  # object centre (x, y) at frame 0
    background: str
    background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]


def all_captions() -> list[Caption]:
    """Every (shape, color, direction) combination, in a fixed order."""
    return [Caption(s, c, d) for s in SHAPES for c in COLORS for d in DIRECTIONS]


def held_out_captions() -> list[Caption]:
    """Combinations never shown in training, to measure generalization to new captions.

    Every shape, color and direction still appears in training with other partners.
    """
    return [
        Caption("triangle", "red", "left"),
        Caption("circle", "green", "up"),
        Caption("square", "blue", "right"),
        Caption("triangle", "yellow", "down"),
        Caption("circle", "red", "right"),
        Caption("square", "yellow", "up"),
    ]


def train_captions() -> list[Caption]:
    """Training combinations: all but :func:`held_out_captions`."""
    held = set(held_out_captions())
    return [c for c in all_captions() if c not in held]


def _muted_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(15, 110, size=3))  # type: ignore[return-value]


def random_spec(rng: np.random.Generator, caption: Caption, lanes: bool = True) -> ClipSpec:
    """Draw the nuisance variables of a clip with ``caption`` so the object stays in view.

    The object starts on the side its direction leaves from and travels along its direction's
    lane (:data:`LANE_OFFSET`, within :data:`CROSS_AXIS_JITTER`), so the caption fixes the
    track's place; size, speed, the exact start and the background vary. ``lanes=False`` puts the
    track anywhere across both lanes (the toy classifier trains on such clips, so it judges the
    motion, not the lane).
    """
    size = float(rng.uniform(10.0, 14.0))
    speed = float(rng.uniform(2.0, 3.0))
    travel = speed * (NUM_FRAMES - 1)
    margin = size / 2 + 1
    dx, dy = DIRECTIONS[caption.direction]

    def start_along(d: int) -> float:
        if d == 0:
            centre = FRAME_SIZE / 2
            if not lanes:
                reach = LANE_OFFSET + CROSS_AXIS_JITTER
                return float(rng.uniform(centre - reach, centre + reach))
            lane = centre + LANE_SIDE[caption.direction] * LANE_OFFSET
            return float(rng.uniform(lane - CROSS_AXIS_JITTER, lane + CROSS_AXIS_JITTER))
        low, high = margin, FRAME_SIZE - margin - travel
        pos = float(rng.uniform(low, max(low, high)))
        return pos if d > 0 else FRAME_SIZE - pos

    start = (start_along(dx), start_along(dy))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return ClipSpec(caption, size, speed, start, background, (_muted_color(rng), _muted_color(rng)))


def _background(spec: ClipSpec) -> np.ndarray:
    """(H, W, 3) float background in [0, 255]."""
    a = np.array(spec.background_colors[0], dtype=np.float32)
    b = np.array(spec.background_colors[1], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, FRAME_SIZE, dtype=np.float32)
    if spec.background == "solid":
        weight = np.zeros((FRAME_SIZE, FRAME_SIZE), dtype=np.float32)
    elif spec.background == "horizontal-gradient":
        weight = np.broadcast_to(ramp[None, :], (FRAME_SIZE, FRAME_SIZE))
    elif spec.background == "vertical-gradient":
        weight = np.broadcast_to(ramp[:, None], (FRAME_SIZE, FRAME_SIZE))
    elif spec.background == "stripes":
        weight = np.broadcast_to(((np.arange(FRAME_SIZE) // 4) % 2).astype(np.float32)[:, None], (FRAME_SIZE, FRAME_SIZE))
    else:
        raise ValueError(f"unknown background {spec.background!r}; expected one of {BACKGROUNDS}")
    return a * (1 - weight[..., None]) + b * weight[..., None]


def _coverage(shape: str, centre: tuple[float, float], size: float) -> np.ndarray:
    """(H, W) fraction of each pixel covered by the shape, by supersampling."""
    n = FRAME_SIZE * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)
    u, v = xs - centre[0], ys - centre[1]
    half = size / 2
    if shape == "square":
        inside = (np.abs(u) <= half * 0.9) & (np.abs(v) <= half * 0.9)
    elif shape == "circle":  # an outline (a ring): its hole tells it from a square with soft corners
        radius2 = u**2 + v**2
        inside = (radius2 <= half**2) & (radius2 >= (CIRCLE_HOLE * half) ** 2)
    elif shape == "triangle":  # apex up, base at the bottom
        inside = (v <= half * 0.9) & (v >= -half) & (np.abs(u) <= (v + half) * 0.55)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(FRAME_SIZE, SUPERSAMPLE, FRAME_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render_clip(spec: ClipSpec) -> np.ndarray:
    """Render ``spec`` as a uint8 (T, H, W, 3) clip."""
    background = _background(spec)
    color = np.array(COLORS[spec.caption.color], dtype=np.float32)
    dx, dy = DIRECTIONS[spec.caption.direction]
    frames = np.empty((NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    for i in range(NUM_FRAMES):
        frame = background
        for behind, opacity in (*TRAIL, (0, 1.0)):
            centre = (spec.start[0] + dx * spec.speed * (i - behind), spec.start[1] + dy * spec.speed * (i - behind))
            alpha = opacity * _coverage(spec.caption.shape, centre, spec.size)[..., None]
            frame = frame * (1 - alpha) + color * alpha
        frames[i] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return frames


def draw_specs(seed: int, count: int, captions: Sequence[Caption] | None = None, lanes: bool = True
               ) -> list[ClipSpec]:
    """``count`` specs from ``seed``; captions cycle through ``captions`` (default: training set);
    ``lanes``: see :func:`random_spec`."""
    pool = list(captions) if captions is not None else train_captions()
    if not pool:
        raise ValueError("draw_specs needs at least one caption")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    return [random_spec(rng, pool[order[i % len(pool)]], lanes) for i in range(count)]


def make_clips(seed: int, count: int, captions: Sequence[Caption] | None = None, lanes: bool = True
               ) -> tuple[np.ndarray, list[ClipSpec]]:
    """Render ``count`` clips from ``seed``: uint8 (N, T, H, W, 3) and their specs (``lanes``:
    see :func:`random_spec`)."""
    specs = draw_specs(seed, count, captions, lanes)
    return np.stack([render_clip(s) for s in specs]), specs


def clips_to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float (N, 3, T, H, W) in [-1, 1] (the model's pixel space)."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).float() / 127.5 - 1.0
    return x.permute(0, 4, 1, 2, 3).contiguous()


def tensor_to_clips(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, T, H, W) in [-1, 1] -> uint8 (N, T, H, W, 3), clamped."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()
