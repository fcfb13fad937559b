"""An expert-parallel MoE block on torch.distributed: each rank routes its own tokens, sends each
(token, choice) to a rank holding the chosen expert, runs its experts, and gets the results back.

The math is the in-memory runtime's (`router_scores`, `select_experts`, `expert_mlp`,
`applied_gate_weights`, `add_shared_experts`); only where the rows are computed changes. Experts
sit in the plan document's physical slots (`shunter.plan.document.ExpertSlots`): an exclusive
placement has one slot per expert, a replicated one several, each taking a share of its expert's
tokens. Per rank:

1. route the local tokens x [T, H];
2. all-gather the per-expert counts: every rank then knows counts [n, E], and splits each rank's
   pairs of a replicated expert among its slots by the plan's shares (`split_by_shares`, the same
   deterministic rounding everywhere), hence rows [n, n] and the slot of every row it will receive
   (rows from one source arrive sorted by slot), so no ids travel with the tokens;
3. dispatch: order the T*k (token, choice) pairs by (destination, slot) and exchange the rows;
   each local slot runs its expert once on its rows from all sources;
4. combine: the outputs travel back along the transposed exchange, arrive in the order they were
   sent, and are weighted and summed into their tokens; shared experts run locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import ShunterError
from shunter.model.layers import (
    add_shared_experts,
    add_weighted_rows,
    applied_gate_weights,
    expert_mlp,
    gated_expert_inputs,
    router_scores,
    select_experts,
)
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, MLPWeights, MoEWeights
from shunter.network.transport import Strategy
from shunter.parallel.exchange import Links, exchange, open_links, plan_exchange
from shunter.plan.schedule import Schedule
from shunter.plan.slots import ExpertSlots


def contiguous_placement(num_experts: int, num_ranks: int) -> np.ndarray:
    """[E] int64: expert e on rank floor(e * n / E) (even blocks, the usual default)."""
    return (np.arange(num_experts, dtype=np.int64) * num_ranks) // num_experts


def check_placement(
    device_of_expert: Sequence[int] | np.ndarray, num_experts: int, num_ranks: int
) -> np.ndarray:
    placement = np.asarray(device_of_expert, dtype=np.int64)
    if placement.shape != (num_experts,):
        raise ShunterError(f"placement: {placement.shape[0]} entries for a layer of {num_experts} experts")
    bad = np.flatnonzero((placement < 0) | (placement >= num_ranks))
    if bad.size:
        raise ShunterError(
            f"placement: expert {bad[0]} is placed on device {placement[bad[0]]}, but there are only "
            f"{num_ranks} ranks"
        )
    return placement


Placement = ExpertSlots | Sequence[int] | np.ndarray


def as_slots(placement: Placement, num_experts: int, num_ranks: int) -> ExpertSlots:
    """Slots from a plan's ExpertSlots (checked against the model and the group) or from an
    exclusive device_of_expert [E]."""
    if not isinstance(placement, ExpertSlots):
        return ExpertSlots.from_device_of_expert(
            check_placement(placement, num_experts, num_ranks), num_ranks
        )
    if placement.num_experts != num_experts:
        raise ShunterError(
            f"placement: the plan places {placement.num_experts} experts, the layer has {num_experts}"
        )
    if placement.num_devices != num_ranks:
        raise ShunterError(
            f"placement: the plan is for {placement.num_devices} devices, the process group has "
            f"{num_ranks} ranks"
        )
    return placement


def split_by_shares(counts: np.ndarray, slots: ExpertSlots) -> np.ndarray:
    """[n, S] int64 the (token, choice) pairs each rank sends each slot.

    counts [n, E]: pairs on rank i that chose expert e. Rank i's pairs of expert e are split among
    e's slots in proportion to the slots' shares, rounded by largest remainder (ties to the lower
    slot), so the parts sum to counts[i, e] exactly and every rank computes the same split."""
    counts = np.asarray(counts, dtype=np.int64)
    ideal = counts[:, slots.slot_expert] * slots.slot_share  # [n, S]
    parts = np.floor(ideal).astype(np.int64)
    for expert in np.flatnonzero(slots.replica_count > 1):
        columns = np.flatnonzero(slots.slot_expert == expert)
        missing = counts[:, expert] - parts[:, columns].sum(axis=1)  # [n], each < len(columns)
        fraction = ideal[:, columns] - parts[:, columns]
        # rank of each slot by remainder, largest first; a stable sort keeps lower slots first on ties
        order = np.argsort(-fraction, axis=1, kind="stable")
        rank_of = np.empty_like(order)
        np.put_along_axis(rank_of, order, np.arange(columns.size)[None, :].repeat(len(counts), 0), axis=1)
        parts[:, columns] += rank_of < missing[:, None]
    return parts


def rows_between_ranks(counts: np.ndarray, placement: Placement) -> np.ndarray:
    """[n, n] int64 rows each rank sends each rank, from counts [n, E] ((token, choice) pairs on
    rank i that chose expert e) and a placement (slots, or an exclusive device_of_expert [E])."""
    n, num_experts = np.shape(counts)
    slots = as_slots(placement, num_experts, n)
    return _rows_of_slot_counts(split_by_shares(counts, slots), slots)


def _rows_of_slot_counts(slot_counts: np.ndarray, slots: ExpertSlots) -> np.ndarray:
    """[n, n] rows between ranks from slot_counts [n, S]: a slot's rows go to its device."""
    to_device = np.zeros((slots.num_slots, slots.num_devices), dtype=np.int64)
    to_device[np.arange(slots.num_slots), slots.slot_device] = 1
    return slot_counts @ to_device


