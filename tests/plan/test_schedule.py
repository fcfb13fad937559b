"""All-to-all schedules: optimality against the bound, and the validator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shunter.network.bounds import matching_lower_bound_s, port_lower_bound_s
from shunter.network.cost import FREE_ROUNDS, RoundCost, round_times_s
from shunter.plan.decompose import decompose_into_matchings
from shunter.plan.schedule import (
    DEFAULT_MAX_LANES,
    Schedule,
    choose_lanes,
    merge_rounds,
    merge_rounds_with_startup,
    merge_short_rounds,
    schedule_all_to_all,
    schedule_cost_s,
    schedule_violations,
    schedule_with_round_cost,
)
from tests.traffic_matrices import GBIT_S, traffic_matrices


@settings(max_examples=120, deadline=None)
@given(traffic_matrices())
def test_homogeneous_optimal_makespan_equals_the_bound_and_is_valid(traffic: np.ndarray) -> None:
    """Oracle: Aurora Thm 4.2, makespan == max_i max(row_i, col_i) / B (relative 1e-9); the
    validator accepts the schedule and every round is a matching."""
    bandwidth = 100 * GBIT_S
    schedule = schedule_all_to_all(traffic, bandwidth)
    bound = port_lower_bound_s(traffic, bandwidth)
    assert schedule.makespan_s == pytest.approx(bound, rel=1e-9, abs=1e-300)
    assert schedule_violations(schedule, traffic, bandwidth, require_matching=True) == []


@settings(max_examples=80, deadline=None)
@given(traffic_matrices(max_n=12), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_merging_short_rounds_keeps_the_schedule_valid_and_never_slower(
    traffic: np.ndarray, seed: int, share: float
) -> None:
    """Oracle: the validator (every byte delivered, no port over its bandwidth) and the original
    makespan, which the merged one may not exceed; the merged round is the brute-force port bound
    of the transfers it took, and no other round changed."""
    n = traffic.shape[0]
    rng = np.random.default_rng(seed)
    bandwidth = rng.uniform(10, 100, n) * GBIT_S if rng.random() < 0.5 else np.full(n, 50 * GBIT_S)
    schedule = schedule_all_to_all(traffic, bandwidth)
    merged = merge_short_rounds(schedule, bandwidth, share)
    assert schedule_violations(merged, traffic, bandwidth) == []
    assert merged.makespan_s <= schedule.makespan_s * (1 + 1e-9)
    before, after = schedule.round_durations_s(), merged.round_durations_s()
    folded = schedule.num_rounds - merged.num_rounds + 1 if merged.num_rounds < schedule.num_rounds else 0
    assert before[np.argsort(before)][:folded].sum() <= share * before.sum() * (1 + 1e-9)
    if folded:
        kept = np.sort(before)[folded:]
        assert np.sort(after[:-1]) == pytest.approx(kept, rel=1e-12)
        last = merged.round_of == merged.num_rounds - 1
        port_load = np.zeros((2, n))
        for src, dst, amount in zip(merged.src[last], merged.dst[last], merged.bytes[last], strict=True):
            port_load[0, src] += amount
            port_load[1, dst] += amount
        assert after[-1] == pytest.approx((port_load / bandwidth).max(), rel=1e-9)


def test_merging_short_rounds_folds_slivers_into_one_round() -> None:
    """Closed form: rounds of 10, 1 and 1 s on equal ports, the two 1 s rounds on disjoint ports,
    fold into one round of 1 s; with max_share 0 nothing changes."""
    schedule = Schedule(
        round_of=np.array([0, 0, 1, 2]),
        src=np.array([0, 1, 0, 2]),
        dst=np.array([1, 0, 1, 3]),
        bytes=np.array([10.0, 10.0, 1.0, 1.0]),
        rate_bytes_s=np.ones(4),
        num_rounds=3,
        num_devices=4,
        strategy="matchings",
    )
    merged = merge_short_rounds(schedule, 1.0, max_share=0.2)
    assert merged.num_rounds == 2
    assert merged.round_durations_s().tolist() == [10.0, 1.0]
    assert merge_short_rounds(schedule, 1.0, max_share=0.0) is schedule


@settings(max_examples=60, deadline=None)
@given(traffic_matrices(max_n=16), st.integers(0, 2**32 - 1))
def test_heterogeneous_schedule_is_valid_and_between_the_bounds(traffic: np.ndarray, seed: int) -> None:
    """Oracle: port bound <= makespan == the lanes' predicted makespan <= the one-flow-per-port
    bound (lanes never do worse than plain matchings); the validator accepts it."""
    n = traffic.shape[0]
    bandwidth = np.random.default_rng(seed).uniform(10, 100, n) * GBIT_S
    schedule = schedule_all_to_all(traffic, bandwidth)
    assert schedule_violations(schedule, traffic, bandwidth) == []
    makespan = schedule.makespan_s
    assert makespan >= port_lower_bound_s(traffic, bandwidth) * (1 - 1e-9)
    assert makespan == pytest.approx(choose_lanes(traffic, bandwidth).predicted_makespan_s(traffic), rel=1e-9)
    assert makespan <= matching_lower_bound_s(traffic, bandwidth) * (1 + 1e-9)


def test_lanes_reach_the_port_bound_on_aurora_port_types() -> None:
    """Oracle: with 100/80/50/40 Gbit/s ports (10 Gbit/s lanes) the lane schedule reaches
    max_i max(row_i, col_i) / B_i exactly, although fast ports carry the most traffic."""
    rng = np.random.default_rng(3)
    bandwidth = np.repeat([100.0, 80.0, 50.0, 40.0], 3) * GBIT_S
    traffic = rng.integers(1, 10**6, (12, 12)) * np.outer(bandwidth, bandwidth) / bandwidth.max() ** 2
    schedule = schedule_all_to_all(traffic, bandwidth)
    assert schedule.makespan_s == pytest.approx(port_lower_bound_s(traffic, bandwidth), rel=1e-9)
    assert schedule_violations(schedule, traffic, bandwidth) == []
    assert matching_lower_bound_s(traffic, bandwidth) > 1.2 * port_lower_bound_s(traffic, bandwidth)


def test_aurora_worked_example_takes_two_units() -> None:
    """Oracle: Aurora's example, GPU1 -> {2, 3} and GPU2 -> {1, 3} in unit flows, takes 2 units
    (= b_max), where the naive orders take 3."""
    traffic = np.array([[0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=np.float64)
    schedule = schedule_all_to_all(traffic, 1.0)
    assert schedule.makespan_s == pytest.approx(2.0)
    assert schedule.num_rounds == 2


def test_decomposition_of_an_integer_matrix_needs_at_most_its_largest_line_sum_rounds() -> None:
    """Oracle: every BvN round moves at least one unit from every line of the padded matrix."""
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 3, (40, 40)).astype(np.float64)
    np.fill_diagonal(matrix, 0)
    rounds = decompose_into_matchings(matrix)
    assert rounds.num_rounds <= max(matrix.sum(axis=0).max(), matrix.sum(axis=1).max())


def test_empty_traffic_gives_an_empty_schedule() -> None:
    """Oracle: nothing to send (diagonal only), nothing to do."""
    schedule = schedule_all_to_all(np.diag([5.0, 7.0, 9.0]), 1.0)
    assert schedule.num_rounds == 0 and schedule.makespan_s == 0.0
    assert schedule_violations(schedule, np.diag([5.0, 7.0, 9.0]), 1.0) == []


def test_validator_reports_missing_bytes_an_overloaded_port_and_a_non_matching_round() -> None:
    """Oracle: each broken schedule names its fault."""
    traffic = np.array([[0, 4, 4], [0, 0, 0], [0, 0, 0]], dtype=np.float64)

    def make(
        round_of: list[int], src: list[int], dst: list[int], moved: list[float], rate: list[float]
    ) -> Schedule:
        return Schedule(
            np.array(round_of),
            np.array(src),
            np.array(dst),
            np.array(moved, dtype=float),
            np.array(rate, dtype=float),
            max(round_of) + 1,
            3,
            "hand-made",
        )

    short = make([0, 1], [0, 0], [1, 2], [4, 3], [1, 1])
    assert any("delivered" in p for p in schedule_violations(short, traffic, 1.0))
    too_fast = make([0, 0], [0, 0], [1, 2], [4, 4], [1, 1])  # both at full rate in one round
    assert any("over its" in p for p in schedule_violations(too_fast, traffic, 1.0))
    halves = make([0, 0], [0, 0], [1, 2], [4, 4], [0.5, 0.5])
    assert schedule_violations(halves, traffic, 1.0) == []
    assert any("matching" in p for p in schedule_violations(halves, traffic, 1.0, require_matching=True))


# ---------------------------------------------------------------------------------------------
# schedules under a per-round cost


def _two_round_schedule(second_dst: int) -> Schedule:
    """Round 0: 0 -> 1, 10 s; round 1: 0 -> second_dst, 1 s; three devices at 1 B/s."""
    return Schedule(
        round_of=np.array([0, 1]),
        src=np.array([0, 0]),
        dst=np.array([1, second_dst]),
        bytes=np.array([10.0, 1.0]),
        rate_bytes_s=np.ones(2),
        num_rounds=2,
        num_devices=3,
        strategy="matchings",
    )


def test_a_round_costs_its_startup_and_its_crowded_port_in_closed_form() -> None:
    """Closed form: a round crossing one port side with 2 flows of 3 devices runs at the crowded
    efficiency (port_efficiency_by_flows at n - 1 = 2 flows) and every busy round pays the startup."""
    schedule = Schedule(
        round_of=np.array([0, 1, 1]),
        src=np.array([0, 0, 0]),
        dst=np.array([1, 1, 2]),
        bytes=np.array([4.0, 3.0, 3.0]),
        rate_bytes_s=np.array([1.0, 0.5, 0.5]),
        num_rounds=2,
        num_devices=3,
        strategy="lanes",
    )
    times = round_times_s(schedule, RoundCost(startup_s=0.5, crowded_port_efficiency=0.6))
    assert times.tolist() == pytest.approx([4.0 + 0.5, 6.0 / 0.6 + 0.5])
    assert round_times_s(schedule, FREE_ROUNDS).sum() == pytest.approx(schedule.makespan_s)


def test_rounds_merge_while_the_startup_saved_exceeds_what_the_crowded_port_loses() -> None:
    """Closed form: 10 s and 1 s rounds from device 0. On disjoint receivers the merged round
    still has one flow per receiver but two from device 0: T = 11 s / 0.6 + startup, against
    11 s + 2 startups; merged iff 11 / 0.6 - 11 < startup (7.33 s). Rounds on the same pair merge
    at any startup: the merged round is still a matching of 11 s."""
    crowded = _two_round_schedule(second_dst=2)
    assert merge_rounds_with_startup(crowded, 1.0, RoundCost(7.0, 0.6)).num_rounds == 2
    merged = merge_rounds_with_startup(crowded, 1.0, RoundCost(8.0, 0.6))
    assert merged.num_rounds == 1 and merged.makespan_s == pytest.approx(11.0)
    same_pair = _two_round_schedule(second_dst=1)
    assert merge_rounds_with_startup(same_pair, 1.0, RoundCost(1e-3, 0.6)).num_rounds == 1
    assert merge_rounds_with_startup(same_pair, 1.0, RoundCost(0.0, 0.6)).num_rounds == 2  # a tie


@settings(max_examples=40, deadline=None)
@given(
    traffic_matrices(min_n=2, max_n=5),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 1e-3, 0.05, 1.0]),
    st.sampled_from([0.3, 0.6, 1.0]),
)
def test_merging_with_a_startup_finds_the_cheapest_set_of_rounds_by_brute_force(
    traffic: np.ndarray, seed: int, startup_fraction: float, crowded: float
) -> None:
    """Oracle: brute force over every set of rounds folded into one (merge_rounds, then the cost of
    the schedule it builds); the chosen schedule costs the least of them and the validator accepts
    it (every byte delivered, no port over its bandwidth)."""
    n = traffic.shape[0]
    rng = np.random.default_rng(seed)
    bandwidth = rng.uniform(10, 100, n) * GBIT_S if rng.random() < 0.5 else np.full(n, 50 * GBIT_S)
    schedule = schedule_all_to_all(traffic, bandwidth, max_lanes_per_device=1)
    assume(2 <= schedule.num_rounds <= 10)
    cost = RoundCost(startup_fraction * schedule.makespan_s / schedule.num_rounds, crowded)
    chosen = merge_rounds_with_startup(schedule, bandwidth, cost)
    assert schedule_violations(chosen, traffic, bandwidth) == []
    brute = min(
        schedule_cost_s(
            merge_rounds(schedule, bandwidth, np.isin(np.arange(schedule.num_rounds), subset)), cost
        )
        for size in range(0, schedule.num_rounds + 1)
        for subset in itertools.combinations(range(schedule.num_rounds), size)
    )
    assert schedule_cost_s(chosen, cost) == pytest.approx(brute, rel=1e-9)
    assert schedule_cost_s(chosen, cost) <= schedule_cost_s(schedule, cost) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(traffic_matrices(min_n=2, max_n=8), st.integers(0, 2**32 - 1))
def test_free_rounds_fold_into_one_round_at_the_port_bound(traffic: np.ndarray, seed: int) -> None:
    """Oracle: Aurora's port bound max_i max(row_i, col_i) / B_i. With no startup and ports that
    lose nothing to sharing, the cheapest schedule is every transfer at once, which takes the bound;
    the validator accepts it."""
    n = traffic.shape[0]
    bandwidth = np.random.default_rng(seed).uniform(10, 100, n) * GBIT_S
    schedule = schedule_with_round_cost(traffic, bandwidth, FREE_ROUNDS)
    assert schedule_violations(schedule, traffic, bandwidth) == []
    assert schedule.makespan_s == pytest.approx(port_lower_bound_s(traffic, bandwidth), rel=1e-9, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(traffic_matrices(min_n=2, max_n=8), st.integers(0, 2**32 - 1))
def test_the_round_cost_schedule_is_valid_and_no_dearer_than_either_candidate(
    traffic: np.ndarray, seed: int
) -> None:
    """Oracle: the validator, and the cost of the lane schedule and of plain matchings as built by
    schedule_all_to_all: the chosen one costs at most the cheaper of the two."""
    n = traffic.shape[0]
    bandwidth = np.random.default_rng(seed).uniform(10, 100, n) * GBIT_S
    cost = RoundCost()
    chosen = schedule_with_round_cost(traffic, bandwidth, cost)
    assert schedule_violations(chosen, traffic, bandwidth) == []
    candidates = [schedule_all_to_all(traffic, bandwidth, lanes) for lanes in (1, DEFAULT_MAX_LANES)]
    assert schedule_cost_s(chosen, cost) <= min(schedule_cost_s(c, cost) for c in candidates) * (1 + 1e-9)


def test_a_crowded_port_costs_more_than_a_second_round_only_below_its_break_even() -> None:
    """Closed form: ports 2, 1, 1 B/s; device 0 sends 1 B to each of 1 and 2. Both at once (the
    lanes' one round, or the two matchings merged) take 1 s with two flows on device 0's port:
    1 / e + 0.005 s; one at a time, two rounds of 1 s: 2.01 s. At e = 0.6 (1.672 s) one round;
    at e = 0.4 (2.505 s) two."""
    traffic = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    bandwidth = np.array([2.0, 1.0, 1.0])
    at_once = schedule_with_round_cost(traffic, bandwidth, RoundCost(0.005, 0.6))
    assert at_once.num_rounds == 1 and at_once.makespan_s == pytest.approx(1.0)
    matchings = schedule_with_round_cost(traffic, bandwidth, RoundCost(0.005, 0.4))
    assert matchings.num_rounds == 2 and matchings.makespan_s == pytest.approx(2.0)
