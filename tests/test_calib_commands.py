"""The ``calibrate`` and ``bench quality`` commands: argument handling, errors, table helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tfmq_video.calib.quality import ROW_KEYS, markdown_table, per_step_error
from tfmq_video.cli import main


def test_calibrate_with_an_invalid_config_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("quant:\n  weight:\n    bits: 12\n")
    out = tmp_path / "out"
    assert main(["calibrate", str(config), "--out", str(out)]) == 2
    assert "quant.weight.bits: unsupported bit width 12" in capsys.readouterr().err
    assert not out.exists()


def test_bench_quality_rejects_unknown_methods(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["bench", "quality", "--json", str(tmp_path / "q.json"), "--methods", "gptq"])
    assert code == 2
    assert "unknown methods ['gptq']" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


def test_markdown_table_has_every_key_and_formats_missing_values() -> None:
    rows = [{"method": "fp", "wbits": 32, "abits": 32, "fvd": 1.23456, "fvd_fp": 0.0, "psnr_fp": None,
             "temporal_feature_error": 0.0, "calib_seconds": 0.0, "quantized_weight_fraction": 0.0}]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| " + " | ".join(ROW_KEYS) + " |"
    assert "| fp | 32 | 32 | 1.235 | 0 | - |" in table[2]
    assert per_step_error({"t": [1.0, 3.0], "t_mlp": [3.0, 5.0]}) == [2.0, 4.0]


@pytest.mark.slow
def test_bench_quality_end_to_end_small(tmp_path: Path) -> None:
    import json

    out = tmp_path / "q.json"
    assert main(["bench", "quality", "--json", str(out), "--methods", "rtn", "--settings", "W8A8",
                 "--num-videos", "4", "--plot", str(tmp_path / "q.png")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "fp-reseed", "rtn"]
    assert (tmp_path / "q.png").is_file()
