"""Whole plans: placement, traffic and schedules for every MoE layer of a trace on a cluster.

Per layer (Aurora's Eq. 1 without the gate and aggregation, which a trace does not measure):
    layer_time_s = dispatch makespan + max over devices of expert compute + combine makespan,
    compute_s[d] = tokens processed on d * flops_per_token / compute_flop_s[d],
    utilisation  = mean over devices of compute_s / layer_time_s.
Colocated models share the all-to-alls (Aurora Thm 6.1: schedule the aggregated traffic
D_a + D_b) and each device computes both models' experts one after the other.

The "without a plan" reference for each mode: exclusive -> random assignment (RGA) and fair-share
all-to-all; replicated -> the exclusive plan without replication, fair share; colocated -> Lina's
packing, fair share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shunter.errors import ShunterError
from shunter.network.bounds import port_lower_bound_s
from shunter.network.cost import all_to_all_time_s
from shunter.plan.cluster import ClusterSpec
from shunter.plan.placement import (
    ColocatedInstance,
    Placement,
    check_colocatable,
    place_colocated_heterogeneous,
    place_colocated_homogeneous,
    place_colocated_lina,
    place_exclusive,
    place_random,
)
from shunter.plan.replication import (
    MAX_EXPERTS_PER_DEVICE,
    build_path_estimator,
    eplb_replicate,
    max_over_mean_load,
    plan_lina_layer,
)
from shunter.plan.schedule import DEFAULT_MAX_LANES, Schedule, schedule_all_to_all
from shunter.plan.traffic import combine_traffic, dispatch_traffic, tokens_per_device
from shunter.shapes import MIXTRAL_8X7B
from shunter.trace.routing_trace import RoutingTrace

# A Mixtral-sized expert: hidden 4096 in bf16 on the wire (8192 bytes); SwiGLU 4096 -> 14336 -> 4096
# is 3 * 4096 * 14336 multiply-adds, 2 FLOPs each (an int, as the plan's JSON has always shown it).
DEFAULT_BYTES_PER_TOKEN = MIXTRAL_8X7B.token_bytes
DEFAULT_FLOPS_PER_TOKEN = int(MIXTRAL_8X7B.expert_flops_per_token)

Mode = Literal["exclusive", "replicated", "colocated"]


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of a plan; every quantity carries its unit."""

    bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN
    flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN
    replicate: bool = False
    path_length: int = 3
    max_experts_per_device: int | None = None
    max_lanes_per_device: int = DEFAULT_MAX_LANES
    baselines: bool = True
    seed: int = 0


@dataclass(frozen=True)
class AllToAllPlan:
    """One all-to-all: traffic_bytes [n, n], its schedule, the port bound, and (optionally) the
    baselines' makespans: fair_share_s, random_order_s, shortest_first_s."""

    traffic_bytes: np.ndarray
    schedule: Schedule
    lower_bound_s: float
    baselines_s: dict[str, float] = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return self.schedule.makespan_s

    def to_dict(self, include_rounds: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "makespan_s": self.makespan_s,
            "lower_bound_s": self.lower_bound_s,
            "rounds": self.schedule.num_rounds,
            "transfers": self.schedule.num_transfers,
            "strategy": self.schedule.strategy,
            "total_bytes": float(self.traffic_bytes.sum()),
            "baselines": dict(self.baselines_s),
        }
        if include_rounds:
            out["schedule"] = {
                "round_of": self.schedule.round_of.tolist(),
                "src": self.schedule.src.tolist(),
                "dst": self.schedule.dst.tolist(),
                "bytes": self.schedule.bytes.tolist(),
                "rate_bytes_s": self.schedule.rate_bytes_s.tolist(),
            }
        return out


def plan_all_to_all(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    *,
    baselines: bool = True,
    seed: int = 0,
    max_lanes_per_device: int = DEFAULT_MAX_LANES,
) -> AllToAllPlan:
    """Schedule one all-to-all and, with baselines, simulate the three transports without a plan."""
    schedule = schedule_all_to_all(traffic_bytes, bandwidth_bytes_s, max_lanes_per_device)
    bound = port_lower_bound_s(traffic_bytes, bandwidth_bytes_s)
    times: dict[str, float] = {}
    if baselines:
        for policy in ("random_order", "shortest_first", "fair_share"):
            times[f"{policy}_s"] = all_to_all_time_s(traffic_bytes, bandwidth_bytes_s, policy, seed=seed)
    return AllToAllPlan(np.asarray(traffic_bytes, dtype=np.float64), schedule, bound, times)


