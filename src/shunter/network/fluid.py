"""The network as a fluid: max-min fair rates on full-duplex ports, and flows run to completion.

Transports without a plan (what a plain all-to-all does), simulated as a fluid: all flows at once
with max-min fair sharing of every port ("fair_share"), or each sender working through its flows
one at a time in a random order (RCS) or shortest first (SJF), receivers shared max-min fairly.
Rates are recomputed whenever a flow finishes; each interval between two such events is one round
of the recorded Schedule. FluidNetwork runs flows that join at any time, for the timeline engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shunter.network.bounds import bandwidth_vector, off_diagonal
from shunter.network.schedule import Schedule
from shunter.network.transport import SenderQueueTransport, UnplannedTransport


@dataclass(frozen=True)
class BaselineResult:
    """A simulated baseline: its makespan, and the schedule when it was recorded."""

    policy: UnplannedTransport
    makespan_s: float
    num_events: int
    schedule: Schedule | None


def simulate_baseline(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    policy: UnplannedTransport,
    *,
    seed: int = 0,
    record: bool = True,
    shared_port_efficiency: float = 1.0,
    crowded_port_efficiency: float = 1.0,
) -> BaselineResult:
    """Makespan (and, with record, the Schedule) of an all-to-all run without a plan.

    fair_share: every flow starts at once; port bandwidth is shared max-min fairly (progressive
        filling), recomputed whenever a flow finishes.
    random_order (RCS): each sender sends its flows one at a time in a random order (seeded);
        flows meeting at a receiver share it max-min fairly.
    shortest_first (SJF): as random_order, each sender's flows smallest first.
    shared_port_efficiency (sender queues only): the share of its bandwidth a receiving port
        delivers while two or more flows meet there (1: a fluid; TCP flows meeting at a shaped
        port fill less of it, measured by `shunter.bench.a2a.calibrate`).
    crowded_port_efficiency (fair_share only): the share of its bandwidth one side of a port
        delivers while n - 1 flows cross it; see port_efficiency_by_flows.
    """
    matrix = off_diagonal(traffic_bytes)
    n = matrix.shape[0]
    bandwidth = bandwidth_vector(bandwidth_bytes_s, n)
    if policy == "fair_share":
        if not 0 < crowded_port_efficiency <= 1:
            raise ValueError(f"crowded_port_efficiency must be in (0, 1], got {crowded_port_efficiency}")
        return _simulate_fair_share(matrix, bandwidth, record, crowded_port_efficiency)
    if policy not in ("random_order", "shortest_first"):
        raise ValueError(f"unknown baseline policy {policy!r}")
    if not 0 < shared_port_efficiency <= 1:
        raise ValueError(f"shared_port_efficiency must be in (0, 1], got {shared_port_efficiency}")
    queues = sender_queues(matrix, policy, seed)
    return _simulate_sender_queues(matrix, bandwidth, queues, policy, record, shared_port_efficiency)


def sender_queues(traffic_bytes: np.ndarray, policy: SenderQueueTransport, seed: int = 0) -> list[list[int]]:
    """Per sender, the order it sends its off-diagonal flows in: a seeded random permutation (RCS)
    or smallest first (SJF). The runtime's random-order exchange uses the same queues, so the
    simulator predicts exactly the order that runs."""
    matrix = off_diagonal(traffic_bytes)
    rng = np.random.default_rng(seed)
    queues: list[list[int]] = []
    for i in range(matrix.shape[0]):
        targets = np.flatnonzero(matrix[i])
        if policy == "random_order":
            targets = rng.permutation(targets)
        else:
            targets = targets[np.argsort(matrix[i, targets], kind="stable")]
        queues.append(targets.tolist())
    return queues


def max_min_fair_rates(
    src: np.ndarray, dst: np.ndarray, bandwidth_bytes_s: np.ndarray, receive_bytes_s: np.ndarray | None = None
) -> np.ndarray:
    """[F] max-min fair rates of flows src[f] -> dst[f] on full-duplex ports (progressive filling):
    raise every unfrozen flow's rate together until some port is full, freeze the flows through it,
    repeat. Ports 0..n-1 are send sides, n..2n-1 receive sides; flows are indexed by port so each
    round of freezing costs only the flows it freezes. receive_bytes_s: the receive sides' [n]
    capacities when they differ from the send sides' (default: the same)."""
    n = bandwidth_bytes_s.shape[0]
    flows = src.shape[0]
    rate = np.zeros(flows)
    if flows == 0:
        return rate
    port_of_flow = np.concatenate([src, dst + n])  # [2F]: flow f uses ports src[f] and n + dst[f]
    flow_of_entry = np.argsort(port_of_flow, kind="stable")
    port_start = np.searchsorted(port_of_flow[flow_of_entry], np.arange(2 * n + 1))
    flow_of_entry %= flows
    count = np.diff(port_start).astype(np.float64)  # [2n] unfrozen flows through each port
    receive = bandwidth_bytes_s if receive_bytes_s is None else receive_bytes_s
    left = np.concatenate([bandwidth_bytes_s, receive]).astype(np.float64)
    frozen = np.zeros(flows, dtype=bool)
    position = np.zeros(flows, dtype=np.int64)  # scratch for de-duplication
    share = np.empty(2 * n)
    level = 0.0  # the rate every unfrozen flow has reached
    unfrozen = flows
    while unfrozen:
        share.fill(np.inf)
        np.divide(left, count, out=share, where=count > 0)
        step = max(float(share.min()), 0.0)
        level += step
        left -= step * count
        full = np.flatnonzero(share <= step * (1 + 1e-12))
        candidates = np.concatenate([flow_of_entry[port_start[p] : port_start[p + 1]] for p in full.tolist()])
        newly = candidates[~frozen[candidates]]
        if newly.size > 1:  # a flow whose two ports fill together appears twice: keep one copy
            position[newly] = np.arange(newly.size)
            newly = newly[position[newly] == np.arange(newly.size)]
        frozen[newly] = True
        rate[newly] = level
        unfrozen -= newly.size
        count -= np.bincount(np.concatenate([src[newly], dst[newly] + n]), minlength=2 * n)
        count[full] = 0
    return rate


