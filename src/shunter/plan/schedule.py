"""All-to-all schedules: ordered rounds of (src, dst, bytes) transfers, built and validated.

The network model (ports, bounds, the Schedule itself, transports without a plan simulated as a
fluid) is shunter.network; Schedule is re-exported here. Local traffic (the diagonal) is free and
never scheduled.

A schedule is a sequence of rounds run back to back. Each transfer in a round has a rate; a round
lasts max over its transfers of bytes / rate_bytes_s, and the makespan is the sum of the rounds.
A schedule is valid when every off-diagonal byte is delivered and, in every round, the rates at
each port add up to at most that port's bandwidth.

- Matching schedules (the optimal one on equal ports): in a
  round every device sends to at most one destination and receives from at most one source, at
  rate min(B_src, B_dst). With equal ports this reaches the lower bound max_i max(row_i, col_i) / B
  exactly: pad the matrix until every row and column sums to that bound, decompose it into
  weighted perfect matchings (Birkhoff–von Neumann / König), run them back to back, drop the
  padding. A transfer may be split over several rounds.
- Unequal ports (virtual lanes): device i is split into lanes_i lanes of rate B_i / lanes_i; a
  round is a matching of lanes, so a fast device talks to several slow ones at once. When the
  bandwidths are integer multiples of one lane rate this reaches max_i max(row_i, col_i) / B_i
  exactly; otherwise a transfer runs at the slower of its two lane rates and the makespan is
  max_i max(sum_j D_ij / r_ij, sum_j D_ji / r_ji) / lanes_i with r_ij = min(lane rates), which
  `choose_lanes` minimises over lane counts up to a cap, raising the cap only while the schedule
  is more than CLOSE_TO_BOUND above the port bound.

On a real network a round also costs a start-up (RoundCost.startup_s: the ranks meet between
rounds, each connection ramps up), and a port side that k flows cross at once delivers less than
its rate (TCP flows do not split a port at planned rates). `schedule_with_round_cost` picks, under
that cost, between the lane schedule and plain matchings and which rounds to run as one
(`merge_rounds_with_startup`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from shunter.network.bounds import bandwidth_vector, off_diagonal, port_lower_bound_s
from shunter.network.cost import RoundCost, round_times_s
from shunter.network.fluid import port_efficiency_by_flows
from shunter.network.schedule import Schedule
from shunter.plan.decompose import decompose_into_matchings

# ---------------------------------------------------------------------------------------------
# the validator


def schedule_violations(
    schedule: Schedule,
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    *,
    require_matching: bool = False,
    relative_tolerance: float = 1e-9,
) -> list[str]:
    """Everything wrong with a schedule for this traffic on these ports; [] when it is valid.

    Checks: every off-diagonal byte delivered and nothing more; no transfer to itself; positive
    rates; in every round the rates at each port add up to at most its bandwidth; with
    require_matching, at most one send and one receive per device in each round.
    """
    matrix = off_diagonal(traffic_bytes)
    n = matrix.shape[0]
    bandwidth = bandwidth_vector(bandwidth_bytes_s, n)
    problems: list[str] = []
    if schedule.num_devices != n:
        return [f"schedule is for {schedule.num_devices} devices, traffic has {n}"]
    if schedule.num_transfers:
        if np.any(schedule.src == schedule.dst):
            problems.append("a transfer sends a device's bytes to itself")
        if np.any(~(schedule.rate_bytes_s > 0)):
            problems.append("a transfer has a rate that is not positive")
        if np.any(schedule.bytes < 0):
            problems.append("a transfer moves negative bytes")
        if np.any(np.diff(schedule.round_of) < 0) or schedule.round_of.max() >= schedule.num_rounds:
            problems.append("transfers are not sorted by round or name a round past the last")
    scale = max(float(matrix.max(initial=0.0)), 1.0)
    missing = np.abs(schedule.delivered_bytes() - matrix)
    if missing.max(initial=0.0) > relative_tolerance * scale:
        i, j = np.unravel_index(int(np.argmax(missing)), missing.shape)
        delivered = schedule.delivered_bytes()[i, j]
        problems.append(f"bytes from {i} to {j}: delivered {delivered:.6g}, needed {matrix[i, j]:.6g}")
    if schedule.num_transfers:
        rounds = schedule.num_rounds
        send_rate = np.bincount(
            schedule.round_of * n + schedule.src, weights=schedule.rate_bytes_s, minlength=rounds * n
        ).reshape(rounds, n)
        recv_rate = np.bincount(
            schedule.round_of * n + schedule.dst, weights=schedule.rate_bytes_s, minlength=rounds * n
        ).reshape(rounds, n)
        limit = bandwidth * (1 + relative_tolerance)
        for side, rate in (("send", send_rate), ("receive", recv_rate)):
            over = rate > limit
            if over.any():
                r, i = np.argwhere(over)[0]
                problems.append(
                    f"round {r}: device {i} {side}s at {rate[r, i]:.6g} B/s over its {bandwidth[i]:.6g} B/s"
                )
        if require_matching:
            sends = np.bincount(schedule.round_of * n + schedule.src, minlength=rounds * n)
            receives = np.bincount(schedule.round_of * n + schedule.dst, minlength=rounds * n)
            if sends.max() > 1 or receives.max() > 1:
                problems.append("a round is not a matching: some device sends or receives twice")
    return problems


# ---------------------------------------------------------------------------------------------
# optimal schedules


@dataclass(frozen=True)
class Lanes:
    """Virtual lanes per device: lanes_per_device [n] int; lane_rate_bytes_s [n] = B_i / lanes_i."""

    lanes_per_device: np.ndarray
    lane_rate_bytes_s: np.ndarray

    def pair_rate_bytes_s(self) -> np.ndarray:
        """[n, n] rate of one lane-to-lane transfer: the slower of the two lane rates."""
        return np.minimum.outer(self.lane_rate_bytes_s, self.lane_rate_bytes_s)

    def predicted_makespan_s(self, traffic_bytes: np.ndarray) -> float:
        """What the lane decomposition reaches: max_i max(sum_j D_ij/r_ij, sum_j D_ji/r_ji) / lanes_i."""
        seconds = off_diagonal(traffic_bytes) / self.pair_rate_bytes_s()
        per_lane = np.maximum(seconds.sum(axis=1), seconds.sum(axis=0)) / self.lanes_per_device
        return float(per_lane.max(initial=0.0))


# Lane caps tried in turn: more lanes mean more, smaller transfers (more rounds and connections on
# a real network), so a larger cap is only searched while the schedule is more than
# CLOSE_TO_BOUND above the port bound. 16 lanes leave at most 1.060x on 1000 random cases of
# continuous bandwidths; 48 leave 1.0013x (docs/planner.md).
LANE_CAPS = (16, 32, 48, 64)
CLOSE_TO_BOUND = 1.02
DEFAULT_MAX_LANES = LANE_CAPS[-1]


def choose_lanes(
    traffic_bytes: np.ndarray, bandwidth_bytes_s: np.ndarray, max_lanes_per_device: int = DEFAULT_MAX_LANES
) -> Lanes:
    """Lane counts that minimise the lane decomposition's makespan.

    Candidates: one lane everywhere (the plain matching model), and for each distinct bandwidth b
    and c in 1..cap the lane rate b / c with lanes_i = round(B_i * c / b). With bandwidths that are
    integer multiples of a common rate within the cap (100/80/50/40 Gbit/s: 10 Gbit/s lanes) the
    chosen lanes reach the port bound exactly. The cap starts at 16 and grows through LANE_CAPS (never
    past max_lanes_per_device) while the best makespan is above CLOSE_TO_BOUND x the port bound.
    """
    bandwidth = bandwidth_vector(bandwidth_bytes_s, np.asarray(traffic_bytes).shape[0])
    best = Lanes(np.ones_like(bandwidth, dtype=np.int64), bandwidth.copy())
    if np.all(bandwidth == bandwidth[0]):
        return best
    best_time = best.predicted_makespan_s(traffic_bytes)
    good_enough = CLOSE_TO_BOUND * port_lower_bound_s(traffic_bytes, bandwidth)
    distinct = np.unique(bandwidth)
    if distinct.size > 64:
        distinct = np.quantile(distinct, np.linspace(0, 1, 64))
    caps = sorted({min(cap, max_lanes_per_device) for cap in LANE_CAPS})
    searched = 0
    for cap in caps:
        if searched and best_time <= good_enough:
            break
        for base in distinct:
            for count in range(1, cap + 1):
                lane_rate = base / count
                lanes = np.maximum(1, np.round(bandwidth / lane_rate)).astype(np.int64)
                if lanes.max() > cap or (count <= searched and lanes.max() <= searched):
                    continue  # over this cap, or already tried under the previous one
                candidate = Lanes(lanes, bandwidth / lanes)
                time = candidate.predicted_makespan_s(traffic_bytes)
                better = time < best_time * (1 - 1e-12)
                tie_fewer = time <= best_time * (1 + 1e-12) and lanes.sum() < best.lanes_per_device.sum()
                if better or tie_fewer:
                    best, best_time = candidate, time
        searched = cap
    return best


def schedule_all_to_all(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    max_lanes_per_device: int = DEFAULT_MAX_LANES,
) -> Schedule:
    """The optimal (equal ports) or lane-based (unequal ports) schedule of an all-to-all.

    Args:
        traffic_bytes [n, n]: bytes from device i to device j; the diagonal is local and ignored.
        bandwidth_bytes_s: one port bandwidth, or [n] one per device.

    Equal ports: makespan == port_lower_bound_s (to rounding); every round is a matching.
    Unequal ports: makespan == choose_lanes(...).predicted_makespan_s(...), >= the port bound.
    """
    matrix = off_diagonal(traffic_bytes)
    n = matrix.shape[0]
    bandwidth = bandwidth_vector(bandwidth_bytes_s, n)
    lanes = choose_lanes(matrix, bandwidth, max_lanes_per_device)
    if np.all(lanes.lanes_per_device == 1):
        return _schedule_single_lane(matrix, bandwidth)
    return _schedule_with_lanes(matrix, lanes)


def merge_short_rounds(
    schedule: Schedule, bandwidth_bytes_s: np.ndarray | float, max_share: float = 0.05
) -> Schedule:
    """The same transfers with the shortest rounds folded into one last round.

    The shortest rounds, taken while their durations add up to at most `max_share` of the
    makespan, run as one round (see merge_rounds). max_share = 0 returns the schedule unchanged.
    """
    durations = schedule.round_durations_s()
    if max_share <= 0 or schedule.num_rounds < 2:
        return schedule
    order = np.argsort(durations, kind="stable")
    within = np.cumsum(durations[order]) <= max_share * durations.sum()
    short = np.zeros(schedule.num_rounds, dtype=bool)
    short[order[within]] = True
    return merge_rounds(schedule, bandwidth_bytes_s, short)


def merge_rounds(schedule: Schedule, bandwidth_bytes_s: np.ndarray | float, which: np.ndarray) -> Schedule:
    """The same transfers with the rounds marked in which [num_rounds] bool folded into one last round.

    In that round every one of their transfers starts at once, at rate bytes / T with
    T = max_i max(sent_i, received_i) / B_i (so every port's rates add up to at most its bandwidth,
    and all finish together). T is at most the sum of the rounds it replaces, so the fluid makespan
    never grows; that round is no longer a matching. Fewer than two marked rounds: unchanged.
    """
    short = np.asarray(which, dtype=bool)
    if short.sum() < 2:
        return schedule
    # kept rounds keep their order and come first; the merged round is the last
    new_index = np.cumsum(~short) - 1
    kept = int((~short).sum())
    new_index[short] = kept
    round_of = new_index[schedule.round_of]
    in_merged = short[schedule.round_of]
    n = schedule.num_devices
    bandwidth = bandwidth_vector(bandwidth_bytes_s, n)
    sent = np.bincount(schedule.src[in_merged], weights=schedule.bytes[in_merged], minlength=n)
    received = np.bincount(schedule.dst[in_merged], weights=schedule.bytes[in_merged], minlength=n)
    merged_s = float((np.maximum(sent, received) / bandwidth).max())
    rate = np.where(in_merged, schedule.bytes / merged_s, schedule.rate_bytes_s)
    order_by_round = np.argsort(round_of, kind="stable")
    return Schedule(
        round_of[order_by_round],
        schedule.src[order_by_round],
        schedule.dst[order_by_round],
        schedule.bytes[order_by_round],
        rate[order_by_round],
        kept + 1,
        n,
        schedule.strategy,
    )


# ---------------------------------------------------------------------------------------------
# schedules under a per-round cost (network.cost.RoundCost)

EXHAUSTIVE_MERGE_ROUNDS = 10  # up to this many rounds every subset is tried; beyond, the k shortest


def schedule_cost_s(schedule: Schedule, cost: RoundCost) -> float:
    """The schedule's time under cost: the sum of round_times_s."""
    return float(round_times_s(schedule, cost).sum())


