"""The planner's reported measurements, reproducible from a seed (the figures in docs/planner.md).

    python -m shunter.reproduce.planner_figures heterogeneous [--cases 1000] [--seed 0]
    python -m shunter.reproduce.planner_figures colocated [--cases 200] [--seed 0]
    python -m shunter.reproduce.planner_figures replication [--seed 0]
    python -m shunter.reproduce.planner_figures timing [--devices 256] [--experts 256]

Each subcommand prints one JSON object. The functions are pure apart from reading the clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from shunter.network.bounds import matching_lower_bound_s, port_lower_bound_s
from shunter.network.cost import GBIT_S
from shunter.network.fluid import simulate_baseline
from shunter.plan.placement import (
    ColocatedInstance,
    place_colocated_brute_force,
    place_colocated_heterogeneous,
    place_exclusive,
    placement_from_devices,
)
from shunter.plan.replication import (
    build_path_estimator,
    eplb_replicate,
    max_over_mean_load,
    plan_lina_layer,
    replicate_hot_experts,
)
from shunter.plan.schedule import schedule_all_to_all, schedule_violations
from shunter.plan.traffic import dispatch_traffic
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.synthetic import zipf_trace

AURORA_BANDWIDTHS_GBIT_S = (100.0, 80.0, 50.0, 40.0)


# ---------------------------------------------------------------------------------------------
# heterogeneous ports: lane schedule vs the per-port bound


@dataclass(frozen=True)
class HeterogeneousReport:
    cases: int
    worst_ratio: float
    mean_ratio: float
    worst_ratio_four_types: float  # bandwidths drawn from Aurora's 100/80/50/40 Gbit/s
    worst_ratio_continuous: float  # bandwidths uniform in [10, 100] Gbit/s
    worst_ratio_without_lanes: float  # one transfer per port at min(B_src, B_dst): the matching bound
    invalid_schedules: int
    seconds: float


def random_heterogeneous_case(
    rng: np.random.Generator, max_devices: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(traffic_bytes [n, n], bandwidth_bytes_s [n], kind): n in 2..max_devices; ports from Aurora's four
    types or continuous; traffic dense or sparse, uniform or scaled by B_i * B_j (so fast ports are
    the busy ones, the hard case for one-flow-per-port schedules)."""
    n = int(rng.integers(2, max_devices + 1))
    kind = "four_types" if rng.random() < 0.5 else "continuous"
    if kind == "four_types":
        bandwidth = rng.choice(AURORA_BANDWIDTHS_GBIT_S, n) * GBIT_S
    else:
        bandwidth = rng.uniform(10.0, 100.0, n) * GBIT_S
    density = rng.choice([1.0, 0.5, 0.2])
    traffic = rng.integers(0, 10**6, (n, n)).astype(np.float64) * (rng.random((n, n)) < density)
    if rng.random() < 0.5:
        traffic *= np.outer(bandwidth, bandwidth) / bandwidth.max() ** 2
    return traffic, bandwidth, kind