def port_efficiency_by_flows(num_ports: int, crowded_port_efficiency: float) -> np.ndarray:
    """[num_ports] the share of its bandwidth one side (send or receive) of a port delivers while k
    flows cross it, at index k: 1 for one flow, falling linearly to crowded_port_efficiency at
    num_ports - 1 flows (every other port), which is what a uniform all-to-all probe measures.
    TCP flows sharing a shaped port fill less of it the more of them there are."""
    flows = np.arange(num_ports, dtype=np.float64)
    if num_ports <= 2:
        return np.ones(num_ports)
    return 1.0 - (1.0 - crowded_port_efficiency) * np.clip(flows - 1, 0, None) / (num_ports - 2)


def _simulate_fair_share(
    matrix: np.ndarray, bandwidth: np.ndarray, record: bool, crowded_port_efficiency: float = 1.0
) -> BaselineResult:
    n = matrix.shape[0]
    src, dst = np.nonzero(matrix)
    remaining = matrix[src, dst].copy()
    recorder = _Recorder(n, "fair_share", record)
    by_flows = port_efficiency_by_flows(n, crowded_port_efficiency)
    elapsed = 0.0
    events = 0
    while src.size:
        if crowded_port_efficiency == 1.0:
            rate = max_min_fair_rates(src, dst, bandwidth)
        else:
            # Send and receive sides get their own capacities: ports 0..n-1 send, n..2n-1 receive
            # (max_min_fair_rates gives each of its ports both sides; the unused ones carry nothing).
            sending = bandwidth * by_flows[np.bincount(src, minlength=n)]
            receiving = bandwidth * by_flows[np.bincount(dst, minlength=n)]
            rate = max_min_fair_rates(src, dst + n, np.concatenate([sending, receiving]))
        finish = remaining / rate
        step = finish.min()
        done = finish <= step * (1 + 1e-12)
        moved = np.where(done, remaining, rate * step)
        recorder.add_round(src, dst, moved, np.where(done, remaining / step, rate))
        elapsed += step
        events += 1
        remaining = remaining - moved
        keep = ~done
        src, dst, remaining = src[keep], dst[keep], remaining[keep]
    return BaselineResult("fair_share", elapsed, events, recorder.schedule())


