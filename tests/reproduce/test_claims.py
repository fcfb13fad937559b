"""The rules a paper's claim is judged by, at their edges (oracle: the rule as stated in words)."""

from __future__ import annotations

import pytest

from shunter.reproduce.claims import (
    Claim,
    Figure,
    GainWithinFactor,
    RangesOverlap,
    WithinFactor,
    WithinPoints,
    WithinRelative,
)


def one(value: float | None) -> Figure:
    return Figure.value(value, "")


@pytest.mark.parametrize(("ours", "holds"), [(1.25, True), (0.75, True), (1.26, False), (0.74, False)])
def test_within_25_percent_holds_up_to_a_quarter_either_way(ours: float, holds: bool) -> None:
    assert WithinRelative(0.25).holds(one(ours), one(1.0)) is holds
    assert str(WithinRelative(0.25)) == "within 25%"


def test_an_up_to_figure_is_judged_by_its_top() -> None:
    """Aurora's 'up to 1.38x' against our range: the tops are compared, not the bottoms."""
    paper = Figure("up to 1.38x", 1.0, 1.38)
    assert WithinRelative(0.25).holds(Figure("", 0.2, 1.4), paper)
    assert not WithinRelative(0.25).holds(Figure("", 1.0, 1.0), paper)


@pytest.mark.parametrize(("ours", "holds"), [(0.5, True), (2.0, True), (0.49, False), (2.01, False)])
def test_within_2x_holds_from_half_to_double(ours: float, holds: bool) -> None:
    assert WithinFactor(2).holds(one(ours), one(1.0)) is holds
    assert str(WithinFactor(2)) == "within 2x"


def test_a_missing_figure_never_reproduces() -> None:
    """Klotski's planner row: no bubble-free n is 'none', not a number within 2x of 10."""
    rules = (WithinRelative(0.25), WithinPoints(15), WithinFactor(2), GainWithinFactor(2), RangesOverlap())
    for rule in rules:
        assert not rule.holds(one(None), one(10.0))


def test_a_gain_is_judged_by_the_speedup_less_one() -> None:
    """1.12x against 1.20x is 60% of the gain (holds at factor 2); 1.04x is a fifth of it (fails),
    though 1.04 is within 2x of 1.20."""
    assert GainWithinFactor(2).holds(one(1.12), one(1.20))
    assert not GainWithinFactor(2).holds(one(1.04), one(1.20))
    assert WithinFactor(2).holds(one(1.04), one(1.20))


@pytest.mark.parametrize(
    ("ours", "holds"), [((1.0, 1.36), True), ((1.81, 2.0), True), ((1.0, 1.35), False), ((1.5, 1.5), True)]
)
def test_ranges_overlap_when_they_share_a_point(ours: tuple[float, float], holds: bool) -> None:
    assert RangesOverlap().holds(Figure("", *ours), Figure("", 1.36, 1.81)) is holds


def test_within_points_compares_percentages_by_difference() -> None:
    assert WithinPoints(15).holds(one(38.0), one(23.0))
    assert not WithinPoints(15).holds(one(39.0), one(23.0))
    assert str(WithinPoints(15)) == "within 15 points"


def test_a_row_reproduces_exactly_when_its_claims_rule_holds() -> None:
    claim = Claim("speedup", Figure.value(1.45, "1.45x"), WithinRelative(0.25))
    assert claim.beside(one(1.5), "why").reproduced
    row = claim.beside(Figure.value(2.0, "2.00x"), "why", {"seed": 0})
    assert not row.reproduced
    assert row.to_dict() == {
        "label": "speedup",
        "ours": "2.00x",
        "paper": "1.45x",
        "reproduced": False,
        "why": "why",
        "unit": "x",
        "ours_low": 2.0,
        "ours_high": 2.0,
        "paper_low": 1.45,
        "paper_high": 1.45,
        "inputs": {"seed": 0},
    }
