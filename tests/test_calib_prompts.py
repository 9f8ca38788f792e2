"""Calibration from a prompts file with a local T5: one sampling pass, real (tiny, random) files.

A tiny random T5 encoder and a word-level tokenizer are saved with ``save_pretrained`` and loaded
back offline, exactly as a real T5-XXL folder would be; the STDiT3 is the tiny random one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from dit_adapters.opensora.loading import save_stdit3
from dit_adapters.opensora.rflow import seeded_noise
from dit_adapters.opensora.stdit3 import STDiT3
from tfmq_video.calib.prompts import read_prompts
from tfmq_video.calib.recorder import calibration_seeds, record_recipe_calibration
from tfmq_video.calib.testing import TINY_CONFIG
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import RecipeConfig, VideoConfig, load_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CAPTION_TOKENS = 8
CAPTION_DIM = TINY_CONFIG.caption_channels
WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "square",
    "circle",
    "moving",
    "left",
    "right",
    "up",
    "down",
    "slowly",
    "café",
]
PROMPTS = ["a red square moving left", "a blue circle moving up slowly", "a green café"]
VIDEO = {"num_frames": 9, "height": 32, "width": 48, "fps": 24}  # latents (4, 3, 4, 6)
SAMPLER = {"num_steps": 3, "guidance_scale": 4.0, "fixed_shift": 2.0}


def save_tiny_t5(folder: Path, d_model: int = CAPTION_DIM) -> Path:
    """A random 1-layer T5 encoder and a word-level tokenizer as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = transformers.T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(1)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def model() -> STDiT3:
    torch.manual_seed(0)
    return STDiT3(dataclasses.replace(TINY_CONFIG, model_max_length=CAPTION_TOKENS)).eval()


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# calibration captions\n\n" + "\n".join(PROMPTS) + "\n   \n# the end\n", encoding="utf-8"
    )
    return path


def calibration(prompts: Path, t5: Path, **overrides: object) -> dict:
    cal = {
        "prompts_file": str(prompts),
        "text_encoder": {"kind": "t5", "path": str(t5), "max_length": CAPTION_TOKENS},
        "video": VIDEO,
        "sampler": SAMPLER,
        "batch_size": 2,
        "seed": 3,
    }
    cal.update(overrides)
    return cal


def recipe(prompts: Path, t5: Path, **overrides: object) -> RecipeConfig:
    return parse_config({"progress": False, "calibration": calibration(prompts, t5, **overrides)})