def _simulate_sender_queues(
    matrix: np.ndarray,
    bandwidth: np.ndarray,
    queues: list[list[int]],
    policy: UnplannedTransport,
    record: bool,
    shared_port_efficiency: float = 1.0,
) -> BaselineResult:
    """Each sender has one flow in flight. With one flow per sender, max-min fairness splits into
    one water-filling per receiver (a sender's port only caps its single flow), so a finishing flow
    changes rates only at its own receiver and at its sender's next receiver. A receiver that two
    or more flows share offers shared_port_efficiency x its bandwidth."""
    n = matrix.shape[0]
    position = np.zeros(n, dtype=np.int64)
    target = np.array([q[0] if q else -1 for q in queues], dtype=np.int64)  # -1: sender is done
    remaining = np.array([matrix[i, target[i]] if target[i] >= 0 else 0.0 for i in range(n)])
    rate = np.zeros(n)
    senders_at: list[set[int]] = [set() for _ in range(n)]
    for i in np.flatnonzero(target >= 0).tolist():
        senders_at[int(target[i])].add(i)
    recorder = _Recorder(n, policy, record)

    def refill(receiver: int) -> None:
        # Water-filling at one receiver: slowest-capped senders first, the rest share what is left.
        senders = sorted(senders_at[receiver], key=lambda s: bandwidth[s])
        capacity = float(bandwidth[receiver]) * (shared_port_efficiency if len(senders) > 1 else 1.0)
        for index, s in enumerate(senders):
            rate[s] = min(float(bandwidth[s]), capacity / (len(senders) - index))
            capacity -= rate[s]

    for j in range(n):
        if senders_at[j]:
            refill(j)
    elapsed = 0.0
    events = 0
    while True:
        active = np.flatnonzero(target >= 0)
        if active.size == 0:
            break
        finish = remaining[active] / rate[active]
        step = finish.min()
        done = finish <= step * (1 + 1e-12)
        moved = np.where(done, remaining[active], rate[active] * step)
        if step > 0:
            recorder.add_round(active, target[active], moved, np.where(done, moved / step, rate[active]))
        remaining[active] -= moved
        elapsed += step
        events += 1
        touched: set[int] = set()
        for f in active[done].tolist():
            touched.add(int(target[f]))
            senders_at[int(target[f])].discard(f)
            rate[f] = 0.0
            position[f] += 1
            if position[f] < len(queues[f]):
                target[f] = queues[f][position[f]]
                remaining[f] = matrix[f, target[f]]
                senders_at[int(target[f])].add(f)
                touched.add(int(target[f]))
            else:
                target[f] = -1
                remaining[f] = 0.0
        for receiver in touched:
            refill(receiver)
    return BaselineResult(policy, elapsed, events, recorder.schedule())


class _Recorder:
    """Collects rounds of a simulated baseline (or nothing, when not recording)."""

    def __init__(self, n: int, strategy: str, record: bool) -> None:
        self.n, self.strategy, self.record = n, strategy, record
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add_round(self, src: np.ndarray, dst: np.ndarray, moved: np.ndarray, rate: np.ndarray) -> None:
        if self.record:
            keep = moved > 0
            self.parts.append((src[keep], dst[keep], moved[keep], rate[keep]))

    def schedule(self) -> Schedule | None:
        if not self.record:
            return None
        counts = np.array([p[0].size for p in self.parts], dtype=np.int64)
        if not self.parts:
            empty = np.zeros(0, dtype=np.int64)
            return Schedule(empty, empty, empty, np.zeros(0), np.zeros(0), 0, self.n, self.strategy)
        return Schedule(
            np.repeat(np.arange(len(self.parts), dtype=np.int64), counts),
            np.concatenate([p[0] for p in self.parts]).astype(np.int64),
            np.concatenate([p[1] for p in self.parts]).astype(np.int64),
            np.concatenate([p[2] for p in self.parts]),
            np.concatenate([p[3] for p in self.parts]),
            len(self.parts),
            self.n,
            self.strategy,
        )


# How much faster than its shaped rate a side passes bytes while its token bucket holds tokens (the
# emulated cluster's veth pairs run at memory speed; a finite multiple keeps the fluid model's events
# finite).
BURST_SPEEDUP = 10.0


