"""The fluid network: max-min fair rates against textbook fairness, transports without a plan
against hand computations and the validator, and FluidNetwork's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.network.bounds import port_lower_bound_s
from shunter.network.fluid import (
    BURST_SPEEDUP,
    FluidNetwork,
    max_min_fair_rates,
    port_efficiency_by_flows,
    simulate_baseline,
)
from shunter.plan.schedule import schedule_violations
from tests.traffic_matrices import GBIT_S, traffic_matrices


def test_max_min_fairness_textbook_example_with_a_fast_sender() -> None:
    """Oracle (progressive filling by hand): port 0 sends 2 B/s to 1, 2, 3; device 4 also sends to 3.
    Receiver 3 fills first at 0.5 each; port 0 then splits its remaining 1.5 between 0->1 and 0->2."""
    src, dst = np.array([0, 0, 0, 4]), np.array([1, 2, 3, 3])
    rates = max_min_fair_rates(src, dst, np.array([2.0, 1.0, 1.0, 1.0, 1.0]))
    assert rates == pytest.approx([0.75, 0.75, 0.5, 0.5])


def test_max_min_fairness_gives_a_bottlenecked_flow_its_share_and_the_rest_to_others() -> None:
    """Oracle: 0->2 and 1->2 share receiver 2 (0.5 each); 1's other flow 1->3 then takes what
    sender 1 has left (0.5); 0's other flow 0->3 is limited by receiver 3 to 0.5."""
    src, dst = np.array([0, 1, 1, 0]), np.array([2, 2, 3, 3])
    rates = max_min_fair_rates(src, dst, np.ones(4))
    assert rates == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert rates[:2].sum() <= 1.0 + 1e-12


@pytest.mark.parametrize("policy", ["fair_share", "random_order", "shortest_first"])
@settings(max_examples=25, deadline=None)
@given(traffic=traffic_matrices(max_n=12), seed=st.integers(0, 1000), mixed=st.booleans())
def test_baselines_are_valid_schedules_no_faster_than_the_bound(
    policy: str, traffic: np.ndarray, seed: int, mixed: bool
) -> None:
    """Oracle: the validator, and the port lower bound (no schedule beats it)."""
    n = traffic.shape[0]
    bandwidth = np.random.default_rng(seed).choice([100.0, 40.0], n) * GBIT_S if mixed else 100 * GBIT_S
    result = simulate_baseline(traffic, bandwidth, policy, seed=seed)  # type: ignore[arg-type]
    assert result.schedule is not None
    assert schedule_violations(result.schedule, traffic, bandwidth) == []
    assert result.schedule.makespan_s == pytest.approx(result.makespan_s, rel=1e-9, abs=1e-300)
    assert result.makespan_s >= port_lower_bound_s(traffic, bandwidth) * (1 - 1e-9)


def test_senders_work_through_their_flows_one_at_a_time() -> None:
    """Oracle: hand computation; a lone sender with flows of 1 and 3 bytes at 1 B/s takes 4 s in
    either order, and its transfers never overlap."""
    traffic = np.array([[0, 1, 3], [0, 0, 0], [0, 0, 0]], dtype=np.float64)
    for policy in ("random_order", "shortest_first"):
        result = simulate_baseline(traffic, 1.0, policy)  # type: ignore[arg-type]
        assert result.makespan_s == pytest.approx(4.0)
        assert schedule_violations(result.schedule, traffic, 1.0, require_matching=True) == []


def test_a_shared_receiving_port_delivers_its_measured_share() -> None:
    """Oracle: hand computation. Ranks 1 and 2 send 100 and 300 B to rank 0 at 10 B/s. As a fluid
    both get 5 B/s until the short flow ends at 20 s, then the long one moves its last 200 B
    alone: 40 s. Shared at 0.8, the port gives 4 B/s each until 25 s and 10 B/s alone after: 45 s.
    A lone sender's flows never share a port, so the efficiency leaves it alone."""
    traffic = np.array([[0, 0, 0], [100, 0, 0], [300, 0, 0]], dtype=np.float64)
    assert simulate_baseline(traffic, 10.0, "random_order").makespan_s == pytest.approx(40.0)
    shared = simulate_baseline(traffic, 10.0, "random_order", shared_port_efficiency=0.8)
    assert shared.makespan_s == pytest.approx(45.0)
    assert schedule_violations(shared.schedule, traffic, 10.0) == []
    alone = np.array([[0, 100, 300], [0, 0, 0], [0, 0, 0]], dtype=np.float64)
    assert simulate_baseline(
        alone, 10.0, "random_order", shared_port_efficiency=0.5
    ).makespan_s == pytest.approx(40.0)
    with pytest.raises(ValueError, match="shared_port_efficiency"):
        simulate_baseline(traffic, 10.0, "random_order", shared_port_efficiency=0.0)


