"""Whole-model expert-parallel inference on torch.distributed (launched by torchrun).

Attention is data-parallel: every rank holds the dense weights (embedding, attention, norms, dense
MLPs, routers, shared experts, LM head), owns a contiguous block of the batch's sequences and their
KV cache. Every MoE layer is an `ExpertParallelMoE` over the same ranks under one placement per
layer (the plan document's slots: exclusive, replicated or one model's half of a colocated plan;
contiguous blocks without a plan), and a rank loads only the routed experts its slots hold, straight
from the checkpoint. With balance "live" the layers are `LiveBalancedMoE` (parallel/live.py).

Every rank runs the same number of forwards (a rank whose block of the batch is empty runs a
discarded copy of the first prompt), so each layer's exchanges pair up; stop tokens cut each
sequence afterwards, which leaves greedy tokens equal to single-process `generate`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import InMemoryModel
from shunter.model.generate import GenerationResult, generate
from shunter.model.sampling import GREEDY, SamplingParams
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.weights import CheckpointLayout, ModelWeights
from shunter.network.transport import Strategy
from shunter.parallel.exchange import open_links
from shunter.parallel.moe import ExpertParallelMoE, as_slots, contiguous_placement
from shunter.plan.document import PlanDocument
from shunter.plan.slots import ExpertSlots
from shunter.trace.routing_trace import RoutingTrace

BALANCES = ("plan", "live")


def moe_layer_indices(spec: ModelSpec) -> list[int]:
    """The model layers that are MoE layers, in order (plan layer i is model layer result[i])."""
    return [i for i, is_moe in enumerate(spec.moe_layers) if is_moe]


def placements_of(
    spec: ModelSpec, world: int, plan: PlanDocument | None, model_source: str, model_index: int = 0
) -> list[ExpertSlots]:
    """One ExpertSlots per MoE layer: the plan's (model `model_index` of a colocated plan), checked
    against the checkpoint and the process group, or contiguous blocks when plan is None."""
    layers = moe_layer_indices(spec)
    if not layers:
        raise ShunterError(f"{model_source}: the model has no MoE layer to run expert-parallel")
    if plan is None:
        exclusive = contiguous_placement(spec.num_experts, world)
        return [as_slots(exclusive, spec.num_experts, world) for _ in layers]
    if plan.num_devices != world:
        raise ShunterError(
            f"{plan.source}: the plan places experts on {plan.num_devices} devices, but {world} ranks "
            f"were started (torchrun --nproc-per-node {plan.num_devices}, or plan again for {world})"
        )
    if model_index >= len(plan.models):
        raise ShunterError(
            f"{plan.source}: the plan places {len(plan.models)} model(s), not {model_index + 1}"
        )
    experts = plan.slots(0, model_index).num_experts
    if experts != spec.num_experts or plan.num_layers != len(layers):
        which = f"model {model_index} of " if len(plan.models) > 1 else ""
        raise ShunterError(
            f"{plan.source}: {which}the plan places {experts} experts in {plan.num_layers} MoE layers; "
            f"{model_source} has {spec.num_experts} experts in {len(layers)} MoE layers"
        )
    return [as_slots(plan.slots(i, model_index), spec.num_experts, world) for i in range(len(layers))]


def port_bandwidths(plan: PlanDocument | None, world: int) -> np.ndarray:
    """[n] bytes/s the scheduled exchange plans for: the plan's devices, or equal ports."""
    if plan is None:
        return np.ones(world)
    return np.array([bandwidth for bandwidth, _ in plan.device_specs], dtype=np.float64)


@dataclass
class LiveOptions:
    """Options of `--balance live` (parallel/live.py).

    profile: the routing trace the path estimator is built from (None: phase 2 only, the gate's
    actual counts); spare_slots: expert slots per rank beyond an even share, room for replicas;
    free_moves: re-plan whenever the load improves, ignoring what moving experts costs (tests);
    copy_bytes_s: the checkpoint read rate moves are priced at, instead of the measured one (tests:
    a very low rate declines every move that needs a copy)."""

    profile: RoutingTrace | None = None
    path_length: int = 3
    spare_slots: int = 1
    free_moves: bool = False
    copy_bytes_s: float | None = None


