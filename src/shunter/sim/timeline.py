"""Run a graph of compute ops and collectives on the devices of a cluster and its shared network.

The graph is a list of ops, each naming the ops it waits for:
- Compute(name, seconds [n], after, stream): runs on every device where seconds[d] > 0. A device
  runs one op at a time per stream, in list order (a CUDA stream): device d starts the op when it
  has finished the earlier ops of that stream and every dependency is done (a compute
  dependency: on d; a collective: everywhere). A zero entry is a no-op that occupies nothing.
  Stream "compute" is the GPU's arithmetic (utilisation counts it); another stream (e.g. "copy"
  for weights arriving over PCIe) runs beside it.
- Collective(name, src, dst, bytes, after): a set of flows (an all-to-all, one allreduce chunk).
  It starts when every dependency is done on every device (collectives are barriers) and ends
  when its last byte arrives.
Networks:
- "fair_share": all started collectives share the ports; flows start after the per-message latency
  and are shared max-min fairly (network.fluid.FluidNetwork) — what plain NCCL/TCP transports approach.
- "planned": each collective runs its own matching schedule (its planned_s, latency included)
  with the network to itself; collectives queue for it (ready time, then list order).
Priority (Lina): a low-priority collective (an allreduce micro-op) starts only when no
high-priority collective is running, waiting, or announced (a compute op in its announced_by has
started: "an all-to-all is coming"); a started one is never preempted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shunter.network.fluid import FluidNetwork
from shunter.network.transport import TimelineTransport


@dataclass(frozen=True)
class Compute:
    """seconds [n]: time on each device (0: not run there). kind: a label for reports (gate, expert...)."""

    name: str
    seconds: np.ndarray
    after: tuple[str, ...] = ()
    kind: str = ""
    stream: str = "compute"


@dataclass(frozen=True)
class Collective:
    """Flows src [F] -> dst [F] of bytes [F]; planned_s: its duration on a "planned" network;
    announced_by: compute ops whose start makes it imminent for the priority rule."""

    name: str
    src: np.ndarray
    dst: np.ndarray
    bytes: np.ndarray
    after: tuple[str, ...] = ()
    low_priority: bool = False
    planned_s: float | None = None
    kind: str = ""
    announced_by: tuple[str, ...] = ()

    @classmethod
    def from_traffic(
        cls,
        name: str,
        traffic_bytes: np.ndarray,
        after: tuple[str, ...] = (),
        planned_s: float | None = None,
        kind: str = "all_to_all",
    ) -> Collective:
        """An all-to-all from traffic [n, n] (the diagonal is local and not sent)."""
        matrix = np.asarray(traffic_bytes, dtype=np.float64)
        src, dst = np.nonzero(matrix * (1 - np.eye(matrix.shape[0])))
        return cls(name, src, dst, matrix[src, dst], after, False, planned_s, kind)

    @property
    def total_bytes(self) -> float:
        return float(np.sum(self.bytes))


Op = Compute | Collective


@dataclass(frozen=True)
class TimelineOptions:
    network: TimelineTransport = "fair_share"
    latency_s: float = 0.0
    priority: bool = False


@dataclass(frozen=True)
class Timeline:
    """What happened: per op, when it started and finished.

    compute_start_s / compute_finish_s: name -> [n] (a no-op device has start == finish);
    collective_start_s / collective_finish_s: name -> seconds; busy_s [n]: compute time per device.
    """

    makespan_s: float
    busy_s: np.ndarray
    compute_start_s: dict[str, np.ndarray] = field(default_factory=dict)
    compute_finish_s: dict[str, np.ndarray] = field(default_factory=dict)
    collective_start_s: dict[str, float] = field(default_factory=dict)
    collective_finish_s: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def utilisation(self) -> np.ndarray:
        """[n] fraction of the makespan each device spends computing."""
        return self.busy_s / self.makespan_s if self.makespan_s > 0 else np.zeros_like(self.busy_s)

    @property
    def mean_utilisation(self) -> float:
        return float(self.utilisation.mean())

    def network_busy_s(self) -> float:
        """Length of the union of the collectives' [start, finish) intervals."""
        intervals = sorted(
            (self.collective_start_s[k], self.collective_finish_s[k]) for k in self.collective_start_s
        )
        total, end = 0.0, -math.inf
        for start, finish in intervals:
            if finish > end:
                total += finish - max(start, end)
                end = finish
        return total


