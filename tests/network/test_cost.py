"""The time of traffic on the network against closed forms and the fluid timeline."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.network.calibration import LinkCalibration
from shunter.network.cost import (
    all_to_all_time_s,
    fair_share_time_s,
    flow_time_s,
    ring_allreduce_flows,
    ring_allreduce_time_s,
    schedule_time_s,
    sender_queue_time_s,
)
from shunter.network.fluid import simulate_baseline
from shunter.network.schedule import Schedule
from shunter.network.transport import Transport, UnplannedTransport
from shunter.plan.schedule import schedule_all_to_all
from shunter.sim.timeline import Collective, Compute, TimelineOptions, run_timeline


def one_flow(
    src: int, dst: int, num_bytes: float, name: str = "x", after: tuple[str, ...] = ()
) -> Collective:
    return Collective(name, np.array([src]), np.array([dst]), np.array([num_bytes]), after)


def test_one_flow_takes_latency_plus_bytes_over_bandwidth() -> None:
    """Oracle: t = latency + bytes / B (closed form and through the fluid timeline)."""
    assert flow_time_s(1e6, 1e9, 1e9, 5e-6) == pytest.approx(5e-6 + 1e-3)
    timeline = run_timeline([one_flow(0, 1, 1e6)], np.full(2, 1e9), TimelineOptions("fair_share", 5e-6))
    assert timeline.makespan_s == pytest.approx(5e-6 + 1e-3, rel=1e-12)


def test_one_flow_runs_at_the_slower_of_its_two_ports() -> None:
    """Oracle: bytes / min(B_src, B_dst)."""
    timeline = run_timeline([one_flow(0, 1, 100.0)], np.array([10.0, 4.0]), TimelineOptions())
    assert timeline.makespan_s == pytest.approx(25.0)
    assert flow_time_s(100.0, 10.0, 4.0, 0.0) == pytest.approx(25.0)


def test_two_equal_flows_into_one_port_take_twice_as_long_as_one() -> None:
    """Oracle: the receiver's port is shared, each flow gets B/2."""
    bandwidth = np.full(3, 10.0)
    alone = run_timeline([one_flow(0, 2, 100.0)], bandwidth, TimelineOptions()).makespan_s
    both = Collective("x", np.array([0, 1]), np.array([2, 2]), np.array([100.0, 100.0]))
    shared = run_timeline([both], bandwidth, TimelineOptions()).makespan_s
    assert shared == pytest.approx(2 * alone)


def test_flows_from_and_to_different_ports_do_not_slow_each_other() -> None:
    """Oracle: full-duplex ports and a non-blocking core: 0->1 and 1->0 and 2->3 all run at B."""
    flows = Collective("x", np.array([0, 1, 2]), np.array([1, 0, 3]), np.array([100.0, 100.0, 100.0]))
    assert run_timeline([flows], np.full(4, 10.0), TimelineOptions()).makespan_s == pytest.approx(10.0)


def test_a_flow_joining_later_shares_the_port_from_then_on() -> None:
    """Oracle: A (10 B) alone at 1 B/s for 5 s, then A and B share at 0.5 B/s: A ends at 15 s;
    B (10 B) moves 5 B by 15 s and the rest alone: ends at 20 s."""
    ops = [
        one_flow(0, 1, 10.0, "A"),
        Compute("wait", np.array([0.0, 0.0, 5.0])),
        one_flow(2, 1, 10.0, "B", after=("wait",)),
    ]
    timeline = run_timeline(ops, np.ones(3), TimelineOptions())
    assert timeline.collective_finish_s["A"] == pytest.approx(15.0)
    assert timeline.collective_finish_s["B"] == pytest.approx(20.0)


def test_a_matching_schedule_takes_the_sum_of_its_rounds_each_with_one_latency() -> None:
    """Oracle: rounds of 2 s and 3 s (longest transfer each) with 0.5 s latency: 2.5 + 3.5 = 6 s."""
    schedule = Schedule(
        round_of=np.array([0, 0, 1]),
        src=np.array([0, 1, 0]),
        dst=np.array([1, 0, 2]),
        bytes=np.array([20.0, 10.0, 30.0]),
        rate_bytes_s=np.array([10.0, 10.0, 10.0]),
        num_rounds=2,
        num_devices=3,
        strategy="test",
    )
    assert schedule.makespan_s == pytest.approx(5.0)
    assert schedule_time_s(schedule, 0.5) == pytest.approx(6.0)
    assert list(schedule.round_durations_s(0.5)) == pytest.approx([2.5, 3.5])


