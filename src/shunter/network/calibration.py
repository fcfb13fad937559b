"""Fitting the network model to measurements: what a real network sustains beside the fluid.

Pure arithmetic on times already measured (bench.a2a.calibrate does the timing on
torch.distributed): a line through measured times against fluid times gives a pattern's
efficiency and startup; a bisection turns a slowdown into the share of its rate a port delivers
while flows meet there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shunter.network.cost import fair_share_time_s, sender_queue_time_s

MIN_PORT_SHARE = 0.05  # solve_share's floor: a port delivering less is not what is being measured


@dataclass(frozen=True)
class LinkCalibration:
    """What the network sustains, measured on probes that are not the benchmark's traffic.

    efficiency: one flow alone, measured rate / shaped rate (median over ordered pairs).
    latency_s: half a tiny message's round trip (median).
    concurrent_efficiency, concurrent_startup_s: a uniform all-to-all (every pair at once, equal
        sizes, three sizes) takes concurrent_startup_s + the fluid fair-share time at efficiency x
        shaped rates with every port side that n - 1 flows cross delivering concurrent_efficiency
        of its rate (fewer flows: more, fluid.port_efficiency_by_flows). TCP flows sharing a
        shaped port do not fill it as a fluid would (queues, ACKs behind data, ramp-up).
    matching_efficiency: the same fit for one flow per port (every rank sends to the next, run as
        a schedule): what one round of a matching schedule sustains.
    round_startup_s: what each round of a schedule costs beyond its bytes: the uniform pattern
        run as plain matchings (n - 1 rounds) against the same bytes as one round
        (fit_round_startup). It is not a start-up the one-round fit above sees (that fitted 0):
        rounds meet at barriers, and each starts its flows afresh while one round keeps a port
        busy as long as any flow into it has bytes.
    shared_port_efficiency: the share of its rate a receiving port delivers while two or more
        random-order flows meet there: the uniform pattern run in random order, the slowdown over
        its fluid time solved for this share (1.0 with fewer than 3 ranks). Two equal flows started
        together fill a shared port (0.96 of the shaped rate, as one flow); flows that arrive while
        others run and leave at different times do not.
    merged_round_efficiency: every pair at once as one round of a schedule (point-to-point, each
        direction on its own connection), its fitted efficiency over matching_efficiency, at most
        1: what a port side crossed by n - 1 flows of a merged round delivers beside one flow
        (network.cost.RoundCost.crowded_port_efficiency). all_to_all_single's concurrent_efficiency
        is far lower because gloo carries both directions of a pair on one connection."""

    efficiency: float
    latency_s: float
    concurrent_efficiency: float
    concurrent_startup_s: float
    matching_efficiency: float
    round_startup_s: float
    shared_port_efficiency: float
    pair_efficiency: list[list[float]]
    merged_round_efficiency: float = 1.0


def fit_startup_and_efficiency(fluid_s: np.ndarray, measured_s: np.ndarray) -> tuple[float, float]:
    """(efficiency, startup_s >= 0) of the least-squares line measured = startup + fluid / efficiency."""
    slope, startup = np.polyfit(fluid_s, measured_s, 1)
    if startup < 0:  # through the origin instead
        slope, startup = float(fluid_s @ measured_s / (fluid_s @ fluid_s)), 0.0
    return 1.0 / max(float(slope), 1e-9), float(startup)


def fit_round_startup(
    rounds: int, rounds_fluid_s: float, once_fluid_s: float, rounds_measured_s: float, once_measured_s: float
) -> float:
    """Seconds each round of a schedule costs beyond its bytes, at least 0: the same traffic run as
    `rounds` rounds (fluid time rounds_fluid_s) and as one round (once_fluid_s) took
    rounds_measured_s and once_measured_s; what the rounds took beyond the one round's time scaled
    to their fluid time, spread over the rounds the one round saved."""
    if rounds < 2:
        return 0.0
    beyond = rounds_measured_s - once_measured_s * rounds_fluid_s / once_fluid_s
    return max(beyond / (rounds - 1), 0.0)


def solve_share(time_s: Callable[[float], float], target_s: float) -> float:
    """The share in [MIN_PORT_SHARE, 1] at which time_s(share) == target_s, for a time that falls as
    the share of a port's rate grows (bisection; clipped at the ends)."""
    low, high = MIN_PORT_SHARE, 1.0
    if time_s(high) >= target_s:
        return high
    if time_s(low) <= target_s:
        return low
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if time_s(middle) > target_s else (low, middle)
    return (low + high) / 2


def fit_port_share(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray,
    transport: Literal["fair_share", "random_order"],
    efficiency: float,
    seed: int = 0,
) -> float:
    """The share of a port's rate that flows meeting there deliver, solved so that the pattern
    traffic_bytes [n, n] takes its fluid time / efficiency (its fitted slowdown) under `transport`:
    fair_share solves the crowded port side's share (LinkCalibration.concurrent_efficiency),
    random_order (in the order of `seed`) the shared receiving port's (shared_port_efficiency).

    On equal ports every side of an all-pairs pattern carries n - 1 flows throughout and the
    fair-share answer is the efficiency itself; on mixed ports the fast ports' flows end first."""

    def time_s(share: float) -> float:
        if transport == "fair_share":
            return fair_share_time_s(traffic_bytes, bandwidth_bytes_s, 0.0, share)
        return sender_queue_time_s(traffic_bytes, bandwidth_bytes_s, transport, seed, 0.0, share)

    return solve_share(time_s, time_s(1.0) / efficiency)


def most_contended_seed(traffic_bytes: np.ndarray, bandwidth_bytes_s: np.ndarray, seeds: int = 16) -> int:
    """Of random-order seeds 0..seeds-1, the one whose fluid time grows the most when shared ports
    deliver 0.8 of their rate: the send order that tells a shared port's efficiency apart best."""

    def growth(seed: int) -> float:
        slow, fluid = (
            sender_queue_time_s(traffic_bytes, bandwidth_bytes_s, "random_order", seed, 0.0, share)
            for share in (0.8, 1.0)
        )
        return slow / fluid

    return max(range(seeds), key=growth)