def heterogeneous_report(cases: int = 1000, seed: int = 0, max_devices: int = 32) -> HeterogeneousReport:
    """Worst and mean makespan / port bound (max_i max(row_i, col_i) / B_i) of schedule_all_to_all
    over `cases` random cases with traffic to move."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    ratios, ratios_by_kind, without_lanes, invalid = [], {"four_types": [1.0], "continuous": [1.0]}, [], 0
    while len(ratios) < cases:
        traffic, bandwidth, kind = random_heterogeneous_case(rng, max_devices)
        bound = port_lower_bound_s(traffic, bandwidth)
        if bound == 0:  # nothing crosses the network (tiny sparse cases): draw again
            continue
        schedule = schedule_all_to_all(traffic, bandwidth)
        invalid += bool(schedule_violations(schedule, traffic, bandwidth))
        ratio = schedule.makespan_s / bound
        ratios.append(ratio)
        ratios_by_kind[kind].append(ratio)
        without_lanes.append(matching_lower_bound_s(traffic, bandwidth) / bound)
    return HeterogeneousReport(
        cases=len(ratios),
        worst_ratio=float(max(ratios)),
        mean_ratio=float(np.mean(ratios)),
        worst_ratio_four_types=float(max(ratios_by_kind["four_types"])),
        worst_ratio_continuous=float(max(ratios_by_kind["continuous"])),
        worst_ratio_without_lanes=float(max(without_lanes)),
        invalid_schedules=invalid,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# case 4: two-stage heuristic vs brute force


@dataclass(frozen=True)
class ColocatedGapReport:
    instances: int
    mean_gap: float  # heuristic with local search from the two-stage start and random starts / optimum
    worst_gap: float
    mean_gap_one_start: float  # local search from the two-stage start only
    worst_gap_one_start: float
    mean_gap_two_stage_only: float  # Aurora's heuristic without the local search
    worst_gap_two_stage_only: float
    optimal_fraction: float  # instances where the heuristic (with local search) is optimal
    seconds: float


def random_colocated_instance(rng: np.random.Generator, max_devices: int = 6) -> ColocatedInstance:
    """n in 2..max_devices; Zipf-like expert loads for both models (dispatch volume follows load,
    sends drawn around the mean); devices from Aurora's four port types with compute loosely
    tracking the port."""
    n = int(rng.integers(2, max_devices + 1))

    def model() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        load = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -rng.uniform(0.0, 1.5)) * 1e4
        recv = load * 8192
        send = rng.uniform(0.5, 1.5, n) * recv.mean()
        return send, recv, load * 7e8

    send_a, recv_a, flops_a = model()
    send_b, recv_b, flops_b = model()
    bandwidth = rng.choice(AURORA_BANDWIDTHS_GBIT_S, n) * GBIT_S
    compute = bandwidth / GBIT_S * rng.uniform(1.0, 4.0, n) * 1e12
    return ColocatedInstance(send_a, recv_a, flops_a, send_b, recv_b, flops_b, bandwidth, compute)


def colocated_gap_report(instances: int = 1000, seed: int = 0, max_devices: int = 7) -> ColocatedGapReport:
    """Average and worst ratio of the case-4 heuristic's bottleneck time to the brute-force optimum."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    gaps, one_start_gaps, plain_gaps = [], [], []
    for _ in range(instances):
        instance = random_colocated_instance(rng, max_devices)
        _, optimum = place_colocated_brute_force(instance)
        for options, out in (
            ({}, gaps),
            ({"restarts": 0}, one_start_gaps),
            ({"improve": False}, plain_gaps),
        ):
            colocation = place_colocated_heterogeneous(instance, **options)
            partner = _partner_of_a(colocation.device_of_a, colocation.device_of_b)
            out.append(instance.largest_time_s(partner, colocation.device_of_a) / optimum)
    gaps_array = np.array(gaps)
    return ColocatedGapReport(
        instances=instances,
        mean_gap=float(gaps_array.mean()),
        worst_gap=float(gaps_array.max()),
        mean_gap_one_start=float(np.mean(one_start_gaps)),
        worst_gap_one_start=float(np.max(one_start_gaps)),
        mean_gap_two_stage_only=float(np.mean(plain_gaps)),
        worst_gap_two_stage_only=float(np.max(plain_gaps)),
        optimal_fraction=float(np.mean(gaps_array <= 1 + 1e-9)),
        seconds=time.perf_counter() - start,
    )


def _partner_of_a(device_of_a: np.ndarray, device_of_b: np.ndarray) -> np.ndarray:
    """partner[i] = the expert of b on expert i of a's device."""
    b_on_device = np.empty(len(device_of_b), dtype=np.int64)
    b_on_device[device_of_b] = np.arange(len(device_of_b))
    return b_on_device[device_of_a]


# ---------------------------------------------------------------------------------------------
# Lina replication and the EPLB-style baseline on skewed traces


@dataclass(frozen=True)
class ReplicationRow:
    """Mean over layers of max/mean tokens per device on the held-out half of the tokens."""

    skew: float
    num_experts: int
    num_devices: int
    none: float  # one expert per device (or balanced blocks), no replicas
    lina: float  # phase 1 from the path estimate, phase 2 re-plan when the top-2k differ
    lina_phase1_only: float
    eplb: float  # EPLB-style, planned from the profile half's load
    replanned_fraction: float
    lina_replicas: float  # mean replicas per layer
    eplb_replicas: int


