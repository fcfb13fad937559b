"""Expert- and data-parallel training on torch.distributed, with Lina's communication scheduler.

Launched by torchrun (`torchrun --nproc-per-node N -m shunter train ... --expert-parallel N`), one
process per rank. Each rank:
- trains on its slice of every global batch (sequences [r*B/n, (r+1)*B/n) of `batch_at`);
- holds a full copy of the dense weights (embeddings, norms, attention, routers) and the routed
  experts its placement gives it (contiguous blocks, or an exclusive plan's slots);
- runs each MoE layer as `ExpertParallelMoE` does, with the all-to-alls differentiable
  (`_Exchange`: the backward of an exchange is the exchange of the gradients along the transposed
  rows), so an expert's gradient sums the contributions of every token it served, on every rank;
- computes its part of the global loss (`language_model_loss` with `batch_share`), so the sum of
  the ranks' dense gradients is the single-process gradient of the global batch; dense gradients
  are summed across ranks by one of the schedulers below, expert gradients stay where they are.

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
first all-to-all of the layer's backward) to the end of the backward of its dispatch exchange.
The three give the same gradients; they only reorder communication.

With N ranks and --expert-parallel P < N (P dividing N), ranks [d*P, (d+1)*P) form expert-parallel
group d, each group holds every expert once, and the ranks at one position of every group
(replicas of the same experts) sum their expert gradients after backward; the balance loss then
counts routing over every group.

With --a2a-chunks K > 1 (Lina's partitioning of the all-to-all), each MoE layer's dispatch, expert
FFN and combine run as K chunks of its rows (`_ChunkedExperts`): every (source, destination) block
of the dispatch is cut into K contiguous parts of nearly equal rows (`chunk_slot_counts`), so each
chunk is an all-to-all of its own; chunk c+1's dispatch is on the wire (asynchronous
all_to_all_single) while chunk c's tokens go through the experts, and each chunk's combine leaves as
soon as its FFN is done. Backward walks the chunks the same way: chunk c+1's combine gradients
travel while chunk c's FFN backward runs, and chunk c's dispatch gradients leave right after it.
The FFN is row by row, so chunks change no math (only the order expert gradients are summed in).
K = 1 is the plain path through `_Exchange`.

Not done here (Lina's other piece): expert packing.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import FieldError, ShunterError
from shunter.files import atomic_output
from shunter.model.layers import (
    add_shared_experts,
    add_weighted_rows,
    applied_gate_weights,
    gated_expert_inputs,
    router_scores,
    select_experts,
)
from shunter.model.weights import MLPWeights, ModelWeights
from shunter.parallel.exchange import exchange
from shunter.parallel.moe import (
    ExpertParallelMoE,
    _rows_of_slot_counts,
    contiguous_placement,
    split_by_shares,
)
from shunter.plan.slots import ExpertSlots
from shunter.train.objective import language_model_loss, load_balancing_loss_part
from shunter.train.trainer import (
    TrainConfig,
    Trainer,
    TrainResult,
    _bar,
    batch_at,
    check_not_past_end,
    check_resumable,
    learning_rate,
    make_optimizer,
    parameters,
)

COMM_SCHEDULERS = ("overlap", "priority", "lina")
DEFAULT_MICRO_OP_BYTES = 30_000_000  # Lina's default micro-op (30 MB)
DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_A2A_CHUNKS = 1  # no chunking: one all-to-all per dispatch and per combine


@dataclass(frozen=True)
class ParallelOptions:
    """How a parallel run communicates; none of it changes the math, so all may change on resume.

    expert_parallel: ranks the experts are spread over (must equal the world size).
    comm: one of COMM_SCHEDULERS. micro_op_bytes: Lina's micro-op size ("lina").
    bucket_bytes: the allreduce buckets of "overlap" and "priority".
    a2a_chunks: chunks of each MoE layer's all-to-alls, pipelined with the expert FFN (1: none).
    placements: per MoE layer the plan's exclusive slots; None: contiguous blocks of experts."""

    expert_parallel: int
    comm: str = "overlap"
    micro_op_bytes: int = DEFAULT_MICRO_OP_BYTES
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    a2a_chunks: int = DEFAULT_A2A_CHUNKS
    placements: Sequence[ExpertSlots] | None = None
    plan_source: str = "plan"

    def validate(self, config: TrainConfig, world_size: int) -> None:
        self.check_values(config)
        self.check_world(config, world_size)

    def check_values(self, config: TrainConfig) -> None:
        """The checks that need no process group (run before joining one)."""
        if self.comm not in COMM_SCHEDULERS:
            raise FieldError("comm", f"{self.comm!r} is not one of {', '.join(COMM_SCHEDULERS)}")
        for name in ("micro_op_bytes", "bucket_bytes"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be a positive number of bytes, got {getattr(self, name)}")
        if self.a2a_chunks < 1:
            raise FieldError("a2a_chunks", f"must be at least 1 (1: no chunking), got {self.a2a_chunks}")
        if self.expert_parallel < 1:
            raise FieldError("expert_parallel", f"must be at least 1, got {self.expert_parallel}")
        if self.expert_parallel > config.num_experts:
            raise FieldError(
                "expert_parallel",
                f"{self.expert_parallel} ranks for {config.num_experts} experts: every expert-parallel rank "
                "must hold at least one expert (launch more ranks than experts with a smaller "
                "--expert-parallel: each group of that many ranks then holds every expert)",
            )
        if config.batch_size % self.expert_parallel:
            raise FieldError(
                "batch_size",
                f"{config.batch_size} sequences do not split evenly over {self.expert_parallel} ranks",
            )
        if self.placements is not None:
            self._check_placements(config, self.expert_parallel)

    def check_world(self, config: TrainConfig, world_size: int) -> None:
        if world_size % self.expert_parallel:
            raise FieldError(
                "expert_parallel",
                f"{self.expert_parallel} does not divide the {world_size} ranks launched into "
                "data-parallel replicas of the experts",
            )
        if config.batch_size % world_size:
            raise FieldError(
                "batch_size", f"{config.batch_size} sequences do not split evenly over {world_size} ranks"
            )

    def _check_placements(self, config: TrainConfig, world_size: int) -> None:
        assert self.placements is not None
        if len(self.placements) != config.num_layers:
            raise ShunterError(
                f"{self.plan_source}: the plan has {len(self.placements)} layers, "
                f"the model {config.num_layers}"
            )
        for layer, slots in enumerate(self.placements):
            if slots.num_devices != world_size:
                raise ShunterError(
                    f"{self.plan_source}: the plan is for {slots.num_devices} devices, but --expert-parallel "
                    f"is {world_size}"
                )
            if slots.num_experts != config.num_experts:
                raise ShunterError(
                    f"{self.plan_source}: layer {layer} places {slots.num_experts} experts, the model has "
                    f"{config.num_experts}"
                )
            if not slots.is_exclusive:
                raise ShunterError(
                    f"{self.plan_source}: layer {layer} replicates experts; training needs an exclusive "
                    "placement (make the plan without --replicate)"
                )

    def slots(self, layer: int, num_experts: int, world_size: int) -> ExpertSlots:
        if self.placements is not None:
            return self.placements[layer]
        return ExpertSlots.from_device_of_expert(contiguous_placement(num_experts, world_size), world_size)


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class StepTimeline:
    """perf_counter intervals of one rank's step: all-to-alls (forward and backward) and allreduces
    (launch to completion, recorded by the backend's thread); and each MoE layer's dispatch rows
    (row [i, j]: (token, choice) pairs rank i sent to rank j), the routing the simulator replays."""

    a2a_forward: list[tuple[float, float]] = field(default_factory=list)
    a2a_backward: list[tuple[float, float]] = field(default_factory=list)
    allreduce: list[tuple[float, float]] = field(default_factory=list)
    dispatch_rows: list[list[list[int]]] = field(default_factory=list)  # per MoE layer, rows [n, n]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.a2a_forward.clear()
            self.a2a_backward.clear()
            self.allreduce.clear()
            self.dispatch_rows.clear()

    def add_allreduce(self, start: float, end: float) -> None:
        with self.lock:
            self.allreduce.append((start, end))

    def add_a2a(self, backward: bool, start: float, end: float) -> None:
        with self.lock:
            (self.a2a_backward if backward else self.a2a_forward).append((start, end))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in _union(intervals))


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds covered by both interval sets."""
    total = 0.0
    for s1, e1 in _union(a):
        for s2, e2 in _union(b):
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
        self.handles = [
            p.register_post_accumulate_grad_hook(lambda _p, index=i: self._gradient_ready(index))
            for i, p in enumerate(params)
        ]
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
        self._reset()
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
        """Stop the scheduler thread (after a failure in the main thread)."""
        if self.thread is not None and self.thread.is_alive():
            with self.condition:
                self.stopping = True
                self.condition.notify_all()
            self.thread.join(timeout=1.0)


# ---------------------------------------------------------------------------------------------
# the differentiable exchange and the MoE layer


class ExchangeContext:
    """What the all-to-alls of one rank share: the group, the step's timeline and the allreduce
    scheduler to tell when a backward all-to-all is pending."""

    def __init__(self, group: dist.ProcessGroup | None, timeline: StepTimeline) -> None:
        self.group, self.timeline = group, timeline
        self.sync: GradientSync | None = None

    def all_to_all(self, send: torch.Tensor, rows: np.ndarray, backward: bool) -> torch.Tensor:
        started = time.perf_counter()
        received = exchange(send.contiguous(), rows, "all_to_all", group=self.group)
        self.timeline.add_a2a(backward, started, time.perf_counter())
        return received

    def start_all_to_all(self, send: torch.Tensor, rows: np.ndarray, backward: bool) -> PendingExchange:
        """The all-to-all of `exchange` (same buffers), started without waiting for it: the caller
        computes meanwhile and collects the rows with `wait`. Every rank must start its all-to-alls
        in the same order (they match by order on the group)."""
        rank = dist.get_rank(self.group)
        send = send.contiguous()
        received = send.new_empty((int(rows[:, rank].sum()), *send.shape[1:]))
        started = time.perf_counter()
        work = dist.all_to_all_single(
            received, send, rows[:, rank].tolist(), rows[rank].tolist(), group=self.group, async_op=True
        )

        def finished(future: torch.futures.Future) -> None:
            self.timeline.add_a2a(backward, started, time.perf_counter())
            future.value()  # a failed all-to-all raises from `wait`, not silently

        return PendingExchange(work.get_future().then(finished), send, received)


@dataclass
class PendingExchange:
    """An all-to-all in flight: `send` is kept alive until it is done, `received` filled by then."""

    done: torch.futures.Future
    send: torch.Tensor
    received: torch.Tensor

    def wait(self) -> torch.Tensor:
        self.done.wait()
        return self.received


class _Exchange(torch.autograd.Function):
    """An all-to-all of rows (see `shunter.parallel.exchange`) whose backward sends the gradients
    back along the transposed rows. phase "combine" opens a MoE layer's pending backward
    all-to-alls, "dispatch" closes it."""

    @staticmethod
    def forward(ctx, send: torch.Tensor, rows: np.ndarray, context: ExchangeContext, phase: str):
        ctx.rows, ctx.context, ctx.phase = rows, context, phase
        return context.all_to_all(send, rows, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        context: ExchangeContext = ctx.context
        if ctx.phase == "combine" and context.sync is not None:
            context.sync.a2a_pending(True)
        sent_back = context.all_to_all(grad, ctx.rows.T, backward=True)
        if ctx.phase == "dispatch" and context.sync is not None:
            context.sync.a2a_pending(False)
        return sent_back, None, None, None


def chunk_slot_counts(slot_counts: np.ndarray, slots: ExpertSlots, chunks: int) -> list[np.ndarray]:
    """A dispatch of slot_counts [n, S] cut into `chunks` dispatches of its own, [n, S] each, summing
    to slot_counts.

    The rows rank i sends rank j (sorted by slot, as the dispatch orders them) are cut into
    `chunks` contiguous parts of rows // chunks rows, plus one for each of the first rows % chunks
    parts; chunk c's count of slot s is how many of s's rows fall in part c. Every rank computes the
    same parts from the same counts; a part may be empty."""
    slot_counts = np.asarray(slot_counts, dtype=np.int64)
    rows = _rows_of_slot_counts(slot_counts, slots)  # [n, n]
    base, extra = np.divmod(rows, chunks)
    part_rows = base[None] + (np.arange(chunks)[:, None, None] < extra[None])  # [K, n, n]
    # each part's [start, end) and each slot's [start, end) within the block of its destination
    part_end = np.cumsum(part_rows, axis=0)[:, :, slots.slot_device]  # [K, n, S]
    part_start = part_end - part_rows[:, :, slots.slot_device]
    slot_end = np.zeros_like(slot_counts)  # [n, S]
    for device in range(slots.num_devices):
        columns = np.flatnonzero(slots.slot_device == device)
        slot_end[:, columns] = np.cumsum(slot_counts[:, columns], axis=1)
    slot_start = slot_end - slot_counts
    overlap = np.minimum(part_end, slot_end[None]) - np.maximum(part_start, slot_start[None])
    return list(np.maximum(overlap, 0))


@dataclass(frozen=True)
class DispatchChunk:
    """One chunk of a layer's dispatch: slot_counts [n, S] and rows [n, n] of its all-to-all, and
    send_index [R_c]: the rows of this rank's send buffer in it (also where its combine's rows land
    in the layer's returned rows), in buffer order."""

    slot_counts: np.ndarray
    rows: np.ndarray
    send_index: torch.Tensor


