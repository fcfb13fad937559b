"""The three papers' experiments re-run on our cost model, our numbers beside theirs.

    reproduce_aurora()  — 8 devices, 100 Gbit/s or 100/80/50/40 Gbit/s, 8 experts, 4 layers, the four cases
    reproduce_lina()    — 16 devices, expert skew ~4-5.5x, path length 3: inference per batch, training step
    reproduce_klotski() — Mixtral-8x7B, RTX 3090 + PCIe 4.0 x16 + 1 GB/s SSD: the ablation ladder

Every row says whether it reproduced and why (the rule used is in the sentence). Routing comes
from synthetic Zipf traces (trace.synthetic.zipf_trace) with the skew stated in the settings,
since the papers' traces (LIMoE, Lina's models) are not public and the built-in model's traces do
not exist yet. Deterministic: fixed seeds; `quick` shrinks the workloads for tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

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
from shunter.plan.replication import build_path_estimator
from shunter.sim.cost import LIMOE_B, LINA_MOE, MIXTRAL_8X7B, ComputeModel, MoEShapes
from shunter.sim.klotski import (
    OffloadMachine,
    PipelineOptions,
    klotski_step_time,
    klotski_throughput,
    mixtral_pipeline_times,
    smallest_bubble_free_batches,
)
from shunter.sim.lina import InferenceSetup, TrainingSetup, inference_batch, split_batches, training_step
from shunter.sim.moe_layer import LayerCosts, TokenCosts, layer_costs, simulate_colocated, simulate_exclusive
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.stats import load_skew
from shunter.trace.synthetic import zipf_trace

PAPERS = ("aurora", "lina", "klotski")


@dataclass(frozen=True)
class Row:
    """One result: ours beside the paper's. *_low/*_high: the numbers (equal for a single value)."""

    label: str
    ours: str
    paper: str
    reproduced: bool
    why: str
    unit: str = "x"
    ours_low: float | None = None
    ours_high: float | None = None
    paper_low: float | None = None
    paper_high: float | None = None
    inputs: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "ours": self.ours,
            "paper": self.paper,
            "reproduced": self.reproduced,
            "why": self.why,
            "unit": self.unit,
            "ours_low": self.ours_low,
            "ours_high": self.ours_high,
            "paper_low": self.paper_low,
            "paper_high": self.paper_high,
            "inputs": self.inputs,
        }


@dataclass(frozen=True)
class Reproduction:
    paper: str
    title: str
    settings: tuple[str, ...]
    rows: tuple[Row, ...]
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "paper": self.paper,
            "title": self.title,
            "settings": list(self.settings),
            "rows": [row.to_dict() for row in self.rows],
            "seconds": self.seconds,
        }


def _fmt_range(low: float, high: float, unit: str = "x", digits: int = 2) -> str:
    if abs(high - low) < 0.5 * 10**-digits:
        return f"{low:.{digits}f}{unit}"
    return f"{low:.{digits}f}-{high:.{digits}f}{unit}"


def _overlap(ours: tuple[float, float], paper: tuple[float, float]) -> bool:
    return ours[0] <= paper[1] and paper[0] <= ours[1]


# ---------------------------------------------------------------------------------------------
# Aurora


A100_FLOP_S = 312e12


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


