"""What traffic costs on the network: one flow, a schedule, an all-to-all under each transport, a
ring allreduce.

Network (Aurora's big switch): device i has a full-duplex port of bandwidth_bytes_s[i]; the core
never blocks, so flows contend only at ports. Every message pays a fixed latency_s before its
first byte moves:
  - one flow alone: latency_s + bytes / min(B_src, B_dst)                       (flow_time_s)
  - a matching schedule: round by round, each round latency_s + its longest transfer
    (Schedule.makespan_with_latency_s)                                           (schedule_time_s)
  - concurrent flows: ports shared max-min fairly (fluid.max_min_fair_rates), rates recomputed
    whenever a flow starts or finishes; flows may join at any time              (fluid.FluidNetwork)
all_to_all_time_s is the one time of an all-to-all under a transport that the planner, the
simulator and the benchmark's prediction share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shunter.errors import ShunterError
from shunter.network.bounds import off_diagonal
from shunter.network.fluid import port_efficiency_by_flows, simulate_baseline
from shunter.network.schedule import Schedule
from shunter.network.transport import SenderQueueTransport, Transport

if TYPE_CHECKING:  # calibration imports this module; the time only reads a calibration's fields
    from shunter.network.calibration import LinkCalibration

GBIT_S = 1e9 / 8  # bytes/s in one Gbit/s


@dataclass(frozen=True)
class NetworkModel:
    """latency_s: fixed cost of every message (one flow, or one round of a matching schedule)."""

    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or not math.isfinite(self.latency_s):
            raise ShunterError(f"network latency must be >= 0 seconds, got {self.latency_s!r}")


def flow_time_s(
    num_bytes: float, src_bandwidth_bytes_s: float, dst_bandwidth_bytes_s: float, latency_s: float
) -> float:
    """One flow alone on the switch: latency + bytes at the slower of its two ports."""
    if num_bytes <= 0:
        return 0.0
    return latency_s + num_bytes / min(src_bandwidth_bytes_s, dst_bandwidth_bytes_s)


def schedule_time_s(schedule: Schedule, latency_s: float) -> float:
    """A matching schedule run round by round: sum over rounds of (latency + longest transfer)."""
    return schedule.makespan_with_latency_s(latency_s)


@dataclass(frozen=True)
class RoundCost:
    """What running a round of a schedule costs on a real network beside its fluid duration.

    startup_s: paid once per busy round (the ranks meet between rounds; connections ramp up).
    crowded_port_efficiency: the share of its rate a port side delivers while n - 1 flows cross it;
        with k flows, fluid.port_efficiency_by_flows (1 for one flow, linear in between). A round
        lasts its fluid duration / the efficiency of its most crowded port side: TCP flows sharing a
        port do not split it at the planned rates.
    The defaults are what `shunter bench a2a` calibrated on the emulated 4-host cluster (2026-12-03,
    docs/benchmarks.md): 56 ms a round on mixed ports (0 on equal ones), and 0.95 for every pair at
    once on equal ports (1.0 on mixed ones); the benchmark uses its own calibration's."""

    startup_s: float = 0.05
    crowded_port_efficiency: float = 0.95

    def __post_init__(self) -> None:
        if not self.startup_s >= 0 or not 0 < self.crowded_port_efficiency <= 1:
            raise ShunterError(
                f"a round cost needs startup_s >= 0 and an efficiency in (0, 1], got {self.startup_s!r} "
                f"and {self.crowded_port_efficiency!r}"
            )


FREE_ROUNDS = RoundCost(0.0, 1.0)  # the fluid model: a round costs its duration


def round_times_s(schedule: Schedule, cost: RoundCost) -> np.ndarray:
    """[num_rounds] seconds each round takes under cost: its fluid duration / the efficiency of its
    most crowded port side (Schedule.round_crowding), plus startup_s if it moves anything."""
    durations = schedule.round_durations_s()
    # distinct peers, so at most n - 1 flows: within port_efficiency_by_flows' table
    efficiency = port_efficiency_by_flows(schedule.num_devices, cost.crowded_port_efficiency)
    per_round = durations / efficiency[schedule.round_crowding()]
    return np.where(durations > 0, per_round + cost.startup_s, 0.0)


def fair_share_time_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    latency_s: float,
    crowded_port_efficiency: float = 1.0,
) -> float:
    """An all-to-all with every flow started at once and ports shared max-min fairly: all flows
    wait the same latency, then the fluid fair-share simulation runs (a port side crossed by
    n - 1 flows delivering crowded_port_efficiency of its rate, fewer flows more:
    fluid.port_efficiency_by_flows)."""
    matrix = off_diagonal(traffic_bytes)
    if not matrix.any():
        return 0.0
    fluid = simulate_baseline(
        matrix, bandwidth_bytes_s, "fair_share", record=False, crowded_port_efficiency=crowded_port_efficiency
    )
    return latency_s + fluid.makespan_s