class _ChunkedExperts(torch.autograd.Function):
    """One MoE layer's dispatch -> expert FFN -> combine as chunks, pipelined (module docstring).

    forward(sent [R, H] grouped by destination, gate_up, down (this rank's expert stacks), layer,
    chunks) -> returned [R, H]: the expert outputs of sent's rows, in sent's order. Each chunk's FFN
    runs under enable_grad on its received rows and on detached copies of the stacks, and keeps its
    small graph; backward differentiates each with torch.autograd.grad, summing the stacks'
    gradients over the chunks. The layer's backward all-to-alls are pending for `GradientSync` from
    the first combine gradient sent to the last dispatch gradient received. A rank that receives no
    rows of a chunk still runs all of its all-to-alls, as its peers do."""

    @staticmethod
    def forward(ctx, sent, gate_up, down, layer: TrainingExpertParallelMoE, chunks: list[DispatchChunk]):
        context = layer.context
        weights = (gate_up.detach().requires_grad_(), down.detach().requires_grad_())
        with torch.enable_grad():  # forward runs without grad: views made here would be outside the graph
            layer.local_experts = layer._experts(*weights)  # what _run_local_slots runs
        graphs: list[tuple[torch.Tensor, torch.Tensor]] = []
        combines: list[PendingExchange] = []
        dispatch = context.start_all_to_all(sent[chunks[0].send_index], chunks[0].rows, backward=False)
        for c, chunk in enumerate(chunks):
            received = dispatch.wait().requires_grad_()
            if c + 1 < len(chunks):  # on the wire while this chunk goes through the experts
                following = chunks[c + 1]
                dispatch = context.start_all_to_all(
                    sent[following.send_index], following.rows, backward=False
                )
            with torch.enable_grad():
                computed = layer._run_local_slots(received, chunk.slot_counts)
            graphs.append((received, computed))
            combines.append(context.start_all_to_all(computed.detach(), chunk.rows.T, backward=False))
        returned = torch.empty_like(sent)
        for chunk, combine in zip(chunks, combines, strict=True):
            returned[chunk.send_index] = combine.wait()
        ctx.context, ctx.chunks, ctx.graphs, ctx.weights = context, chunks, graphs, weights
        return returned

    @staticmethod
    def backward(ctx, grad_returned: torch.Tensor):
        context: ExchangeContext = ctx.context
        chunks: list[DispatchChunk] = ctx.chunks
        if context.sync is not None:
            context.sync.a2a_pending(True)
        gate_up, down = ctx.weights
        grad_gate_up, grad_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        dispatches: list[PendingExchange] = []
        combine = context.start_all_to_all(grad_returned[chunks[0].send_index], chunks[0].rows, backward=True)
        for c, (chunk, (received, computed)) in enumerate(zip(chunks, ctx.graphs, strict=True)):
            grad_computed = combine.wait()
            if c + 1 < len(chunks):  # on the wire while this chunk's FFN backward runs
                following = chunks[c + 1]
                combine = context.start_all_to_all(
                    grad_returned[following.send_index], following.rows, backward=True
                )
            grad_received = torch.zeros_like(received)
            if computed.requires_grad:  # False when no row of this chunk came to this rank
                grads = torch.autograd.grad(
                    computed, (received, gate_up, down), grad_computed, allow_unused=True
                )
                for total, grad in zip((grad_received, grad_gate_up, grad_down), grads, strict=True):
                    if grad is not None:
                        total += grad
            dispatches.append(context.start_all_to_all(grad_received, chunk.rows.T, backward=True))
        grad_sent = torch.empty_like(grad_returned)
        for chunk, dispatch in zip(chunks, dispatches, strict=True):
            grad_sent[chunk.send_index] = dispatch.wait()
        if context.sync is not None:
            context.sync.a2a_pending(False)
        ctx.graphs = None
        return grad_sent, grad_gate_up, grad_down, None, None


