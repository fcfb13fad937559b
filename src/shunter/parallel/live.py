"""Live balancing of an expert-parallel MoE layer (`--balance live`): Lina's inference half at run time.

Per layer and forward, on every rank:
1. the tokens of a replicated expert are split over its replicas by the current batch's counts
   (`split_by_load`: water-filling onto the least-loaded replicas, a rank's own replica first), not
   by the plan's static shares;
2. phase 1: each rank estimates the popularity of this layer's experts from its tokens' paths
   through the previous MoE layers (`plan.replication.estimate_popularity`, the path estimator
   profiled from a routing trace); the estimates travel with the gate's counts in the one
   all-gather the block does anyway, so every rank sees the same totals, and Lina's packing
   (`replicate_hot_experts`: replica counts, first-fit decreasing) gives a candidate placement;
3. phase 2: if the estimate's top-2k experts differ from the gate's, the candidate is planned from
   the actual counts instead;
4. the candidate replaces the current placement only when the expected gain (fewer rows on the
   busiest rank, times the measured seconds per expert row) exceeds the cost of copying in the
   experts a rank does not hold (the most bytes any rank loads, over the measured checkpoint read
   rate). Every input of this decision is the same on every rank (the gathered counts, and costs
   agreed once with an all-reduce), so all ranks switch together without another message.

A declined candidate is not dropped: each rank starts copying in the experts of it that it lacks on
a background thread, overlapped with the layers and batches that follow (Lina overlaps its swaps with
the layers before; here the copy runs while the model goes on under the current placement). Each
rank reports which experts it holds on the same all-gather, so every rank sees the same residency:
once a candidate's experts are resident its move costs nothing, and the next batch that gains
adopts it. A candidate adopted at once (its gain exceeding the copy) copies its missing experts on
the spot, after any background copy in flight. Experts are copied in from the checkpoint
(memory-mapped: host RAM once read) and kept: a rank never evicts, so moving back to an earlier
placement costs nothing. What each copy cost is counted in `MoveStats`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import ShunterError
from shunter.model.layers import expert_mlp
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, MLPWeights
from shunter.parallel.moe import ExpertParallelMoE, Placement
from shunter.plan.replication import (
    PathEstimator,
    build_path_estimator,
    estimate_popularity,
    replicate_hot_experts,
    top_experts_differ,
)
from shunter.plan.slots import ExpertSlots
from shunter.trace.routing_trace import RoutingTrace


def water_fill(load: np.ndarray, total: int) -> np.ndarray:
    """[D] int64 rows to add to each of D devices with loads load [D] so the busiest ends as low as
    possible; sums to total. Fractions are rounded by largest remainder (ties to the lower index)."""
    load = np.asarray(load, dtype=np.float64)
    ordered = np.sort(load, kind="stable")
    level = ordered[-1] if ordered.size else 0.0
    for m in range(1, load.size + 1):
        level = (total + ordered[:m].sum()) / m
        if m == load.size or level <= ordered[m]:
            break
    ideal = np.clip(level - load, 0.0, None)
    parts = np.floor(ideal).astype(np.int64)
    missing = int(np.clip(total - parts.sum(), 0, load.size))
    order = np.argsort(-(ideal - parts), kind="stable")
    parts[order[:missing]] += 1
    return parts


def split_by_load(counts: np.ndarray, slots: ExpertSlots) -> np.ndarray:
    """[n, S] int64 the (token, choice) pairs each rank sends each slot, balancing rank loads.

    counts [n, E]: pairs on rank i that chose expert e. An expert with one slot takes all its pairs;
    a replicated expert's pairs (experts by total, largest first) are water-filled onto its slots'
    devices given the load already there, and each rank's pairs fill its own device's replica
    before any other (fewer rows travel). Deterministic: every rank computes the same split."""
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.shape[0]
    parts = np.zeros((n, slots.num_slots), dtype=np.int64)
    replicated = slots.replica_count > 1
    single = ~replicated[slots.slot_expert]
    parts[:, single] = counts[:, slots.slot_expert[single]]
    device_load = np.zeros(slots.num_devices, dtype=np.int64)
    np.add.at(device_load, slots.slot_device[single], parts[:, single].sum(axis=0))
    totals = counts.sum(axis=0)
    for expert in sorted(np.flatnonzero(replicated).tolist(), key=lambda e: (-totals[e], e)):
        columns = np.flatnonzero(slots.slot_expert == expert)
        devices = slots.slot_device[columns]
        target = water_fill(device_load[devices], int(totals[expert]))
        device_load[devices] += target
        left = counts[:, expert].copy()
        for source in range(n):  # a rank's own replica first
            for j in np.flatnonzero(devices == source):
                take = min(left[source], target[j])
                parts[source, columns[j]] += take
                left[source] -= take
                target[j] -= take
        for source in range(n):
            for j in range(columns.size):
                take = min(left[source], target[j])
                parts[source, columns[j]] += take
                left[source] -= take
                target[j] -= take
    return parts


def busiest_rank_rows(counts: np.ndarray, slots: ExpertSlots) -> int:
    """Rows the busiest rank computes when counts [n, E] are split by `split_by_load`."""
    parts = split_by_load(counts, slots)
    per_device = np.zeros(slots.num_devices, dtype=np.int64)
    np.add.at(per_device, slots.slot_device, parts.sum(axis=0))
    return int(per_device.max())


class PathHistory:
    """The top-1 expert of every token row at each MoE layer of the current forward (rows are in the
    same order at every layer), and the path estimator built from a profile trace (None: no
    profile, so phase 1 is skipped and only the gate's counts re-plan)."""

    def __init__(self, estimator: PathEstimator | None, num_experts: int) -> None:
        self.estimator = estimator
        self.num_experts = num_experts
        self.top1: list[np.ndarray] = []

    @classmethod
    def for_model(cls, spec: ModelSpec, live: object, model_dir: Path) -> PathHistory:
        profile: RoutingTrace | None = live.profile  # type: ignore[attr-defined]
        if profile is None:
            return cls(None, spec.num_experts)
        layers = sum(spec.moe_layers)
        if profile.num_experts != spec.num_experts or profile.num_layers != layers:
            raise ShunterError(
                f"{profile.source or 'trace'}: the profile trace has {profile.num_experts} experts in "
                f"{profile.num_layers} MoE layers; {model_dir} has {spec.num_experts} in {layers}"
            )
        return cls(build_path_estimator(profile, live.path_length), spec.num_experts)  # type: ignore[attr-defined]

    def estimate_and_record(self, moe_index: int, top1: np.ndarray, pairs: int) -> np.ndarray:
        """[E] float64 expected (token, choice) pairs of this layer from the tokens' paths (zeros
        without an estimator or at the first MoE layer); records this layer's top-1 [N]."""
        if moe_index == 0:
            self.top1 = []
        estimate = np.zeros(self.num_experts)
        usable = self.estimator is not None and moe_index > 0 and len(self.top1) == moe_index
        if usable and top1.size:
            history = np.stack([*self.top1, np.zeros_like(top1)])[:, :, None]  # [m + 1, N, 1]
            batch = RoutingTrace(
                history.astype(np.int64), np.ones(history.shape, np.float32), self.num_experts,
                np.arange(history.shape[0]),
            )  # fmt: skip
            estimate = estimate_popularity(self.estimator, batch, moe_index) * pairs  # type: ignore[arg-type]
        self.top1.append(top1.astype(np.int64))
        return estimate


@dataclass(frozen=True)
class MoveCosts:
    """Agreed by every rank (the slowest rank's figures): seconds an expert takes per row, and the
    bytes/s at which a rank copies an expert in from the checkpoint; expert_bytes per expert."""

    row_s: float
    copy_bytes_s: float
    expert_bytes: int


def mlp_bytes(weights: MLPWeights) -> int:
    tensors = (weights.gate_up, weights.down, weights.up, weights.gate_up_bias, weights.down_bias)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_move_costs(
    spec: ModelSpec, layout: CheckpointLayout, layer: int, dtype: torch.dtype, group: dist.ProcessGroup | None
) -> MoveCosts:
    """Time one expert's copy from the checkpoint and its MLP on 64 rows, on every rank; the slowest
    figures win (one all-reduce), so the re-planning decision is the same everywhere."""
    started = time.perf_counter()
    expert = layout.expert(layer, 0, dtype)
    copy_s = max(time.perf_counter() - started, 1e-9)
    rows = torch.randn(64, spec.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    expert_mlp(rows, expert)  # warm-up
    started = time.perf_counter()
    expert_mlp(rows, expert)
    row_s = max((time.perf_counter() - started) / rows.shape[0], 1e-12)
    size = mlp_bytes(expert)
    figures = torch.tensor([row_s, copy_s / size], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)
    return MoveCosts(float(figures[0]), 1.0 / float(figures[1]), size)


@dataclass
class MoveStats:
    """What re-planning did: placements adopted (phase2 of them from the gate's counts), declined
    (gain below the move's cost), experts copied in, their bytes and the seconds copying took."""

    replans: int = 0
    phase2: int = 0
    declined: int = 0
    experts_loaded: int = 0
    bytes_loaded: int = 0
    load_s: float = 0.0  # copies that blocked a layer
    background_loaded: int = 0  # of experts_loaded: copied while the model went on
    background_load_s: float = 0.0
    gains_s: list[float] = field(default_factory=list)


# One copier for every layer of the process: background copies read the checkpoint one at a time.
_COPIER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-copy")


class LiveBalancedMoE(ExpertParallelMoE):
    """An ExpertParallelMoE whose placement follows the batches (see the module docstring).

    Extra args: source_layout, model_layer, expert_dtype: where to copy experts in from;
    moe_index: this layer's position among the MoE layers (for paths); history: the model's
    PathHistory; costs: MoveCosts; live: LiveOptions (spare_slots, free_moves)."""

    def __init__(
        self,
        spec: ModelSpec,
        weights,
        local_experts: dict[int, MLPWeights],
        placement: Placement,
        *,
        source_layout: CheckpointLayout,
        model_layer: int,
        expert_dtype: torch.dtype,
        moe_index: int,
        history: PathHistory,
        costs: MoveCosts,
        live: object,
        **options,
    ) -> None:
        super().__init__(spec, weights, local_experts, placement, **options)
        self.source_layout, self.model_layer, self.expert_dtype = source_layout, model_layer, expert_dtype
        self.moe_index, self.history, self.costs = moe_index, history, costs
        self.free_moves = bool(live.free_moves)  # type: ignore[attr-defined]
        n, num_experts = self.num_ranks, spec.num_experts
        self.max_experts_per_rank = math.ceil(num_experts / n) + int(live.spare_slots)  # type: ignore[attr-defined]
        self.resident = np.zeros((n, num_experts), dtype=bool)  # [n, E] what every rank holds
        self.resident[self.slots.slot_device, self.slots.slot_expert] = True
        self.moves = MoveStats()
        self.copying: Future[tuple[dict[int, MLPWeights], float]] | None = None  # in the background

    @classmethod
    def from_checkpoint(cls, spec, layout, layer, placement, dtype, **options) -> LiveBalancedMoE:  # type: ignore[override]
        return super().from_checkpoint(
            spec, layout, layer, placement, dtype,
            source_layout=layout, model_layer=layer, expert_dtype=dtype, **options,
        )  # type: ignore[return-value]  # fmt: skip

    def _slot_counts(self, expert_ids: torch.Tensor) -> np.ndarray:
        num_experts = self.spec.num_experts
        flat = expert_ids.reshape(-1).cpu().numpy()
        actual = np.bincount(flat, minlength=num_experts).astype(np.float64)
        top1 = expert_ids[:, 0].cpu().numpy() if expert_ids.shape[0] else np.zeros(0, np.int64)
        estimated = self.history.estimate_and_record(self.moe_index, top1, flat.size)
        self._collect_copy(wait=False)
        held = np.zeros(num_experts)
        held[list(self.local_experts)] = 1.0
        mine = torch.from_numpy(np.concatenate([actual, estimated, held]))
        everyone = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(everyone, mine, group=self.group)
        gathered = torch.stack(everyone).numpy()  # [n, 3E]
        counts = np.rint(gathered[:, :num_experts]).astype(np.int64)
        self.resident = gathered[:, 2 * num_experts :] > 0.5  # the same on every rank
        self._replan(counts, gathered[:, num_experts : 2 * num_experts].sum(axis=0), expert_ids.shape[1])
        return split_by_load(counts, self.slots)

    def _replan(self, counts: np.ndarray, estimated: np.ndarray, top_k: int) -> None:
        """Lina's phases 1 and 2 from the gathered counts [n, E] and estimate [E]; switch placement
        when the gain exceeds the cost of the experts that would have to be copied in."""
        actual = counts.sum(axis=0).astype(np.float64)
        if actual.sum() == 0:
            return
        actual_share = actual / actual.sum()
        phase2 = False
        share = actual_share
        if estimated.sum() > 0:
            estimated_share = estimated / estimated.sum()
            phase2 = top_experts_differ(estimated_share, actual_share, top_k)
            share = actual_share if phase2 else estimated_share
        candidate = ExpertSlots.from_shares(
            replicate_hot_experts(share, self.num_ranks, self.max_experts_per_rank).shares
        )
        if candidate == self.slots:
            return
        gain_rows = busiest_rank_rows(counts, self.slots) - busiest_rank_rows(counts, candidate)
        if gain_rows <= 0:
            return
        wanted = np.zeros_like(self.resident)
        wanted[candidate.slot_device, candidate.slot_expert] = True
        to_copy = wanted & ~self.resident  # [n, E]
        cost_s = to_copy.sum(axis=1).max() * self.costs.expert_bytes / self.costs.copy_bytes_s
        gain_s = gain_rows * self.costs.row_s
        if not self.free_moves and gain_s <= cost_s:
            self.moves.declined += 1
            missing = np.flatnonzero(to_copy[self.rank]).tolist()
            if missing and self.copying is None:  # copy them while the model goes on
                self.copying = _COPIER.submit(self._copy, missing)
            return
        if to_copy[self.rank].any():  # the layer waits: a background copy in flight, then the rest
            started = time.perf_counter()
            self._collect_copy(wait=True)
            missing = [e for e in np.flatnonzero(to_copy[self.rank]).tolist() if e not in self.local_experts]
            self._keep(self._copy(missing)[0])
            self.moves.load_s += time.perf_counter() - started
        self.resident |= wanted
        self.slots = candidate
        self.my_slots = np.flatnonzero(candidate.slot_device == self.rank)
        self.moves.replans += 1
        self.moves.phase2 += int(phase2)
        self.moves.gains_s.append(gain_s)

    def _copy(self, experts: list[int]) -> tuple[dict[int, MLPWeights], float]:
        """Read these experts from the checkpoint: ({expert: weights}, seconds it took)."""
        started = time.perf_counter()
        copied = {e: self.source_layout.expert(self.model_layer, e, self.expert_dtype) for e in experts}
        return copied, time.perf_counter() - started

    def _keep(self, copied: dict[int, MLPWeights]) -> None:
        self.local_experts.update(copied)
        self.moves.experts_loaded += len(copied)
        self.moves.bytes_loaded += sum(mlp_bytes(w) for w in copied.values())

    def _collect_copy(self, wait: bool) -> None:
        """Keep what the background copy read, once it is done (wait: block until it is)."""
        if self.copying is None or not (wait or self.copying.done()):
            return
        copied, seconds = self.copying.result()
        self.copying = None
        self._keep(copied)
        self.moves.background_loaded += len(copied)
        self.moves.background_load_s += seconds
