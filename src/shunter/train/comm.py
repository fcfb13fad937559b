"""When the dense gradients of expert-parallel training are summed across ranks: DDP's buckets,
Lina's micro-ops and her priority scheduler (`GradientSync`), and the per-step timeline of
communication (`StepTimeline`).

Schedulers of the dense-gradient allreduce (`--comm`), all on their own gloo group so an allreduce
in flight shares the links with the all-to-all as it does on a real cluster:
- "overlap": DDP's buckets (`--bucket-bytes`, in reverse parameter order), each launched
  asynchronously as soon as its gradients are ready during backward, concurrently with the
  backward all-to-alls (what DDP and DeepSpeed do).
- "priority": the same buckets, launched one at a time by a scheduler thread only while no MoE
  layer's backward all-to-all is waiting or running (Lina's priority alone: a launched bucket cannot
  be preempted).
- "lina": priority with every gradient cut into micro-ops of `--micro-op-bytes` (chunks of two
  tensors never share one), so an all-to-all waits for at most one micro-op.
A MoE layer's backward is "all-to-all pending" from the backward of its combine exchange (the
first all-to-all of the layer's backward) to the end of the backward of its dispatch exchange
(`shunter.train.expert_parallel` signals it). The three give the same gradients; they only
reorder communication.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from shunter.errors import ShunterError

COMM_SCHEDULERS = ("overlap", "priority", "lina")


@dataclass
class StepTimeline:
    """perf_counter intervals of one rank's step: all-to-alls (forward and backward) and allreduces
    (launch to completion, recorded by the backend's thread); and each MoE layer's dispatch rows
    (row [i, j]: (token, choice) pairs rank i sent to rank j), the routing the simulator replays;
    and how long each forward expert-FFN micro-op took (what expert packing compares)."""

    a2a_forward: list[tuple[float, float]] = field(default_factory=list)
    a2a_backward: list[tuple[float, float]] = field(default_factory=list)
    allreduce: list[tuple[float, float]] = field(default_factory=list)
    dispatch_rows: list[list[list[int]]] = field(default_factory=list)  # per MoE layer, rows [n, n]
    ffn: list[float] = field(default_factory=list)  # seconds of each forward expert-FFN micro-op
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.a2a_forward.clear()
            self.a2a_backward.clear()
            self.allreduce.clear()
            self.dispatch_rows.clear()
            self.ffn.clear()

    def add_allreduce(self, start: float, end: float) -> None:
        with self.lock:
            self.allreduce.append((start, end))

    def add_a2a(self, backward: bool, start: float, end: float) -> None:
        with self.lock:
            (self.a2a_backward if backward else self.a2a_forward).append((start, end))


def union_of(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def union_length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in union_of(intervals))


def overlap_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds covered by both interval sets."""
    total = 0.0
    for s1, e1 in union_of(a):
        for s2, e2 in union_of(b):
            total += max(0.0, min(e1, e2) - max(s1, s2))
    return total


# ---------------------------------------------------------------------------------------------
# the dense-gradient allreduce


@dataclass(frozen=True)
class Segment:
    """Elements [start, stop) of one parameter's flattened gradient."""

    param: int
    start: int
    stop: int


def bucket_ops(
    params: list[torch.Tensor], bucket_bytes: int, order: Sequence[int] | None = None
) -> list[list[Segment]]:
    """DDP's buckets: whole gradients in `order` (the order backward made them; by default reverse
    parameter order, DDP's first guess), a bucket closed once it holds bucket_bytes or more."""
    ops: list[list[Segment]] = []
    current: list[Segment] = []
    size = 0
    for index in reversed(range(len(params))) if order is None else order:
        p = params[index]
        current.append(Segment(index, 0, p.numel()))
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            ops.append(current)
            current, size = [], 0
    if current:
        ops.append(current)
    return ops


def micro_ops(
    params: list[torch.Tensor], micro_op_bytes: int, order: Sequence[int] | None = None
) -> list[list[Segment]]:
    """Lina's micro-ops: each gradient (in `order`, as bucket_ops) cut into chunks of at most
    micro_op_bytes; chunks of different tensors never share a micro-op."""
    ops: list[list[Segment]] = []
    for index in reversed(range(len(params))) if order is None else order:
        p = params[index]
        per_op = max(micro_op_bytes // p.element_size(), 1)
        ops += [[Segment(index, s, min(s + per_op, p.numel()))] for s in range(0, p.numel(), per_op)]
    return ops


class GradientSync:
    """Sums the dense gradients over the ranks during and after backward.

    ops: the allreduces, launched in this order on every rank (collectives on one group must be);
    an op starts once all its gradients are ready. priority=False launches each as soon as it may
    (overlap); priority=True launches them one at a time from a scheduler thread, only while no
    all-to-all is pending (`a2a_pending`), and every remaining one after backward (`finish`)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        ops: list[list[Segment]],
        priority: bool,
        group: dist.ProcessGroup | None,
        timeline: StepTimeline,
    ) -> None:
        self.params, self.priority, self.group = params, priority, group
        self.timeline = timeline
        self.use_ops(ops)
        self.ready_order: list[int] = []  # parameters in the order their gradients were ready
        self.condition = threading.Condition()
        self.handles: list[RemovableHandle] = []
        self._reset()

    def use_ops(self, ops: list[list[Segment]]) -> None:
        """Allreduce these ops from the next backward on (the same ops on every rank)."""
        self.ops = ops
        self.ops_of_param: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            for segment in op:
                self.ops_of_param.setdefault(segment.param, []).append(i)

    def _reset(self) -> None:
        self.ready_order = []
        self.waiting = [len({s.param for s in op}) for op in self.ops]  # gradients each op still needs
        self.next_op = 0
        self.pending_a2a = False
        self.flushing = False
        self.stopping = False
        self.launched: list[tuple[object, torch.Tensor | None, list[Segment]]] = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def begin_backward(self) -> None:
        """Before each backward: hook every parameter's gradient (until `stop`)."""
        self._reset()
        # The hooks live for one backward only: a hook's closure holds this object (and its group),
        # and a parameter holds its hooks where the garbage collector cannot see them, so hooks
        # left in place would keep the group alive into the interpreter's teardown, where gloo's
        # threads can abort the process.
        self.handles = [
            p.register_post_accumulate_grad_hook(lambda _p, index=i: self._gradient_ready(index))
            for i, p in enumerate(self.params)
        ]
        if self.priority:
            self.thread = threading.Thread(target=self._schedule, name="allreduce-scheduler", daemon=True)
            self.thread.start()

    def a2a_pending(self, pending: bool) -> None:
        if not self.priority:
            return
        with self.condition:
            self.pending_a2a = pending
            self.condition.notify_all()

    def _gradient_ready(self, param: int) -> None:
        with self.condition:
            self.ready_order.append(param)
            for i in self.ops_of_param.get(param, ()):
                self.waiting[i] -= 1
            if self.priority:
                self.condition.notify_all()
                return
        while self.next_op < len(self.ops) and self.waiting[self.next_op] == 0:
            self._launch(self.ops[self.next_op])
            self.next_op += 1

    def _launch(self, op: list[Segment]) -> object:
        grads = [self.params[s.param].grad for s in op]
        if any(g is None for g in grads):
            raise ShunterError("a dense parameter got no gradient; every rank must use every dense weight")
        if len(op) == 1:  # in place, on a contiguous slice of the gradient
            buffer, flat = None, grads[0].view(-1)[op[0].start : op[0].stop]
        else:
            buffer = flat = torch.cat([g.view(-1)[s.start : s.stop] for g, s in zip(grads, op, strict=True)])
        started = time.perf_counter()
        work = dist.all_reduce(flat, async_op=True, group=self.group)
        work.get_future().then(lambda _f: self.timeline.add_allreduce(started, time.perf_counter()))
        self.launched.append((work, buffer, op))
        return work

    def _schedule(self) -> None:
        """The priority scheduler thread: one allreduce at a time, none while an all-to-all is
        pending; once backward is over (flushing) no all-to-all can come, so the rest go at once,
        in flight together as overlap's buckets are (waited for in `finish`)."""
        try:
            for index, op in enumerate(self.ops):
                with self.condition:
                    self.condition.wait_for(
                        lambda i=index: (
                            self.stopping
                            or (self.waiting[i] == 0 and (self.flushing or not self.pending_a2a))
                        )
                    )
                    if self.stopping:
                        return
                    flushing = self.flushing
                work = self._launch(op)
                if not flushing:
                    work.wait()  # type: ignore[attr-defined]
        except BaseException as exc:  # a failed collective: reported by finish() on the main thread
            self.error = exc

    def finish(self) -> None:
        """After backward: launch what is left, wait for every allreduce, copy bucket sums back."""
        if self.priority:
            assert self.thread is not None
            with self.condition:
                self.flushing = True
                self.condition.notify_all()
            self.thread.join()
            if self.error is not None:
                raise self.error
        else:
            while self.next_op < len(self.ops):
                self._launch(self.ops[self.next_op])
                self.next_op += 1
        for work, buffer, op in self.launched:
            work.wait()  # type: ignore[attr-defined]
            if buffer is not None:
                offset = 0
                for s in op:
                    n = s.stop - s.start
                    self.params[s.param].grad.view(-1)[s.start : s.stop].copy_(buffer[offset : offset + n])
                    offset += n

    def stop(self) -> None:
        """After each backward (finished or failed): unhook the parameters and stop the scheduler
        thread."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.thread is not None and self.thread.is_alive():
            with self.condition:
                self.stopping = True
                self.condition.notify_all()
            self.thread.join(timeout=1.0)