class TrainingExpertParallelMoE(ExpertParallelMoE):
    """ExpertParallelMoE with differentiable all-to-alls; its routed experts are this rank's
    trainable stacks gate_up [E_local, 2I, H] and down [E_local, H, I] (rows in `local_ids` order).
    Calling it returns (output [N, H], this rank's part of the load-balancing loss)."""

    def __init__(
        self,
        spec,
        weights,
        slots: ExpertSlots,
        context: ExchangeContext,
        group=None,
        replica_group=None,
        a2a_chunks: int = 1,
    ) -> None:
        """group: the expert-parallel ranks (None: all); replica_group: the ranks holding the same
        experts in the other expert-parallel groups (None: there are none); a2a_chunks: chunks of
        the all-to-alls pipelined with the expert FFN (`_ChunkedExperts`; 1: `_Exchange`)."""
        self.replica_group = replica_group
        self.a2a_chunks = a2a_chunks
        rank = dist.get_rank(group)
        self.local_ids = sorted(set(slots.slot_expert[slots.slot_device == rank].tolist()))
        gate_up, down = weights.experts_gate_up, weights.experts_down
        self.gate_up = gate_up[self.local_ids].detach().clone()
        self.down = down[self.local_ids].detach().clone()
        dense = dataclasses.replace(weights, experts_gate_up=None, experts_down=None)
        super().__init__(spec, dense, self._experts(self.gate_up, self.down), slots, group=group)
        self.context = context

    def _experts(self, gate_up: torch.Tensor, down: torch.Tensor) -> dict[int, MLPWeights]:
        """Each local expert's weights as views of the stacks gate_up and down."""
        return {e: MLPWeights(gate_up[i], down[i]) for i, e in enumerate(self.local_ids)}

    def _dispatch_chunks(self, slot_counts: np.ndarray) -> list[DispatchChunk]:
        counts = chunk_slot_counts(slot_counts, self.slots, self.a2a_chunks)
        rows = [_rows_of_slot_counts(c, self.slots) for c in counts]
        sent_rows = np.stack([r[self.rank] for r in rows])  # [K, n]: this rank's rows to each rank
        # the send buffer is grouped by destination; each destination's rows are cut in chunk order
        chunk_of_row = np.concatenate(
            [np.repeat(np.arange(self.a2a_chunks), sent_rows[:, j]) for j in range(self.num_ranks)]
        )
        return [
            DispatchChunk(c, r, torch.from_numpy(np.flatnonzero(chunk_of_row == i)))
            for i, (c, r) in enumerate(zip(counts, rows, strict=True))
        ]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """x [N, H] -> (output [N, H], this rank's part of the layer's balance loss). The same steps
        as ExpertParallelMoE.forward, through `_Exchange` (or `_ChunkedExperts`)."""
        scores = router_scores(x, self.weights, self.spec)
        expert_ids, gate_weights = select_experts(scores, self.weights, self.spec)
        applied = applied_gate_weights(gate_weights, x.dtype, self.spec)
        k = expert_ids.shape[1]
        flat_experts = expert_ids.reshape(-1)
        counts = self._all_counts(flat_experts)  # [n, E]
        slot_counts = split_by_shares(counts, self.slots)
        rows = _rows_of_slot_counts(slot_counts, self.slots)
        self.context.timeline.dispatch_rows.append(rows.tolist())
        by_expert = flat_experts.argsort(stable=True)
        slot_of_pair = torch.empty_like(flat_experts)
        slot_of_pair[by_expert] = torch.from_numpy(
            np.repeat(np.arange(self.slots.num_slots), slot_counts[self.rank])
        )
        destination = torch.from_numpy(self.slots.slot_device)[slot_of_pair]
        order = (destination * self.slots.num_slots + slot_of_pair).argsort(stable=True)
        token_index, choice_index = order // k, order % k
        sent, applied = gated_expert_inputs(
            x, token_index, choice_index, applied, self.spec.gate_on_expert_input
        )
        if self.a2a_chunks > 1:
            chunks = self._dispatch_chunks(slot_counts)
            returned = _ChunkedExperts.apply(sent, self.gate_up, self.down, self, chunks)
        else:
            self.local_experts = self._experts(self.gate_up, self.down)  # views in this step's graph
            received = _Exchange.apply(sent, rows, self.context, "dispatch")
            computed = self._run_local_slots(received, slot_counts)
            if received.shape[0] == 0:
                # No token chose this rank's experts: `computed` is a fresh empty tensor outside the
                # graph, and autograd would skip this rank's backward of the dispatch exchange while
                # its peers run theirs (their rows then meet another layer's all-to-all). The clone
                # keeps the exchange in the graph; its gradient is empty.
                computed = received.clone()
            returned = _Exchange.apply(computed, rows.T, self.context, "combine")
        out = torch.zeros_like(x)
        add_weighted_rows(out, returned, token_index, choice_index, applied)
        global_counts = torch.from_numpy(counts.sum(axis=0))  # [E] over this expert-parallel group
        if self.replica_group is not None:  # and over every group: the global batch's routing
            dist.all_reduce(global_counts, group=self.replica_group)
        balance = load_balancing_loss_part(
            scores, global_counts, int(global_counts.sum()) // k, self.spec.num_experts
        )
        return add_shared_experts(x, out, self.weights), balance

    __call__ = forward  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# the trainer