def merge_rounds_with_startup(
    schedule: Schedule, bandwidth_bytes_s: np.ndarray | float, cost: RoundCost
) -> Schedule:
    """The schedule with the set of rounds folded into one (merge_rounds) that costs least under
    cost: a merge saves startup_s per round it removes and costs what its crowded ports lose.

    Every subset of rounds is tried up to EXHAUSTIVE_MERGE_ROUNDS rounds; beyond that, the k
    shortest rounds for every k. Ties keep more rounds (fewer flows sharing a port)."""
    rounds = schedule.num_rounds
    if rounds < 2:
        return schedule
    n = schedule.num_devices
    bandwidth = bandwidth_vector(bandwidth_bytes_s, n)
    times = round_times_s(schedule, cost)
    sent = np.zeros((rounds, n))
    received = np.zeros((rounds, n))
    np.add.at(sent, (schedule.round_of, schedule.src), schedule.bytes)
    np.add.at(received, (schedule.round_of, schedule.dst), schedule.bytes)
    pairs = np.zeros((rounds, n, n), dtype=bool)
    pairs[schedule.round_of, schedule.src, schedule.dst] = schedule.bytes > 0
    efficiency = port_efficiency_by_flows(n, cost.crowded_port_efficiency)

    def merged_cost(which: np.ndarray) -> float:
        fluid = float((np.maximum(sent[which].sum(0), received[which].sum(0)) / bandwidth).max())
        union = pairs[which].any(axis=0)
        crowd = int(max(union.sum(axis=1).max(), union.sum(axis=0).max()))
        merged = fluid / efficiency[crowd] + cost.startup_s if fluid > 0 else 0.0
        return float(times[~which].sum()) + merged

    if rounds <= EXHAUSTIVE_MERGE_ROUNDS:
        candidates = (
            np.array([(mask >> r) & 1 for r in range(rounds)], dtype=bool)
            for mask in range(1 << rounds)
            if bin(mask).count("1") >= 2
        )
    else:
        order = np.argsort(schedule.round_durations_s(), kind="stable")
        candidates = (np.isin(np.arange(rounds), order[:k]) for k in range(2, rounds + 1))
    best, best_cost = np.zeros(rounds, dtype=bool), float(times.sum())
    for which in candidates:
        candidate_cost = merged_cost(which)
        if candidate_cost < best_cost * (1 - 1e-12):
            best, best_cost = which, candidate_cost
    return merge_rounds(schedule, bandwidth, best)


