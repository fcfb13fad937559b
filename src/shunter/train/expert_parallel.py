"""The MoE layer of expert-parallel training: each rank's experts behind differentiable
all-to-alls, optionally cut into chunks pipelined with the expert FFN (Lina's partitioning).

`TrainingExpertParallelMoE` runs a MoE layer as `ExpertParallelMoE` does, with the all-to-alls
differentiable (`_Exchange`: the backward of an exchange is the exchange of the gradients along the
transposed rows), so an expert's gradient sums the contributions of every token it served, on every
rank. A rank that receives no rows still takes part in every backward all-to-all.

With --a2a-chunks K > 1, each MoE layer's dispatch, expert FFN and combine run as K chunks of its
rows (`_ChunkedExperts`): every (source, destination) block of the dispatch is cut into K contiguous
parts of nearly equal rows (`chunk_slot_counts`), so each chunk is an all-to-all of its own; chunk
c+1's dispatch is on the wire (asynchronous all_to_all_single) while chunk c's tokens go through the
experts, and each chunk's combine leaves as soon as its FFN is done. Backward walks the chunks the
same way: chunk c+1's combine gradients travel while chunk c's FFN backward runs, and chunk c's
dispatch gradients leave right after it. The FFN is row by row, so chunks change no math (only the
order expert gradients are summed in). K = 1 is the plain path through `_Exchange`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shunter.model.layers import (
    add_shared_experts,
    add_weighted_rows,
    applied_gate_weights,
    gated_expert_inputs,
    router_scores,
    select_experts,
)
from shunter.model.weights import MLPWeights
from shunter.parallel.exchange import exchange
from shunter.parallel.moe import ExpertParallelMoE, _rows_of_slot_counts, split_by_shares
from shunter.plan.slots import ExpertSlots
from shunter.train.comm import GradientSync, StepTimeline
from shunter.train.objective import load_balancing_loss_part


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
            started = time.perf_counter()
            with torch.enable_grad():
                computed = layer._run_local_slots(received, chunk.slot_counts)
            if received.shape[0]:
                context.timeline.ffn.append(time.perf_counter() - started)
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
            started = time.perf_counter()
            computed = self._run_local_slots(received, slot_counts)
            if received.shape[0]:
                self.context.timeline.ffn.append(time.perf_counter() - started)
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