def transposed(
    plan: AllToAllPlan, bandwidth_bytes_s: np.ndarray, *, baselines: bool, seed: int
) -> AllToAllPlan:
    """The combine all-to-all: the transpose of the dispatch schedule is optimal for the transposed
    traffic (ports are full duplex, so send and receive sides just swap). Fair share is symmetric
    in the same way; the per-sender baselines are not, so those are simulated again."""
    s = plan.schedule
    schedule = Schedule(
        s.round_of, s.dst, s.src, s.bytes, s.rate_bytes_s, s.num_rounds, s.num_devices, s.strategy
    )
    traffic = combine_traffic(plan.traffic_bytes)
    times: dict[str, float] = {}
    if baselines:
        for policy in ("random_order", "shortest_first"):
            times[f"{policy}_s"] = all_to_all_time_s(traffic, bandwidth_bytes_s, policy, seed=seed)
        times["fair_share_s"] = plan.baselines_s["fair_share_s"]
    return AllToAllPlan(traffic, schedule, plan.lower_bound_s, times)


@dataclass(frozen=True)
class LayerPlan:
    """The plan of one MoE layer.

    placement: what goes where, as printed (Placement.to_dict / Colocation.to_dict); placements:
    the same, typed, one per model; dispatch, combine: the all-to-alls; compute_s [n]: expert
    compute per device; reference_*: the same layer without a plan (see the module docstring);
    replication: Lina/EPLB load figures when replicating.
    """

    layer: int
    placement: dict[str, object]
    dispatch: AllToAllPlan
    combine: AllToAllPlan
    compute_s: np.ndarray
    reference_name: str
    reference_layer_time_s: float
    reference_utilisation: float
    replication: dict[str, object] | None = None
    placements: tuple[Placement, ...] = ()

    @property
    def layer_time_s(self) -> float:
        return self.dispatch.makespan_s + float(self.compute_s.max()) + self.combine.makespan_s

    @property
    def utilisation(self) -> float:
        return float(self.compute_s.mean() / self.layer_time_s) if self.layer_time_s > 0 else 0.0

    def to_dict(self, include_rounds: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "layer": self.layer,
            "layer_time_s": self.layer_time_s,
            "compute_s": float(self.compute_s.max()),
            "utilisation": self.utilisation,
            "dispatch": self.dispatch.to_dict(include_rounds),
            "combine": self.combine.to_dict(include_rounds),
            "reference": {
                "name": self.reference_name,
                "layer_time_s": _number_or_none(self.reference_layer_time_s),
                "utilisation": _number_or_none(self.reference_utilisation),
                "speedup": _number_or_none(self.reference_layer_time_s / self.layer_time_s)
                if self.layer_time_s > 0
                else None,
            },
            "placement": self.placement,
        }
        if self.replication is not None:
            out["replication"] = self.replication
        return out


@dataclass(frozen=True)
class ClusterPlan:
    """A plan for every layer of a trace (or of two colocated traces) on a cluster."""

    cluster: ClusterSpec
    mode: Mode
    options: PlanOptions
    layers: tuple[LayerPlan, ...]

    def to_dict(self, include_rounds: bool = False) -> dict[str, object]:
        planned = sum(layer.layer_time_s for layer in self.layers)
        reference = sum(layer.reference_layer_time_s for layer in self.layers)
        return {
            "mode": self.mode,
            "cluster": self.cluster.to_dict(),
            "options": {
                "bytes_per_token": self.options.bytes_per_token,
                "flops_per_token": self.options.flops_per_token,
                "path_length": self.options.path_length,
                "max_experts_per_device": self.options.max_experts_per_device,
                "seed": self.options.seed,
            },
            "summary": {
                "layer_time_s": planned,
                "reference_layer_time_s": _number_or_none(reference),
                "speedup": _number_or_none(reference / planned) if planned > 0 else None,
            },
            "layers": [layer.to_dict(include_rounds) for layer in self.layers],
        }


