"""The statistics behind docs/results.md's intervals and verdicts (bench/compare.py), on numbers worked by hand."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("compare", Path(__file__).resolve().parents[1] / "bench" / "compare.py")
compare = sys.modules["compare"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(compare)


def test_mean_ci_is_the_student_t_interval_over_seeds():
    m, lo, hi = compare.mean_ci([0.60, 0.65, 0.70])
    half = 4.303 * 0.05 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert (m, lo, hi) == pytest.approx((0.65, 0.65 - half, 0.65 + half))
    assert math.isnan(compare.mean_ci([0.5])[1])


def test_paired_bootstrap_is_deterministic_and_inside_the_observed_range():
    diffs = [-0.046, -0.008, 0.012, -0.032, 0.020]
    m, lo, hi = compare.paired_bootstrap(diffs)
    assert m == pytest.approx(-0.0108)
    assert min(diffs) <= lo < m < hi <= max(diffs)
    assert compare.paired_bootstrap(diffs) == (m, lo, hi)  # fixed resampling seed: the report is reproducible
    # all differences of one sign: the interval excludes 0
    assert compare.paired_bootstrap([0.01, 0.02, 0.03])[1] > 0


@pytest.mark.parametrize(("diffs", "expected"), [([0.01, 0.02, 0.03, 0.02], "established"),
                                                 ([-0.01, -0.02, -0.03, -0.02], "contradicted"),
                                                 ([-0.01, 0.02, 0.03, 0.0], "not established")])
def test_verdict_follows_the_interval(diffs, expected):
    assert compare.verdict(diffs) == expected


def test_verdict_takes_the_wider_interval_and_needs_three_seeds():
    # the bootstrap of [0.01, 0.01, 0.05] stays above 0, the t interval (2 df) does not: no verdict either way
    assert compare.paired_bootstrap([0.01, 0.01, 0.05])[1] > 0 > compare.mean_ci([0.01, 0.01, 0.05])[1]
    assert compare.verdict([0.01, 0.01, 0.05]) == "not established"
    # two seeds of one sign make a bootstrap "interval" of [min, max]; that is no evidence
    assert compare.verdict([0.03, 0.05]) == "not established (2 seeds: too few for an interval)"