class FluidNetwork:
    """Flows on a big switch sharing ports max-min fairly; flows may join at any time.

    A flow added at time t is idle until t + latency_s, then moves bytes at its max-min fair rate
    (max_min_fair_rates over all moving flows), recomputed at every start and finish.
    Each flow carries a tag (the collective it belongs to); `advance` reports tags whose last flow
    finished. Used by the timeline engine; a single all-to-all through it takes exactly
    fair_share_time_s (tested).

    burst_bytes [n]: a token bucket on each side of each port (Linux tbf, as the emulated cluster
    shapes its links): a side whose bucket holds tokens passes `BURST_SPEEDUP` x its rate, draining
    the bucket by what it passes beyond the rate; an empty side passes its rate; a side passing less
    than its rate (idle included) refills, up to burst_bytes. Buckets start full. A side's speed is
    re-read when rates are recomputed (a flow starts or ends) or its bucket runs dry. None: no bucket.
    """

    def __init__(
        self, bandwidth_bytes_s: np.ndarray, latency_s: float = 0.0, burst_bytes: np.ndarray | None = None
    ) -> None:
        self.bandwidth = np.asarray(bandwidth_bytes_s, dtype=np.float64)
        self.latency_s = float(latency_s)
        n = self.bandwidth.shape[0]
        self.burst = None if burst_bytes is None else np.tile(np.asarray(burst_bytes, dtype=np.float64), 2)
        self.tokens = None if self.burst is None else self.burst.copy()  # [2n] send sides, receive sides
        self._ports_rate = np.tile(self.bandwidth, 2)  # [2n] the sides' shaped rates
        self._usage = np.zeros(2 * n)  # [2n] bytes/s passing each side at the current rates
        self.now_s = 0.0
        self._src = np.zeros(0, dtype=np.int64)
        self._dst = np.zeros(0, dtype=np.int64)
        self._left = np.zeros(0)  # bytes still to move
        self._size = np.zeros(0)  # bytes at the start
        self._active_at = np.zeros(0)  # when the flow's first byte may move
        self._tag = np.zeros(0, dtype=np.int64)
        self._rate = np.zeros(0)
        self._rates_valid = False
        self._flows_of_tag: dict[int, int] = {}
        self._device_flows: dict[int, np.ndarray] = {}  # tag -> [n] unfinished flows sent or received
        self._parts_done: list[tuple[int, int, float]] = []  # (tag, device, time) since last taken

    @property
    def busy(self) -> bool:
        return self._src.size > 0

    def add(self, tag: int, src: np.ndarray, dst: np.ndarray, num_bytes: np.ndarray) -> None:
        """Start flows now (they move after the latency). Local (src == dst) and empty flows are dropped."""
        keep = (np.asarray(num_bytes) > 0) & (np.asarray(src) != np.asarray(dst))
        count = int(keep.sum())
        self._flows_of_tag[tag] = self._flows_of_tag.get(tag, 0) + count
        n = self.bandwidth.shape[0]
        touching = self._device_flows.setdefault(tag, np.zeros(n, dtype=np.int64))
        touching += np.bincount(np.asarray(src)[keep], minlength=n) + np.bincount(
            np.asarray(dst)[keep], minlength=n
        )
        if count == 0:
            return
        self._src = np.concatenate([self._src, np.asarray(src, dtype=np.int64)[keep]])
        self._dst = np.concatenate([self._dst, np.asarray(dst, dtype=np.int64)[keep]])
        self._left = np.concatenate([self._left, np.asarray(num_bytes, dtype=np.float64)[keep]])
        self._size = np.concatenate([self._size, np.asarray(num_bytes, dtype=np.float64)[keep]])
        self._active_at = np.concatenate([self._active_at, np.full(count, self.now_s + self.latency_s)])
        self._tag = np.concatenate([self._tag, np.full(count, tag, dtype=np.int64)])
        self._rates_valid = False

    def devices_in(self, tag: int) -> np.ndarray:
        """[n] bool: the devices with a flow of `tag` still to finish."""
        n = self.bandwidth.shape[0]
        return self._device_flows.get(tag, np.zeros(n, dtype=np.int64)) > 0

    def take_parts_done(self) -> list[tuple[int, int, float]]:
        """(tag, device, time) for each device whose last flow of a tag (sent or received) ended,
        since the last call: a rank's part of an all-to-all is then over (it returns)."""
        parts, self._parts_done = self._parts_done, []
        return parts

    def flows_of(self, tag: int) -> int:
        """Flows of `tag` not yet finished (0 for a tag whose flows are all done or never existed)."""
        return self._flows_of_tag.get(tag, 0)

    def _rates(self) -> np.ndarray:
        if not self._rates_valid:
            moving = self._active_at <= self.now_s
            self._rate = np.zeros(self._src.size)
            n = self.bandwidth.shape[0]
            capacity = self._ports_rate
            if self.tokens is not None:
                capacity = np.where(self.tokens > 0, self._ports_rate * BURST_SPEEDUP, self._ports_rate)
            if moving.any():
                self._rate[moving] = max_min_fair_rates(
                    self._src[moving], self._dst[moving], capacity[:n], capacity[n:]
                )
            self._usage = np.bincount(
                np.concatenate([self._src, self._dst + n]), np.tile(self._rate, 2), minlength=2 * n
            )
            self._rates_valid = True
        return self._rate

    def _bucket_empties_s(self) -> float:
        """When the first draining bucket runs dry at the current rates (inf: none drains)."""
        if self.tokens is None:
            return math.inf
        self._rates()
        draining = (self.tokens > 0) & (self._usage > self._ports_rate * (1 + 1e-9))
        if not draining.any():
            return math.inf
        return self.now_s + float((self.tokens[draining] / (self._usage - self._ports_rate)[draining]).min())

    def _move_tokens(self, seconds: float) -> None:
        if self.tokens is None:
            return
        before = self.tokens > 0
        self.tokens = np.clip(self.tokens - (self._usage - self._ports_rate) * seconds, 0.0, self.burst)
        self.tokens[self.tokens <= self.burst * 1e-9] = 0.0
        if np.any(before & (self.tokens == 0)):
            self._rates_valid = False  # a side ran dry: it passes only its rate now

    def next_event_s(self) -> float:
        """The next time a flow starts moving or finishes at the current rates (inf when idle)."""
        if not self.busy:
            return math.inf
        rate = self._rates()
        dry = self._bucket_empties_s()
        waiting = self._active_at > self.now_s
        next_start = float(self._active_at[waiting].min()) if waiting.any() else math.inf
        moving = rate > 0
        next_finish = (
            float((self._left[moving] / rate[moving]).min()) + self.now_s if moving.any() else math.inf
        )
        return min(next_start, next_finish, dry)

    def advance(self, until_s: float) -> list[int]:
        """Move bytes up to until_s (which must not pass next_event_s); returns tags that completed."""
        if until_s < self.now_s:
            raise AssertionError("the fluid network cannot go back in time")
        before = self.now_s
        if not self.busy:
            self._usage[:] = 0.0
            self._move_tokens(until_s - before)  # idle sides refill
            self.now_s = until_s
            return []
        rate = self._rates()
        self._left = self._left - rate * (until_s - before)
        self._move_tokens(until_s - before)
        self.now_s = until_s
        # Event times come from these rates, so a finishing flow lands on ~0; allow rounding.
        # (A time tolerance too: a step below the clock's resolution would never be taken.)
        done = (rate > 0) & (
            (self._left <= 1e-9 * self._size) | (self._left <= rate * 1e-12 * max(until_s, 1e-6))
        )
        completed: list[int] = []
        if done.any():
            for tag, src, dst in zip(self._tag[done], self._src[done], self._dst[done], strict=True):
                touching = self._device_flows[int(tag)]
                for device in (int(src), int(dst)):
                    touching[device] -= 1
                    if touching[device] == 0:
                        self._parts_done.append((int(tag), device, until_s))
            for tag, count in zip(*np.unique(self._tag[done], return_counts=True), strict=True):
                self._flows_of_tag[int(tag)] -= int(count)
                if self._flows_of_tag[int(tag)] == 0:
                    completed.append(int(tag))
            keep = ~done
            self._src, self._dst, self._left = self._src[keep], self._dst[keep], self._left[keep]
            self._size, self._active_at, self._tag = self._size[keep], self._active_at[keep], self._tag[keep]
            self._rates_valid = False
        if np.any((self._active_at > before) & (self._active_at <= until_s)):
            self._rates_valid = False  # flows past their latency join the sharing
        return completed
