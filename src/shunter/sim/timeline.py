"""Run a graph of compute ops and collectives on the devices of a cluster and its shared network.

The graph is a list of ops, each naming the ops it waits for:
- Compute(name, seconds [n], after, stream): runs on every device where seconds[d] > 0. A device
  runs one op at a time per stream, in list order (a CUDA stream): device d starts the op when it
  has finished the earlier ops of that stream and every dependency is done on d (a collective
  is done on d once d's own flows, sent and received, have ended: a rank's all-to-all returns when
  its part is done, in gloo and NCCL alike). A zero entry is a no-op that occupies nothing.
  Stream "compute" is the GPU's arithmetic (utilisation counts it); another stream (e.g. "copy"
  for weights arriving over PCIe) runs beside it.
- Collective(name, src, dst, bytes, after): a set of flows (an all-to-all, one allreduce chunk).
  It starts when every dependency is done on every device (collectives start as barriers) and
  ends when its last byte arrives.
Networks:
- "fair_share": all started collectives share the ports; flows start after the per-message latency
  and are shared max-min fairly (network.fluid.FluidNetwork) — what plain NCCL/TCP transports approach.
- "planned": each collective runs its own matching schedule (its planned_s, latency included)
  with the network to itself; collectives queue for it (ready time, then list order).
Shared cores (TimelineOptions.cores = c; None: every device computes on its own): the devices
are processes on one machine's c cores (emulated hosts), so ops on the "compute" stream are
processor-shared (sim.cores.SharedCores): while k devices run one, each progresses at min(1, c / k)
of its speed (a device computing while the others wait in a collective runs at full speed). Compute
is then event-driven: device d starts its next op of a stream when the op's dependencies are done on
d and d's stream is free, and the op's end on d is an event beside the network's. Other streams
(e.g. "copy") are not the CPU's and run at full speed. busy_s counts a device's wall time computing.
One room, though long: the two compute engines (_EagerCompute, _SharedCompute) and the loop that
interleaves them with the network share the op graph's bookkeeping and its every rule above; a
split would pass that state between modules.
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
from shunter.sim.cores import SharedCores


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
    """network and latency_s: how collectives move; priority: Lina's rule; cores: the devices share
    this many cores (module docstring; None: each computes on its own, compute resolved eagerly);
    burst_bytes [n]: each port's token bucket (FluidNetwork; fair_share only; None: none)."""

    network: TimelineTransport = "fair_share"
    latency_s: float = 0.0
    priority: bool = False
    cores: float | None = None
    burst_bytes: np.ndarray | None = None