def replication_report(
    seed: int = 0,
    skews: tuple[float, ...] = (0.8, 1.2, 1.6),
    shapes: tuple[tuple[int, int, int], ...] = ((16, 16, 2), (32, 16, 2), (64, 32, 4)),
    num_layers: int = 8,
    num_tokens: int = 8192,
    correlation: float = 0.6,
    path_length: int = 3,
) -> list[ReplicationRow]:
    """Zipf-skewed synthetic traces (experts, devices, top-k per shape): the first half of the tokens
    profiles (Lina's estimator, EPLB's load statistics), the second half is the batch being served."""
    rows = []
    for skew in skews:
        for num_experts, num_devices, top_k in shapes:
            trace = zipf_trace(num_layers, num_tokens, num_experts, top_k, skew, correlation, seed)
            profile, batch = _split_tokens(trace)
            estimator = build_path_estimator(profile, path_length)
            slots = min(-(-num_experts // num_devices) + 1, 4)
            none, lina, phase1, eplb, replanned, replicas = [], [], [], [], [], []
            blocks = placement_from_devices(
                np.arange(num_experts) * num_devices // num_experts, num_devices, ""
            )
            for layer in range(num_layers):
                load = np.bincount(batch.expert_ids[layer].ravel(), minlength=num_experts).astype(np.float64)
                profile_load = np.bincount(profile.expert_ids[layer].ravel(), minlength=num_experts)
                none.append(max_over_mean_load(load, blocks))
                plan = plan_lina_layer(estimator, batch, layer, num_devices)
                lina.append(max_over_mean_load(load, plan.placement))
                replanned.append(plan.replanned)
                replicas.append(int((plan.placement.shares > 0).sum()))
                phase1.append(
                    max_over_mean_load(load, replicate_hot_experts(plan.estimated_share, num_devices))
                )
                eplb.append(max_over_mean_load(load, eplb_replicate(profile_load, num_devices, slots)))
            rows.append(
                ReplicationRow(
                    skew=skew,
                    num_experts=num_experts,
                    num_devices=num_devices,
                    none=float(np.mean(none)),
                    lina=float(np.mean(lina)),
                    lina_phase1_only=float(np.mean(phase1)),
                    eplb=float(np.mean(eplb)),
                    replanned_fraction=float(np.mean(replanned)),
                    lina_replicas=float(np.mean(replicas)),
                    eplb_replicas=num_devices * slots,
                )
            )
    return rows


def _split_tokens(trace: RoutingTrace) -> tuple[RoutingTrace, RoutingTrace]:
    half = trace.num_tokens // 2
    parts = []
    for tokens in (slice(0, half), slice(half, None)):
        parts.append(
            RoutingTrace(
                trace.expert_ids[:, tokens],
                trace.gate_weights[:, tokens],
                trace.num_experts,
                trace.layer_indices,
                trace.model,
                trace.source,
            )
        )
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------
# scale


@dataclass(frozen=True)
class TimingReport:
    num_devices: int
    num_experts: int
    num_tokens: int
    top_k: int
    place_and_traffic_s: float
    dispatch_schedule_s: float  # the combine schedule is its transpose (free)
    total_planned_and_scheduled_s: float
    rounds: int
    transfers: int
    makespan_over_bound: float  # bound: max_i max(row_i, col_i) / B_i
    baselines_s: dict[str, float]  # wall time of each baseline simulation; empty when skipped


def timing_report(
    num_devices: int = 256,
    num_experts: int = 256,
    tokens_per_device: int = 64,
    top_k: int = 8,
    skew: float = 1.0,
    seed: int = 0,
    baselines: bool = True,
    mixed: bool = False,
) -> TimingReport:
    """Wall time to place one layer and schedule its all-to-all on equal 100 Gbit/s ports, or with
    mixed, on Aurora's four port types (100/80/50/40 Gbit/s in equal numbers; case 2 placement)."""
    trace = zipf_trace(1, num_devices * tokens_per_device, num_experts, top_k, skew, 0.5, seed)
    ids = trace.expert_ids[0]
    if mixed:
        bandwidth = np.resize(np.array(AURORA_BANDWIDTHS_GBIT_S), num_devices) * GBIT_S
    else:
        bandwidth = np.full(num_devices, 100 * GBIT_S)
    start = time.perf_counter()
    load = np.bincount(ids.ravel(), minlength=num_experts).astype(np.float64)
    placement = place_exclusive(load, 1.0 / bandwidth)
    traffic = dispatch_traffic(ids, placement.shares, 8192, num_devices)
    placed = time.perf_counter()
    schedule = schedule_all_to_all(traffic, bandwidth)
    scheduled = time.perf_counter()
    baseline_times: dict[str, float] = {}
    if baselines:
        for policy in ("random_order", "shortest_first", "fair_share"):
            begin = time.perf_counter()
            simulate_baseline(traffic, bandwidth, policy, record=False)
            baseline_times[f"{policy}_s"] = time.perf_counter() - begin
    return TimingReport(
        num_devices=num_devices,
        num_experts=num_experts,
        num_tokens=trace.num_tokens,
        top_k=top_k,
        place_and_traffic_s=placed - start,
        dispatch_schedule_s=scheduled - placed,
        total_planned_and_scheduled_s=scheduled - start,
        rounds=schedule.num_rounds,
        transfers=schedule.num_transfers,
        makespan_over_bound=schedule.makespan_s / port_lower_bound_s(traffic, bandwidth),
        baselines_s=baseline_times,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shunter.reproduce.planner_figures", description=__doc__.split("\n")[0]
    )
    parser.add_argument("experiment", choices=["heterogeneous", "colocated", "replication", "timing"])
    parser.add_argument("--cases", type=int, help="random cases (heterogeneous: 1000, colocated: 1000)")
    parser.add_argument("--max-devices", type=int, default=7, help="colocated: n drawn in 2..this (<= 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=256, help="timing: devices")
    parser.add_argument("--experts", type=int, default=256, help="timing: experts")
    parser.add_argument("--no-baselines", action="store_true", help="timing: skip the baseline simulations")
    parser.add_argument("--mixed", action="store_true", help="timing: Aurora's four port types")
    args = parser.parse_args(argv)
    if args.experiment == "heterogeneous":
        result: object = asdict(heterogeneous_report(args.cases or 1000, args.seed))
    elif args.experiment == "colocated":
        result = asdict(colocated_gap_report(args.cases or 1000, args.seed, args.max_devices))
    elif args.experiment == "replication":
        result = [asdict(row) for row in replication_report(args.seed)]
    else:
        baselines = not args.no_baselines
        report = timing_report(
            args.devices, args.experts, seed=args.seed, baselines=baselines, mixed=args.mixed
        )
        result = asdict(report)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
