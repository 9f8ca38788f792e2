"""Recipe validation: clear errors naming the offending field, bundled configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tfmq_video.calib.baselines import method_recipe
from tfmq_video.errors import ConfigError
from tfmq_video.quant.config import load_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"quant": {"weight": {"bits": 9}}}, "quant.weight.bits: unsupported bit width 9"),
        ({"quant": {"activation": {"bits": 1}}}, "quant.activation.bits: unsupported bit width 1"),
        ({"quant": {"weight": {"group_size": 32}}}, "quant.weight.group_size: group_size must be one of"),
        ({"quant": {"activation": {"mode": "sometimes"}}}, "quant.activation.mode"),
        ({"tib": {"cache": False, "select": True}}, "tib.select needs tib.cache"),
        ({"calibration": {"steps": []}}, "calibration.steps is empty"),
        ({"reconstruction": {"iterations": -1}}, "reconstruction.iterations"),
        ({"quant": {"wieght": {}}}, "quant.wieght: Extra inputs are not permitted"),
    ],
)
def test_invalid_values_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        parse_config(raw, "test.yaml")


def test_all_problems_are_listed_together() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"quant": {"weight": {"bits": 9}, "activation": {"bits": 0}}})
    assert "quant.weight.bits" in str(err.value) and "quant.activation.bits" in str(err.value)


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_configs_are_valid(path: Path) -> None:
    recipe = load_config(path)
    # The toy recipes use the bundled model; the real-model recipes name a folder the user edits.
    assert recipe.model.path == "toy" or recipe.calibration.prompts_file is not None


def test_method_recipes_override_bits_and_reject_unknown_methods() -> None:
    recipe = method_recipe("viditq", 4, 6)
    assert recipe.quant.weight.bits == 4 and recipe.quant.activation.bits == 6
    assert recipe.tib.keep_fp and recipe.quant.activation.mode == "dynamic_per_token"
    with pytest.raises(ConfigError, match="unknown method"):
        method_recipe("gptq", 4, 8)
    with pytest.raises(ConfigError, match="unsupported bit width"):
        method_recipe("tfmq", 3, 12)


@pytest.mark.parametrize("abits", [4, 6, 8])
def test_cache_is_8_bit_unless_set(abits: int) -> None:
    # The cache stores int8 codes whatever the activation bits; only tib.cache_bits lowers it.
    assert method_recipe("tfmq", 4, abits).cache_bits() == 8
    assert parse_config({"quant": {"activation": {"bits": abits}}, "tib": {"cache_bits": 4}}).cache_bits() == 4