class CallCounter:
    """Forward hook on the FP model: counts calls and keeps each call's caption shape."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.captions: list[tuple[int, ...]] = []
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output) -> None:  # noqa: ANN001
        self.captions.append(tuple(kwargs["y"].shape))

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def reference_captions(t5: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(t5, local_files_only=True)
    encoder = transformers.T5EncoderModel.from_pretrained(t5, local_files_only=True).float().eval()
    tokens = tokenizer(
        prompts, max_length=CAPTION_TOKENS, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
    return hidden, tokens["attention_mask"]


def test_prompts_file_is_recorded_in_one_sampling_pass(
    model: STDiT3, prompts_file: Path, t5_dir: Path
) -> None:
    cal_config = recipe(prompts_file, t5_dir).calibration
    with CallCounter(model) as counter:
        cal = record_recipe_calibration(model, cal_config)
    steps, batches = SAMPLER["num_steps"], 2  # 3 prompts in batches of 2
    assert len(counter.captions) == steps * batches  # one sampler run per batch: O(T) model calls
    assert cal.sampler_steps == [0, 1, 2] and len(cal.timesteps) == steps
    assert cal.timesteps[0] == 1000.0 and cal.timesteps == sorted(cal.timesteps, reverse=True)
    assert [c.step for c in cal.calls] == [0, 1, 2, 0, 1, 2]

    y_ref, mask_ref = reference_captions(t5_dir, PROMPTS)
    assert y_ref.shape == (3, CAPTION_TOKENS, CAPTION_DIM)
    null = model.y_embedder.y_embedding
    latent = VideoConfig(**VIDEO).latent_shape()
    assert latent == (4, 3, 4, 6)
    noise = seeded_noise(calibration_seeds(3, 3), latent)
    for i, call in enumerate(cal.calls):
        rows = slice(0, 2) if i < steps else slice(2, 3)  # the first batch's steps, then the second's
        b = rows.stop - rows.start
        x, t = call.args
        y, mask = call.kwargs["y"], call.kwargs["mask"]
        assert x.shape == (2 * b, *latent) and t.shape == (2 * b,)  # cond + uncond halves
        assert y.shape == (2 * b, 1, CAPTION_TOKENS, CAPTION_DIM)  # the T5 output's shape
        torch.testing.assert_close(y[:b, 0], y_ref[rows])
        torch.testing.assert_close(y[b:, 0], null[None].expand(b, -1, -1))
        assert torch.equal(mask, mask_ref[rows])
        assert float(call.kwargs["fps"]) == 24.0 and float(call.kwargs["height"][0]) == 32.0
        if call.step == 0:
            torch.testing.assert_close(x[:b], noise[rows])
    assert counter.captions[0] == (4, 1, CAPTION_TOKENS, CAPTION_DIM)


def test_a_step_subset_still_costs_one_pass(model: STDiT3, prompts_file: Path, t5_dir: Path) -> None:
    cal_config = recipe(prompts_file, t5_dir, steps=[0, 2], num_prompts=2).calibration
    with CallCounter(model) as counter:
        cal = record_recipe_calibration(model, cal_config)
    assert len(counter.captions) == 3  # 2 prompts = one batch, 3 steps
    assert cal.sampler_steps == [0, 2] and len(cal.calls) == 2


def test_calibrate_command_on_a_prompts_file(
    tmp_path: Path, model: STDiT3, prompts_file: Path, t5_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from tfmq_video.commands import calibrate

    model_dir = save_stdit3(model, tmp_path / "stdit3")
    raw = {
        "progress": False,
        "model": {"adapter": "opensora-stdit3", "path": str(model_dir)},
        "calibration": calibration(prompts_file, t5_dir),
        "quant": {"weight": {"bits": 4}, "activation": {"bits": 8}},
        "tib": {"iterations": 20},
        "reconstruction": {"iterations": 5, "batch_size": 2},
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    out = tmp_path / "out"
    args = argparse.Namespace(config=config, out=out, threads=None, no_progress=True, export=None, device="cpu")
    assert calibrate.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "record" in summary["seconds"] and (out / "quantization.json").is_file()
    manifest = json.loads((out / "quantization.json").read_text())
    assert len(manifest["timesteps"]) == SAMPLER["num_steps"]
    assert manifest["recipe"]["calibration"]["prompts_file"] == str(prompts_file)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("# only a comment\n\n  \n", "has no captions")],
)
def test_prompts_file_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(path)


def test_prompts_are_utf8_lines_without_comments(prompts_file: Path) -> None:
    assert read_prompts(prompts_file) == PROMPTS


def test_mismatched_encoder_or_inputs_fail_before_sampling(
    tmp_path: Path, model: STDiT3, prompts_file: Path, t5_dir: Path
) -> None:
    wide = save_tiny_t5(tmp_path / "t5_wide", d_model=24)
    cases = [
        (recipe(prompts_file, tmp_path / "no_t5"), "is not a folder"),
        (recipe(tmp_path / "missing.txt", t5_dir), "does not exist"),
        (recipe(prompts_file, wide), "produces 24-dim captions but the model's caption_channels is 16"),
        (
            recipe(prompts_file, t5_dir, text_encoder={"path": str(t5_dir), "max_length": 12}),
            "max_length is 12 but the model takes captions of 8 tokens",
        ),
        (recipe(prompts_file, t5_dir, video={**VIDEO, "latent_channels": 8}), "latent_channels is 8"),
        (recipe(prompts_file, t5_dir, num_prompts=5), "has only 3 captions"),
    ]
    with CallCounter(model) as counter:
        for config, message in cases:
            with pytest.raises(ConfigError, match=message):
                record_recipe_calibration(model, config.calibration)
    assert counter.captions == []


def test_missing_transformers_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, model: STDiT3, prompts_file: Path, t5_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"tfmq-video\[t5\]"):
        record_recipe_calibration(model, recipe(prompts_file, t5_dir).calibration)


@pytest.mark.parametrize(
    ("frames", "latent"), [(1, 1), (4, 1), (9, 3), (16, 4), (17, 5), (18, 6), (34, 10), (51, 15), (102, 30)]
)
def test_latent_frames_follow_open_sora_vae(frames: int, latent: int) -> None:
    assert VideoConfig(num_frames=frames).latent_frames() == latent


@pytest.mark.parametrize(
    ("calibration_section", "message"),
    [
        ({"text_encoder": {"path": "/t5"}}, "calibration.text_encoder only apply to a prompts file"),
        ({"prompts_file": "p.txt"}, "needs calibration.text_encoder"),
        (
            {"prompts_file": "p.txt", "text_encoder": {"path": "/t5"}, "steps": [30]},
            "exceed the sampler's 30 steps",
        ),
        ({"prompts_file": "p.txt", "text_encoder": {"path": "/t5", "kind": "clip"}}, "text_encoder.kind"),
        ({"prompts_file": "p.txt", "text_encoder": {}}, "text_encoder.path: Field required"),
        (
            {"prompts_file": "p.txt", "text_encoder": {"path": "/t5"}, "video": {"height": 4}},
            "height 4 is smaller than the VAE's spatial compression 8",
        ),
        (
            {"prompts_file": "p.txt", "text_encoder": {"path": "/t5"}, "sampler": {"num_steps": 0}},
            "calibration.sampler.num_steps",
        ),
    ],
)
def test_calibration_section_errors_name_the_field(calibration_section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_config({"calibration": calibration_section}, "test.yaml")


def test_open_sora_recipe_parses_with_upstream_defaults() -> None:
    recipe = load_config(CONFIGS / "opensora_v1_2_w4a8.yaml")
    cal = recipe.calibration
    assert recipe.model.path == "/path/to/OpenSora-STDiT-v3" and cal.text_encoder is not None
    assert cal.text_encoder.kind == "t5" and cal.text_encoder.max_length == 300
    assert cal.video_settings().latent_shape() == (4, 15, 30, 53)  # 51 frames of 240x426
    assert cal.sampler_settings().num_steps == 30 and cal.sampler_settings().guidance_scale == 7.0
    assert recipe.quant.weight.bits == 4 and recipe.quant.activation.bits == 8
    assert parse_config({}).calibration.prompts_file is None  # the toy prompts stay the default


@pytest.mark.slow  # ~50 s on 2 busy CPU cores: 2 toy sampling runs of 20 steps each
def test_toy_path_records_what_the_toy_sampler_records() -> None:
    """The shared ``record_calibration`` reproduces the toy world's own sampling run call for call."""
    from tfmq_video.calib.recorder import StepRecorder, record_toy_calibration
    from tfmq_video.toy.data import train_captions
    from tfmq_video.toy.world import generate_latents, load_toy_stdit3

    toy = load_toy_stdit3()
    captions = [c.text for c in train_captions()]
    chosen = [
        captions[int(i)]
        for i in torch.randperm(len(captions), generator=torch.Generator().manual_seed(1))[:2]
    ]
    recorder = StepRecorder([0, 19])
    generate_latents(
        toy, toy.y_embedder.y_embedding, chosen, calibration_seeds(1, 2), batch_size=1, callback=recorder
    )
    expected = recorder.calibration_set()
    got = record_toy_calibration(toy, 2, seed=1, steps=[0, 19], batch_size=1)
    assert got.timesteps == expected.timesteps and got.sampler_steps == expected.sampler_steps == [0, 19]
    assert len(got.calls) == len(expected.calls) == 4
    for a, b in zip(got.calls, expected.calls, strict=True):
        assert a.step == b.step and a.kwargs.keys() == b.kwargs.keys()
        for u, v in zip((*a.args, *a.kwargs.values()), (*b.args, *b.kwargs.values()), strict=True):
            assert torch.equal(u, v)
