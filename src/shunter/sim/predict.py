"""Predict a plan (what `shunter plan --out` writes) on a cluster: every layer's timeline.

The plan gives, per layer, where experts live; the trace gives which tokens go where. From both
the simulator rebuilds each layer's traffic and compute (plan.traffic), then runs the layer
timeline (moe_layer) with the plan's matching schedules and per-message latency, and beside it
the same layer with every flow at once and fair sharing. The schedule of a layer is, in order:
- the full schedule when the plan includes it (checked against the rebuilt traffic by
  plan.schedule.schedule_violations), run round by round;
- the plan's summary (makespan and rounds) when its bytes match the rebuilt traffic: a round pays
  one latency, so the time is makespan + rounds * latency exactly, with no need to rebuild;
- otherwise (or with rebuild_schedules) schedule_all_to_all again, deterministically.
Colocated plans run Aurora's interleaved timeline, each model's all-to-all scheduled on its own.
Memory: every layer's experts stay resident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shunter.errors import ShunterError
from shunter.network.bounds import port_lower_bound_s
from shunter.network.cost import fair_share_time_s
from shunter.plan.cluster import ClusterSpec
from shunter.plan.document import PlanDocument
from shunter.plan.schedule import schedule_all_to_all, schedule_violations
from shunter.sim.cost import ComputeModel, expert_bytes_per_device
from shunter.sim.moe_layer import LayerCosts, TokenCosts, layer_costs, simulate_colocated, simulate_exclusive
from shunter.sim.timeline import Timeline
from shunter.trace.routing_trace import RoutingTrace


@dataclass(frozen=True)
class SimulateOptions:
    """latency_s: per message; compute: how compute is timed; bytes_per_param: expert weights on
    the device (the expert's parameters are flops_per_token / 2); fair_share: also run every layer
    with every flow at once and fair sharing (slow beyond a few hundred devices);
    rebuild_schedules: schedule every layer again instead of using the plan's summary."""

    latency_s: float = 5e-6
    compute: ComputeModel = field(default_factory=ComputeModel)
    bytes_per_param: float = 2.0
    fair_share: bool = True
    rebuild_schedules: bool = False


@dataclass(frozen=True)
class LayerPrediction:
    layer: int
    a2a_planned_s: float  # dispatch + combine with the plan's schedules, latency included
    rounds: int
    a2a_fair_share_s: float | None
    compute_s: float  # slowest device's gate + experts + aggregation
    layer_planned_s: float
    layer_fair_share_s: float | None
    utilisation: float
    plan_layer_s: float | None  # what the planner predicted (no latency, no gate/aggregation)


@dataclass(frozen=True)
class PlanPrediction:
    """The whole plan: per-layer figures, the forward through all layers (timeline makespan),
    mean GPU utilisation, and memory (experts of every layer resident)."""

    mode: str
    layers: list[LayerPrediction]
    total_planned_s: float
    total_fair_share_s: float | None
    utilisation: float
    colocated_sequential_s: float | None
    expert_bytes_per_device: np.ndarray
    memory_bytes: np.ndarray
    notes: list[str]

    @property
    def fits(self) -> bool:
        return bool(np.all(self.expert_bytes_per_device <= self.memory_bytes))

    def to_dict(self) -> dict[str, object]:
        worst = int(np.argmax(self.expert_bytes_per_device / self.memory_bytes))
        return {
            "mode": self.mode,
            "total_planned_s": self.total_planned_s,
            "total_fair_share_s": self.total_fair_share_s,
            "colocated_sequential_s": self.colocated_sequential_s,
            "utilisation": self.utilisation,
            "memory": {
                "fits": self.fits,
                "max_expert_bytes": float(self.expert_bytes_per_device.max()),
                "device": worst,
                "device_memory_bytes": float(self.memory_bytes[worst]),
            },
            "notes": list(self.notes),
            "layers": [
                {
                    "layer": p.layer,
                    "a2a_planned_s": p.a2a_planned_s,
                    "rounds": p.rounds,
                    "a2a_fair_share_s": p.a2a_fair_share_s,
                    "compute_s": p.compute_s,
                    "layer_planned_s": p.layer_planned_s,
                    "layer_fair_share_s": p.layer_fair_share_s,
                    "utilisation": p.utilisation,
                    "plan_layer_time_s": p.plan_layer_s,
                }
                for p in self.layers
            ],
        }


def _token_costs(plan: PlanDocument, num_experts: int, top_k: int) -> TokenCosts:
    """Costs from the plan's options; the hidden size is the token's bytes over bf16's 2 bytes."""
    hidden = plan.bytes_per_token / 2
    return TokenCosts(
        bytes_per_token=plan.bytes_per_token,
        expert_flops_per_token=plan.flops_per_token,
        gate_flops_per_token=2 * hidden * num_experts,
        aggregation_flops_per_token=2 * top_k * hidden,
        expert_weight_bytes=plan.flops_per_token / 2,
    )


def _planned_costs(
    plan: PlanDocument,
    cluster: ClusterSpec,
    trace: RoutingTrace,
    shares: list[np.ndarray],
    options: SimulateOptions,
    use_plan_schedules: bool,
    notes: list[str],
) -> tuple[list[LayerCosts], list[LayerCosts] | None, list[int]]:
    """Per layer: costs with the plan's schedule time, the same with fair share, and rounds."""
    costs = _token_costs(plan, trace.num_experts, trace.top_k)
    planned, fair, rounds = [], [], []
    bandwidth = cluster.bandwidth_bytes_s
    same_ports = np.array_equal(bandwidth, [spec[0] for spec in plan.device_specs])
    rebuilt_layers = []
    for layer in range(trace.num_layers):
        ids = trace.expert_ids[layer]
        base = layer_costs(ids, shares[layer], cluster, costs, options.compute, None)
        schedule = plan.schedules[layer] if use_plan_schedules else None
        summary = plan.summaries[layer] if use_plan_schedules and same_ports else None
        if schedule is not None:
            problems = schedule_violations(schedule, base.dispatch_bytes, bandwidth)
            if problems:
                raise ShunterError(
                    f"{plan.source}: layers[{layer}].dispatch.schedule does not carry this trace's traffic "
                    f"on this cluster: {problems[0]}"
                )
            a2a, layer_rounds = schedule.makespan_with_latency_s(options.latency_s), schedule.num_rounds
        elif (
            summary is not None
            and not options.rebuild_schedules
            and np.isclose(summary[2], base.dispatch_bytes.sum(), rtol=1e-9)
            and summary[0] >= port_lower_bound_s(base.dispatch_bytes, bandwidth) * (1 - 1e-9)
        ):
            a2a, layer_rounds = summary[0] + summary[1] * options.latency_s, summary[1]
        else:
            if summary is not None and not options.rebuild_schedules:
                rebuilt_layers.append(layer)
            built = schedule_all_to_all(base.dispatch_bytes, bandwidth) if base.dispatch_bytes.any() else None
            a2a = built.makespan_with_latency_s(options.latency_s) if built is not None else 0.0
            layer_rounds = built.num_rounds if built is not None else 0
        rounds.append(layer_rounds)
        planned.append(_with_a2a(base, a2a))
        if options.fair_share:
            fair.append(_with_a2a(base, fair_share_time_s(base.dispatch_bytes, bandwidth, options.latency_s)))
    if rebuilt_layers:
        notes.append(
            f"the traffic of {len(rebuilt_layers)} layer(s) differs from what the plan scheduled (another "
            "trace?): their schedules were built again"
        )
    return planned, (fair if options.fair_share else None), rounds


def _with_a2a(base: LayerCosts, seconds: float) -> LayerCosts:
    return LayerCosts(
        base.gate_s, base.dispatch_bytes, base.expert_s, base.aggregation_s, seconds, base.tokens_processed
    )


def predict_plan(
    plan: PlanDocument,
    cluster: ClusterSpec,
    trace: RoutingTrace,
    options: SimulateOptions,
    colocated_trace: RoutingTrace | None = None,
    notes: list[str] | None = None,
) -> PlanPrediction:
    """Simulate every layer of the plan on the cluster (see the module docstring)."""
    notes = list(notes or [])
    planned, fair, rounds = _planned_costs(
        plan, cluster, trace, plan.shares_a, options, plan.mode != "colocated", notes
    )
    expert_weight_bytes = plan.flops_per_token / 2 * options.bytes_per_param
    resident = plan.shares_a + (plan.shares_b or [])
    held = expert_bytes_per_device(resident, expert_weight_bytes)
    sequential = None
    if plan.mode == "colocated":
        if colocated_trace is None or plan.shares_b is None:
            raise ShunterError(f"{plan.source}: a colocated plan needs the second model's trace (--colocate)")
        planned_b, _, rounds_b = _planned_costs(
            plan, cluster, colocated_trace, plan.shares_b, options, False, notes
        )
        timeline = simulate_colocated(planned, planned_b, cluster, True, "planned", options.latency_s)
        sequential = simulate_colocated(
            planned, planned_b, cluster, False, "planned", options.latency_s
        ).makespan_s
        fair_timeline = (
            simulate_colocated(planned, planned_b, cluster, True, "fair_share", options.latency_s)
            if options.fair_share
            else None
        )
        layer_rows = []
        for layer in range(plan.num_layers):
            names = [f"{op}{m}{layer}" for m in "ab" for op in "GNFCA"]
            start = min(_start(timeline, k) for k in names)
            end = max(_finish(timeline, k) for k in names)
            a2a = sum(planned_layer.all_to_all_s * 2 for planned_layer in (planned[layer], planned_b[layer]))
            fair_a2a = (
                2
                * fair_share_time_s(
                    planned[layer].dispatch_bytes + planned_b[layer].dispatch_bytes,
                    cluster.bandwidth_bytes_s,
                    options.latency_s,
                )
                if options.fair_share
                else None
            )
            compute = float(
                (
                    planned[layer].gate_s
                    + planned[layer].expert_s
                    + planned[layer].aggregation_s
                    + planned_b[layer].gate_s
                    + planned_b[layer].expert_s
                    + planned_b[layer].aggregation_s
                ).max()
            )
            layer_rows.append(
                LayerPrediction(
                    layer,
                    a2a,
                    rounds[layer] + rounds_b[layer],
                    fair_a2a,
                    compute,
                    end - start,
                    None,
                    compute / (end - start) if end > start else 0.0,
                    plan.predicted_layer_s[layer],
                )
            )
        return PlanPrediction(
            plan.mode,
            layer_rows,
            timeline.makespan_s,
            fair_timeline.makespan_s if fair_timeline is not None else None,
            timeline.mean_utilisation,
            sequential,
            held,
            cluster.memory_bytes.astype(np.float64),
            notes,
        )
    timeline = simulate_exclusive(planned, cluster, "planned", options.latency_s)
    fair_timeline = (
        simulate_exclusive(fair, cluster, "planned", options.latency_s) if fair is not None else None
    )
    rows = []
    for layer in range(plan.num_layers):
        names = [f"{op}{layer}" for op in "GNFCA"]
        layer_s = _finish(timeline, names[-1]) - _start(timeline, names[0])
        fair_layer = (
            _finish(fair_timeline, names[-1]) - _start(fair_timeline, names[0])
            if fair_timeline is not None
            else None
        )
        cost = planned[layer]
        compute = float(cost.gate_s.max() + cost.expert_s.max() + cost.aggregation_s.max())
        busy = (cost.gate_s + cost.expert_s + cost.aggregation_s).mean()
        rows.append(
            LayerPrediction(
                layer,
                2 * cost.all_to_all_s,
                rounds[layer],
                2 * fair[layer].all_to_all_s if fair is not None else None,
                compute,
                layer_s,
                fair_layer,
                float(busy / layer_s) if layer_s > 0 else 0.0,
                plan.predicted_layer_s[layer],
            )
        )
    return PlanPrediction(
        plan.mode,
        rows,
        timeline.makespan_s,
        fair_timeline.makespan_s if fair_timeline is not None else None,
        timeline.mean_utilisation,
        None,
        held,
        cluster.memory_bytes.astype(np.float64),
        notes,
    )


def _start(timeline: Timeline, name: str) -> float:
    if name in timeline.compute_start_s:
        return float(timeline.compute_start_s[name].min())
    return float(timeline.collective_start_s[name])


def _finish(timeline: Timeline, name: str) -> float:
    if name in timeline.compute_finish_s:
        return float(timeline.compute_finish_s[name].max())
    return float(timeline.collective_finish_s[name])