class ParallelTrainer(Trainer):
    """Trainer for one rank of an expert-parallel run (the process group already initialised).

    The work directory (tokenizer, token streams) is prepared by rank 0 before the others read it.
    Checkpoints: each rank writes `state-STEP.rankR.pt` (its dense copy, its experts, its optimizer
    state), then rank 0 names the step in `parallel.json` (written atomically after every rank has
    saved), and only then deletes older steps: a run killed at any point leaves the last named
    step loadable. Per-step timing goes to `steps.rankR.jsonl` in the work directory."""

    MANIFEST = "parallel.json"

    def __init__(
        self, config, corpus_root, out_dir, options: ParallelOptions, work_dir=None, **kwargs
    ) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        config.validate()
        options.validate(config, self.world_size)
        self.options = options
        silent = kwargs.pop("log", None) if self.rank else None
        if self.rank != 0:
            kwargs["log"] = silent or (lambda _line: None)
        failure: list[str | None] = [None]
        if self.rank == 0:
            try:
                super().__init__(config, corpus_root, out_dir, work_dir, **kwargs)
            except ShunterError as exc:
                failure[0] = str(exc)
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            if self.rank == 0:
                raise ShunterError(failure[0])
            raise ShunterError("rank 0 could not prepare the run (its error names the cause)")
        if self.rank != 0:
            super().__init__(config, corpus_root, out_dir, work_dir, **kwargs)
        self.timing_path = self.work_dir / f"steps.rank{self.rank}.jsonl"

    def checkpoint_path(self) -> Path:
        return self.work_dir / self.MANIFEST

    def _state_file(self, step: int, rank: int) -> Path:
        return self.work_dir / f"state-{step}.rank{rank}.pt"

    def run(self, resume: bool = False, stop_after: int | None = None) -> TrainResult | None:
        config, options, n = self.config, self.options, self.world_size
        weights = self.initial_weights()
        timeline = StepTimeline()
        expert_group, replica_group = self._groups()
        context = ExchangeContext(expert_group, timeline)
        P = options.expert_parallel
        blocks = [
            TrainingExpertParallelMoE(
                self.spec,
                layer.moe,
                options.slots(i, config.num_experts, P),
                context,
                expert_group,
                replica_group,
                options.a2a_chunks,
            )
            for i, layer in enumerate(weights.layers)
        ]
        for layer in weights.layers:  # this rank keeps only its own experts (in `blocks`)
            layer.moe.experts_gate_up = layer.moe.experts_down = None
        dense = parameters(weights, experts=False)
        experts = [t for block in blocks for t in (block.gate_up, block.down)]
        params = dense + experts
        optimizer = make_optimizer(config, params)
        gradient_group = dist.new_group(backend="gloo")

        def allreduce_ops(order: Sequence[int] | None) -> list[list[Segment]]:
            if options.comm == "lina":
                return micro_ops(dense, options.micro_op_bytes, order)
            return bucket_ops(dense, options.bucket_bytes, order)

        sync = GradientSync(dense, allreduce_ops(None), options.comm != "overlap", gradient_group, timeline)
        context.sync = sync

        start_step, losses, train_seconds = 0, [], 0.0
        manifest_path = self.checkpoint_path()
        if manifest_path.is_file() and not resume:
            raise ShunterError(
                f"{manifest_path}: a checkpoint exists; pass --resume to continue it, "
                "or delete the work directory to start over"
            )
        if resume:
            start_step, losses, train_seconds = self._load(params, optimizer)
        tokens_per_step = config.batch_size * config.seq_len
        per_rank = config.batch_size // n
        end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
        window_started, window_steps = time.perf_counter(), 0
        completed = start_step
        for step in range(start_step, end):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            tokens = batch_at(self.train_stream, config, step)[
                self.rank * per_rank : (self.rank + 1) * per_rank
            ]
            timeline.clear()
            began = time.perf_counter()
            with self._autocast():
                loss, cross_entropy, aux = language_model_loss(
                    weights, self.spec, tokens, config.aux_loss_coef, blocks, per_rank / config.batch_size
                )
            forward_done = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sync.begin_backward()
            try:
                loss.backward()
                backward_done = time.perf_counter()
                sync.finish()
            finally:
                sync.stop()
            for expert in experts:  # experts no token chose: zero, as their rows of the one-process
                if expert.grad is None:  # stacks (the optimizer still decays and moves them)
                    expert.grad = torch.zeros_like(expert)
            if replica_group is not None:  # replicas of an expert sum their gradients
                for expert in experts:
                    dist.all_reduce(expert.grad, group=replica_group)
            synced = time.perf_counter()
            if step == start_step:  # as DDP does: rebuild the ops in the order rank 0's gradients came
                order = [sync.ready_order]
                dist.broadcast_object_list(order, src=0)
                sync.use_ops(allreduce_ops(order[0]))
            global_ce, global_aux = self._clip_and_sum(dense, experts, cross_entropy, aux)
            optimizer.step()
            ended = time.perf_counter()
            completed = step + 1
            losses.append((step, global_ce, global_aux))
            self._record_timing(step, began, forward_done, backward_done, synced, ended, timeline, losses[-1])
            window_steps += 1
            if self.rank == 0 and (completed % 10 == 0 or completed == config.steps):
                now = time.perf_counter()
                rate = window_steps * tokens_per_step / (now - window_started)
                train_seconds += now - window_started
                window_started, window_steps = now, 0
                recent = np.mean([ce for _, ce, _ in losses[-10:]])
                self.progress(
                    f"{_bar(completed / config.steps)} step {completed}/{config.steps}  loss {recent:.3f}  "
                    f"balance {global_aux:.3f}  {rate / 1000:.1f}k tok/s on {n} ranks ({options.comm})"
                )
            if completed % config.checkpoint_every == 0:
                self._save(params, optimizer, completed, losses, train_seconds)
        if completed != start_step or not manifest_path.is_file():
            self._save(params, optimizer, completed, losses, train_seconds)
        full = self._gather_experts(weights, blocks)
        if completed < config.steps or self.rank != 0:
            return None
        assert full is not None
        heldout = self.evaluate(full)
        result = TrainResult(
            self.out_dir,
            config.steps,
            losses[-1][1],
            losses,
            train_seconds,
            config.steps * tokens_per_step,
            heldout,
        )
        self._export(full, result)
        return result

    def _groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(this rank's expert-parallel group, its replica group). Ranks [d*P, (d+1)*P) form
        expert-parallel group d; the ranks at the same position of every group hold the same
        experts. With one group: (None, None), the default group. Every rank creates every group
        (new_group is collective)."""
        P, n = self.options.expert_parallel, self.world_size
        if self.world_size == self.options.expert_parallel:
            return None, None
        expert_groups = [
            dist.new_group(list(range(d * P, (d + 1) * P)), backend="gloo") for d in range(n // P)
        ]
        replica_groups = [dist.new_group(list(range(p, n, P)), backend="gloo") for p in range(P)]
        return expert_groups[self.rank // P], replica_groups[self.rank % P]

    def _clip_and_sum(self, dense, experts, cross_entropy, aux) -> tuple[float, float]:
        """Clip by the global gradient norm (as clip_grad_norm_ over every parameter of the
        single-process model) and return the global batch's (cross-entropy, balance loss)."""
        dense_sq = sum(g.grad.float().pow(2).sum() for g in dense)  # the same on every rank
        local = torch.stack(
            [
                sum((e.grad.float().pow(2).sum() for e in experts if e.grad is not None), torch.zeros(())),
                cross_entropy.detach().float(),
                aux.detach().float(),
            ]
        )
        dist.all_reduce(local)
        replicas = self.world_size // self.options.expert_parallel  # each expert's gradient counted as often
        total_norm = (dense_sq + local[0] / replicas).sqrt()
        scale = torch.clamp(self.config.grad_clip / (total_norm + 1e-6), max=1.0)
        for p in dense + experts:
            if p.grad is not None:
                p.grad.mul_(scale)
        return float(local[1]), float(local[2])

    def _record_timing(self, step, began, forward_done, backward_done, synced, ended, timeline, loss) -> None:
        a2a_fwd = _length(timeline.a2a_forward)
        a2a_bwd = _length(timeline.a2a_backward)
        record = {
            "step": step,
            "rank": self.rank,
            "comm": self.options.comm,
            "cross_entropy": loss[1],
            "balance": loss[2],
            "step_s": ended - began,
            "forward_s": forward_done - began,
            "backward_s": synced - forward_done,
            "forward_compute_s": forward_done - began - a2a_fwd,
            "backward_compute_s": backward_done - forward_done - a2a_bwd,
            "a2a_forward_s": a2a_fwd,
            "a2a_backward_s": a2a_bwd,
            "allreduce_s": _length(timeline.allreduce),
            "allreduce_exposed_s": synced - backward_done,
            "a2a_with_allreduce_s": _overlap(timeline.a2a_backward, timeline.allreduce),
            "optimizer_s": ended - synced,
            # perf_counter is CLOCK_MONOTONIC, one clock for every process on a machine: the
            # ranks' steps line up on it (the emulated cluster's hosts share this machine)
            "began_s": began,
            "dispatch_rows": timeline.dispatch_rows,
            # seconds since the step began, for per-rank timeline plots
            "intervals": {
                "forward": [[0.0, forward_done - began]],
                "backward": [[forward_done - began, backward_done - began]],
                "a2a": [[a - began, b - began] for a, b in timeline.a2a_forward + timeline.a2a_backward],
                "allreduce": [[a - began, b - began] for a, b in sorted(timeline.allreduce)],
                "optimizer": [[synced - began, ended - began]],
            },
        }
        with open(self.timing_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, params, optimizer, step, losses, train_seconds) -> None:
        state = {
            "config": dataclasses.asdict(self.config),
            "world_size": self.world_size,
            "step": step,
            "losses": losses,
            "params": [p.detach().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "train_seconds": train_seconds,
        }
        with atomic_output(self._state_file(step, self.rank), binary=True) as f:
            torch.save(state, f)
        dist.barrier()  # every rank's file of this step is complete
        if self.rank == 0:
            previous = self._manifest_step()
            with atomic_output(self.checkpoint_path()) as f:
                f.write(json.dumps({"step": step, "world_size": self.world_size}) + "\n")
            if previous is not None and previous != step:
                for rank in range(self.world_size):
                    self._state_file(previous, rank).unlink(missing_ok=True)
        dist.barrier()

    def _manifest_step(self) -> int | None:
        path = self.checkpoint_path()
        if not path.is_file():
            return None
        return int(json.loads(path.read_text())["step"])

    def _load(self, params, optimizer) -> tuple[int, list, float]:
        path = self.checkpoint_path()
        try:
            manifest = json.loads(path.read_text())
            step, world_size = int(manifest["step"]), int(manifest["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShunterError(f"{path}: not a parallel checkpoint manifest ({exc})") from None
        if world_size != self.world_size:
            raise ShunterError(
                f"{path}: the checkpoint was made by {world_size} ranks, this run has {self.world_size}; "
                f"resume with {world_size} ranks"
            )
        state_path = self._state_file(step, self.rank)
        if not state_path.is_file():
            raise ShunterError(f"{state_path}: missing; the checkpoint of step {step} is incomplete")
        state = torch.load(state_path, weights_only=False)
        check_resumable(state["config"], self.config, state_path, self.log)
        check_not_past_end(state["step"], self.config, state_path)
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        self.log(f"resumed at step {step} from {path} on {self.world_size} ranks")
        return state["step"], state["losses"], state["train_seconds"]

    def _gather_experts(self, weights: ModelWeights, blocks) -> ModelWeights | None:
        """Rank 0 gets every expert back into the full weights (for evaluation and export)."""
        mine = [(block.local_ids, block.gate_up.detach(), block.down.detach()) for block in blocks]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if self.rank != 0:
            return None
        for i, layer in enumerate(weights.layers):
            E = self.config.num_experts
            _, first_gu, first_down = everyone[0][i]
            gate_up = first_gu.new_empty((E, *first_gu.shape[1:]))
            down = first_down.new_empty((E, *first_down.shape[1:]))
            for rank_blocks in everyone:
                ids, gu, dn = rank_blocks[i]
                gate_up[ids], down[ids] = gu, dn
            layer.moe.experts_gate_up, layer.moe.experts_down = gate_up, down
        for p in parameters(weights):
            p.requires_grad_(False)
        return weights