@dataclass
class ExpertParallelModel:
    """A model whose MoE layers run expert-parallel; `blocks[model layer]` are its MoE blocks."""

    model: InMemoryModel
    blocks: dict[int, ExpertParallelMoE]
    rank: int
    world: int
    group: dist.ProcessGroup | None = None
    balance: str = "plan"
    stats: dict[str, float] = field(default_factory=dict)

    def live_stats(self) -> dict[str, float | int]:
        """Totals of the live balancer over every layer (empty without --balance live)."""
        from shunter.parallel.live import LiveBalancedMoE

        live = [b for b in self.blocks.values() if isinstance(b, LiveBalancedMoE)]
        if not live:
            return {}
        return {
            "replans": sum(b.moves.replans for b in live),
            "phase2_replans": sum(b.moves.phase2 for b in live),
            "declined_replans": sum(b.moves.declined for b in live),
            "experts_loaded": sum(b.moves.experts_loaded for b in live),
            "bytes_loaded": sum(b.moves.bytes_loaded for b in live),
            "load_s": sum(b.moves.load_s for b in live),
            "experts_loaded_in_background": sum(b.moves.background_loaded for b in live),
            "background_load_s": sum(b.moves.background_load_s for b in live),
        }


def load_expert_parallel_model(
    model_dir: Path,
    dtype: torch.dtype,
    placements: Sequence[ExpertSlots],
    *,
    strategy: Strategy = "scheduled",
    bandwidth_bytes_s: np.ndarray | None = None,
    seed: int = 0,
    balance: str = "plan",
    live: LiveOptions | None = None,
    group: dist.ProcessGroup | None = None,
) -> ExpertParallelModel:
    """Load the dense weights and this rank's routed experts only; every MoE layer expert-parallel.

    Collective: every rank of `group` calls it with the same placements."""
    if balance not in BALANCES:
        raise ShunterError(f"--balance: expected one of {', '.join(BALANCES)}, got {balance!r}")
    spec = load_spec(model_dir)
    layout = CheckpointLayout(spec, Checkpoint(model_dir))
    embed = layout.embed(dtype)
    weights = ModelWeights(
        embed=embed,
        layers=[layout.layer(i, dtype, with_experts=False) for i in range(spec.num_layers)],
        final_norm=layout.final_norm(dtype),
        lm_head=layout.lm_head(dtype, embed),
    )
    model = InMemoryModel(spec, weights, dtype)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    links = open_links(group) if strategy != "all_to_all" else None
    options = dict(
        strategy=strategy, bandwidth_bytes_s=bandwidth_bytes_s, seed=seed, group=group, links=links
    )
    blocks: dict[int, ExpertParallelMoE] = {}
    layers = moe_layer_indices(spec)
    if len(placements) != len(layers):
        raise ShunterError(f"{len(placements)} placements for {len(layers)} MoE layers")
    if balance == "live":
        from shunter.parallel.live import LiveBalancedMoE, PathHistory, measure_move_costs

        live = live or LiveOptions()
        history = PathHistory.for_model(spec, live, model_dir)
        costs = measure_move_costs(spec, layout, layers[0], dtype, group)
        if live.copy_bytes_s is not None:
            costs = replace(costs, copy_bytes_s=live.copy_bytes_s)
        for index, layer in enumerate(layers):
            blocks[layer] = LiveBalancedMoE.from_checkpoint(
                spec, layout, layer, placements[index], dtype,
                moe_index=index, history=history, costs=costs, live=live, **options,
            )  # fmt: skip
    else:
        for index, layer in enumerate(layers):
            blocks[layer] = ExpertParallelMoE.from_checkpoint(
                spec, layout, layer, placements[index], dtype, **options
            )
    model.moe_overrides.update(blocks)
    return ExpertParallelModel(model, blocks, rank, world, group, balance)


