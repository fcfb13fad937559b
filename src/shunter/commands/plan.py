"""`shunter plan --cluster C.toml --trace T.npz`: place experts and schedule every layer's all-to-alls."""

from __future__ import annotations

import argparse
import json
import math
import sys

from shunter.errors import ShunterError
from shunter.model.loader import default_trace_path
from shunter.plan.cluster import ClusterSpec, load_cluster
from shunter.plan.document import document_from_plan, model_info_of_trace, write_plan
from shunter.plan.planner import (
    DEFAULT_BYTES_PER_TOKEN,
    DEFAULT_FLOPS_PER_TOKEN,
    ClusterPlan,
    LayerPlan,
    PlanOptions,
    plan_colocated,
    plan_exclusive,
)
from shunter.trace.routing_trace import load_trace
from shunter.units import flag_type, parse_bytes, parse_number, parse_seed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="place experts on a cluster and schedule each layer's all-to-alls",
        description="Place a model's experts (or two models' experts, --colocate) on the devices of a "
        "cluster and schedule every MoE layer's dispatch and combine all-to-alls; print per layer the "
        "planned time next to the lower bound and to transports and placements without a plan.",
    )
    parser.add_argument("--cluster", required=True, help="cluster TOML (see docs/planner.md)")
    parser.add_argument(
        "--trace",
        default=None,
        help="routing trace (.npz) of the model to place (default: the built-in model's)",
    )
    parser.add_argument("--colocate", metavar="TRACE", help="a second model's trace: share the devices")
    parser.add_argument("--replicate", action="store_true", help="replicate hot experts per layer (Lina)")
    parser.add_argument(
        "--profile", metavar="TRACE", help="trace that trains the replication estimator (default: --trace)"
    )
    parser.add_argument("--path-length", type=int, default=3, help="Lina estimator path length (default 3)")
    parser.add_argument(
        "--bytes-per-token",
        default=str(DEFAULT_BYTES_PER_TOKEN),
        help=f"bytes of one token on the wire, e.g. 8KiB (default {DEFAULT_BYTES_PER_TOKEN}: 4096 x bf16)",
    )
    parser.add_argument(
        "--flops-per-token",
        type=flag_type(parse_number, above=0),
        default=float(DEFAULT_FLOPS_PER_TOKEN),
        help=f"expert FLOPs per token (default {DEFAULT_FLOPS_PER_TOKEN:.3g}: SwiGLU 4096 -> 14336)",
    )
    parser.add_argument("--max-experts-per-device", type=int, help="memory limit, in experts per device")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baseline simulations")
    parser.add_argument(
        "--seed", type=flag_type(parse_seed), default=0, help="seed of the random baselines (default 0)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--out", help="write the plan (JSON) to this file")
    parser.add_argument(
        "--include-schedules", action="store_true", help="put every round of every schedule into the plan"
    )
    parser.set_defaults(func=run, outputs={"out": "file"})


