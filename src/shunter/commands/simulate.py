"""`shunter simulate --cluster C.toml --plan plan.json`: predict a plan's layer times on a cluster."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from shunter.errors import ShunterError
from shunter.units import parse_seconds

FAIR_SHARE_MAX_DEVICES = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="predict a plan (from `shunter plan --out`) on a cluster, layer by layer",
        description="Rebuild every layer's traffic and compute from the plan's placement and the routing "
        "trace, run the layer timelines (gate, dispatch, experts, combine, aggregation; colocated models "
        "interleaved as in Aurora) with the plan's matching schedules and per-message latency, and "
        "beside them every flow at once with max-min fair sharing. Prints per-layer times, GPU "
        "utilisation and whether the experts fit in device memory.",
    )
    parser.add_argument("--cluster", required=True, help="cluster TOML (see docs/planner.md)")
    parser.add_argument("--plan", required=True, help="plan JSON written by `shunter plan --out`")
    parser.add_argument("--trace", help="routing trace (.npz); default: the trace the plan names")
    parser.add_argument("--colocate", metavar="TRACE", help="second model's trace of a colocated plan")
    parser.add_argument(
        "--latency", default="5us", help="per-message latency, e.g. 5us, 0.01ms, 0 (default 5us)"
    )
    parser.add_argument(
        "--efficiency",
        type=float,
        default=1.0,
        help="share of peak FLOP/s compute reaches (default 1.0)",
    )
    parser.add_argument(
        "--compute-profile",
        metavar="JSON",
        help='measured op times: {"expert": {"tokens": [...], "seconds": [...]}, ...} (ops: attention, '
        "gate, expert, aggregation); replaces the FLOP estimate for the ops it names",
    )
    parser.add_argument(
        "--fair-share",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run every all-to-all with all flows at once, max-min fair (default: up to "
        f"{FAIR_SHARE_MAX_DEVICES} devices; it is slow beyond)",
    )
    parser.add_argument(
        "--rebuild-schedules",
        action="store_true",
        help="schedule every layer again instead of using the plan's makespan and rounds",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", metavar="FILE", help="draw per-layer times to this .png, .pdf or .svg")
    parser.set_defaults(func=run, outputs={"plot": "figure"})


def _plan_trace(plan, plan_path: Path, given: str | None, key: str, model: str) -> tuple[object, Path]:
    """The trace of a plan's model `model` ("a", or "b" when colocated): the path given by --trace /
    --colocate, else the one the plan names under inputs.`key`; checked against the plan."""
    from shunter.plan.document import check_trace_against
    from shunter.trace.routing_trace import load_trace

    if given:
        path = Path(given)
    else:
        named = plan.trace_path if key == "trace" else plan.colocate_path
        if named is None:
            what = "inputs.trace is missing" if key == "trace" else "a colocated plan needs the second trace"
            raise ShunterError(f"{plan_path}: {what}; pass --{key}")
        path = _resolve(named, plan_path, f"inputs.{key}")
    trace = load_trace(path)
    check_trace_against(plan, trace, str(path), model=model)
    return trace, path


def _resolve(path_text: str, plan_path: Path, field: str) -> Path:
    """A path the plan names: as written, else relative to the plan's folder."""
    path = Path(path_text)
    if path.is_file():
        return path
    beside = plan_path.parent / path
    if not path.is_absolute() and beside.is_file():
        return beside
    raise ShunterError(
        f"{plan_path}: {field} names {path_text}, which does not exist; pass it with --trace/--colocate"
    )


