"""``bench seeds``: merging quality runs, the exact rank test, the tables and the command."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest

from tfmq_video.calib.seed_stats import (
    compare_methods,
    mann_whitney_p,
    mann_whitney_u,
    merge_runs,
    seeds_table,
    signed_rank_p,
)
from tfmq_video.cli import main
from tfmq_video.errors import ConfigError

FP_ROWS = [{"method": "fp", "wbits": 32, "abits": 32, "num_videos": 8, "fvd": 5.0, "fvd_fp": 0.0, "psnr_fp": None},
           {"method": "fp-reseed", "wbits": 32, "abits": 32, "num_videos": 8, "reseed": 1, "fvd": 4.0,
            "fvd_fp": 0.07, "psnr_fp": 17.0}]


def _rows(method: str, values: dict[int, float]) -> list[dict]:
    return [{"method": method, "wbits": 4, "abits": 8, "num_videos": 8, "calib_seed": seed, "fvd": 6.0 + v,
             "fvd_fp": v, "psnr_fp": 30.0 - v} for seed, v in values.items()]


def test_exact_test_matches_the_counting_definition() -> None:
    # every value of a below every value of b: only 1 of the C(6, 3) splits reaches U = 9
    assert mann_whitney_u([1, 2, 3], [4, 5, 6]) == 9
    assert mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(1 / comb(6, 3))
    assert mann_whitney_p([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(1 / comb(8, 4))
    assert mann_whitney_p([4, 5, 6], [1, 2, 3]) == 1.0  # a worse everywhere
    assert mann_whitney_p([4, 5, 6], [1, 2, 3], lower_is_better=False) == pytest.approx(1 / 20)
    assert mann_whitney_u([1, 2], [2, 3]) == 3.5  # the tie counts half
    # interleaved values: U = 6 of 9 (a1 < b1, b2, b3; a2 < b2, b3; a3 < b3), reached by 7 of 20 splits
    assert mann_whitney_p([1, 3, 5], [2, 4, 6]) == pytest.approx(7 / 20)


def test_signed_rank_test_matches_the_counting_definition() -> None:
    # a better at each of 3 seeds: only 1 of the 2**3 sign flips reaches W+ = 6
    assert signed_rank_p([1, 2, 3], [2, 4, 6]) == pytest.approx(1 / 8)
    assert signed_rank_p([2, 4, 6], [1, 2, 3]) == 1.0
    assert signed_rank_p([2, 4, 6], [1, 2, 3], lower_is_better=False) == pytest.approx(1 / 8)
    # gains 0.95, -1.87, 0.15, 0.67, 0.72: W+ = 1 + 2 + 3 + 4 = 10, reached by the 10 of 32 flips
    # whose complement sums to at most 5
    a, b = [11.57, 11.49, 14.0, 12.43, 11.58], [12.52, 9.62, 14.15, 13.10, 12.30]
    assert signed_rank_p(a, b) == pytest.approx(10 / 32)
    # a tie at one seed is dropped, tied |differences| share their rank: gains 1, 1, -2 -> ranks 1.5, 1.5, 3
    assert signed_rank_p([0, 0, 5, 7], [1, 1, 3, 7]) == pytest.approx(5 / 8)  # W+ = 3: 5 of the 8 subsets
    assert signed_rank_p([1.0], [1.0]) == 1.0
    with pytest.raises(ValueError, match="paired"):
        signed_rank_p([1, 2], [1])


def _listed_mann_whitney_p(a: list[float], b: list[float], lower: bool) -> float:
    """The definition, listed: every split of the pooled values, U counted pair by pair."""
    from itertools import combinations

    pooled, observed = [*a, *b], mann_whitney_u(a, b, lower)
    splits = list(combinations(range(len(pooled)), len(a)))
    return sum(mann_whitney_u([pooled[i] for i in chosen], [pooled[i] for i in range(len(pooled)) if i not in chosen],
                              lower) >= observed - 1e-9 for chosen in splits) / len(splits)


def _listed_signed_rank_p(a: list[float], b: list[float], lower: bool) -> float:
    """The definition, listed: every sign flip of the paired differences (ranks by brute force)."""
    sign = 1.0 if lower else -1.0
    gains = [sign * (y - x) for x, y in zip(a, b, strict=True) if x != y]
    size = [abs(g) for g in gains]
    ranks = [sum(v < x for v in size) + (sum(v == x for v in size) + 1) / 2 for x in size]
    observed = sum(r for r, g in zip(ranks, gains, strict=True) if g > 0)
    flips = range(2 ** len(ranks))
    return sum(sum(r for i, r in enumerate(ranks) if f >> i & 1) >= observed - 1e-9 for f in flips) / 2 ** len(ranks)


def test_counted_tests_equal_the_listed_definitions_with_ties() -> None:
    """The exact tests count splits and sign flips by rank sum; on small random samples with
    ties (values on a coarse grid) they equal the listing of every split and flip."""
    import random

    rng = random.Random(0)
    for _ in range(40):
        n_a, n_b = rng.randint(1, 6), rng.randint(1, 6)
        a = [rng.randint(0, 6) / 2 for _ in range(n_a)]
        b = [rng.randint(0, 6) / 2 for _ in range(n_b)]
        for lower in (True, False):
            assert mann_whitney_p(a, b, lower) == pytest.approx(_listed_mann_whitney_p(a, b, lower)), (a, b, lower)
            paired = b[:n_a] + [rng.randint(0, 6) / 2 for _ in range(n_a - len(b[:n_a]))]
            assert signed_rank_p(a, paired, lower) == pytest.approx(_listed_signed_rank_p(a, paired, lower))


def test_exact_tests_run_at_twenty_seeds_and_more() -> None:
    """17 against 17 seeds (C(34, 17) = 2.3e9 splits, too many to list) and 25 paired seeds
    (2**25 flips) are counted exactly: a complete separation gives the smallest p."""
    a, b = [float(i) for i in range(17)], [float(i) + 100 for i in range(17)]
    assert mann_whitney_p(a, b) == pytest.approx(1 / comb(34, 17))
    assert signed_rank_p([float(i) for i in range(25)], [float(i) + 1 for i in range(25)]) == pytest.approx(2.0 ** -25)


def test_comparisons_pair_the_common_seeds() -> None:
    rows = FP_ROWS + _rows("tfmq", {0: 0.10, 1: 0.30, 2: 0.20, 7: 0.01}) + _rows("qdiffusion", {0: 0.2, 1: 0.4, 2: 0.25})
    by_pair = {(c.method_a, c.method_b): c for c in compare_methods(rows, "fvd_fp")}
    tfmq = by_pair["tfmq", "qdiffusion"]
    assert (tfmq.seeds_a, tfmq.seeds_b, tfmq.paired_seeds) == (4, 3, 3)  # seed 7 has no partner
    assert tfmq.paired_wins == 1.0 and tfmq.paired_p == pytest.approx(1 / 8)
    assert tfmq.wins == pytest.approx(9.5 / 12)  # unpaired: 0.30 loses to 0.2 and 0.25, 0.20 ties 0.2
    alone = compare_methods(FP_ROWS + _rows("tfmq", {0: 0.1}) + _rows("rtn", {1: 0.5}), "fvd_fp")
    assert {(c.paired_seeds, c.paired_wins, c.paired_p) for c in alone} == {(0, None, None)}


def test_runs_merge_once_and_comparisons_name_the_better_method() -> None:
    first = {"rows": FP_ROWS + _rows("tfmq", {0: 0.10, 1: 0.05})}
    second = {"rows": FP_ROWS + _rows("qdiffusion", {0: 0.2, 1: 0.15, 2: 0.12}) + _rows("tfmq", {2: 0.08})}
    rows = merge_runs([("a.json", first), ("b.json", second)])
    assert len(rows) == 2 + 3 + 3  # the FP rows once
    by_pair = {(c.metric, c.method_a, c.method_b): c for m in ("fvd_fp", "psnr_fp") for c in compare_methods(rows, m)}
    assert by_pair["fvd_fp", "tfmq", "qdiffusion"].wins == 1.0
    assert by_pair["fvd_fp", "qdiffusion", "tfmq"].wins == 0.0
    assert by_pair["psnr_fp", "tfmq", "qdiffusion"].p_value == pytest.approx(1 / 20)  # higher is better
    table = seeds_table(rows, ["fvd_fp"])
    assert "| tfmq | 4 | 8 | 8 | 0,1,2 | 0.1 / 0.05 / 0.08 (0.07667 ± 0.025) |" in table


def test_runs_scored_against_other_fp_videos_are_refused() -> None:
    rescored = [dict(FP_ROWS[0], fvd=5.0 + 4e-7, fvd_fp=5e-9), FP_ROWS[1]]  # same videos, another process
    assert len(merge_runs([("a.json", {"rows": FP_ROWS}), ("b.json", {"rows": rescored})])) == 2
    other_fp = [dict(FP_ROWS[0], fvd=5.5), FP_ROWS[1]]
    with pytest.raises(ConfigError, match="not scored against the same FP videos"):
        merge_runs([("a.json", {"rows": FP_ROWS}), ("b.json", {"rows": other_fp})])
    rerun = _rows("qdiffusion", {3: 0.107})
    with pytest.raises(ConfigError, match="same method and calibration seed gave other videos"):
        merge_runs([("a.json", {"rows": FP_ROWS + rerun}), ("b.json", {"rows": FP_ROWS + _rows("qdiffusion", {3: 0.159})})])
    with pytest.raises(ConfigError, match="not a `bench quality` record"):
        merge_runs([("c.json", [1, 2])])


def test_runs_of_different_devices_are_refused() -> None:
    on_gpu = [dict(row, device="cuda") for row in FP_ROWS + _rows("tfmq", {5: 0.1})]
    assert len(merge_runs([("g.json", {"rows": on_gpu}), ("h.json", {"rows": on_gpu})])) == 3
    # older records carry no device: they were all measured on CPU
    with pytest.raises(ConfigError, match="a.json was measured on cpu and g.json on cuda"):
        merge_runs([("a.json", {"rows": FP_ROWS}), ("g.json", {"rows": on_gpu})])


def test_bench_seeds_command_writes_tables_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"rows": FP_ROWS + _rows("tfmq", {0: 0.1, 1: 0.05})}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": FP_ROWS + _rows("rtn", {0: 1.0, 1: 1.4})}))
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["bench", "seeds", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out),
                 "--plot", str(plot), "--metrics", "fvd_fp", "psnr_fp"]) == 0
    printed = capsys.readouterr().out
    assert "| fvd_fp | 4 | 8 | 8 | tfmq | rtn | 2, 2 | 1.00 | 0.167 | 2 | 1.00 | 0.250 |" in printed
    record = json.loads(out.read_text())
    assert {c["method_a"] for c in record["comparisons"]} == {"tfmq", "rtn"} and len(record["rows"]) == 6
    assert plot.stat().st_size > 10_000


def test_bench_seeds_bad_input_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"rows": FP_ROWS + _rows("tfmq", {0: 0.1})}))
    out = tmp_path / "s.json"
    assert main(["bench", "seeds", str(tmp_path / "missing.json"), "--json", str(out)]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    assert main(["bench", "seeds", str(tmp_path / "a.json"), "--metrics", "ssim"]) == 2
    assert "unknown metrics ['ssim']" in capsys.readouterr().err
    assert main(["bench", "seeds", str(tmp_path / "a.json"), "--methods", "gptq"]) == 2
    assert "no rows of ['gptq']" in capsys.readouterr().err
    assert not out.exists()


def test_tags_compare_one_method_across_recipes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run_g64.json").write_text(json.dumps({"rows": FP_ROWS + _rows("tfmq", {0: 0.2, 1: 0.3, 2: 0.25})}))
    (tmp_path / "run_g64i.json").write_text(json.dumps({"rows": FP_ROWS + _rows("tfmq", {0: 0.1, 1: 0.2, 2: 0.15})}))
    out = tmp_path / "s.json"
    runs = [str(tmp_path / "run_g64.json"), str(tmp_path / "run_g64i.json")]
    assert main(["bench", "seeds", *runs, "--tag", "*g64i.json=int", "*g64.json=float", "--methods", "tfmq",
                 "--metrics", "fvd_fp", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert sorted({row["method"] for row in record["rows"]}) == ["fp", "fp-reseed", "tfmq@float", "tfmq@int"]
    by_pair = {(c["method_a"], c["method_b"]): c for c in record["comparisons"]}
    assert by_pair["tfmq@int", "tfmq@float"]["paired_wins"] == 1.0
    assert by_pair["tfmq@int", "tfmq@float"]["paired_p"] == pytest.approx(1 / 8)
    # without tags the same method and seeds from two runs disagree: refused, not silently merged
    assert main(["bench", "seeds", *runs]) == 2
    assert "same method and calibration seed gave other videos" in capsys.readouterr().err
    assert main(["bench", "seeds", *runs, "--tag", "nolabel"]) == 2
    assert "use PATTERN=LABEL" in capsys.readouterr().err
