"""An expert-parallel MoE block on torch.distributed: each rank routes its own tokens, sends each
(token, choice) to the rank holding the chosen expert, runs its experts, and gets the results back.

The math is the in-memory runtime's (`router_scores`, `select_experts`, `expert_mlp`,
`applied_gate_weights`, `add_shared_experts`); only where the rows are computed changes. Per rank:

1. route the local tokens x [T, H]; order the T*k (token, choice) pairs by (destination, expert);
2. all-gather the per-expert counts: every rank then knows counts [n, E], hence rows [n, n] and
   the expert of every row it will receive (rows from one source arrive sorted by expert), so no
   expert ids travel with the tokens;
3. dispatch: exchange the rows; each local expert runs once on its rows from all sources;
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
    router_scores,
    select_experts,
)
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, MLPWeights, MoEWeights
from shunter.network.transport import Strategy
from shunter.parallel.exchange import Links, exchange, open_links, plan_exchange
from shunter.plan.schedule import Schedule
from shunter.plan.traffic import shares_from_device_of_expert


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


def rows_between_ranks(counts: np.ndarray, device_of_expert: np.ndarray) -> np.ndarray:
    """[n, n] int64 rows each rank sends each rank, from counts [n, E] ((token, choice) pairs on
    rank i that chose expert e) and an exclusive placement device_of_expert [E]."""
    shares = shares_from_device_of_expert(device_of_expert, counts.shape[0]).astype(np.int64)
    return np.asarray(counts, dtype=np.int64) @ shares


@dataclass
class ExchangeCounts:
    """What one forward moved: rows [n, n] (token rows from rank i to rank j) of the dispatch."""

    rows: np.ndarray


class ExpertParallelMoE:
    """One MoE block whose routed experts are spread over the ranks of a process group.

    Args:
        spec: the model family's routing rules.
        weights: the router and shared experts (every rank), and the routed experts this rank holds:
            `local_experts[e]` for every e with device_of_expert[e] == rank.
        device_of_expert [E]: the rank holding each expert (an exclusive placement).
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
        device_of_expert: Sequence[int] | np.ndarray,
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
        self.device_of_expert = check_placement(device_of_expert, spec.num_experts, self.num_ranks)
        self.my_experts = np.flatnonzero(self.device_of_expert == self.rank)
        missing = [int(e) for e in self.my_experts if int(e) not in local_experts]
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
        self.last = ExchangeCounts(np.zeros((self.num_ranks, self.num_ranks), dtype=np.int64))

    @classmethod
    def from_checkpoint(
        cls,
        spec: ModelSpec,
        layout: CheckpointLayout,
        layer: int,
        device_of_expert: Sequence[int] | np.ndarray,
        dtype: torch.dtype,
        **options: object,
    ) -> ExpertParallelMoE:
        """Load one layer's router and shared experts, and only this rank's routed experts."""
        rank = dist.get_rank(options.get("group"))  # type: ignore[arg-type]
        placement = check_placement(
            device_of_expert, spec.num_experts, dist.get_world_size(options.get("group"))
        )  # type: ignore[arg-type]
        weights = layout.moe(layer, dtype, with_experts=False)
        local = {int(e): layout.expert(layer, int(e), dtype) for e in np.flatnonzero(placement == rank)}
        return cls(spec, weights, local, placement, **options)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (this rank's tokens; T may differ between ranks, or be 0) -> [T, H]."""
        scores = router_scores(x, self.weights, self.spec)
        expert_ids, gate_weights = select_experts(scores, self.weights, self.spec)
        applied = applied_gate_weights(gate_weights, x.dtype, self.spec)
        k = expert_ids.shape[1]

        # (token, choice) pairs ordered by (destination rank, expert).
        flat_experts = expert_ids.reshape(-1)
        destination = torch.from_numpy(self.device_of_expert).to(x.device)[flat_experts]
        order = (destination * self.spec.num_experts + flat_experts).argsort(stable=True)
        token_index, slot_index = order // k, order % k

        counts = self._all_counts(flat_experts)  # [n, E]
        rows = rows_between_ranks(counts, self.device_of_expert)
        self.last = ExchangeCounts(rows)

        dispatch_schedule, combine_schedule = self._schedules(rows, x.shape[1] * x.element_size())
        received = exchange(
            x[token_index], rows, self.strategy, schedule=dispatch_schedule, seed=self.seed,
            group=self.group, links=self.links,
        )  # fmt: skip
        computed = self._run_local_experts(received, counts)
        returned = exchange(
            computed, rows.T, self.strategy, schedule=combine_schedule, seed=self.seed + 1,
            group=self.group, links=self.links,
        )  # fmt: skip
        out = torch.zeros_like(x)
        add_weighted_rows(out, returned, token_index, slot_index, applied)
        return add_shared_experts(x, out, self.weights)

    __call__ = forward

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

    def _run_local_experts(self, received: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
        """received [R, H] grouped by source, each source's rows sorted by expert -> outputs [R, H]."""
        mine = self.my_experts
        labels = np.concatenate([np.repeat(mine, counts[source, mine]) for source in range(self.num_ranks)])
        out = torch.empty_like(received)
        labels_t = torch.from_numpy(labels.astype(np.int64)).to(received.device)
        for e in mine.tolist():
            index = (labels_t == e).nonzero().squeeze(1)
            if index.numel():
                out[index] = expert_mlp(received[index], self.local_experts[e]).to(received.dtype)
        return out
