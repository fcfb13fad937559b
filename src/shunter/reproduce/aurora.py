"""Aurora (expert deployment and all-to-all scheduling) re-run on our cost model: its four cases.

8 devices at 100 Gbit/s, or Aurora's four port types (100/80/50/40 Gbit/s) two each; LIMoE-B with
8 experts, 4 layers; routing from synthetic Zipf traces (LIMoE's are not public).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shunter.network.cost import GBIT_S
from shunter.plan.cluster import ClusterSpec, Device
from shunter.plan.placement import (
    Placement,
    place_colocated_lina,
    place_exclusive,
    place_random,
    placement_from_devices,
)
from shunter.plan.planner import PlanOptions, plan_colocated, seconds_per_token
from shunter.reproduce.claims import (
    Claim,
    Figure,
    RangesOverlap,
    Reproduction,
    Row,
    WithinRelative,
    format_range,
)
from shunter.shapes import LIMOE_B
from shunter.sim.cost import ComputeModel
from shunter.sim.moe_layer import LayerCosts, TokenCosts, layer_costs, simulate_colocated, simulate_exclusive
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.synthetic import zipf_trace

# What the paper reports (aurora.md, Evaluation) and the rule ours is judged by.
VS_SJF = Claim(
    "exclusive + homogeneous vs SJF (inference time)", Figure("up to 1.38x", 1.0, 1.38), WithinRelative(0.25)
)
VS_RANDOM_ASSIGNMENT = Claim(
    "exclusive + mixed vs random GPU assignment (RGA)", Figure("1.36-1.81x", 1.36, 1.81), RangesOverlap()
)
COLOCATED_VS_LINA = {
    "homogeneous": Claim(
        "colocated + homogeneous vs Lina", Figure("1.25-2.38x", 1.25, 2.38), RangesOverlap()
    ),
    "mixed": Claim("colocated + mixed vs Lina", Figure("1.91-3.54x", 1.91, 3.54), RangesOverlap()),
}
UTILISATION_VS_EXCLUSIVE = Claim(
    "GPU utilisation: colocated vs exclusive", Figure("1.57-1.72x", 1.57, 1.72), RangesOverlap()
)
UTILISATION_VS_LINA = Claim(
    "GPU utilisation: colocated vs Lina", Figure("1.28-1.50x", 1.28, 1.50), RangesOverlap()
)

A100_FLOP_S = 312e12
# the colocated pairs of workloads (indices into aurora_workloads)
PAIRS = [(0, 3), (1, 2), (0, 2), (1, 3)]


def aurora_clusters() -> tuple[ClusterSpec, ClusterSpec]:
    """Aurora's two settings: 8 x 100 Gbit/s, and its four port types two each (with the compute of
    examples/cluster-mixed.toml: H100 / A100 / L40S / A10, faster GPU with faster port)."""
    homogeneous = ClusterSpec.uniform(8, 100 * GBIT_S, A100_FLOP_S)
    types = (("h100", 100, 989e12), ("a100", 80, 312e12), ("l40s", 50, 362e12), ("a10", 40, 125e12))
    devices = tuple(
        Device(f"{name}-{k}", gbit * GBIT_S, flop_s, 80 * 2**30)
        for name, gbit, flop_s in types
        for k in range(2)
    )
    return homogeneous, ClusterSpec(devices, "mixed: 100/80/50/40 Gbit/s")


@dataclass(frozen=True)
class AuroraWorkload:
    """One model's routing: LIMoE-B/16 (196 patches per image) or B/32 (49) at a Zipf skew."""

    name: str
    tokens_per_device: int
    skew: float
    seed: int

    def trace(self, num_devices: int = 8, num_layers: int = 4) -> RoutingTrace:
        return zipf_trace(num_layers, self.tokens_per_device * num_devices, 8, 1, self.skew, 0.6, self.seed)


