"""Reporting tests: small versions of the measurements in docs/planner.md (full ones:
python -m shunter.reproduce.planner_figures ...)."""

from __future__ import annotations

import pytest

from shunter.reproduce.planner_figures import heterogeneous_report, replication_report, timing_report


def test_heterogeneous_lane_schedules_are_valid_and_near_the_port_bound() -> None:
    """Report on 100 random cases (n <= 16; the 1000-case figure is in docs/planner.md). Oracle:
    the validator accepts every schedule and no schedule beats the port bound."""
    report = heterogeneous_report(cases=100, seed=1, max_devices=16)
    print(
        f"\nheterogeneous: worst {report.worst_ratio:.4f}, mean {report.mean_ratio:.4f}, "
        f"without lanes worst {report.worst_ratio_without_lanes:.4f}"
    )
    assert report.invalid_schedules == 0
    assert report.mean_ratio >= 1 - 1e-9
    assert report.worst_ratio_four_types == pytest.approx(1.0, rel=1e-9)
    assert report.worst_ratio <= report.worst_ratio_without_lanes * (1 + 1e-9)


def test_replication_report_on_a_zipf_trace() -> None:
    """Report: Lina and EPLB-style max/mean device load against one expert per device."""
    (row,) = replication_report(seed=0, skews=(1.2,), shapes=((16, 16, 2),), num_layers=4, num_tokens=4096)
    print(f"\nmax/mean load: none {row.none:.2f}, Lina {row.lina:.2f}, EPLB {row.eplb:.2f}")
    assert row.lina < row.none / 2 and row.eplb < row.none / 2


@pytest.mark.slow
def test_256_devices_and_experts_are_scheduled_at_the_port_bound() -> None:
    """Scale: one layer, 256 devices x 256 experts, top-8, 64 tokens per device. Oracle: the
    schedule meets the bound. (How long it takes is measured, not asserted: `python -m
    shunter.reproduce.planner_figures timing` prints it; docs/planner.md, "Scale".)"""
    report = timing_report(256, 256, baselines=False)
    print(f"\n256 x 256: {report.total_planned_and_scheduled_s:.2f} s, {report.rounds} rounds")
    assert report.makespan_over_bound == pytest.approx(1.0, rel=1e-9)
