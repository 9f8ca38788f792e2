"""How much does a toy STDiT3 use each caption word? A diagnostic for the toy world's quality bar.

For fresh procedural clips it prints, per noise level, the denoising loss with the right
caption and with one word (direction, shape or color) swapped for another. A word the model
uses raises the loss when wrong. The last line gives, per word, the loss gain an ideal model
could get from that word at the highest noise level: the squared distance between the
per-word time-averaged mean clip and the mean over that word's values (in model units).

    python tools/probe_caption_words.py --model tfmq_video/assets/toy_stdit3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dit_adapters.opensora.rflow import RFlowSampler
from tfmq_video.toy.data import COLORS, DIRECTIONS, SHAPES, Caption, all_captions, clips_to_tensor, make_clips
from tfmq_video.toy.world import TOY_SAMPLER_CONFIG, load_toy_stdit3, model_kwargs, toy_text_encoder

WORDS = {"direction": tuple(DIRECTIONS), "shape": SHAPES, "color": tuple(COLORS)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swapped(caption: Caption, word: str | None) -> str:
    """The caption text with ``word`` replaced by the next value of its kind (``None``: unchanged;
    ``"sign"``: the opposite direction on the same axis)."""
    if word is None:
        return caption.text
    if word == "sign":
        return Caption(caption.shape, caption.color, OPPOSITE[caption.direction]).text
    values = WORDS[word]
    fields = {"direction": caption.direction, "shape": caption.shape, "color": caption.color}
    fields[word] = values[(values.index(fields[word]) + 1) % len(values)]
    return Caption(fields["shape"], fields["color"], fields["direction"]).text


@torch.no_grad()
def word_losses(model: torch.nn.Module, clips: int, timesteps: list[float]) -> dict[float, dict[str, float]]:
    """Loss per timestep with the right caption (``right``) and with each word swapped."""
    data, specs = make_clips(4242, clips, all_captions())
    x0 = clips_to_tensor(data)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sampler, encoder = RFlowSampler(TOY_SAMPLER_CONFIG), toy_text_encoder()
    target = sampler.velocity_target(x0, noise)
    out: dict[float, dict[str, float]] = {}
    for value in timesteps:
        t = torch.full((len(x0),), value)
        x_t = sampler.add_noise(x0, noise, t)
        out[value] = {}
        for word in (None, *WORDS, "sign"):
            y, mask = encoder.encode([swapped(s.caption, word) for s in specs])
            pred = model(x_t, t, y, mask=mask, **model_kwargs(len(x0)))
            out[value][word or "right"] = float((pred - target).pow(2).mean())
    return out


def ideal_gains(clips_per_value: int = 100) -> dict[str, float]:
    """Per word: mean squared distance of per-value time-averaged mean clips from their average."""
    gains = {}
    base = Caption("square", "red", "left")
    for word, values in WORDS.items():
        means = []
        for value in values:
            caption = Caption(**{**base.__dict__, word: value})
            clips, _ = make_clips(1, clips_per_value, [caption])
            means.append(clips_to_tensor(clips).mean(dim=(0, 2)))
        average = torch.stack(means).mean(0)
        gains[word] = float(torch.stack([(m - average).pow(2).mean() for m in means]).mean())
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="STDiT3 folder (default: the bundled one)")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--timesteps", type=float, nargs="+", default=[950.0, 850.0, 700.0, 500.0, 300.0])
    args = parser.parse_args()
    model = load_toy_stdit3(args.model)
    print("| t | right caption | wrong direction | opposite direction | wrong shape | wrong color |\n"
          "|---|---|---|---|---|---|")
    for t, row in word_losses(model, args.clips, args.timesteps).items():
        print(f"| {t:g} | {row['right']:.5f} | {row['direction']:.5f} | {row['sign']:.5f} | {row['shape']:.5f} "
              f"| {row['color']:.5f} |")
    print("ideal loss gain at t -> 1:", {word: round(gain, 5) for word, gain in ideal_gains().items()})


if __name__ == "__main__":
    main()
