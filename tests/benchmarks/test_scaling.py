"""Tests of the scaling summary: time per 1k rows, growth against the size before, and the flags."""

from __future__ import annotations

import pytest

from benchmarks.scaling import END_TO_END, growth_flag, scaling_summary, size_label, split_cost


def test_growth_flags_mark_time_per_row_changing_by_more_than_one_and_a_half():
    assert growth_flag((1000, 2.0), (2000, 4.0)) is None  # linear
    assert growth_flag((1000, 2.0), (2000, 5.9)) is None  # x1.48 per row: near enough
    assert growth_flag((1000, 2.0), (2000, 6.2)) == "superlinear"
    assert growth_flag((1000, 2.0), (4000, 4.0)) == "sublinear"  # a fixed cost dominates
    assert growth_flag((1000, 0.1), (4000, 0.45)) is None  # both under half a second: noise


def test_summary_gives_each_stage_and_end_to_end_per_size():
    runs = [
        {"rows": 5000, "stages": [{"stage": "ingest", "seconds": 1.0}, {"stage": "train", "seconds": 10.0}]},
        {"rows": 10000, "stages": [{"stage": "ingest", "seconds": 1.2}, {"stage": "train", "seconds": 20.0}]},
        {"rows": 40000, "stages": [{"stage": "ingest", "seconds": 4.0}, {"stage": "train", "seconds": 160.0}]},
    ]
    summary = scaling_summary(runs)
    assert summary["sizes"] == [5000, 10000, 40000] and list(summary["stages"]) == ["ingest", "train", END_TO_END]
    train = summary["stages"]["train"]
    assert [c["seconds_per_1k"] for c in train] == pytest.approx([2.0, 2.0, 4.0])
    assert train[0]["growth"] is None and train[1]["growth"] == pytest.approx(2.0) and train[1]["flag"] is None
    assert train[2]["rows_growth"] == 4 and train[2]["per_row_change"] == pytest.approx(2.0)
    assert summary["stages"]["ingest"][1]["flag"] == "sublinear"
    assert summary["stages"][END_TO_END][2]["seconds"] == pytest.approx(164.0)
    assert [flag[:4] for flag in summary["flags"]] == [
        ["ingest", 5000, 10000, "sublinear"], ["train", 10000, 40000, "superlinear"],
        [END_TO_END, 10000, 40000, "superlinear"],
    ]


def test_flags_carry_the_line_through_both_sizes():
    assert split_cost((1000, 2.0), (4000, 5.0)) == pytest.approx((1.0, 1.0))  # 1 s fixed: sublinear
    assert split_cost((1000, 2.0), (2000, 6.2)) == pytest.approx((-2.2, 4.2))  # negative: superlinear
    runs = [{"rows": 1000, "stages": [{"stage": "serve", "seconds": 5.0}]},
            {"rows": 4000, "stages": [{"stage": "serve", "seconds": 6.5}]}]
    (flag,) = [f for f in scaling_summary(runs)["flags"] if f[0] == "serve"]
    assert flag[3] == "sublinear" and flag[5:] == pytest.approx([4.5, 0.5])


def test_size_labels():
    assert [size_label(n) for n in (300, 2000, 2500, 25000, 100000, 2_000_000)] == ["300", "2k", "2.5k", "25k", "100k", "2M"]