def sequences_of_rank(num_sequences: int, rank: int, world: int) -> range:
    """The contiguous block of the batch rank `rank` owns (earlier ranks take one more when uneven)."""
    base, extra = divmod(num_sequences, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """tokens up to and including the first stop token (what `generate` keeps with stop_ids)."""
    stop = set(stop_ids)
    for index, token in enumerate(tokens):
        if token in stop:
            return list(tokens[: index + 1])
    return list(tokens)


def generate_expert_parallel(
    ep: ExpertParallelModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop_ids: Sequence[int] = (),
    on_step: Callable[[list[int | None]], None] | None = None,
) -> GenerationResult:
    """Generate for the whole batch `prompts` (every rank passes all of them); each rank runs its
    block, and every rank returns the gathered result (tokens in batch order; times: the slowest
    rank's). on_step sees this rank's own sequences' tokens, uncut (stop tokens included and passed).

    Sampling (temperature > 0) draws per rank: tokens then differ from single-process sampling."""
    mine = sequences_of_rank(len(prompts), ep.rank, ep.world)
    local = [prompts[i] for i in mine] or [prompts[0]]  # an idle rank still joins every exchange
    result = generate(ep.model, local, max_new_tokens, sampling, stop_ids=(), on_step=on_step)
    mine_cut = [cut_at_stop(t, stop_ids) for t in result.tokens[: len(mine)]]
    summary = (mine_cut, result.prefill_s, result.decode_s, result.decode_steps, result.per_step_s)
    gathered: list[tuple | None] = [None] * ep.world
    dist.all_gather_object(gathered, summary, group=ep.group)
    tokens = [t for part in gathered for t in part[0]]  # type: ignore[index]
    per_step_s = [max(steps) for steps in zip(*(part[4] for part in gathered), strict=True)]  # type: ignore[index]
    # single-process generate stops once every sequence has stopped: count the forwards it would run
    needed = max(0, max(len(t) for t in tokens) - 1)
    return GenerationResult(
        tokens=tokens,
        prompt_tokens=sum(len(p) for p in prompts),
        prefill_s=max(part[1] for part in gathered),  # type: ignore[index]
        decode_s=sum(per_step_s[:needed]),
        decode_steps=min(needed, len(per_step_s)),
        batch=len(prompts),
        per_step_s=per_step_s,
    )


@dataclass
class ModelRun:
    """One model's generation: its expert-parallel model and `generate_expert_parallel`'s arguments."""

    model: ExpertParallelModel
    prompts: Sequence[Sequence[int]]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop_ids: Sequence[int] = ()
    on_step: Callable[[list[int | None]], None] | None = None

    def arguments(self) -> tuple:
        return (self.prompts, self.max_new_tokens, self.sampling, self.stop_ids, self.on_step)


def new_model_group() -> dist.ProcessGroup:
    """Every rank in a communicator of its own, so two colocated models' collectives never pair up
    with each other. Collective: every rank creates the groups in the same order."""
    return dist.new_group(list(range(dist.get_world_size())), backend=dist.get_backend())


def generate_colocated(runs: Sequence[ModelRun]) -> list[GenerationResult]:
    """Aurora's colocation: the models generate at the same time on the same ranks, one thread each
    (each model on its own process group), so one model's exchange runs while the other computes.
    Every rank returns every model's gathered result; the first failure is raised here."""
    results: list[GenerationResult | None] = [None] * len(runs)
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = generate_expert_parallel(runs[index].model, *runs[index].arguments())
        except BaseException as exc:  # re-raised on the calling thread, which reports it
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"model-{i}") for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results  # type: ignore[return-value]