def _exclusive_layers(
    trace: RoutingTrace,
    placements: list[Placement],
    cluster: ClusterSpec,
    costs: TokenCosts,
    compute: ComputeModel,
    transport: str | None,
    seed: int = 0,
) -> list[LayerCosts]:
    return [
        layer_costs(
            trace.expert_ids[layer], placements[layer].shares, cluster, costs, compute, transport, 0.0, seed
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


def reproduce_aurora(quick: bool = False) -> Reproduction:
    """Aurora's four cases against their baselines (aurora.md, Evaluation)."""
    started = time.perf_counter()
    homogeneous, mixed = aurora_clusters()
    costs = TokenCosts.from_shapes(LIMOE_B)
    compute = ComputeModel(efficiency=0.5)
    workloads = aurora_workloads(quick)
    traces = [w.trace() for w in workloads]
    options = PlanOptions(
        bytes_per_token=costs.bytes_per_token, flops_per_token=costs.expert_flops_per_token, baselines=False
    )
    rows: list[Row] = []

    # Case 1: exclusive, homogeneous: the planned schedule against SJF and RCS on the same placement.
    sjf, rcs, a2a_sjf = [], [], []
    for trace in traces:
        placements = [place_exclusive(load, np.ones(8)) for load in _loads(trace)]
        planned = _exclusive_layers(trace, placements, homogeneous, costs, compute, "planned")
        by_sjf = _exclusive_layers(trace, placements, homogeneous, costs, compute, "shortest_first")
        by_rcs = _exclusive_layers(trace, placements, homogeneous, costs, compute, "random_order")
        t_planned = simulate_exclusive(planned, homogeneous, "planned", 0.0).makespan_s
        sjf.append(simulate_exclusive(by_sjf, homogeneous, "planned", 0.0).makespan_s / t_planned)
        rcs.append(simulate_exclusive(by_rcs, homogeneous, "planned", 0.0).makespan_s / t_planned)
        a2a_sjf.append(sum(l.all_to_all_s for l in by_sjf) / sum(l.all_to_all_s for l in planned))
    ours = (min(sjf), max(sjf))
    close = abs(ours[1] / 1.38 - 1) <= 0.25
    rows.append(
        Row(
            "exclusive + homogeneous vs SJF (inference time)",
            f"up to {ours[1]:.2f}x ({_fmt_range(*ours)})",
            "up to 1.38x",
            close,
            f"our largest gain over SJF is {ours[1]:.2f}x against the paper's 1.38x (rule: within 25%); "
            f"the all-to-all alone is {_fmt_range(min(a2a_sjf), max(a2a_sjf))} faster, and the compute, "
            "which no schedule shortens, dilutes it.",
            ours_low=ours[0],
            ours_high=ours[1],
            paper_low=1.0,
            paper_high=1.38,
            inputs={
                "workloads": [w.name for w in workloads],
                "vs_rcs": [min(rcs), max(rcs)],
                "a2a_only_vs_sjf": [min(a2a_sjf), max(a2a_sjf)],
            },
        )
    )

    # Case 2: exclusive, mixed ports: load-by-speed placement vs random GPU assignment, same scheduler.
    rga = []
    speed_cost = seconds_per_token(mixed, options)
    seeds = range(3 if quick else 10)
    for trace in traces:
        loads = _loads(trace)
        aurora = [place_exclusive(load, speed_cost) for load in loads]
        t_aurora = simulate_exclusive(
            _exclusive_layers(trace, aurora, mixed, costs, compute, "planned"), mixed, "planned", 0.0
        ).makespan_s
        t_random = [
            simulate_exclusive(
                _exclusive_layers(
                    trace,
                    [place_random(8, 8, 100 * s + l) for l in range(trace.num_layers)],
                    mixed,
                    costs,
                    compute,
                    "planned",
                ),
                mixed,
                "planned",
                0.0,
            ).makespan_s
            for s in seeds
        ]
        rga.append(float(np.mean(t_random)) / t_aurora)
    ours = (min(rga), max(rga))
    ok = _overlap(ours, (1.36, 1.81))
    rows.append(
        Row(
            "exclusive + mixed vs random GPU assignment (RGA)",
            _fmt_range(*ours),
            "1.36-1.81x",
            ok,
            ("ranges overlap" if ok else "ranges do not overlap")
            + " (rule); both sides use the optimal lane schedule, so the gap is placement alone: the hottest "
            f"expert on a 100 Gbit/s, 989 TFLOP/s device instead of a random one (mean over {len(seeds)} "
            "random assignments per workload).",
            ours_low=ours[0],
            ours_high=ours[1],
            paper_low=1.36,
            paper_high=1.81,
            inputs={"workloads": [w.name for w in workloads], "cluster": "2 x each of 100/80/50/40 Gbit/s"},
        )
    )

    # Cases 3 and 4: two models colocated; Aurora's pairing on the interleaved timeline vs Lina.
    pairs = [(0, 3), (1, 2), (0, 2), (1, 3)]
    for case, cluster, paper_range, util_paper in (
        ("homogeneous", homogeneous, (1.25, 2.38), True),
        ("mixed", mixed, (1.91, 3.54), False),
    ):
        vs_lina, same_timeline, interleave_gain, util_vs_excl, util_vs_lina, ratio = [], [], [], [], [], []
        for ia, ib in pairs:
            trace_a, trace_b = traces[ia], traces[ib]
            plan = plan_colocated(cluster, trace_a, trace_b, options)
            aurora_a = [
                placement_from_devices(np.array(l.placement["device_of_expert_a"]), 8, "")
                for l in plan.layers
            ]
            aurora_b = [
                placement_from_devices(np.array(l.placement["device_of_expert_b"]), 8, "")
                for l in plan.layers
            ]
            cost_a = _exclusive_layers(trace_a, aurora_a, cluster, costs, compute, None)
            cost_b = _exclusive_layers(trace_b, aurora_b, cluster, costs, compute, None)
            aurora_t = simulate_colocated(cost_a, cost_b, cluster, True, "fair_share")
            aurora_seq = simulate_colocated(cost_a, cost_b, cluster, False, "fair_share")
            # Lina does not know device speeds: its packing lands on the devices in an arbitrary order,
            # so on mixed devices take the mean over random orders (on equal devices order is moot).
            lina_seq_s, lina_inter_s, lina_util = [], [], []
            for permutation in _device_orders(cluster, 2 if quick else 5):
                lina = [
                    tuple(
                        placement_from_devices(permutation[c], 8, "Lina")
                        for c in (x.device_of_a, x.device_of_b)
                    )
                    for x in (
                        place_colocated_lina(la, lb, 8)
                        for la, lb in zip(_loads(trace_a), _loads(trace_b), strict=True)
                    )
                ]
                lina_a = _exclusive_layers(trace_a, [p[0] for p in lina], cluster, costs, compute, None)
                lina_b = _exclusive_layers(trace_b, [p[1] for p in lina], cluster, costs, compute, None)
                lina_seq = simulate_colocated(lina_a, lina_b, cluster, False, "fair_share")
                lina_seq_s.append(lina_seq.makespan_s)
                lina_util.append(lina_seq.mean_utilisation)
                lina_inter_s.append(
                    simulate_colocated(lina_a, lina_b, cluster, True, "fair_share").makespan_s
                )
            vs_lina.append(float(np.mean(lina_seq_s)) / aurora_t.makespan_s)
            same_timeline.append(float(np.mean(lina_inter_s)) / aurora_t.makespan_s)
            interleave_gain.append(aurora_seq.makespan_s / aurora_t.makespan_s)
            ratio.append(float(aurora_seq.busy_s.max()) / aurora_seq.network_busy_s())
            # Exclusive deployment: each model alone on its own copy of the cluster, Aurora case 1/2.
            alone = []
            for trace in (trace_a, trace_b):
                placements = [
                    place_exclusive(load, seconds_per_token(cluster, options)) for load in _loads(trace)
                ]
                alone.append(
                    simulate_exclusive(
                        _exclusive_layers(trace, placements, cluster, costs, compute, None),
                        cluster,
                        "fair_share",
                        0.0,
                    ).mean_utilisation
                )
            util_vs_excl.append(aurora_t.mean_utilisation / float(np.mean(alone)))
            util_vs_lina.append(aurora_t.mean_utilisation / float(np.mean(lina_util)))
        ours = (min(vs_lina), max(vs_lina))
        ok = _overlap(ours, paper_range)
        rows.append(
            Row(
                f"colocated + {case} vs Lina",
                _fmt_range(*ours),
                _fmt_range(*paper_range),
                ok,
                ("ranges overlap" if ok else "ranges do not overlap")
                + " (rule). Ours = Lina's packing run one model after the other / Aurora's pairing on the "
                "interleaved timeline (fair-share network). Split: the interleaved timeline alone gives "
                f"{_fmt_range(min(interleave_gain), max(interleave_gain))}, Aurora's pairing vs Lina's "
                "packing on the same interleaved timeline "
                f"{_fmt_range(min(same_timeline), max(same_timeline))}"
                + (
                    "; on equal devices both placements balance the ports, so most of the gain is the "
                    "overlap of one model's all-to-all with the other's compute, at most 1 + "
                    f"compute/communication (here compute is {min(ratio):.2f}-{max(ratio):.2f} of the "
                    "network time)."
                    if case == "homogeneous"
                    else "; Lina's packing ignores device speed (mean over random device orders), so "
                    "hot experts and their traffic often land on 40-50 Gbit/s ports and 125 TFLOP/s GPUs."
                ),
                ours_low=ours[0],
                ours_high=ours[1],
                paper_low=paper_range[0],
                paper_high=paper_range[1],
                inputs={
                    "pairs": [f"{workloads[a].name} + {workloads[b].name}" for a, b in pairs],
                    "interleaving_alone": [min(interleave_gain), max(interleave_gain)],
                    "pairing_alone": [min(same_timeline), max(same_timeline)],
                },
            )
        )
        if util_paper:
            ours_u = (min(util_vs_excl), max(util_vs_excl))
            ok_u = _overlap(ours_u, (1.57, 1.72))
            rows.append(
                Row(
                    "GPU utilisation: colocated vs exclusive",
                    _fmt_range(*ours_u),
                    "1.57-1.72x",
                    ok_u,
                    ("ranges overlap" if ok_u else "ranges do not overlap")
                    + " (rule); colocated = Aurora's interleaved timeline with both models on 8 GPUs, "
                    "exclusive = each model alone on 8 GPUs; it rises only as far as one model's compute "
                    "hides under the other's all-to-alls, and compute is "
                    f"{min(ratio):.2f}-{max(ratio):.2f} of the network time here (LIMoE-B's small experts "
                    "at 50% of an A100); the paper's larger rise suggests relatively more compute in its "
                    "setting.",
                    ours_low=ours_u[0],
                    ours_high=ours_u[1],
                    paper_low=1.57,
                    paper_high=1.72,
                )
            )
            ours_l = (min(util_vs_lina), max(util_vs_lina))
            ok_l = _overlap(ours_l, (1.28, 1.50))
            rows.append(
                Row(
                    "GPU utilisation: colocated vs Lina",
                    _fmt_range(*ours_l),
                    "1.28-1.50x",
                    ok_l,
                    ("ranges overlap" if ok_l else "ranges do not overlap")
                    + " (rule); the same compute in less time: this is the inference-time ratio above.",
                    ours_low=ours_l[0],
                    ours_high=ours_l[1],
                    paper_low=1.28,
                    paper_high=1.50,
                )
            )
    settings = (
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
        + ", ".join(f"{workloads[a].name} + {workloads[b].name}" for a, b in pairs)
        + "; network shared max-min fairly when all-to-alls overlap",
    )
    return Reproduction(
        "aurora",
        "Aurora: expert deployment and all-to-all scheduling",
        settings,
        tuple(rows),
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# Lina


LINA_SKEW, LINA_CORRELATION = 0.5, 0.3


def lina_cluster() -> ClusterSpec:
    return ClusterSpec.uniform(16, 100 * GBIT_S, A100_FLOP_S)


def reproduce_lina(quick: bool = False) -> Reproduction:
    """Lina inference (static vs replication vs ideal gate) and the training step ablation."""
    started = time.perf_counter()
    cluster = lina_cluster()
    compute = ComputeModel(efficiency=0.5)
    layers = 4 if quick else 8
    batches = 4 if quick else 12
    tokens_per_batch = 16 * (256 if quick else 1024)
    profile_tokens = 4 * tokens_per_batch
    shapes = replace(LINA_MOE, num_layers=layers)
    trace = zipf_trace(
        layers, profile_tokens + batches * tokens_per_batch, 16, 2, LINA_SKEW, LINA_CORRELATION, 0
    )
    profile = split_batches(trace, profile_tokens)[0]
    served = split_batches(trace, tokens_per_batch)[profile_tokens // tokens_per_batch :]
    estimator = build_path_estimator(profile, 3)
    setup = InferenceSetup(shapes, cluster, compute, context_tokens=512, host_link_bytes_s=25e9)
    free_swaps = replace(setup, host_link_bytes_s=float("inf"))
    times: dict[str, list[float]] = {policy: [] for policy in ("static", "lina", "ideal", "lina_free_swaps")}
    replanned, imbalance, swapped = 0, [], []
    for batch in served:
        for policy in ("static", "lina", "ideal"):
            result = inference_batch(batch, setup, policy, estimator)  # type: ignore[arg-type]
            times[policy].append(result.time_s)
            if policy == "lina":
                replanned += result.replanned
                imbalance.append(float(result.max_over_mean.mean()))
                swapped.append(result.swap_bytes)
        times["lina_free_swaps"].append(inference_batch(batch, free_swaps, "lina", estimator).time_s)
    static, lina, ideal, free = (np.array(times[p]) for p in ("static", "lina", "ideal", "lina_free_swaps"))
    skews = load_skew(trace)
    median_speedup = float(np.median(static) / np.median(lina))
    p95_speedup = float(np.percentile(static, 95) / np.percentile(lina, 95))
    lina_vs_ideal = float(np.percentile(lina, 95) / np.percentile(ideal, 95))
    static_vs_ideal = float(np.percentile(static, 95) / np.percentile(ideal, 95))
    replan_share = replanned / (layers * len(served))
    rows = [
        Row(
            "inference: median per-batch time, static / Lina",
            f"{median_speedup:.2f}x",
            "1.45x",
            abs(median_speedup / 1.45 - 1) <= 0.25,
            f"rule: within 25% of the paper. Median batch: static {np.median(static) * 1e3:.2f} ms, Lina "
            f"{np.median(lina) * 1e3:.2f} ms, ideal gate {np.median(ideal) * 1e3:.2f} ms; the gain is the "
            "hot device's expert compute and receive traffic spread over replicas, less the swap-ins.",
            ours_low=median_speedup,
            ours_high=median_speedup,
            paper_low=1.45,
            paper_high=1.45,
            inputs={
                "static_ms": (static * 1e3).tolist(),
                "lina_ms": (lina * 1e3).tolist(),
                "ideal_ms": (ideal * 1e3).tolist(),
            },
        ),
        Row(
            "inference: p95 per-batch time, static / Lina",
            f"{p95_speedup:.2f}x",
            "1.63x",
            abs(p95_speedup / 1.63 - 1) <= 0.25,
            "rule: within 25% of the paper. Our batches differ only by sampling noise around one "
            "popularity per layer (synthetic traces), so the tail is close to the median; Lina's real "
            "batches vary more.",
            ours_low=p95_speedup,
            ours_high=p95_speedup,
            paper_low=1.63,
            paper_high=1.63,
        ),
        Row(
            "inference: p95 Lina / ideal balanced gate",
            f"{lina_vs_ideal:.2f}x",
            "1.04x",
            abs(lina_vs_ideal / 1.04 - 1) <= 0.10,
            f"rule: within 10% of the paper (Table 5, path length 3). Static is {static_vs_ideal:.2f}x "
            f"the ideal. Lina swaps in {np.mean(swapped) / 1e9:.1f} GB of experts per batch; with free "
            f"swap-ins it would be {np.percentile(free, 95) / np.percentile(ideal, 95):.2f}x the ideal, "
            "the rest being the imbalance left after packing (max/mean device load "
            f"{np.mean(imbalance):.2f}: whole replicas, at most 4 experts per device). The paper's 1.04 "
            "implies swap-ins hidden almost entirely and a finer balance.",
            ours_low=lina_vs_ideal,
            ours_high=lina_vs_ideal,
            paper_low=1.04,
            paper_high=1.04,
        ),
        Row(
            "inference: layers re-planned in phase 2",
            f"{replan_share * 100:.0f}%",
            "~23%",
            abs(replan_share - 0.23) <= 0.15,
            "rule: within 15 points. The synthetic trace keeps each layer's popularity fixed, so the "
            "path estimate's top-2k matches the gate's more (or less) often than real routing does.",
            unit="%",
            ours_low=replan_share * 100,
            ours_high=replan_share * 100,
            paper_low=23.0,
            paper_high=23.0,
        ),
    ]

    # Training: DeepSpeed (allreduce and all-to-all share ports) vs Lina's priority and partitioning.
    h = LINA_MOE.hidden_size
    training = TrainingSetup(
        shapes=replace(LINA_MOE, num_layers=4 if quick else 12),
        cluster=cluster,
        compute=compute,
        tokens_per_device=4096,
        context_tokens=1024,
        # Per MoE block: its attention and the dense transformer layer beside it (attention + MLP).
        dense_gradient_bytes_per_block=(4 * h * h + 4 * h * h + 8 * h * h) * 2,
        dense_flops_per_token_per_block=2 * (4 * h * h + 8 * h * h) + 4 * h * 1024,
    )
    steps = {v: training_step(training, v) for v in ("deepspeed", "priority", "lina")}
    alone = steps["lina"].forward_a2a_s  # a forward all-to-all shares nothing in any variant
    alone = min(steps["deepspeed"].forward_a2a_s, alone)
    priority_gain = steps["deepspeed"].step_s / steps["priority"].step_s
    lina_gain = steps["deepspeed"].step_s / steps["lina"].step_s
    bwd_gain = steps["deepspeed"].backward_a2a_s / steps["priority"].backward_a2a_s
    slowdown = steps["deepspeed"].backward_a2a_s / alone
    rows += [
        Row(
            "training: DeepSpeed backward all-to-all slowed by the allreduce",
            f"{slowdown:.2f}x",
            "1.83x (median)",
            abs(slowdown / 1.83 - 1) <= 0.25,
            "rule: within 25%. The allreduce's ring runs on as many channels per port as the all-to-all "
            "has flows, so a shared port splits about evenly under max-min fairness (our assumption).",
            ours_low=slowdown,
            ours_high=slowdown,
            paper_low=1.83,
            paper_high=1.83,
        ),
        Row(
            "training: step speedup, priority (+ micro-ops) vs DeepSpeed",
            f"{priority_gain:.2f}x",
            "1.24x",
            abs(priority_gain / 1.24 - 1) <= 0.15,
            f"rule: within 15%. Step: DeepSpeed {steps['deepspeed'].step_s * 1e3:.1f} ms, priority "
            f"{steps['priority'].step_s * 1e3:.1f} ms; the all-to-all waits at most one 30 MB micro-op, "
            "and the allreduce fills the dense backward's compute.",
            ours_low=priority_gain,
            ours_high=priority_gain,
            paper_low=1.24,
            paper_high=1.24,
        ),
        Row(
            "training: step speedup, Lina (priority + partitioning) vs DeepSpeed",
            f"{lina_gain:.2f}x",
            "1.57x avg (1.37-1.73x)",
            _overlap((lina_gain, lina_gain), (1.37, 1.73)),
            "rule: inside the paper's range over 2-16 experts. Lina step "
            f"{steps['lina'].step_s * 1e3:.1f} ms; chunking the all-to-all overlaps it with the expert "
            "FFN only as far as the FFN is long, and our expert FFN per block is shorter than the "
            "all-to-all.",
            ours_low=lina_gain,
            ours_high=lina_gain,
            paper_low=1.37,
            paper_high=1.73,
            inputs={
                v: {"step_s": s.step_s, "backward_a2a_s": s.backward_a2a_s, "utilisation": s.utilisation}
                for v, s in steps.items()
            },
        ),
        Row(
            "training: backward all-to-all, DeepSpeed / priority",
            f"{bwd_gain:.2f}x",
            "2.21-2.39x",
            _overlap((bwd_gain, bwd_gain), (2.21, 2.39)),
            "rule: inside the paper's range. With priority the all-to-all shares a port only with a "
            "micro-op that was already running when it arrived.",
            ours_low=bwd_gain,
            ours_high=bwd_gain,
            paper_low=2.21,
            paper_high=2.39,
        ),
    ]
    settings = (
        f"16 devices x (100 Gbit/s, 312 TFLOP/s at 50%); {LINA_MOE.name}: hidden {h}, MLP experts "
        f"{LINA_MOE.expert_intermediate_size}, 16 experts, top-2",
        f"inference: {layers} MoE layers, {batches} batches of {tokens_per_batch} tokens after a "
        f"{profile_tokens}-token profile; synthetic Zipf traces skew {LINA_SKEW}, correlation "
        f"{LINA_CORRELATION}: expert skew max/min per layer {skews.min():.1f}-{skews.max():.1f}x (median "
        f"{np.median(skews):.1f}x; the paper: 4.02x with 4 experts, 5.56x with 16); path length 3; "
        "experts swapped in over a 25 GB/s host link (pipelined unless phase 2 re-plans); all-to-alls "
        "shared max-min fairly",
        f"training: {training.shapes.num_layers} MoE blocks, 4096 tokens per device, dense gradients "
        f"{training.dense_gradient_bytes_per_block / 1e6:.1f} MB per block (ring allreduce), micro-ops 30 "
        "MB, all-to-all in 4 chunks for partitioning; balanced routing (training's balancing loss)",
    )
    return Reproduction(
        "lina",
        "Lina: all-to-all first in training, replication in inference",
        settings,
        tuple(rows),
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# Klotski


RTX3090_PCIE4 = OffloadMachine(
    name="RTX 3090 24 GB, PCIe 4.0 x16, 256 GB RAM, 1 GB/s SSD",
    # bf16 tensor cores with fp32 accumulation: 71 TFLOP/s dense; kernels reach about half.
    compute_flop_s=0.5 * 71e12,
    memory_bandwidth_bytes_s=936e9,
    # The paper's own profile: one Mixtral expert (352 MB) takes ~21 ms over PCIe.
    link_bytes_s=MIXTRAL_8X7B.expert_bytes / 0.021,
    disk_bytes_s=1e9,
    device_memory_bytes=24 * 2**30,
    host_memory_bytes=256e9,
    launch_s=20e-6,
)
KLOTSKI_PAPER = (5.721, 18.24, 19.074, 22.414)
KLOTSKI_SKEW = 0.5


def _prefill_flops(shapes: MoEShapes, sequences: int, prompt_tokens: int) -> float:
    """FLOPs of a causal prefill: attention over half the prompt on average, gate, k experts."""
    per_token = shapes.attention_flops_per_token(prompt_tokens / 2) + shapes.gate_flops_per_token
    per_token += shapes.top_k * shapes.expert_flops_per_token
    return float(sequences * prompt_tokens * shapes.num_layers * per_token)


def reproduce_klotski(quick: bool = False) -> Reproduction:
    """The ablation ladder on Env 1 (Mixtral-8x7B, RTX 3090), batch 64, n = 10 (the paper's profile)."""
    started = time.perf_counter()
    shapes = replace(MIXTRAL_8X7B, num_layers=8) if quick else MIXTRAL_8X7B
    machine = RTX3090_PCIE4
    weights = np.arange(1, shapes.num_experts + 1, dtype=np.float64) ** -KLOTSKI_SKEW
    share = weights / weights.sum()
    batch, n = 64, 10
    prompt, output = 512, 32
    ladder = [
        ("simple pipeline (n=1, whole layers)", 1, PipelineOptions("whole_layer", "by_batch")),
        ("+ multiple batches", n, PipelineOptions("whole_layer", "by_batch")),
        ("+ prefetch only hot experts", n, PipelineOptions("hot_only", "by_batch")),
        ("+ reorder experts (Klotski)", n, PipelineOptions("hot_only", "hot_first")),
    ]
    results = [
        klotski_throughput(shapes, machine, batch, nb, prompt, output, opts, share) for _, nb, opts in ladder
    ]
    rows = []
    for (label, nb, _), result, paper in zip(ladder, results, KLOTSKI_PAPER, strict=True):
        ratio = result.throughput_tok_s / paper
        ok = 0.5 <= ratio <= 2.0
        # What the paper's figure implies for the prefill if our decode is right.
        paper_total_s = nb * batch * output / paper
        implied_prefill_s = paper_total_s - result.decode_steps * result.decode_step_s
        prefill_flops = _prefill_flops(shapes, nb * batch, prompt)
        implied = (
            f"; if our decode is right, the paper's figure implies a prefill at "
            f"{prefill_flops / implied_prefill_s / 1e12:.0f} TFLOP/s (we assume "
            f"{machine.compute_flop_s / 1e12:.0f})"
            if implied_prefill_s > 0
            else "; the paper's total is shorter than our decode alone"
        )
        rows.append(
            Row(
                label,
                f"{result.throughput_tok_s:.2f} tok/s",
                f"{paper:g} tok/s",
                ok,
                f"rule: within 2x; ours is {ratio:.2f}x the paper's. Prefill {result.prefill_s:.1f} s "
                f"(compute-bound), decode {result.decode_step_s:.2f} s per step x {result.decode_steps} "
                f"({'KV on the GPU' if result.kv_on_device else 'KV streamed over PCIe'}){implied}.",
                unit="tok/s",
                ours_low=result.throughput_tok_s,
                ours_high=result.throughput_tok_s,
                paper_low=paper,
                paper_high=paper,
                inputs={
                    "batch_size": batch,
                    "num_batches": nb,
                    "prefill_s": result.prefill_s,
                    "decode_step_s": result.decode_step_s,
                },
            )
        )
    for k in range(1, 4):
        ours = results[k].throughput_tok_s / results[k - 1].throughput_tok_s
        paper = KLOTSKI_PAPER[k] / KLOTSKI_PAPER[k - 1]
        gain_ratio = (ours - 1) / (paper - 1)
        ok = 0.5 <= gain_ratio <= 2.0
        why = (
            f"rule: our gain within a factor 2 of the paper's (ours {(ours - 1) * 100:+.1f}%, paper "
            f"{(paper - 1) * 100:+.1f}%). "
        )
        if k == 1:
            why += (
                "n batches share each layer's 2.9 GB of weights, so decode tokens per weight byte grow "
                "n-fold; the KV cache of 640 sequences no longer fits and crosses PCIe too."
            )
        else:
            why += (
                "In our model the decode step is bound by PCIe (weights + KV: "
                f"{results[k].decode_step_s:.2f} s per step, compute a few percent of it) and the prefill "
                "by compute, so reordering transfers or experts cannot shorten either; the paper's gain "
                "implies its compute and transfers were closer to balanced (e.g. slower attention or a "
                "faster link than its 21 ms per expert)."
                if not ok
                else "the reorder removes bubbles where compute and transfer are comparable."
            )
        rows.append(
            Row(
                f"step ratio: {ladder[k][0]}",
                f"{ours:.3f}x",
                f"{paper:.3f}x",
                ok,
                why,
                ours_low=ours,
                ours_high=ours,
                paper_low=paper,
                paper_high=paper,
            )
        )
    # One layer, one decode step of 10 batches of 64: the paper's profiler timeline.
    decode = mixtral_pipeline_times(shapes, machine, batch, n, "decode", prompt, prompt + output // 2, share)
    one_layer = replace(decode, num_layers=1)
    klotski_layer = klotski_step_time(one_layer, n, ladder[3][2]).step_s
    simple_layer = n * klotski_step_time(one_layer, 1, ladder[0][2]).step_s
    for label, ours_s, paper_s in (
        ("profiler: one layer, 10 x 64 (Klotski)", klotski_layer, 0.215),
        ("profiler: the same with a simple overlap pipeline", simple_layer, 2.367),
    ):
        ratio = ours_s / paper_s
        rows.append(
            Row(
                label,
                f"{ours_s * 1e3:.0f} ms",
                f"~{paper_s * 1e3:.0f} ms",
                0.5 <= ratio <= 2.0,
                f"rule: within 2x ({ratio:.2f}x). One decode layer: attention weights, 8 experts and the "
                "KV of 10 batches over PCIe; 'simple' loads the layer once per batch.",
                unit="ms",
                ours_low=ours_s * 1e3,
                ours_high=ours_s * 1e3,
                paper_low=paper_s * 1e3,
                paper_high=paper_s * 1e3,
            )
        )
    # The planner's n: the paper's accounting folds the KV load into tc_A.
    paper_accounting = replace(
        decode, attention_compute_s=decode.attention_compute_s + decode.kv_load_s, kv_load_s=0.0
    )
    planned = smallest_bubble_free_batches(paper_accounting, 2)
    ours_link = smallest_bubble_free_batches(decode, 2)
    planned_n = planned.num_batches
    rows.append(
        Row(
            "planner: smallest bubble-free n (inequalities 4-7), batch 64",
            f"n = {planned_n} (binding: ({planned.binding}))" if planned_n else "none",
            "n = 10 (profiled run)",
            planned_n is not None and 0.5 <= planned_n / 10 <= 2.0,
            "rule: within 2x of the n the paper ran. With the KV load counted as attention time (the "
            "paper's tc_A); counting it on the link instead, "
            + (
                f"n = {ours_link.num_batches}"
                if ours_link.num_batches
                else "no n is bubble-free: each batch adds more KV transfer than compute"
            )
            + ".",
            unit="batches",
            ours_low=float(planned_n) if planned_n else None,
            ours_high=float(planned_n) if planned_n else None,
            paper_low=10.0,
            paper_high=10.0,
        )
    )
    settings = (
        f"{shapes.name}: {shapes.num_layers} layers, hidden {shapes.hidden_size}, 8 SwiGLU experts of "
        f"{shapes.expert_bytes / 1e6:.0f} MB, top-2, bf16 ({'quick: 8 layers' if quick else 'all layers'})",
        f"{machine.name}: {machine.compute_flop_s / 1e12:.1f} TFLOP/s reached (half of 71 dense bf16), "
        f"936 GB/s device memory, {machine.link_bytes_s / 1e9:.1f} GB/s host->device (the paper's 21 ms "
        "per expert); the 93 GB model fits in 256 GB RAM, so the 1 GB/s SSD is not on the path",
        f"workload: prompts of {prompt} tokens, {output} generated, batch {batch}, n = {n} batches (the "
        f"paper's profiled run); expert popularity Zipf exponent {KLOTSKI_SKEW} over 8 experts (max/min "
        f"{weights[0] / weights[-1]:.1f}x); prefetch accuracy 100% (all prefetched experts used)",
        "metric: generated tokens / (prefill + decode); decode steps simulated at the mean context length",
    )
    return Reproduction(
        "klotski",
        "Klotski: expert-aware multi-batch pipeline (ablation, Env 1)",
        settings,
        tuple(rows),
        time.perf_counter() - started,
    )


def reproduce(paper: str, quick: bool = False) -> Reproduction:
    if paper == "aurora":
        return reproduce_aurora(quick)
    if paper == "lina":
        return reproduce_lina(quick)
    if paper == "klotski":
        return reproduce_klotski(quick)
    raise ValueError(f"unknown paper {paper!r}")