def run(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster)
    if args.trace is None:
        args.trace = str(default_trace_path())
    trace = load_trace(args.trace)
    options = _options(args)
    models = [trace]
    if args.colocate:
        if args.replicate:
            raise ShunterError("--replicate and --colocate cannot be combined (Lina replicates one model)")
        models.append(load_trace(args.colocate))
        plan = plan_colocated(cluster, trace, models[1], options)
    else:
        profile = load_trace(args.profile) if args.profile else None
        if profile is not None and profile.num_experts != trace.num_experts:
            raise ShunterError(
                f"{args.profile}: num_experts is {profile.num_experts}, {args.trace} has {trace.num_experts}"
            )
        plan = plan_exclusive(cluster, trace, options, profile=profile)
    document = document_from_plan(
        plan,
        tuple(model_info_of_trace(t) for t in models),
        {"cluster": str(args.cluster), "trace": str(args.trace), "colocate": args.colocate},
        include_rounds=args.include_schedules,
    )
    if args.out:
        write_plan(document, args.out)
    if args.json:
        json.dump(document.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(plan, args)
        if args.out:
            print(f"plan written to {args.out}")
    return 0


def _options(args: argparse.Namespace) -> PlanOptions:
    bytes_per_token = parse_bytes(args.bytes_per_token, "--bytes-per-token")
    if bytes_per_token <= 0:
        raise ShunterError(f"--bytes-per-token: must be positive, got {args.bytes_per_token!r}")
    if not args.flops_per_token > 0 or not math.isfinite(args.flops_per_token):
        raise ShunterError(f"--flops-per-token: must be a positive number, got {args.flops_per_token!r}")
    if args.path_length < 0:
        raise ShunterError(f"--path-length: must be >= 0, got {args.path_length}")
    if args.max_experts_per_device is not None and args.max_experts_per_device < 1:
        raise ShunterError(f"--max-experts-per-device: must be >= 1, got {args.max_experts_per_device}")
    return PlanOptions(
        bytes_per_token=bytes_per_token,
        flops_per_token=args.flops_per_token,
        replicate=args.replicate,
        path_length=args.path_length,
        max_experts_per_device=args.max_experts_per_device,
        baselines=not args.no_baselines,
        seed=args.seed,
    )


def _describe_cluster(cluster: ClusterSpec) -> str:
    groups: dict[tuple[float, float], int] = {}
    for device in cluster.devices:
        key = (device.bandwidth_bytes_s, device.compute_flop_s)
        groups[key] = groups.get(key, 0) + 1
    parts = [
        f"{count} x ({bandwidth * 8 / 1e9:g} Gbit/s, {compute / 1e12:g} TFLOP/s)"
        for (bandwidth, compute), count in groups.items()
    ]
    return f"{cluster.num_devices} devices: " + ", ".join(parts)


def print_table(plan: ClusterPlan, args: argparse.Namespace) -> None:
    """One row per layer: all-to-all time (dispatch + combine) planned, its bound and the baselines on
    the planned placement, then the whole layer against the reference without a plan."""
    print(f"cluster {args.cluster}: {_describe_cluster(plan.cluster)}")
    first = plan.layers[0]
    strategy = first.placement.get("strategy", "")
    print(f"mode: {plan.mode}; placement: {strategy}; reference: {first.reference_name}")
    print("a2a = dispatch + combine all-to-all; fair/RCS/SJF = transports without a schedule, same placement")
    columns = ["layer", "a2a ms", "bound ms", "fair ms", "RCS ms", "SJF ms", "vs fair", "vs SJF"]
    columns += ["layer ms", "util", "ref ms", "ref util", "speedup"]
    if plan.mode == "replicated":
        columns += ["load none", "load lina", "load eplb"]
    rows = [_layer_row(layer) for layer in plan.layers]
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    planned = sum(layer.layer_time_s for layer in plan.layers)
    reference = sum(layer.reference_layer_time_s for layer in plan.layers)
    print(
        f"total: {_ms(planned)} ms planned, {_ms(reference)} ms reference, "
        f"speedup {_ratio(reference, planned)}"
    )
    if plan.mode == "replicated":
        print("load = max/mean tokens per device: no replication, Lina, EPLB-style")


def _layer_row(layer: LayerPlan) -> list[str]:
    a2a = layer.dispatch.makespan_s + layer.combine.makespan_s
    bound = layer.dispatch.lower_bound_s + layer.combine.lower_bound_s

    def both(key: str) -> float:
        d, c = layer.dispatch.baselines_s, layer.combine.baselines_s
        return d[key] + c[key] if key in d else math.nan

    fair, rcs, sjf = both("fair_share_s"), both("random_order_s"), both("shortest_first_s")
    row = [str(layer.layer), *(_ms(t) for t in (a2a, bound, fair, rcs, sjf))]
    row += [_ratio(fair, a2a), _ratio(sjf, a2a), _ms(layer.layer_time_s), f"{layer.utilisation:.2f}"]
    reference_utilisation = layer.reference_utilisation
    row += [
        _ms(layer.reference_layer_time_s),
        "-" if math.isnan(reference_utilisation) else f"{reference_utilisation:.2f}",
        _ratio(layer.reference_layer_time_s, layer.layer_time_s),
    ]
    if layer.replication is not None:
        loads = layer.replication["max_over_mean_load"]
        assert isinstance(loads, dict)
        row += [f"{loads[key]:.2f}" for key in ("none", "lina", "eplb")]
    return row


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 and not math.isnan(numerator) else "-"
