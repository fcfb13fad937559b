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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shunter.errors import ShunterError
from shunter.network.bounds import off_diagonal
from shunter.network.fluid import simulate_baseline
from shunter.network.schedule import Schedule
from shunter.network.transport import SenderQueueTransport

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