def test_a_crowded_port_side_delivers_less_the_more_flows_cross_it() -> None:
    """Oracle: hand computation on 4 ports of 10 B/s, crowded efficiency 0.6, so a side crossed by
    1, 2, 3 flows delivers 10, 8, 6 B/s. All pairs, 120 B each: every side carries 3 flows, 2 B/s
    each, 60 s (36 s as a fluid). Ranks 1 and 2 send 100 B each to rank 0: rank 0's receiving side
    carries 2, 4 B/s each, 25 s (20 s as a fluid). One flow alone: 10 s either way."""
    assert port_efficiency_by_flows(4, 0.6).tolist() == pytest.approx([1.0, 1.0, 0.8, 0.6])
    assert port_efficiency_by_flows(2, 0.6).tolist() == [1.0, 1.0]
    uniform = np.full((4, 4), 120.0)
    incast = np.zeros((4, 4))
    incast[1, 0] = incast[2, 0] = 100.0
    alone = np.zeros((4, 4))
    alone[1, 0] = 100.0
    for traffic, fluid_s, crowded_s in ((uniform, 36.0, 60.0), (incast, 20.0, 25.0), (alone, 10.0, 10.0)):
        assert simulate_baseline(traffic, 10.0, "fair_share").makespan_s == pytest.approx(fluid_s)
        crowded = simulate_baseline(traffic, 10.0, "fair_share", crowded_port_efficiency=0.6)
        assert crowded.makespan_s == pytest.approx(crowded_s)
        assert schedule_violations(crowded.schedule, traffic, 10.0) == []
    with pytest.raises(ValueError, match="crowded_port_efficiency"):
        simulate_baseline(uniform, 10.0, "fair_share", crowded_port_efficiency=1.5)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 10), st.integers(0, 2**32 - 1))
def test_fair_rates_are_max_min_fair(n: int, seed: int) -> None:
    """Oracle: the bottleneck characterisation of max-min fairness: rates fit the ports, and every
    flow crosses a full port where no other flow gets more than it."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n)) < 0.5
    np.fill_diagonal(mask, False)
    src, dst = np.nonzero(mask)
    bandwidth = rng.choice([1.0, 2.0, 5.0], n)
    rate = max_min_fair_rates(src, dst, bandwidth)
    sent = np.bincount(src, weights=rate, minlength=n)
    received = np.bincount(dst, weights=rate, minlength=n)
    assert np.all(sent <= bandwidth * (1 + 1e-9)) and np.all(received <= bandwidth * (1 + 1e-9))
    for f in range(src.size):
        at_src = (src == src[f]) & (sent[src[f]] >= bandwidth[src[f]] * (1 - 1e-9))
        at_dst = (dst == dst[f]) & (received[dst[f]] >= bandwidth[dst[f]] * (1 - 1e-9))
        bottleneck_at_src = at_src.any() and rate[f] >= rate[src == src[f]].max() * (1 - 1e-9)
        bottleneck_at_dst = at_dst.any() and rate[f] >= rate[dst == dst[f]].max() * (1 - 1e-9)
        assert bottleneck_at_src or bottleneck_at_dst


def test_fluid_network_reports_a_collective_done_when_its_last_flow_ends() -> None:
    """Oracle: tag 7's flows end at 1 s and 2 s alone on their ports; the tag completes at 2 s."""
    network = FluidNetwork(np.ones(4))
    network.add(7, np.array([0, 2]), np.array([1, 3]), np.array([1.0, 2.0]))
    assert network.advance(network.next_event_s()) == []
    assert network.advance(network.next_event_s()) == [7]
    assert network.now_s == pytest.approx(2.0)


def _run_until_idle(network: FluidNetwork) -> float:
    while network.busy:
        network.advance(network.next_event_s())
    return network.now_s


def test_a_full_token_bucket_passes_its_burst_then_the_rate() -> None:
    """Closed form, one flow of X bytes at rate r through buckets of B (both sides alike): at
    BURST_SPEEDUP x r the bucket drains at (s - 1) r, dry after B / ((s - 1) r) having passed
    s B / (s - 1); the rest moves at r."""
    r, burst, size, s = 100.0, 50.0, 1000.0, BURST_SPEEDUP
    network = FluidNetwork(np.full(2, r), burst_bytes=np.full(2, burst))
    network.add(1, np.array([0]), np.array([1]), np.array([size]))
    dry_s = burst / ((s - 1) * r)
    assert _run_until_idle(network) == pytest.approx(dry_s + (size - s * r * dry_s) / r)
    plain = FluidNetwork(np.full(2, r))
    plain.add(1, np.array([0]), np.array([1]), np.array([size]))
    assert _run_until_idle(plain) == pytest.approx(size / r)


def test_an_idle_port_refills_its_bucket_and_a_busy_one_does_not() -> None:
    """Oracle: back to back, the second transfer meets an empty bucket and takes X / r; after
    B / r seconds idle the bucket is full again and the transfer is as fast as the first."""
    r, burst, size = 100.0, 50.0, 1000.0
    network = FluidNetwork(np.full(2, r), burst_bytes=np.full(2, burst))
    times = []
    for idle_s in (0.0, 0.0, burst / r):
        network.advance(network.now_s + idle_s)
        start = network.now_s
        network.add(1, np.array([0]), np.array([1]), np.array([size]))
        times.append(_run_until_idle(network) - start)
    assert times[1] == pytest.approx(size / r)
    assert times[0] == pytest.approx(times[2]) and times[0] < times[1]