def sender_queue_time_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    policy: SenderQueueTransport,
    seed: int,
    latency_s: float,
    shared_port_efficiency: float = 1.0,
) -> float:
    """Each sender sends its flows one after another (fluid.sender_queues); each flow
    waits latency_s before it moves, so the longest queue adds one latency per flow. A receiving
    port two or more flows meet at delivers shared_port_efficiency x its bandwidth."""
    matrix = off_diagonal(traffic_bytes)
    if not matrix.any():
        return 0.0
    longest_queue = int((matrix > 0).sum(axis=1).max())
    fluid = simulate_baseline(
        matrix,
        bandwidth_bytes_s,
        policy,
        seed=seed,
        record=False,
        shared_port_efficiency=shared_port_efficiency,
    ).makespan_s
    return fluid + longest_queue * latency_s


def ring_allreduce_flows(
    num_bytes: float, num_devices: int, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src [F], dst [F], bytes [F]) of a ring allreduce of num_bytes on every device: each device
    sends 2 (n-1)/n * num_bytes to its successor (reduce-scatter then all-gather), split over
    `channels` parallel flows (NCCL runs a collective on several channels; with as many channels
    as an all-to-all has flows per port, the two split a shared port evenly under max-min)."""
    if num_devices < 2 or num_bytes <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    src = np.repeat(np.arange(num_devices, dtype=np.int64), channels)
    dst = (src + 1) % num_devices
    per_flow = 2 * (num_devices - 1) / num_devices * num_bytes / channels
    return src, dst, np.full(src.shape[0], per_flow)


def ring_allreduce_time_s(
    num_bytes: float, bandwidth_bytes_s: float, num_devices: int, latency_s: float
) -> float:
    """Closed form on equal ports, alone on the network: 2 (n-1) latencies, 2 (n-1)/n * S / B of data."""
    if num_devices < 2 or num_bytes <= 0:
        return 0.0
    return (
        2 * (num_devices - 1) * latency_s
        + 2 * (num_devices - 1) / num_devices * num_bytes / bandwidth_bytes_s
    )


def all_to_all_time_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    transport: Transport,
    latency_s: float = 0.0,
    seed: int = 0,
    *,
    schedule: Schedule | None = None,
    calibration: LinkCalibration | None = None,
) -> float:
    """One all-to-all of traffic_bytes [n, n] alone on ports bandwidth_bytes_s [n].

    planned: `schedule` (required; built by plan.schedule for this traffic) run round by round,
        each round paying latency_s.
    fair_share: every flow at once, ports shared max-min fairly, one latency.
    random_order / shortest_first (RCS / SJF): the sender-queue simulation (seeded); each sender's
        messages go one after another, so the busiest sender's message count times latency_s is
        added (exact with latency_s = 0, the paper's model).
    calibration: what a measured network sustains (calibration.LinkCalibration), replacing the
        fluid's ideal ports and latency_s: every port runs at calibration.efficiency of its rate;
        fair_share pays max(concurrent_startup_s, latency_s) once and a crowded port side delivers
        concurrent_efficiency; planned scales each round's duration (planned on the shaped rates)
        by 1 / (efficiency x matching_efficiency x the efficiency of its most crowded port side at
        merged_round_efficiency, round_times_s) and pays max(round_startup_s, latency_s) per busy
        round; random order's shared receiving ports deliver shared_port_efficiency.
    """
    if calibration is not None:
        return _calibrated_all_to_all_time_s(
            traffic_bytes, bandwidth_bytes_s, transport, seed, schedule, calibration
        )
    matrix = off_diagonal(traffic_bytes)
    if not matrix.any():
        return 0.0
    if transport == "planned":
        return _required(schedule).makespan_with_latency_s(latency_s)
    if transport == "fair_share":
        return fair_share_time_s(matrix, bandwidth_bytes_s, latency_s)
    return sender_queue_time_s(matrix, bandwidth_bytes_s, transport, seed, latency_s)


def _calibrated_all_to_all_time_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    transport: Transport,
    seed: int,
    schedule: Schedule | None,
    calibration: LinkCalibration,
) -> float:
    # The ideal model with measured efficiencies and startups: an ideal calibration (efficiencies 1,
    # startups 0) gives the uncalibrated times to rounding (tested). The planned time scales the
    # makespan and charges busy rounds only, as the benchmark always computed it, where the ideal
    # branch sums every round with its latency, as the simulator always did: both stay bit for bit.
    sustained = bandwidth_bytes_s * calibration.efficiency
    if transport == "fair_share":
        startup = max(calibration.concurrent_startup_s, calibration.latency_s)
        return fair_share_time_s(traffic_bytes, sustained, startup, calibration.concurrent_efficiency)
    if transport == "planned":
        rate = calibration.efficiency * calibration.matching_efficiency
        crowded = RoundCost(0.0, calibration.merged_round_efficiency)
        rounds = round_times_s(_required(schedule), crowded)
        busy = int((rounds > 0).sum())
        return float(rounds.sum()) / rate + busy * max(calibration.round_startup_s, calibration.latency_s)
    return sender_queue_time_s(
        traffic_bytes, sustained, transport, seed, calibration.latency_s, calibration.shared_port_efficiency
    )


def _required(schedule: Schedule | None) -> Schedule:
    if schedule is None:
        raise ValueError("the planned transport needs its schedule (plan.schedule.schedule_all_to_all)")
    return schedule