def schedule_with_round_cost(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    cost: RoundCost,
    max_lanes_per_device: int = DEFAULT_MAX_LANES,
) -> Schedule:
    """The schedule that runs fastest under cost: the lane schedule (schedule_all_to_all) and plain
    matchings (one lane per device), each with its rounds merged by merge_rounds_with_startup; the
    cheaper one, plain matchings on a tie. On equal ports the two are the same schedule.

    Lanes reach the port bound in the fluid model but put two or more flows on a port at planned,
    unequal rates; TCP splits a shared port its own way, so those rounds run slower than planned."""
    matrix = off_diagonal(traffic_bytes)
    bandwidth = bandwidth_vector(bandwidth_bytes_s, matrix.shape[0])
    matchings = merge_rounds_with_startup(schedule_all_to_all(matrix, bandwidth, 1), bandwidth, cost)
    if max_lanes_per_device <= 1 or np.all(bandwidth == bandwidth[0]):
        return matchings
    lanes = merge_rounds_with_startup(
        schedule_all_to_all(matrix, bandwidth, max_lanes_per_device), bandwidth, cost
    )
    return lanes if schedule_cost_s(lanes, cost) < schedule_cost_s(matchings, cost) else matchings


def _schedule_single_lane(matrix: np.ndarray, bandwidth: np.ndarray) -> Schedule:
    """Each device one lane: decompose D_ij * (B_ref / min(B_i, B_j)) so every unit is one
    second at B_ref; with equal ports this is D itself (integers stay integers, so ties are exact)."""
    n = matrix.shape[0]
    if np.all(bandwidth == bandwidth[0]):  # equal ports: the units are the bytes themselves
        decomposition = decompose_into_matchings(matrix)
        rate = np.full(decomposition.rows.size, bandwidth[0])
        return Schedule(
            decomposition.round_of,
            decomposition.rows,
            decomposition.cols,
            decomposition.amounts,
            rate,
            decomposition.num_rounds,
            n,
            "matchings",
        )
    pair_rate = np.minimum.outer(bandwidth, bandwidth)
    reference = bandwidth.min()
    scale = reference / pair_rate
    decomposition = decompose_into_matchings(matrix * scale)
    src, dst = decomposition.rows, decomposition.cols
    rate = pair_rate[src, dst]
    moved = decomposition.amounts / scale[src, dst]
    return Schedule(decomposition.round_of, src, dst, moved, rate, decomposition.num_rounds, n, "matchings")