@dataclass
class ExchangeCounts:
    """What one forward moved: rows [n, n] (token rows from rank i to rank j) of the dispatch, and
    slot_rows [n, S] (rows from rank i to slot s)."""

    rows: np.ndarray
    slot_rows: np.ndarray


class ExpertParallelMoE:
    """One MoE block whose routed experts are spread over the ranks of a process group.

    Args:
        spec: the model family's routing rules.
        weights: the router and shared experts (every rank), and the routed experts this rank holds:
            `local_experts[e]` for every expert e with a slot on this rank.
        placement: the plan's ExpertSlots for this layer (exclusive or replicated), or
            device_of_expert [E], the rank holding each expert (exclusive).
        strategy: how the all-to-alls run (`shunter.parallel.exchange`).
        bandwidth_bytes_s [n]: port bandwidths the "scheduled" strategy plans for.
        seed: the send order of "random_order" (dispatch; combine uses seed + 1).
        group: the ranks holding the experts (None: the default group).
        links: the groups the point-to-point strategies send on; by default this block opens its
            own with `open_links(group)` (collective). Blocks of one model can share one.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: MoEWeights,
        local_experts: dict[int, MLPWeights],
        placement: Placement,
        *,
        strategy: Strategy = "all_to_all",
        bandwidth_bytes_s: Sequence[float] | np.ndarray | None = None,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
        links: Links | None = None,
    ) -> None:
        self.spec = spec
        self.weights = weights
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.slots = as_slots(placement, spec.num_experts, self.num_ranks)
        self.my_slots = np.flatnonzero(self.slots.slot_device == self.rank)
        missing = [int(e) for e in self.slots.slot_expert[self.my_slots] if int(e) not in local_experts]
        if missing:
            raise ShunterError(
                f"rank {self.rank}: placement puts expert {missing[0]} here but its weights are not loaded"
            )
        self.local_experts = local_experts
        self.strategy = strategy
        self.seed = seed
        if links is None and strategy != "all_to_all":
            links = open_links(group)
        self.links = links
        bandwidth = (
            np.ones(self.num_ranks) if bandwidth_bytes_s is None else np.asarray(bandwidth_bytes_s, float)
        )
        if bandwidth.shape != (self.num_ranks,) or np.any(bandwidth <= 0):
            raise ShunterError(
                f"bandwidth: need {self.num_ranks} positive port bandwidths, got {bandwidth.tolist()}"
            )
        self.bandwidth_bytes_s = bandwidth
        self.last = ExchangeCounts(
            np.zeros((self.num_ranks, self.num_ranks), dtype=np.int64),
            np.zeros((self.num_ranks, self.slots.num_slots), dtype=np.int64),
        )

    @classmethod
    def from_checkpoint(
        cls,
        spec: ModelSpec,
        layout: CheckpointLayout,
        layer: int,
        placement: Placement,
        dtype: torch.dtype,
        **options: object,
    ) -> ExpertParallelMoE:
        """Load one layer's router and shared experts, and only the routed experts of this rank's
        slots (a replicated expert is loaded on every rank holding one of its slots)."""
        group = options.get("group")
        rank = dist.get_rank(group)  # type: ignore[arg-type]
        slots = as_slots(placement, spec.num_experts, dist.get_world_size(group))  # type: ignore[arg-type]
        weights = layout.moe(layer, dtype, with_experts=False)
        mine = sorted(set(slots.slot_expert[slots.slot_device == rank].tolist()))
        local = {e: layout.expert(layer, e, dtype) for e in mine}
        return cls(spec, weights, local, slots, **options)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (this rank's tokens; T may differ between ranks, or be 0) -> [T, H]."""
        scores = router_scores(x, self.weights, self.spec)
        expert_ids, gate_weights = select_experts(scores, self.weights, self.spec)
        applied = applied_gate_weights(gate_weights, x.dtype, self.spec)
        k = expert_ids.shape[1]

        flat_experts = expert_ids.reshape(-1)
        slot_counts = self._slot_counts(expert_ids)  # [n, S]
        rows = _rows_of_slot_counts(slot_counts, self.slots)
        self.last = ExchangeCounts(rows, slot_counts)

        # Slots are ordered by expert, so pairs sorted by expert take their slots in slot order.
        by_expert = flat_experts.argsort(stable=True)
        slot_of_pair = torch.empty_like(flat_experts)
        slot_of_pair[by_expert] = torch.from_numpy(
            np.repeat(np.arange(self.slots.num_slots), slot_counts[self.rank])
        ).to(x.device)
        # (token, choice) pairs ordered by (destination rank, slot).
        destination = torch.from_numpy(self.slots.slot_device).to(x.device)[slot_of_pair]
        order = (destination * self.slots.num_slots + slot_of_pair).argsort(stable=True)
        token_index, choice_index = order // k, order % k

        dispatch_schedule, combine_schedule = self._schedules(rows, x.shape[1] * x.element_size())
        sent, applied = gated_expert_inputs(
            x, token_index, choice_index, applied, self.spec.gate_on_expert_input
        )
        received = exchange(
            sent, rows, self.strategy, schedule=dispatch_schedule, seed=self.seed,
            group=self.group, links=self.links,
        )  # fmt: skip
        computed = self._run_local_slots(received, slot_counts)
        returned = exchange(
            computed, rows.T, self.strategy, schedule=combine_schedule, seed=self.seed + 1,
            group=self.group, links=self.links,
        )  # fmt: skip
        out = torch.zeros_like(x)
        add_weighted_rows(out, returned, token_index, choice_index, applied)
        return add_shared_experts(x, out, self.weights)

    __call__ = forward

    def _slot_counts(self, expert_ids: torch.Tensor) -> np.ndarray:
        """[n, S] the pairs each rank sends each slot, from this rank's choices expert_ids [T, k]:
        the plan's shares. A live-balancing block overrides this (and may move slots first)."""
        return split_by_shares(self._all_counts(expert_ids.reshape(-1)), self.slots)

    def _all_counts(self, flat_experts: torch.Tensor) -> np.ndarray:
        mine = torch.bincount(flat_experts, minlength=self.spec.num_experts).to(torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(everyone, mine, group=self.group)
        return torch.stack(everyone).numpy()

    def _schedules(self, rows: np.ndarray, row_bytes: int) -> tuple[Schedule | None, Schedule | None]:
        if self.strategy != "scheduled":
            return None, None
        traffic = rows.astype(np.float64) * row_bytes
        return (
            plan_exchange(traffic, self.bandwidth_bytes_s),
            plan_exchange(traffic.T, self.bandwidth_bytes_s),
        )

    def _run_local_slots(self, received: torch.Tensor, slot_counts: np.ndarray) -> torch.Tensor:
        """received [R, H] grouped by source, each source's rows sorted by slot -> outputs [R, H]."""
        mine = self.my_slots
        labels = np.concatenate(
            [np.repeat(mine, slot_counts[source, mine]) for source in range(self.num_ranks)]
        )
        out = torch.empty_like(received)
        labels_t = torch.from_numpy(labels.astype(np.int64)).to(received.device)
        for slot in mine.tolist():
            index = (labels_t == slot).nonzero().squeeze(1)
            if index.numel():
                expert = self.local_experts[int(self.slots.slot_expert[slot])]
                out[index] = expert_mlp(received[index], expert).to(received.dtype)
        return out