def _number_or_none(value: float) -> float | None:
    """JSON has no NaN: a skipped measurement is null."""
    return float(value) if np.isfinite(value) else None


def seconds_per_token(cluster: ClusterSpec, options: PlanOptions) -> np.ndarray:
    """[n] time a device spends per token it serves: in and out over its port, plus compute."""
    return (
        2 * options.bytes_per_token / cluster.bandwidth_bytes_s
        + options.flops_per_token / cluster.compute_flop_s
    )


def plan_exclusive(
    cluster: ClusterSpec, trace: RoutingTrace, options: PlanOptions, profile: RoutingTrace | None = None
) -> ClusterPlan:
    """Every layer of one model: Aurora case 1/2 placement (or Lina replication), optimal schedules.

    With options.replicate, Lina's estimator is trained on `profile` (default: the trace itself).
    """
    n = cluster.num_devices
    estimator = build_path_estimator(profile or trace, options.path_length) if options.replicate else None
    layers = []
    for layer in range(trace.num_layers):
        ids = trace.expert_ids[layer]
        load = np.bincount(ids.ravel(), minlength=trace.num_experts).astype(np.float64)
        exclusive = place_exclusive(load, seconds_per_token(cluster, options), options.max_experts_per_device)
        replication = None
        if estimator is not None:
            limit = min(options.max_experts_per_device or MAX_EXPERTS_PER_DEVICE, MAX_EXPERTS_PER_DEVICE)
            speed = 1.0 / seconds_per_token(cluster, options)
            lina = plan_lina_layer(estimator, trace, layer, n, limit, speed / speed.sum())
            placement = lina.placement
            eplb = eplb_replicate(load, n, min(-(-trace.num_experts // n) + 1, MAX_EXPERTS_PER_DEVICE))
            replication = {
                "replanned": lina.replanned,
                "replicas": int((placement.shares > 0).sum()),
                "max_over_mean_load": {
                    "none": max_over_mean_load(load, exclusive),
                    "lina": max_over_mean_load(load, placement),
                    "eplb": max_over_mean_load(load, eplb),
                },
            }
            reference_placement, reference_name = exclusive, "no replication, fair share"
        else:
            placement = exclusive
            reference_placement = place_random(trace.num_experts, n, options.seed + layer)
            reference_name = "random placement (RGA), fair share"
        layers.append(
            _layer_plan(
                cluster,
                options,
                layer,
                [(ids, placement)],
                [(ids, reference_placement)],
                placement.to_dict(),
                reference_name,
                replication,
            )
        )
    return ClusterPlan(cluster, "replicated" if options.replicate else "exclusive", options, tuple(layers))


def plan_colocated(
    cluster: ClusterSpec, trace_a: RoutingTrace, trace_b: RoutingTrace, options: PlanOptions
) -> ClusterPlan:
    """Two models on one cluster, one expert of each per device: Aurora case 3 (equal devices) or
    case 4 (mixed devices), layer l of model a with layer l of model b."""
    n = cluster.num_devices
    if trace_a.num_layers != trace_b.num_layers:
        raise ShunterError(
            f"colocated traces must have the same number of MoE layers: {trace_a.num_layers} and "
            f"{trace_b.num_layers}"
        )
    check_colocatable(trace_a.num_experts, trace_b.num_experts, n)
    layers = []
    for layer in range(trace_a.num_layers):
        ids_a, ids_b = trace_a.expert_ids[layer], trace_b.expert_ids[layer]
        load_a = _padded_load(ids_a, trace_a.num_experts, n)
        load_b = _padded_load(ids_b, trace_b.num_experts, n)
        send_a, recv_a = _expected_volumes(load_a, trace_a.num_tokens, trace_a.top_k, n, options)
        send_b, recv_b = _expected_volumes(load_b, trace_b.num_tokens, trace_b.top_k, n, options)
        if cluster.is_homogeneous:
            colocation = place_colocated_homogeneous(send_a, recv_a, send_b, recv_b, n)
        else:
            instance = ColocatedInstance(
                send_a,
                recv_a,
                load_a * options.flops_per_token,
                send_b,
                recv_b,
                load_b * options.flops_per_token,
                cluster.bandwidth_bytes_s,
                cluster.compute_flop_s,
            )
            colocation = place_colocated_heterogeneous(instance)
        placement_a, placement_b = _trimmed(colocation.placements(), trace_a.num_experts, trace_b.num_experts)
        lina = place_colocated_lina(load_a[: trace_a.num_experts], load_b[: trace_b.num_experts], n)
        lina_a, lina_b = lina.placements()
        layers.append(
            _layer_plan(
                cluster,
                options,
                layer,
                [(ids_a, placement_a), (ids_b, placement_b)],
                [(ids_a, lina_a), (ids_b, lina_b)],
                colocation.to_dict(),
                "Lina packing, fair share",
                None,
            )
        )
    return ClusterPlan(cluster, "colocated", options, tuple(layers))


def _padded_load(ids: np.ndarray, num_experts: int, n: int) -> np.ndarray:
    """[n] tokens per expert; a model with fewer experts than devices gets idle experts of load 0."""
    load = np.zeros(n)
    load[:num_experts] = np.bincount(ids.ravel(), minlength=num_experts)
    return load


def _trimmed(placements: tuple[Placement, Placement], num_a: int, num_b: int) -> tuple[Placement, Placement]:
    a, b = placements
    return Placement(a.shares[:num_a], a.strategy), Placement(b.shares[:num_b], b.strategy)


def _expected_volumes(
    load: np.ndarray, num_tokens: int, top_k: int, n: int, options: PlanOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Per expert, the bytes its device sends and receives in dispatch, expected with tokens spread
    evenly: a device sends its (N/n)*k choices except the 1/n that stay local; the expert receives
    its load except the 1/n of it that is local."""
    off_device = (n - 1) / n
    send = np.full(load.shape[0], num_tokens / n * top_k * off_device * options.bytes_per_token)
    recv = load * off_device * options.bytes_per_token
    return send, recv


def _layer_plan(
    cluster: ClusterSpec,
    options: PlanOptions,
    layer: int,
    planned: list[tuple[np.ndarray, Placement]],
    reference: list[tuple[np.ndarray, Placement]],
    placement_dict: dict[str, object],
    reference_name: str,
    replication: dict[str, object] | None,
) -> LayerPlan:
    n = cluster.num_devices
    bandwidth = cluster.bandwidth_bytes_s
    traffic = sum(dispatch_traffic(ids, p.shares, options.bytes_per_token, n) for ids, p in planned)
    compute = sum(tokens_per_device(ids, p.shares) for ids, p in planned) * options.flops_per_token
    compute_s = np.asarray(compute) / cluster.compute_flop_s
    dispatch = plan_all_to_all(
        np.asarray(traffic),
        bandwidth,
        baselines=options.baselines,
        seed=options.seed + layer,
        max_lanes_per_device=options.max_lanes_per_device,
    )
    combine = transposed(dispatch, bandwidth, baselines=options.baselines, seed=options.seed + layer)

    reference_traffic = sum(
        dispatch_traffic(ids, p.shares, options.bytes_per_token, n) for ids, p in reference
    )
    reference_compute = (
        sum(tokens_per_device(ids, p.shares) for ids, p in reference) * options.flops_per_token
    )
    reference_compute_s = np.asarray(reference_compute) / cluster.compute_flop_s
    if options.baselines:
        # Fair share is symmetric under transposition, so combine takes as long as dispatch.
        fair = all_to_all_time_s(np.asarray(reference_traffic), bandwidth, "fair_share")
        reference_time = 2 * fair + float(reference_compute_s.max())
    else:
        reference_time = float("nan")
    reference_utilisation = (
        float(reference_compute_s.mean() / reference_time) if options.baselines else float("nan")
    )
    return LayerPlan(
        layer=layer,
        placement=placement_dict,
        dispatch=dispatch,
        combine=combine,
        compute_s=compute_s,
        reference_name=reference_name,
        reference_layer_time_s=reference_time,
        reference_utilisation=reference_utilisation,
        replication=replication,
        placements=tuple(p for _, p in planned),
    )
