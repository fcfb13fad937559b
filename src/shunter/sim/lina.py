"""Lina's two timelines (lina.md): inference per batch with dynamic replication, and a training step
in which the all-to-all is scheduled ahead of the data-parallel allreduce.

Inference, per batch, every MoE layer: attention + gate (G) -> all-gather of every device's
per-expert counts (K, a ring: n - 1 message latencies; the split of a replicated expert's rows
needs them) -> dispatch (N) -> experts (F: one call per expert a device holds, on its share of
that expert's rows) -> combine (C) -> aggregation (A), ports shared max-min fairly (a plain NCCL
all-to-all). Policies:
- static: expert e on device e * n // E (DeepSpeed's one expert per device);
- lina: plan.replication.plan_lina_layer per layer and batch (path estimate, phase-2 re-plan when
  the top-2k experts differ); a replicated expert's tokens are split over its replicas. A device
  keeps its static experts resident and swaps in the others over its host link on a copy stream:
  after the previous layer's gate for a phase-1 plan (pipelined with compute), after this layer's
  gate when phase 2 re-planned (blocking); the experts wait for their weights;
- eplb: a fixed placement per layer planned beforehand (the EPLB-style balancer's from a profile:
  `layer_shares`), every replica resident (nothing swapped); a replicated expert's tokens split by
  the plan's shares;
- ideal: a perfectly balanced gate (every expert gets N k / E tokens) on the static placement.
Devices that are processes on one machine's few cores (the emulated cluster: InferenceSetup and
TrainingSetup shared_cores) share them in the timeline (TimelineOptions.cores): while k devices
compute, each at min(1, cores / k) of its speed, so a rank computing while the others wait in a
collective (a hot rank's experts) runs at full speed. Collectives are barriers, so after a dispatch
all devices start their experts together.
Training step, per device: forward G N F C per block, then backward in reverse (combine-backward
all-to-all, expert backward at 2x forward FLOPs, dispatch-backward all-to-all, attention backward
at 2x), and an allreduce of each block's dense gradients once its backward is done, then the
optimizer step. Routing is the ideal gate's, or a measured step's rows per block. Variants:
- deepspeed: each block's allreduce is one collective launched when ready; it shares ports with
  the all-to-alls (both as NCCL-like collectives: the ring runs on as many channels per port as
  the all-to-all has flows, so a shared port splits evenly);
- priority: allreduce split into micro-ops (default 30 MB), launched only when no all-to-all is
  running, waiting or imminent (Lina's scheduler);
- lina: priority + partitioning: every all-to-all is cut into chunks along tokens and the expert
  FFN starts on each chunk as it arrives.
With expert packing (TrainingSetup.expert_parallel P < n): groups of P devices each hold every
expert (their all-to-alls stay inside the group), and after the dense allreduces every device sums
its E/P experts' gradients with their replicas on the other groups, block by block, one ring per
position (as the runtime does, after the dense gradients are summed), before the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from shunter.network.cost import ring_allreduce_flows
from shunter.plan.cluster import ClusterSpec
from shunter.plan.placement import placement_from_devices
from shunter.plan.replication import PathEstimator, plan_lina_layer
from shunter.plan.traffic import combine_traffic, dispatch_traffic, token_home_devices, tokens_per_device
from shunter.shapes import MoEShapes
from shunter.sim.cost import ComputeModel
from shunter.sim.timeline import Collective, Compute, Op, TimelineOptions, run_timeline
from shunter.trace.routing_trace import RoutingTrace

InferencePolicy = Literal["static", "eplb", "lina", "ideal"]
TrainingVariant = Literal["deepspeed", "priority", "lina"]


# ---------------------------------------------------------------------------------------------
# inference


@dataclass(frozen=True)
class InferenceSetup:
    """shapes: the model; context_tokens: attention context per token; host_link_bytes_s: how fast
    a device swaps expert weights in from host memory (PCIe); latency_s: per message; shared_cores:
    the devices are processes sharing this many cores (emulated hosts on one machine), so devices
    computing at once beyond the cores slow each other (TimelineOptions.cores; the compute model's
    seconds are then a device's alone on a core); None: every device computes on its own;
    port_burst_bytes [n]: each port's token bucket (the emulated cluster's tbf; None: none)."""

    shapes: MoEShapes
    cluster: ClusterSpec
    compute: ComputeModel
    context_tokens: int = 512
    host_link_bytes_s: float = 25e9
    latency_s: float = 0.0
    shared_cores: float | None = None
    port_burst_bytes: np.ndarray | None = None


@dataclass(frozen=True)
class BatchResult:
    """One batch: time_s through every layer; replanned: layers phase 2 re-planned; max_over_mean
    [L]: device load imbalance per layer; swap_bytes: expert weights swapped in."""

    time_s: float
    replanned: int
    max_over_mean: np.ndarray
    swap_bytes: float


def static_shares(num_experts: int, num_devices: int) -> np.ndarray:
    """[E, n] contiguous blocks: expert e on device e * n // E (one per device when E == n)."""
    device_of = np.arange(num_experts) * num_devices // num_experts
    return placement_from_devices(device_of, num_devices, "static").shares