def run(args: argparse.Namespace) -> int:
    from shunter.plan.cluster import load_cluster
    from shunter.plan.document import check_plan_against, load_plan
    from shunter.sim.cost import ComputeModel, parse_compute_profile
    from shunter.sim.predict import SimulateOptions, predict_plan

    latency_s = parse_seconds(args.latency, "--latency")
    if not 0 < args.efficiency <= 1 or not math.isfinite(args.efficiency):
        raise ShunterError(f"--efficiency: expected a share in (0, 1], got {args.efficiency}")
    cluster = load_cluster(args.cluster)
    plan_path = Path(args.plan)
    plan = load_plan(plan_path)
    notes = check_plan_against(plan, cluster, args.cluster)
    trace, trace_path = _plan_trace(plan, plan_path, args.trace, "trace", "a")
    colocated = None
    if plan.mode == "colocated":
        colocated, _ = _plan_trace(plan, plan_path, args.colocate, "colocate", "b")
    profile = None
    if args.compute_profile:
        profile_path = Path(args.compute_profile)
        if not profile_path.is_file():
            raise ShunterError(f"{profile_path}: compute profile not found")
        try:
            profile = parse_compute_profile(
                json.loads(profile_path.read_text(encoding="utf-8")), str(profile_path)
            )
        except json.JSONDecodeError as exc:
            raise ShunterError(f"{profile_path}: not valid JSON: {exc}") from None
    fair_share = args.fair_share
    if fair_share is None:
        fair_share = cluster.num_devices <= FAIR_SHARE_MAX_DEVICES
        if not fair_share:
            notes.append(
                f"fair-share comparison skipped above {FAIR_SHARE_MAX_DEVICES} devices (--fair-share to "
                "run it)"
            )
    options = SimulateOptions(
        latency_s=latency_s,
        compute=ComputeModel(efficiency=args.efficiency, profile=profile),
        fair_share=fair_share,
        rebuild_schedules=args.rebuild_schedules,
    )
    prediction = predict_plan(plan, cluster, trace, options, colocated, notes)
    result = prediction.to_dict()
    result["inputs"] = {"cluster": str(args.cluster), "plan": str(plan_path), "trace": str(trace_path)}
    result["latency_s"] = latency_s
    result["efficiency"] = args.efficiency
    if args.plot:
        from shunter.sim.plots import plot_plan_prediction

        plot_plan_prediction(prediction, Path(args.plot))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_table(prediction, cluster, args, latency_s)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f}"


def _print_table(prediction: object, cluster: object, args: argparse.Namespace, latency_s: float) -> None:
    from shunter.commands.plan import _describe_cluster
    from shunter.units import format_bytes

    p = prediction
    print(
        f"plan {args.plan} ({p.mode}, {len(p.layers)} layers) on {args.cluster}: {_describe_cluster(cluster)}"
    )
    print(
        f"network: big switch, {latency_s * 1e6:g} us per message; planned = the plan's matching schedules "
        f"round by round; fair = every flow at once, max-min fair; compute at {args.efficiency:.0%} of peak"
    )
    for note in p.notes:
        print(f"note: {note}")
    columns = [
        "layer",
        "a2a ms",
        "rounds",
        "fair a2a ms",
        "compute ms",
        "layer ms",
        "fair layer ms",
        "util",
        "plan said ms",
    ]
    rows = [
        [
            str(r.layer),
            _ms(r.a2a_planned_s),
            str(r.rounds),
            _ms(r.a2a_fair_share_s),
            _ms(r.compute_s),
            _ms(r.layer_planned_s),
            _ms(r.layer_fair_share_s),
            f"{r.utilisation:.3f}",
            _ms(r.plan_layer_s),
        ]
        for r in p.layers
    ]
    widths = [max(len(c), *(len(row[k]) for row in rows)) for k, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    line = f"forward through all layers: {_ms(p.total_planned_s)} ms planned"
    if p.total_fair_share_s is not None:
        line += f", {_ms(p.total_fair_share_s)} ms fair share"
    if p.colocated_sequential_s is not None:
        line += f"; models one after the other: {_ms(p.colocated_sequential_s)} ms"
    print(line + f"; GPU utilisation {p.utilisation:.3f}")
    worst = int((p.expert_bytes_per_device / p.memory_bytes).argmax())
    verdict = "fits" if p.fits else "DOES NOT FIT"
    print(
        f"memory: experts of every layer take up to {format_bytes(p.expert_bytes_per_device[worst])} of "
        f"{format_bytes(p.memory_bytes[worst])} (device {worst}): {verdict}"
    )
    if p.mode == "colocated":
        print(
            "colocated (Aurora Table 2 interleaving): planned = each model's all-to-all on its own schedule, "
            "one at a time; fair = the two models' all-to-alls share the ports when they overlap"
        )
    else:
        print(
            "layer = gate + dispatch + experts + combine + aggregation; 'plan said' is the planner's "
            "figure (no latency, no gate or aggregation)"
        )