def _schedule_with_lanes(matrix: np.ndarray, lanes: Lanes) -> Schedule:
    n = matrix.shape[0]
    pair_rate = lanes.pair_rate_bytes_s()
    reference = lanes.lane_rate_bytes_s.min()
    units = matrix * (reference / pair_rate)  # lane-seconds at the reference rate
    virtual, device_of_lane = _split_into_lanes(units, lanes.lanes_per_device)
    decomposition = decompose_into_matchings(virtual)
    src = device_of_lane[decomposition.rows]
    dst = device_of_lane[decomposition.cols]
    rate = pair_rate[src, dst]
    moved = decomposition.amounts * rate / reference
    # Lanes of one device pair in the same round are one transfer at the summed rate.
    key = (decomposition.round_of * n + src) * n + dst
    unique_keys, inverse = np.unique(key, return_inverse=True)
    merged_bytes = np.bincount(inverse, weights=moved)
    merged_rate = np.bincount(inverse, weights=rate)
    round_of, rest = np.divmod(unique_keys, n * n)
    merged_src, merged_dst = np.divmod(rest, n)
    return Schedule(
        round_of, merged_src, merged_dst, merged_bytes, merged_rate, decomposition.num_rounds, n, "lanes"
    )


def _split_into_lanes(units: np.ndarray, lanes_per_device: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[M, M] lane matrix (M = sum of lanes) whose lane row and column sums are equal within a device.

    McNaughton's wrap-around rule on each side: device i's outgoing flows, in order, fill its send
    lanes one after another, each lane up to row_i / lanes_i (a flow may straddle lanes); likewise
    incoming flows fill receive lanes. A flow's send pieces and receive pieces are then cut at the
    union of their boundaries, so the lane matrix has few more entries than the device matrix.
    Returns the lane matrix and device_of_lane [M].
    """
    n = units.shape[0]
    lane_start = np.concatenate([[0], np.cumsum(lanes_per_device)])
    device_of_lane = np.repeat(np.arange(n), lanes_per_device)
    virtual = np.zeros((int(lane_start[-1]), int(lane_start[-1])))
    send_pieces = [_wrap_pieces(units[i], int(lanes_per_device[i])) for i in range(n)]
    recv_pieces = [_wrap_pieces(units[:, j], int(lanes_per_device[j])) for j in range(n)]
    for i, j in zip(*np.nonzero(units), strict=True):
        sends, receives = send_pieces[i][j], recv_pieces[j][i]
        if len(sends) == 1 and len(receives) == 1:
            virtual[lane_start[i] + sends[0][0], lane_start[j] + receives[0][0]] += units[i, j]
            continue
        send_end = np.cumsum([amount for _, amount in sends])
        recv_end = np.cumsum([amount for _, amount in receives])
        send_end[-1] = recv_end[-1] = units[i, j]
        cuts = np.unique(np.concatenate([[0.0], send_end, recv_end]))
        for low, high in itertools.pairwise(cuts):
            middle = (low + high) / 2
            a = min(int(np.searchsorted(send_end, middle, side="right")), len(sends) - 1)
            b = min(int(np.searchsorted(recv_end, middle, side="right")), len(receives) - 1)
            virtual[lane_start[i] + sends[a][0], lane_start[j] + receives[b][0]] += high - low
    return virtual, device_of_lane


def _wrap_pieces(flows: np.ndarray, lanes: int) -> dict[int, list[tuple[int, float]]]:
    """One side of one device: flow index -> [(lane, amount), ...] under the wrap-around rule
    (flows laid end to end, lane a covering [a, a+1) * total / lanes; the last lane takes any rounding)."""
    nonzero = np.flatnonzero(flows)
    if lanes == 1:
        return {int(k): [(0, float(flows[k]))] for k in nonzero}
    per_lane = flows.sum() / lanes
    end = np.cumsum(flows[nonzero])
    start = end - flows[nonzero]
    out: dict[int, list[tuple[int, float]]] = {}
    for k, low, high in zip(nonzero.tolist(), start.tolist(), end.tolist(), strict=True):
        first = min(int(low // per_lane), lanes - 1)
        last = min(max(int(np.ceil(high / per_lane)) - 1, first), lanes - 1)
        pieces = []
        for lane in range(first, last + 1):
            lane_low = lane * per_lane
            lane_high = np.inf if lane == lanes - 1 else (lane + 1) * per_lane
            amount = min(high, lane_high) - max(low, lane_low)
            if amount > 0:
                pieces.append((lane, amount))
        if not pieces:  # a flow too small to register against rounding: give it to its first lane
            pieces = [(first, high - low)]
        out[k] = pieces
    return out