def run_timeline(ops: list[Op], bandwidth_bytes_s: np.ndarray, options: TimelineOptions) -> Timeline:
    """Simulate the op graph; see the module docstring for the rules. Raises ValueError on a
    dependency that names no earlier-or-later op, or on a cycle (an op that can never start)."""
    names = [op.name for op in ops]
    if len(set(names)) != len(names):
        raise ValueError("op names must be unique")
    known = set(names)
    for op in ops:
        missing = [d for d in op.after if d not in known]
        if missing:
            raise ValueError(f"{op.name} waits for unknown op {missing[0]!r}")
    bandwidth = np.asarray(bandwidth_bytes_s, dtype=np.float64)
    n = bandwidth.shape[0]
    computes = [op for op in ops if isinstance(op, Compute)]
    collectives = [op for op in ops if isinstance(op, Collective)]
    tag_of = {op.name: k for k, op in enumerate(collectives)}
    is_compute = {op.name: isinstance(op, Compute) for op in ops}

    c_start: dict[str, np.ndarray] = {}
    c_finish: dict[str, np.ndarray] = {}
    k_start: dict[str, float] = {}
    k_finish: dict[str, float] = {}
    streams: dict[str, list[Compute]] = {}
    for op in computes:
        streams.setdefault(op.stream, []).append(op)
    device_free = {stream: np.zeros(n) for stream in streams}
    next_of_stream = dict.fromkeys(streams, 0)
    busy = np.zeros(n)
    network = FluidNetwork(bandwidth, options.latency_s) if options.network == "fair_share" else None
    planned_free_at = 0.0
    planned_running: list[tuple[float, str]] = []  # (finish, name) on the planned network
    now = 0.0

    def dep_ready(op: Op) -> np.ndarray | None:
        """[n] earliest start per device from dependencies, or None while one is unresolved."""
        ready = np.zeros(n)
        for d in op.after:
            if is_compute[d]:
                if d not in c_finish:
                    return None
                ready = np.maximum(ready, c_finish[d])
            else:
                if d not in k_finish:
                    return None
                ready = np.maximum(ready, k_finish[d])
        return ready

    def imminent(op: Collective) -> bool:
        """A high-priority collective that runs, waits, or is announced: a compute op named in its
        announced_by has started on some device (Lina: the backward combine computation)."""
        if op.name in k_finish:
            return False
        if op.name in k_start:
            return True
        ready = dep_ready(op)
        if ready is not None and (float(ready.max()) if ready.size else 0.0) <= now:
            return True
        for d in op.announced_by:
            if d in c_start:
                started = c_start[d][c_finish[d] > c_start[d]]
                if not started.size or started.min() <= now:
                    return True
        return False

    while True:
        # 1. Compute is deterministic once its inputs are known: resolve each stream in its order.
        progress = True
        while progress:
            progress = False
            for stream, queue in streams.items():
                while next_of_stream[stream] < len(queue):
                    op = queue[next_of_stream[stream]]
                    ready = dep_ready(op)
                    if ready is None:
                        break
                    seconds = np.asarray(op.seconds, dtype=np.float64)
                    runs = seconds > 0
                    start = np.where(runs, np.maximum(ready, device_free[stream]), ready)
                    finish = start + seconds
                    device_free[stream] = np.where(runs, finish, device_free[stream])
                    if stream == "compute":
                        busy += seconds
                    c_start[op.name], c_finish[op.name] = start, finish
                    next_of_stream[stream] += 1
                    progress = True

        # 2. Collectives whose inputs are known, and may start now.
        waiting: list[tuple[float, int, Collective]] = []
        future_ready = math.inf
        for index, op in enumerate(collectives):
            if op.name in k_start:
                continue
            ready = dep_ready(op)
            if ready is None:
                continue
            ready_at = float(ready.max()) if ready.size else 0.0
            if ready_at <= now:
                waiting.append((ready_at, index, op))
            else:
                future_ready = min(future_ready, ready_at)
        waiting.sort(key=lambda item: (item[2].low_priority, item[0], item[1]))
        high_pending = options.priority and any(
            imminent(op) for op in collectives if not op.low_priority and op.name not in k_finish
        )
        finished_now = False  # a collective with nothing to send ends as it starts: look again
        for _, _, op in waiting:
            if op.low_priority and high_pending:
                continue
            if network is not None:
                k_start[op.name] = now
                network.add(tag_of[op.name], op.src, op.dst, op.bytes)
                if network.flows_of(tag_of[op.name]) == 0:
                    k_finish[op.name] = now
                    finished_now = True
            else:
                if planned_free_at > now:
                    break  # the planned network runs one collective at a time
                duration = op.planned_s if op.planned_s is not None else 0.0
                k_start[op.name] = now
                k_finish_at = now + duration
                planned_free_at = k_finish_at
                planned_running.append((k_finish_at, op.name))
                if duration == 0:
                    k_finish[op.name] = now
                    planned_running.pop()
                    planned_free_at = now
                    finished_now = True
            if not op.low_priority and op.name not in k_finish:
                high_pending = options.priority

        if finished_now:
            continue
        # 3. Next event: a collective becomes ready, a flow starts or ends, a planned run ends.
        candidates = [future_ready]
        if network is not None:
            candidates.append(network.next_event_s())
        else:
            candidates += [finish for finish, _ in planned_running]
            if planned_free_at > now:
                candidates.append(planned_free_at)
        # Compute finishing can make an imminent all-to-all "waiting" no sooner than its readiness
        # (already a candidate), so compute events need no entry of their own.
        unresolved = [op.name for stream, q in streams.items() for op in q[next_of_stream[stream] :]]
        resolved_all = not unresolved and len(k_finish) == len(collectives)
        next_time = min(candidates)
        if resolved_all:
            break
        if not math.isfinite(next_time):
            stuck = [op.name for op in collectives if op.name not in k_finish] + unresolved
            raise ValueError(f"the op graph cannot finish: {stuck[:3]} never start (a cycle?)")
        # 4. Advance.
        if network is not None:
            for tag in network.advance(next_time):
                k_finish[collectives[tag].name] = next_time
        else:
            still = []
            for finish, name in planned_running:
                if finish <= next_time:
                    k_finish[name] = finish
                else:
                    still.append((finish, name))
            planned_running = still
        now = next_time

    ends = [float(f.max()) for f in c_finish.values() if f.size] + list(k_finish.values())
    kinds = {op.name: op.kind for op in ops}
    return Timeline(max(ends, default=0.0), busy, c_start, c_finish, k_start, k_finish, kinds)
