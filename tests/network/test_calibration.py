"""The calibration's fits: a line through measured times, a port share solved from a slowdown, and
the random order that tells a shared port apart best."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.network.calibration import (
    MIN_PORT_SHARE,
    fit_round_startup,
    fit_startup_and_efficiency,
    most_contended_seed,
    solve_share,
)
from shunter.network.cost import sender_queue_time_s
from shunter.network.fluid import simulate_baseline


def test_calibration_line_recovers_startup_and_efficiency():
    fluid = np.array([0.25, 0.5, 1.0])
    efficiency, startup = fit_startup_and_efficiency(fluid, 0.03 + fluid / 0.8)
    assert efficiency == pytest.approx(0.8) and startup == pytest.approx(0.03)
    # a line that would start before zero is fitted through the origin: slope = sum(f m) / sum(f f)
    measured = np.array([0.2, 0.6, 1.3])
    efficiency, startup = fit_startup_and_efficiency(fluid, measured)
    assert startup == 0.0
    assert efficiency == pytest.approx((fluid @ fluid) / (fluid @ measured))


def test_shared_port_efficiency_solves_the_closed_form_incast():
    # Ranks 1 and 2 each send S bytes to rank 0, every port B bytes/s: both flows share port 0, so
    # the fluid time is 2 S / (c B) for a shared-port efficiency c.
    size, rate = 8e6, 50e6
    traffic = np.zeros((3, 3))
    traffic[1, 0] = traffic[2, 0] = size
    bandwidth = np.full(3, rate)

    def random_order_s(share):
        return sender_queue_time_s(traffic, bandwidth, "random_order", 0, 0.0, share)

    for share in (0.95, 0.7, 0.3):
        assert solve_share(random_order_s, 2 * size / (share * rate)) == pytest.approx(share, rel=1e-6)
    # faster than a fluid: 1; slower than the floor explains: the floor
    assert solve_share(random_order_s, size / rate) == 1.0
    assert solve_share(random_order_s, 1e3) == MIN_PORT_SHARE


def test_the_calibration_seed_is_the_order_where_flows_meet_the_most():
    def growth(traffic, bandwidth, seed):
        times = [
            simulate_baseline(
                traffic, bandwidth, "random_order", seed=seed, shared_port_efficiency=c
            ).makespan_s
            for c in (0.8, 1.0)
        ]
        return times[0] / times[1]

    uniform, bandwidth = np.full((4, 4), 4e6), np.array([50e6, 40e6, 25e6, 20e6])
    chosen = most_contended_seed(uniform, bandwidth)
    assert growth(uniform, bandwidth, chosen) == max(growth(uniform, bandwidth, s) for s in range(16)) > 1.1
    # a shift permutation: one flow per receiver whatever the order, so no seed beats seed 0
    shift = np.roll(np.eye(4), 1, axis=1) * 4e6
    assert most_contended_seed(shift, bandwidth) == 0


def test_round_startup_is_what_the_rounds_took_beyond_one_round_spread_over_the_rounds_saved():
    """Closed form: 3 rounds of fluid 1.2 s took 1.5 s; one round of fluid 1.0 s took 1.1 s, so
    the rounds at its pace would take 1.32 s: 0.18 s over 2 saved rounds is 0.09 s. Rounds faster
    than one round, or a single round: 0."""
    assert fit_round_startup(3, 1.2, 1.0, 1.5, 1.1) == pytest.approx(0.09)
    assert fit_round_startup(3, 1.0, 1.0, 1.0, 1.1) == 0.0
    assert fit_round_startup(1, 1.0, 1.0, 2.0, 1.0) == 0.0
