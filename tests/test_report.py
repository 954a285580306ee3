"""The report's statistics (gen_ssd_ray.pipeline.report): Wilson intervals and the exact paired McNemar test,
checked against values computed independently; and the paired comparison read from prediction files."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from gen_ssd_ray.pipeline.report import _ci95, mcnemar_exact_p, paired_comparisons


def test_wilson_interval_known_values():
    # Wilson score interval for 10/100 at 95%: 0.0552-0.1744 (standard tables)
    assert _ci95(0.1, 100) == pytest.approx([0.055, 0.174], abs=1e-3)
    low, high = _ci95(0.0, 50)
    assert low == 0.0 and 0.05 < high < 0.08  # never below 0, and not degenerate at p = 0
    assert _ci95(None, 10) is None and _ci95(0.5, 0) is None


def test_mcnemar_exact_matches_binomial_tail():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    # 10 discordant, all one way: 2 * 0.5**10
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    # symmetric in its arguments, and equal to the two-sided binomial tail
    tail = sum(math.comb(110, i) for i in range(42)) / 2**110
    assert mcnemar_exact_p(69, 41) == pytest.approx(2 * tail) == pytest.approx(mcnemar_exact_p(41, 69))


def test_paired_comparisons_from_prediction_files(tmp_path):
    solved = {
        "cold_start": [1, 0, 0, 0, 1, 0],
        "gen_ssd": [1, 1, 1, 0, 1, 0],
        "standard_kd": [1, 1, 0, 0, 0, 1],
    }
    for name, ok in solved.items():
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        pd.DataFrame(
            {"problem_id": [f"p{i}" for i in range(6)], "correct": [bool(v) for v in ok]}
        ).to_parquet(folder / "predictions.parquet")
    rows = paired_comparisons(
        tmp_path, ["gen_ssd", "standard_kd"], ["teacher", "cold_start", "gen_ssd", "standard_kd"]
    )
    by_other = {r["other"]: r for r in rows}
    assert set(by_other) == {"cold_start", "standard_kd"}
    assert (by_other["cold_start"]["method_only"], by_other["cold_start"]["other_only"]) == (2, 0)
    assert (by_other["standard_kd"]["method_only"], by_other["standard_kd"]["other_only"]) == (2, 1)
    assert by_other["standard_kd"]["p_value"] == 1.0 and by_other["cold_start"]["problems"] == 6