def aurora_workloads(quick: bool) -> list[AuroraWorkload]:
    scale = 4 if quick else 1
    return [
        AuroraWorkload("B/16 skew 0.8", 1024 // scale, 0.8, 1),
        AuroraWorkload("B/16 skew 1.2", 1024 // scale, 1.2, 2),
        AuroraWorkload("B/32 skew 0.8", 256 // scale, 0.8, 3),
        AuroraWorkload("B/32 skew 1.2", 256 // scale, 1.2, 4),
    ]


@dataclass(frozen=True)
class _Experiment:
    """What every case shares: the two clusters, the workloads and their traces, the cost model."""

    homogeneous: ClusterSpec
    mixed: ClusterSpec
    workloads: list[AuroraWorkload]
    traces: list[RoutingTrace]
    costs: TokenCosts
    compute: ComputeModel
    options: PlanOptions
    quick: bool

    def layers(
        self, trace: RoutingTrace, placements: list[Placement], cluster: ClusterSpec, transport: str | None
    ) -> list[LayerCosts]:
        """Every layer's costs with `placements` on `cluster`, all-to-all by `transport`."""
        return [
            layer_costs(
                trace.expert_ids[layer],
                placements[layer].shares,
                cluster,
                self.costs,
                self.compute,
                transport,
                0.0,
                0,
            )  # type: ignore[arg-type]
            for layer in range(trace.num_layers)
        ]


def _loads(trace: RoutingTrace) -> list[np.ndarray]:
    return [
        np.bincount(trace.expert_ids[l].ravel(), minlength=trace.num_experts).astype(np.float64)
        for l in range(trace.num_layers)
    ]


def _device_orders(cluster: ClusterSpec, count: int) -> list[np.ndarray]:
    """The identity on equal devices; `count` seeded random orders on mixed ones."""
    if cluster.is_homogeneous:
        return [np.arange(cluster.num_devices)]
    rng = np.random.default_rng(7)
    return [rng.permutation(cluster.num_devices) for _ in range(count)]


def _exclusive_homogeneous(x: _Experiment) -> Row:
    """Case 1: exclusive, homogeneous: the planned schedule against SJF and RCS on the same placement."""
    cluster = x.homogeneous
    sjf, rcs, a2a_sjf = [], [], []
    for trace in x.traces:
        placements = [place_exclusive(load, np.ones(8)) for load in _loads(trace)]
        planned = x.layers(trace, placements, cluster, "planned")
        by_sjf = x.layers(trace, placements, cluster, "shortest_first")
        by_rcs = x.layers(trace, placements, cluster, "random_order")
        t_planned = simulate_exclusive(planned, cluster, "planned", 0.0).makespan_s
        sjf.append(simulate_exclusive(by_sjf, cluster, "planned", 0.0).makespan_s / t_planned)
        rcs.append(simulate_exclusive(by_rcs, cluster, "planned", 0.0).makespan_s / t_planned)
        a2a_sjf.append(sum(l.all_to_all_s for l in by_sjf) / sum(l.all_to_all_s for l in planned))
    ours = (min(sjf), max(sjf))
    return VS_SJF.beside(
        Figure(f"up to {ours[1]:.2f}x ({format_range(*ours)})", *ours),
        f"our largest gain over SJF is {ours[1]:.2f}x against the paper's 1.38x (rule: {VS_SJF.rule}); "
        f"the all-to-all alone is {format_range(min(a2a_sjf), max(a2a_sjf))} faster, and the compute, "
        "which no schedule shortens, dilutes it.",
        {
            "workloads": [w.name for w in x.workloads],
            "vs_rcs": [min(rcs), max(rcs)],
            "a2a_only_vs_sjf": [min(a2a_sjf), max(a2a_sjf)],
        },
    )


def _exclusive_mixed(x: _Experiment) -> Row:
    """Case 2: exclusive, mixed ports: load-by-speed placement vs random GPU assignment, same scheduler."""
    cluster = x.mixed
    rga = []
    speed_cost = seconds_per_token(cluster, x.options)
    seeds = range(3 if x.quick else 10)
    for trace in x.traces:
        aurora = [place_exclusive(load, speed_cost) for load in _loads(trace)]
        t_aurora = simulate_exclusive(
            x.layers(trace, aurora, cluster, "planned"), cluster, "planned", 0.0
        ).makespan_s
        t_random = [
            simulate_exclusive(
                x.layers(
                    trace,
                    [place_random(8, 8, 100 * s + l) for l in range(trace.num_layers)],
                    cluster,
                    "planned",
                ),
                cluster,
                "planned",
                0.0,
            ).makespan_s
            for s in seeds
        ]
        rga.append(float(np.mean(t_random)) / t_aurora)
    ours = Figure(format_range(min(rga), max(rga)), min(rga), max(rga))
    ok = VS_RANDOM_ASSIGNMENT.holds(ours)
    return VS_RANDOM_ASSIGNMENT.beside(
        ours,
        ("ranges overlap" if ok else "ranges do not overlap")
        + " (rule); both sides use the optimal lane schedule, so the gap is placement alone: the hottest "
        f"expert on a 100 Gbit/s, 989 TFLOP/s device instead of a random one (mean over {len(seeds)} "
        "random assignments per workload).",
        {"workloads": [w.name for w in x.workloads], "cluster": "2 x each of 100/80/50/40 Gbit/s"},
    )


@dataclass(frozen=True)
class _ColocatedPair:
    """Two models colocated, each figure a ratio: Lina's packing one model after the other over
    Aurora's pairing interleaved, and its parts; GPU utilisation against the alternatives."""

    vs_lina: float
    same_timeline: float  # Lina's packing interleaved / Aurora's pairing interleaved
    interleave_gain: float  # Aurora's pairing one after the other / interleaved
    compute_over_network: float
    utilisation_vs_exclusive: float
    utilisation_vs_lina: float


def _colocated_pair(
    x: _Experiment, cluster: ClusterSpec, trace_a: RoutingTrace, trace_b: RoutingTrace
) -> _ColocatedPair:
    plan = plan_colocated(cluster, trace_a, trace_b, x.options)
    aurora_a = [
        placement_from_devices(np.array(l.placement["device_of_expert_a"]), 8, "") for l in plan.layers
    ]
    aurora_b = [
        placement_from_devices(np.array(l.placement["device_of_expert_b"]), 8, "") for l in plan.layers
    ]
    cost_a = x.layers(trace_a, aurora_a, cluster, None)
    cost_b = x.layers(trace_b, aurora_b, cluster, None)
    aurora_t = simulate_colocated(cost_a, cost_b, cluster, True, "fair_share")
    aurora_seq = simulate_colocated(cost_a, cost_b, cluster, False, "fair_share")
    # Lina does not know device speeds: its packing lands on the devices in an arbitrary order,
    # so on mixed devices take the mean over random orders (on equal devices order is moot).
    lina_seq_s, lina_inter_s, lina_util = [], [], []
    for permutation in _device_orders(cluster, 2 if x.quick else 5):
        lina = [
            tuple(placement_from_devices(permutation[c], 8, "Lina") for c in (p.device_of_a, p.device_of_b))
            for p in (
                place_colocated_lina(la, lb, 8)
                for la, lb in zip(_loads(trace_a), _loads(trace_b), strict=True)
            )
        ]
        lina_a = x.layers(trace_a, [p[0] for p in lina], cluster, None)
        lina_b = x.layers(trace_b, [p[1] for p in lina], cluster, None)
        lina_seq = simulate_colocated(lina_a, lina_b, cluster, False, "fair_share")
        lina_seq_s.append(lina_seq.makespan_s)
        lina_util.append(lina_seq.mean_utilisation)
        lina_inter_s.append(simulate_colocated(lina_a, lina_b, cluster, True, "fair_share").makespan_s)
    # Exclusive deployment: each model alone on its own copy of the cluster, Aurora case 1/2.
    alone = []
    for trace in (trace_a, trace_b):
        placements = [place_exclusive(load, seconds_per_token(cluster, x.options)) for load in _loads(trace)]
        alone.append(
            simulate_exclusive(
                x.layers(trace, placements, cluster, None), cluster, "fair_share", 0.0
            ).mean_utilisation
        )
    return _ColocatedPair(
        vs_lina=float(np.mean(lina_seq_s)) / aurora_t.makespan_s,
        same_timeline=float(np.mean(lina_inter_s)) / aurora_t.makespan_s,
        interleave_gain=aurora_seq.makespan_s / aurora_t.makespan_s,
        compute_over_network=float(aurora_seq.busy_s.max()) / aurora_seq.network_busy_s(),
        utilisation_vs_exclusive=aurora_t.mean_utilisation / float(np.mean(alone)),
        utilisation_vs_lina=aurora_t.mean_utilisation / float(np.mean(lina_util)),
    )


def _span(values: list[float]) -> Figure:
    return Figure(format_range(min(values), max(values)), min(values), max(values))


def _colocated(x: _Experiment, case: str, cluster: ClusterSpec) -> list[Row]:
    """Cases 3 and 4: two models colocated; Aurora's pairing on the interleaved timeline vs Lina."""
    pairs = [_colocated_pair(x, cluster, x.traces[a], x.traces[b]) for a, b in PAIRS]
    claim = COLOCATED_VS_LINA[case]
    ours = _span([p.vs_lina for p in pairs])
    ok = claim.holds(ours)
    interleave_gain = [p.interleave_gain for p in pairs]
    same_timeline = [p.same_timeline for p in pairs]
    ratio = [p.compute_over_network for p in pairs]
    rows = [
        claim.beside(
            ours,
            ("ranges overlap" if ok else "ranges do not overlap")
            + " (rule). Ours = Lina's packing run one model after the other / Aurora's pairing on the "
            "interleaved timeline (fair-share network). Split: the interleaved timeline alone gives "
            f"{format_range(min(interleave_gain), max(interleave_gain))}, Aurora's pairing vs Lina's "
            "packing on the same interleaved timeline "
            f"{format_range(min(same_timeline), max(same_timeline))}"
            + (
                "; on equal devices both placements balance the ports, so most of the gain is the "
                "overlap of one model's all-to-all with the other's compute, at most 1 + "
                f"compute/communication (here compute is {min(ratio):.2f}-{max(ratio):.2f} of the "
                "network time)."
                if case == "homogeneous"
                else "; Lina's packing ignores device speed (mean over random device orders), so "
                "hot experts and their traffic often land on 40-50 Gbit/s ports and 125 TFLOP/s GPUs."
            ),
            {
                "pairs": [f"{x.workloads[a].name} + {x.workloads[b].name}" for a, b in PAIRS],
                "interleaving_alone": [min(interleave_gain), max(interleave_gain)],
                "pairing_alone": [min(same_timeline), max(same_timeline)],
            },
        )
    ]
    if case != "homogeneous":  # the paper reports utilisation on equal devices only
        return rows
    rows.append(
        _overlap_row(
            UTILISATION_VS_EXCLUSIVE,
            _span([p.utilisation_vs_exclusive for p in pairs]),
            "colocated = Aurora's interleaved timeline with both models on 8 GPUs, "
            "exclusive = each model alone on 8 GPUs; it rises only as far as one model's compute "
            "hides under the other's all-to-alls, and compute is "
            f"{min(ratio):.2f}-{max(ratio):.2f} of the network time here (LIMoE-B's small experts "
            "at 50% of an A100); the paper's larger rise suggests relatively more compute in its "
            "setting.",
        )
    )
    rows.append(
        _overlap_row(
            UTILISATION_VS_LINA,
            _span([p.utilisation_vs_lina for p in pairs]),
            "the same compute in less time: this is the inference-time ratio above.",
        )
    )
    return rows


def _overlap_row(claim: Claim, ours: Figure, why: str) -> Row:
    """A row judged by range overlap, its explanation led by the rule's verdict."""
    verdict = "ranges overlap" if claim.holds(ours) else "ranges do not overlap"
    return claim.beside(ours, f"{verdict} (rule); {why}")


def _settings(workloads: list[AuroraWorkload]) -> tuple[str, ...]:
    return (
        f"{LIMOE_B.name}: hidden {LIMOE_B.hidden_size}, MLP experts {LIMOE_B.expert_intermediate_size}, 8 "
        "experts, top-1, 4 MoE layers, bf16 tokens on the wire; gate G and aggregation A as in Aurora's "
        "model (no attention)",
        "routing: synthetic Zipf traces (LIMoE's are not public): "
        + ", ".join(f"{w.name} ({w.tokens_per_device} tokens/device)" for w in workloads)
        + "; B/16 has 4x the tokens of B/32 (196 vs 49 patches)",
        "homogeneous: 8 x (100 Gbit/s, 312 TFLOP/s); mixed: 2 x each of (100 Gbit/s, 989 TFLOP/s), (80, "
        "312), (50, 362), (40, 125); compute at 50% of peak; no per-message latency (Aurora's model)",
        "cases 1-2: one model, Eq. 1 timeline with optimal matching/lane schedules vs SJF/RCS (same "
        "placement) and vs random assignment (same scheduler); cases 3-4: colocated pairs "
        + ", ".join(f"{workloads[a].name} + {workloads[b].name}" for a, b in PAIRS)
        + "; network shared max-min fairly when all-to-alls overlap",
    )


def reproduce_aurora(quick: bool = False) -> Reproduction:
    """Aurora's four cases against their baselines (aurora.md, Evaluation); `quick`: a quarter of
    the tokens and fewer random seeds."""
    started = time.perf_counter()
    homogeneous, mixed = aurora_clusters()
    costs = TokenCosts.from_shapes(LIMOE_B)
    workloads = aurora_workloads(quick)
    experiment = _Experiment(
        homogeneous=homogeneous,
        mixed=mixed,
        workloads=workloads,
        traces=[w.trace() for w in workloads],
        costs=costs,
        compute=ComputeModel(efficiency=0.5),
        options=PlanOptions(
            bytes_per_token=costs.bytes_per_token,
            flops_per_token=costs.expert_flops_per_token,
            baselines=False,
        ),
        quick=quick,
    )
    rows = [
        _exclusive_homogeneous(experiment),
        _exclusive_mixed(experiment),
        *_colocated(experiment, "homogeneous", homogeneous),
        *_colocated(experiment, "mixed", mixed),
    ]
    return Reproduction(
        "aurora",
        "Aurora: expert deployment and all-to-all scheduling",
        _settings(workloads),
        tuple(rows),
        time.perf_counter() - started,
    )