def test_fluid_network_all_to_all_equals_plan_fair_share_simulation() -> None:
    """Oracle: fluid.simulate_baseline(fair_share), the planner's fluid model, plus one latency."""
    traffic = np.random.default_rng(3).integers(0, 10**6, (7, 7)).astype(float)
    bandwidth = np.linspace(5e8, 2e9, 7)
    expected = simulate_baseline(traffic, bandwidth, "fair_share", record=False).makespan_s + 1e-5
    timeline = run_timeline(
        [Collective.from_traffic("a2a", traffic)], bandwidth, TimelineOptions("fair_share", 1e-5)
    )
    assert timeline.makespan_s == pytest.approx(expected, rel=1e-9)
    assert fair_share_time_s(traffic, bandwidth, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_ring_allreduce_alone_takes_its_closed_form() -> None:
    """Oracle: 2 (n-1)/n * S / B on equal ports (no latency)."""
    n, size, bandwidth = 8, 64e6, 12.5e9
    src, dst, nbytes = ring_allreduce_flows(size, n, channels=3)
    timeline = run_timeline([Collective("ar", src, dst, nbytes)], np.full(n, bandwidth), TimelineOptions())
    assert timeline.makespan_s == pytest.approx(ring_allreduce_time_s(size, bandwidth, n, 0.0), rel=1e-12)
    assert timeline.makespan_s == pytest.approx(2 * 7 / 8 * size / bandwidth)


def test_sender_queue_time_single_sender_closed_form():
    # One sender, two flows in sequence: latency + bytes / B each.
    traffic = np.array([[0, 100.0, 300.0], [0, 0, 0], [0, 0, 0]])
    expected = 2 * 0.5 + 400.0 / 10.0
    assert sender_queue_time_s(traffic, 10.0, "random_order", 0, 0.5) == pytest.approx(expected)
    assert simulate_baseline(traffic, 10.0, "random_order").makespan_s == pytest.approx(40.0)


@pytest.mark.parametrize("transport", ["fair_share", "random_order", "shortest_first"])
def test_an_unplanned_all_to_all_without_latency_takes_its_fluid_simulation_exactly(
    transport: UnplannedTransport,
) -> None:
    """Oracle: fluid.simulate_baseline's makespan, bit for bit (the planner's baselines are these)."""
    traffic = np.random.default_rng(5).integers(0, 10**6, (6, 6)).astype(float)
    bandwidth = np.array([1e9, 4e8, 1e9, 2.5e8, 1e9, 4e8])
    fluid = simulate_baseline(traffic, bandwidth, transport, seed=3, record=False).makespan_s
    assert all_to_all_time_s(traffic, bandwidth, transport, seed=3) == fluid


def test_a_planned_all_to_all_runs_its_schedule_and_needs_one() -> None:
    """Oracle: schedule_time_s of the schedule given; without a schedule there is nothing to run."""
    traffic = np.random.default_rng(6).integers(0, 1000, (5, 5)).astype(float)
    schedule = schedule_all_to_all(traffic, 10.0)
    assert all_to_all_time_s(traffic, 10.0, "planned", 0.5, schedule=schedule) == schedule_time_s(
        schedule, 0.5
    )
    with pytest.raises(ValueError, match="schedule"):
        all_to_all_time_s(traffic, 10.0, "planned", 0.5)


@pytest.mark.parametrize("transport", ["planned", "fair_share", "random_order"])
def test_an_ideal_calibration_predicts_what_the_ideal_network_does(transport: Transport) -> None:
    """Oracle: the uncalibrated time with the same latency (efficiencies 1, startups 0), to rounding."""
    traffic = np.random.default_rng(7).integers(0, 10**6, (5, 5)).astype(float)
    bandwidth = np.array([1e9, 4e8, 1e9, 2.5e8, 1e9])
    schedule = schedule_all_to_all(traffic, bandwidth)
    ideal = LinkCalibration(1.0, 1e-4, 1.0, 0.0, 1.0, 0.0, 1.0, [])
    calibrated = all_to_all_time_s(
        traffic, bandwidth, transport, seed=2, schedule=schedule, calibration=ideal
    )
    plain = all_to_all_time_s(traffic, bandwidth, transport, 1e-4, 2, schedule=schedule)
    assert calibrated == pytest.approx(plain, rel=1e-12)