def balanced_expert_ids(num_tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """[N, k] an ideal gate: choice j of token t goes to expert (t k + j) mod E, so every expert
    gets N k / E pairs (when E divides N k) and choices of a token are distinct (k <= E)."""
    flat = np.arange(num_tokens * top_k, dtype=np.int64) % num_experts
    return flat.reshape(num_tokens, top_k)


def all_gather_ring(name: str, num_devices: int, nbytes: float, after: tuple[str, ...]) -> list[Collective]:
    """A ring all-gather of `nbytes` per device as n - 1 steps, each device sending one message to
    the next (gloo's and NCCL's ring), each step after the last: it costs n - 1 message latencies."""
    ring = np.arange(num_devices)
    steps = []
    for step in range(num_devices - 1):
        previous = after if step == 0 else (f"{name}.{step - 1}",)
        sizes = np.full(num_devices, nbytes)
        steps.append(
            Collective(f"{name}.{step}", ring, (ring + 1) % num_devices, sizes, previous, kind="all_gather")
        )
    return steps


def inference_batch(
    batch: RoutingTrace,
    setup: InferenceSetup,
    policy: InferencePolicy,
    estimator: PathEstimator | None = None,
    layer_shares: list[np.ndarray] | None = None,
) -> BatchResult:
    """Time one batch through every MoE layer of `batch` under a placement policy (module docstring).
    estimator: the lina policy's path estimator; layer_shares: the eplb policy's [E, n] per layer."""
    shapes, cluster = setup.shapes, setup.cluster
    n, E = cluster.num_devices, batch.num_experts
    if shapes.num_experts != E:
        raise ValueError(f"trace has {E} experts, the model {shapes.num_experts}")
    speed = cluster.compute_flop_s
    static = static_shares(E, n)
    home = np.bincount(token_home_devices(batch.num_tokens, n), minlength=n).astype(np.float64)
    attention = setup.compute.op_time_s(
        "attention",
        home,
        shapes.attention_flops_per_token(setup.context_tokens) + shapes.gate_flops_per_token,
        shapes.attention_bytes,
        speed,
    )
    aggregation = setup.compute.op_time_s("aggregation", home, shapes.aggregation_flops_per_token, 0.0, speed)
    ops: list[Op] = []
    replanned = 0
    swap_total = 0.0
    imbalance = np.zeros(batch.num_layers)
    previous_gate: tuple[str, ...] = ()
    previous_end: tuple[str, ...] = ()
    for layer in range(batch.num_layers):
        if policy == "ideal":
            ids = balanced_expert_ids(batch.num_tokens, E, batch.top_k)
        else:
            ids = batch.expert_ids[layer]
        shares = static
        swap_s = np.zeros(n)
        swap_after = previous_gate
        if policy == "eplb":
            if layer_shares is None or len(layer_shares) != batch.num_layers:
                raise ValueError("the eplb policy needs one placement (layer_shares) per layer")
            shares = layer_shares[layer]
        if policy == "lina":
            if estimator is None:
                raise ValueError("the lina policy needs a path estimator")
            plan = plan_lina_layer(estimator, batch, layer, n)
            shares = plan.placement.shares
            extra = ((shares > 0) & (static == 0)).sum(axis=0).astype(np.float64)  # [n] experts to fetch
            swap_s = extra * shapes.expert_bytes / setup.host_link_bytes_s
            swap_total += float(extra.sum()) * shapes.expert_bytes
            if plan.replanned:
                replanned += 1
                swap_after = (f"G{layer}",)
        processed = tokens_per_device(ids, shares)
        imbalance[layer] = processed.max() / processed.mean() if processed.mean() > 0 else 1.0
        rows = np.bincount(ids.reshape(-1), minlength=E)[:, None] * shares  # [E, n] rows of each call
        expert_s = setup.compute.op_time_s(
            "expert", rows, shapes.expert_flops_per_token, shapes.expert_bytes, speed
        ).sum(axis=0)
        traffic = dispatch_traffic(ids, shares, shapes.token_bytes, n)
        L = str(layer)
        ops.append(Compute(f"G{L}", attention, previous_end, "gate"))
        ops.append(Compute(f"W{L}", swap_s, swap_after, "swap", stream="copy"))
        counts = all_gather_ring(f"K{L}", n, 8.0 * E, (f"G{L}",))  # int64 per expert
        ops.extend(counts)
        ops.append(Collective.from_traffic(f"N{L}", traffic, (counts[-1].name,) if counts else (f"G{L}",),
                                           kind="dispatch"))  # fmt: skip
        ops.append(Compute(f"F{L}", expert_s, (f"N{L}", f"W{L}"), "expert"))
        ops.append(Collective.from_traffic(f"C{L}", combine_traffic(traffic), (f"F{L}",), kind="combine"))
        ops.append(Compute(f"A{L}", aggregation, (f"C{L}",), "aggregation"))
        previous_gate, previous_end = (f"G{L}",), (f"A{L}",)
    options = TimelineOptions(
        "fair_share", setup.latency_s, cores=setup.shared_cores, burst_bytes=setup.port_burst_bytes
    )
    timeline = run_timeline(ops, cluster.bandwidth_bytes_s, options)
    return BatchResult(timeline.makespan_s, replanned, imbalance, swap_total)


def split_batches(trace: RoutingTrace, tokens_per_batch: int) -> list[RoutingTrace]:
    """Consecutive slices of `tokens_per_batch` tokens (a short last slice is dropped)."""
    out = []
    for start in range(0, trace.num_tokens - tokens_per_batch + 1, tokens_per_batch):
        part = slice(start, start + tokens_per_batch)
        out.append(
            RoutingTrace(
                trace.expert_ids[:, part],
                trace.gate_weights[:, part],
                trace.num_experts,
                trace.layer_indices,
                trace.model,
                trace.source,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrainingSetup:
    """One training step of an MoE transformer with expert parallelism over every device.

    tokens_per_device: tokens each device's data-parallel replica processes; context_tokens:
    attention span; dense_gradient_bytes_per_block: non-expert gradients allreduced per MoE block
    (its attention and the dense layer beside it); micro_op_bytes: Lina's allreduce micro-op;
    a2a_chunks: Lina's all-to-all partitions; allreduce_channels: parallel flows of a ring
    allreduce per port (None: n - 1, as many as an all-to-all has).
    dispatch_rows [blocks, n, n]: (token, choice) pairs device i sends device j in each block's
    dispatch (a measured step's routing; expert compute follows each device's received rows);
    None: the ideal gate, which a balancing loss aims at (early in training routing is far from it).
    optimizer_s: the optimizer step after the last allreduce (per device, measured or estimated).
    final_gradient_bytes: dense gradients complete only when the whole backward is (the input
    embedding, whose lookup is the first op of the forward), allreduced after the first block's.
    shared_cores: the devices are processes sharing this many cores (TimelineOptions.cores; compute
    and optimizer_s are then seconds alone on a core); None: every device computes on its own.
    expert_parallel: devices per expert-parallel group (Lina's packing: P < n, dispatch_rows then
    block-diagonal); None: every device, one group.
    """

    shapes: MoEShapes
    cluster: ClusterSpec
    compute: ComputeModel
    tokens_per_device: int
    context_tokens: int
    dense_gradient_bytes_per_block: float
    dense_flops_per_token_per_block: float
    micro_op_bytes: float = 30e6
    a2a_chunks: int = 4
    allreduce_channels: int | None = None
    latency_s: float = 0.0
    dispatch_rows: np.ndarray | None = None
    optimizer_s: float = 0.0
    final_gradient_bytes: float = 0.0
    shared_cores: float | None = None
    expert_parallel: int | None = None


def replica_allreduce_flows(num_bytes: float, num_devices: int, expert_parallel: int):
    """(src, dst, bytes) of every replica group's ring allreduce of num_bytes at once: the devices
    at position p of every expert-parallel group (p, p + P, p + 2P, ...) form one ring."""
    groups = [np.arange(p, num_devices, expert_parallel) for p in range(expert_parallel)]
    flows = [ring_allreduce_flows(num_bytes, len(group)) for group in groups]
    src = np.concatenate([group[f[0]] for group, f in zip(groups, flows, strict=True)])
    dst = np.concatenate([group[f[1]] for group, f in zip(groups, flows, strict=True)])
    return src, dst, np.concatenate([f[2] for f in flows])


@dataclass(frozen=True)
class StepResult:
    """step_s: the training step; backward_a2a_s / forward_a2a_s: mean time one all-to-all spends on
    the wire (a chunked one: its chunks summed); utilisation: mean share of the step a device spends
    computing (on shared cores: wall time, stretched while it shares them)."""

    step_s: float
    backward_a2a_s: float
    forward_a2a_s: float
    utilisation: float


def training_ops(setup: TrainingSetup, variant: TrainingVariant) -> list[Op]:
    """The op graph of one step (see the module docstring)."""
    shapes, cluster = setup.shapes, setup.cluster
    n = cluster.num_devices
    T = setup.tokens_per_device
    speed = cluster.compute_flop_s
    compute = setup.compute
    blocks = shapes.num_layers
    P = setup.expert_parallel or n
    if n % P:
        raise ValueError(f"expert_parallel {P} does not divide {n} devices")
    if setup.dispatch_rows is None:  # the ideal gate's traffic, the same in every block and group
        ids = balanced_expert_ids(T * P, shapes.num_experts, shapes.top_k)
        shares = static_shares(shapes.num_experts, P)
        group_traffic = dispatch_traffic(ids, shares, shapes.token_bytes, P)
        traffics = [np.kron(np.eye(n // P), group_traffic)] * blocks
        processed = [np.tile(tokens_per_device(ids, shares), n // P)] * blocks
    else:
        rows = np.asarray(setup.dispatch_rows, dtype=np.float64)
        if rows.shape != (blocks, n, n):
            raise ValueError(f"dispatch_rows has shape {rows.shape}, expected {(blocks, n, n)}")
        off_diagonal = rows * (1 - np.eye(n))  # rows a device keeps never cross the network
        traffics = list(off_diagonal * shapes.token_bytes)
        processed = list(rows.sum(axis=1))  # rows each device's experts run
    dense_flops = (
        shapes.attention_flops_per_token(setup.context_tokens) + setup.dense_flops_per_token_per_block
    )
    dense_flops += shapes.gate_flops_per_token
    tokens = np.full(n, float(T))
    dense_fwd = compute.op_time_s("attention", tokens, dense_flops, 0.0, speed)
    expert_fwd = [
        compute.op_time_s("expert", p, shapes.expert_flops_per_token, 0.0, speed) for p in processed
    ]
    chunks = setup.a2a_chunks if variant == "lina" else 1
    channels = setup.allreduce_channels or max(n - 1, 1)
    micro = variant in ("priority", "lina")
    ops: list[Op] = []

    def moe(
        prefix: str,
        before: tuple[str, ...],
        expert: np.ndarray,
        matrix: np.ndarray,
        announced_by: tuple[str, ...] = (),
    ) -> str:
        """first all-to-all (matrix) -> expert compute -> second all-to-all (matrix.T), chunked."""
        chained: tuple[str, ...] = before
        ends = []
        for j in range(chunks):
            a, f, b = f"{prefix}N{j}", f"{prefix}F{j}", f"{prefix}C{j}"
            kind = "bwd_a2a" if prefix.startswith("b") else "fwd_a2a"
            dispatch = Collective.from_traffic(a, matrix / chunks, chained, kind=kind)
            ops.append(replace(dispatch, announced_by=announced_by if j == 0 else ()))
            ops.append(Compute(f, expert / chunks, (a,), "expert"))
            ops.append(Collective.from_traffic(b, matrix.T / chunks, (f,), kind=kind))
            chained = (a,)  # the next chunk leaves once this one has arrived
            ends.append(b)
        join = f"{prefix}join"
        ops.append(Compute(join, np.zeros(n), tuple(ends), "join"))
        return join

    aggregation = compute.op_time_s("aggregation", tokens, shapes.aggregation_flops_per_token, 0.0, speed)
    previous: tuple[str, ...] = ()
    for block in range(blocks):
        g = f"f{block}G"
        ops.append(Compute(g, dense_fwd, previous, "dense"))
        previous = (moe(f"f{block}", (g,), expert_fwd[block], traffics[block]),)
    for block in reversed(range(blocks)):
        # Backward: the combine computation's backward (whose start tells Lina's scheduler an
        # all-to-all is coming), gradients to the experts (the dispatch pattern), expert backward,
        # then gradients home (the combine pattern), then the dense backward.
        combine_bwd = f"b{block}M"
        ops.append(Compute(combine_bwd, 2 * aggregation, previous, "aggregation"))
        join = moe(
            f"b{block}",
            (combine_bwd,),
            2 * expert_fwd[block],
            traffics[block],
            announced_by=(combine_bwd,),
        )
        a = f"b{block}A"
        ops.append(Compute(a, 2 * dense_fwd, (join,), "dense"))
        previous = (a,)
        size = setup.dense_gradient_bytes_per_block
        if block == 0:
            size += setup.final_gradient_bytes
        pieces = max(1, int(np.ceil(size / setup.micro_op_bytes))) if micro else 1
        after: tuple[str, ...] = (a,)
        for p in range(pieces):
            src, dst, nbytes = ring_allreduce_flows(size / pieces, n, channels)
            name = f"b{block}R{p}"
            ops.append(Collective(name, src, dst, nbytes, after, low_priority=True, kind="allreduce"))
            after = (a, name) if micro else (a,)
    if n > P:  # packed: replicas sum their experts' gradients once the dense ones are summed
        after = (*previous, *(op.name for op in ops if isinstance(op, Collective) and op.kind == "allreduce"))
        expert_bytes = shapes.num_experts / P * shapes.expert_bytes
        for block in range(blocks):
            name = f"x{block}R"
            src, dst, nbytes = replica_allreduce_flows(expert_bytes, n, P)
            ops.append(Collective(name, src, dst, nbytes, after, kind="expert_allreduce"))
            after = (name,)
    if setup.optimizer_s > 0:  # once every gradient is summed
        summed = tuple(
            op.name
            for op in ops
            if isinstance(op, Collective) and op.kind in ("allreduce", "expert_allreduce")
        )
        ops.append(Compute("optimizer", np.full(n, setup.optimizer_s), (*previous, *summed), "optimizer"))
    return ops


def training_step(setup: TrainingSetup, variant: TrainingVariant) -> StepResult:
    """Simulate one step; priority applies to the priority and lina variants."""
    ops = training_ops(setup, variant)
    priority = variant in ("priority", "lina")
    options = TimelineOptions("fair_share", setup.latency_s, priority, cores=setup.shared_cores)
    timeline = run_timeline(ops, setup.cluster.bandwidth_bytes_s, options)

    def mean_all_to_all_s(kind: str) -> float:
        """Mean time one all-to-all is on the wire: its chunks' durations summed (two per block)."""
        durations = [
            timeline.collective_finish_s[op.name] - timeline.collective_start_s[op.name]
            for op in ops
            if isinstance(op, Collective) and op.kind == kind
        ]
        return float(np.sum(durations)) / (2 * setup.shapes.num_layers) if durations else 0.0

    return StepResult(
        timeline.makespan_s,
        mean_all_to_all_s("bwd_a2a"),
        mean_all_to_all_s("fwd_a2a"),
        timeline.mean_utilisation,
    )