@dataclass(frozen=True)
class Timeline:
    """What happened: per op, when it started and finished.

    compute_start_s / compute_finish_s: name -> [n] (a no-op device has start == finish);
    collective_start_s / collective_finish_s: name -> seconds; busy_s [n]: wall time each device
    spends on its "compute" stream (on shared cores: its ops' stretched durations).
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


class _EagerCompute:
    """Compute on devices of their own: an op's start and finish on every device follow from its
    inputs alone, so each stream is resolved in its order as soon as the inputs are known, ahead
    of the clock. start_s / finish_s: name -> [n] of every resolved op."""

    def __init__(self, computes: list[Compute], n: int, collective_finish_s: dict[str, np.ndarray]) -> None:
        self.n = n
        self.start_s: dict[str, np.ndarray] = {}
        self.finish_s: dict[str, np.ndarray] = {}
        self.busy_s = np.zeros(n)
        self._collective_finish_s = collective_finish_s
        self._streams: dict[str, list[Compute]] = {}
        for op in computes:
            self._streams.setdefault(op.stream, []).append(op)
        self._device_free = {stream: np.zeros(n) for stream in self._streams}
        self._next_of_stream = dict.fromkeys(self._streams, 0)

    def _ready(self, op: Compute) -> np.ndarray | None:
        """[n] earliest start per device from dependencies, or None while one is unresolved."""
        ready = np.zeros(self.n)
        for d in op.after:
            finish = self.finish_s.get(d, self._collective_finish_s.get(d))
            if finish is None or np.isnan(finish).any():
                return None
            ready = np.maximum(ready, finish)
        return ready

    def resolve(self, now_s: float) -> None:
        """Resolve every op whose inputs are known (now_s plays no part: nothing is shared)."""
        progress = True
        while progress:
            progress = False
            for stream, queue in self._streams.items():
                while self._next_of_stream[stream] < len(queue):
                    op = queue[self._next_of_stream[stream]]
                    ready = self._ready(op)
                    if ready is None:
                        break
                    seconds = np.asarray(op.seconds, dtype=np.float64)
                    runs = seconds > 0
                    start = np.where(runs, np.maximum(ready, self._device_free[stream]), ready)
                    finish = start + seconds
                    self._device_free[stream] = np.where(runs, finish, self._device_free[stream])
                    if stream == "compute":
                        self.busy_s += seconds
                    self.start_s[op.name], self.finish_s[op.name] = start, finish
                    self._next_of_stream[stream] += 1
                    progress = True

    def next_event_s(self) -> float:
        # Compute finishing can make an imminent all-to-all "waiting" no sooner than its readiness
        # (a candidate of the collectives already), so compute has no events of its own.
        return math.inf

    def advance(self, until_s: float) -> None:
        pass

    def unresolved(self) -> list[str]:
        return [op.name for stream, q in self._streams.items() for op in q[self._next_of_stream[stream] :]]

    def started(self, name: str, now_s: float) -> bool:
        """Whether op `name` has started on some device that runs it by now_s (an op that runs
        nowhere: once resolved)."""
        if name not in self.start_s:
            return False
        started = self.start_s[name][self.finish_s[name] > self.start_s[name]]
        return not started.size or started.min() <= now_s


class _SharedCompute:
    """Compute on shared cores (TimelineOptions.cores): per device and stream, the next op starts
    when its dependencies are done on that device and the device's stream is free; "compute" ops
    progress on SharedCores, other streams' at full speed. An op's start and finish are known per
    device as they happen; start_s / finish_s hold the ops done on every device."""

    def __init__(
        self, computes: list[Compute], n: int, collective_finish_s: dict[str, np.ndarray], cores: float
    ) -> None:
        self.n = n
        self.start_s: dict[str, np.ndarray] = {}
        self.finish_s: dict[str, np.ndarray] = {}
        self.busy_s = np.zeros(n)
        self._collective_finish_s = collective_finish_s
        self._cores = SharedCores(n, cores)
        self._seconds = {op.name: np.asarray(op.seconds, dtype=np.float64) for op in computes}
        self._start = {op.name: np.full(n, np.nan) for op in computes}  # per device, NaN: not yet
        self._finish = {op.name: np.full(n, np.nan) for op in computes}
        self._streams: dict[str, list[Compute]] = {}
        for op in computes:
            self._streams.setdefault(op.stream, []).append(op)
        self._next = {stream: np.zeros(n, dtype=np.int64) for stream in self._streams}
        self._free_at = {stream: np.zeros(n) for stream in self._streams}  # streams off the cores

    def _ready_on(self, op: Compute, device: int) -> float | None:
        """Earliest start of op on device from its dependencies, or None while one is not done there."""
        ready = 0.0
        for d in op.after:
            if d in self._finish:
                finish = float(self._finish[d][device])
                if math.isnan(finish):
                    return None
            elif d in self._collective_finish_s:
                finish = float(self._collective_finish_s[d][device])
                if math.isnan(finish):
                    return None
            else:
                return None
            ready = max(ready, finish)
        return ready

    def _record(self, name: str, device: int, start: float, finish: float) -> None:
        self._start[name][device], self._finish[name][device] = start, finish
        if not np.isnan(self._finish[name]).any():
            self.start_s[name], self.finish_s[name] = self._start[name], self._finish[name]

    def _head(self, stream: str, device: int) -> Compute | None:
        queue = self._streams[stream]
        index = int(self._next[stream][device])
        return queue[index] if index < len(queue) else None

    def resolve(self, now_s: float) -> None:
        """Start, on each device, every op that may start by now_s; a no-op entry is done when its
        dependencies are (it occupies nothing)."""
        progress = True
        while progress:
            progress = False
            for stream in self._streams:
                for device in range(self.n):
                    while (op := self._head(stream, device)) is not None:
                        ready = self._ready_on(op, device)
                        if ready is None:
                            break
                        work = float(self._seconds[op.name][device])
                        if work <= 0:
                            self._record(op.name, device, ready, ready)
                        elif ready > now_s:
                            break
                        elif stream == "compute":
                            if self._cores.running(device):
                                break
                            self._cores.start(device, work, op.name)
                            self._start[op.name][device] = now_s
                        else:
                            if self._free_at[stream][device] > now_s:
                                break
                            self._free_at[stream][device] = now_s + work
                            self._record(op.name, device, now_s, now_s + work)
                        self._next[stream][device] += 1
                        progress = True

    def next_event_s(self) -> float:
        """The first of: running compute ends, an op's inputs become done on a device, a stream
        off the cores frees."""
        candidates = [self._cores.next_event_s()]
        now_s = self._cores.now_s
        for stream in self._streams:
            for device in range(self.n):
                op = self._head(stream, device)
                ready = None if op is None else self._ready_on(op, device)
                if ready is None:
                    continue
                if stream != "compute":
                    ready = max(ready, float(self._free_at[stream][device]))
                if ready > now_s:
                    candidates.append(ready)
        return min(candidates)

    def advance(self, until_s: float) -> None:
        for device, name in self._cores.advance(until_s):
            start = float(self._start[name][device])
            self.busy_s[device] += until_s - start
            self._record(name, device, start, until_s)

    def unresolved(self) -> list[str]:
        return [name for name, finish in self._finish.items() if np.isnan(finish).any()]

    def started(self, name: str, now_s: float) -> bool:
        """Whether op `name` has started on some device that runs it by now_s (an op that runs
        nowhere: once done everywhere)."""
        runs = self._seconds[name] > 0
        if not runs.any():
            return name in self.finish_s
        start = self._start[name][runs]
        return bool((start[~np.isnan(start)] <= now_s).any())


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

    k_start: dict[str, float] = {}
    k_finish: dict[str, float] = {}
    kd_finish: dict[
        str, np.ndarray
    ] = {}  # per started collective, [n] when each device's part ended (NaN: not yet)
    compute: _EagerCompute | _SharedCompute
    if options.cores is None:
        compute = _EagerCompute(computes, n, kd_finish)
    else:
        compute = _SharedCompute(computes, n, kd_finish, options.cores)
    c_start, c_finish = compute.start_s, compute.finish_s
    network = (
        FluidNetwork(bandwidth, options.latency_s, options.burst_bytes)
        if options.network == "fair_share"
        else None
    )
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
        return any(compute.started(d, now) for d in op.announced_by)

    while True:
        # 1. Compute whose inputs are known: resolved (eager) or started (shared cores).
        compute.resolve(now)
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
        finished_now = False  # a collective over for some device as it starts: look again
        for _, _, op in waiting:
            if op.low_priority and high_pending:
                continue
            if network is not None:
                k_start[op.name] = now
                network.add(tag_of[op.name], op.src, op.dst, op.bytes)
                # a device with no flow in it is done with it as it starts
                kd_finish[op.name] = np.where(network.devices_in(tag_of[op.name]), np.nan, now)
                if network.flows_of(tag_of[op.name]) == 0:
                    k_finish[op.name] = now
                if not np.isnan(kd_finish[op.name]).all():
                    finished_now = True  # some device is already past it: its compute may go on now
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
                    kd_finish[op.name] = np.full(n, now)
                    planned_running.pop()
                    planned_free_at = now
                    finished_now = True
            if not op.low_priority and op.name not in k_finish:
                high_pending = options.priority

        if finished_now:
            continue
        # 3. Next event: a collective becomes ready, a flow starts or ends, a planned run ends,
        # compute on shared cores starts or ends.
        candidates = [future_ready, compute.next_event_s()]
        if network is not None:
            candidates.append(network.next_event_s())
        else:
            candidates += [finish for finish, _ in planned_running]
            if planned_free_at > now:
                candidates.append(planned_free_at)
        unresolved = compute.unresolved()
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
            for tag, device, finish in network.take_parts_done():
                kd_finish[collectives[tag].name][device] = finish
        else:
            still = []
            for finish, name in planned_running:
                if finish <= next_time:
                    k_finish[name] = finish
                    kd_finish[name] = np.full(n, finish)
                else:
                    still.append((finish, name))
            planned_running = still
        compute.advance(next_time)
        now = next_time

    ends = [float(f.max()) for f in c_finish.values() if f.size] + list(k_finish.values())
    kinds = {op.name: op.kind for op in ops}
    return Timeline(max(ends, default=0.0), compute.busy_s, c_start, c_finish, k_start, k_finish, kinds)
