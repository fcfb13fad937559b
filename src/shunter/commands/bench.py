"""`shunter bench a2a --hosts N --bandwidth ... [--trace T.npz] [--plan P.json]`: measure each MoE
layer's dispatch + combine on an emulated cluster three ways (all_to_all_single, Shunter's
schedule, random order) beside the lower bound and the simulator's prediction. Needs root."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from shunter.commands.common import print_json
from shunter.dist.a2a import DEFAULT_ROW_BYTES
from shunter.dist.cluster import (
    DEFAULT_PORT,
    EmulatedCluster,
    check_environment,
    parse_host_bandwidths,
    run_on_cluster,
)
from shunter.errors import ShunterError
from shunter.model.loader import default_trace_path
from shunter.sim.predict import check_trace_against, read_plan
from shunter.trace.routing_trace import load_trace
from shunter.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks on this machine", description=__doc__)
    kinds = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    a2a = kinds.add_parser(
        "a2a",
        help="all-to-all strategies on an emulated cluster beside the bound and the simulator (root)",
        description="Run one rank per emulated host (network namespaces, each port shaped with tc) "
        "and time every MoE layer's dispatch + combine with all_to_all_single, Shunter's schedule "
        "and random order; median of --reps after --warmup, beside the lower bound and the "
        "simulator's prediction on the measured link efficiency and latency.",
    )
    a2a.add_argument("--hosts", type=int, required=True, help="number of emulated hosts (ranks)")
    a2a.add_argument(
        "--bandwidth",
        required=True,
        help="port rate of every host, or one per host "
        "(e.g. 400Mbit/s or 400Mbit/s,320Mbit/s,200Mbit/s,160Mbit/s)",
    )
    a2a.add_argument("--trace", default=None, help="routing trace .npz (default: the built-in model's)")
    a2a.add_argument(
        "--plan", default=None, help="a plan from `shunter plan --out` (exclusive): its placement per layer"
    )
    a2a.add_argument("--layers", type=int, default=2, help="MoE layers of the trace to run (default 2)")
    a2a.add_argument("--tokens", type=int, default=2048, help="tokens per layer (default 2048)")
    a2a.add_argument(
        "--row-bytes",
        type=int,
        default=DEFAULT_ROW_BYTES,
        help=f"bytes of one token on the wire (default {DEFAULT_ROW_BYTES}: hidden 4096 in bf16)",
    )
    a2a.add_argument("--reps", type=int, default=5, help="timed repetitions per strategy (default 5)")
    a2a.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    a2a.add_argument(
        "--probe-bytes",
        type=int,
        default=4 << 20,
        help="bytes per flow of the calibration probes (default 4 MiB)",
    )
    a2a.add_argument(
        "--max-lanes",
        type=int,
        default=16,
        help="lanes per port Shunter's schedule may use on mixed ports (default 16; 1: plain matchings)",
    )
    a2a.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may wait")
    a2a.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"rendezvous port (default {DEFAULT_PORT})"
    )
    a2a.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a2a.add_argument("--out", default=None, help="also write the JSON result to this file")
    a2a.set_defaults(func=run_a2a)


def run_a2a(args: argparse.Namespace) -> int:
    if args.hosts < 2:
        raise ShunterError(f"--hosts: an all-to-all needs at least 2 hosts, got {args.hosts}")
    if args.reps < 1 or args.warmup < 0 or args.layers < 1 or args.tokens < 1 or args.max_lanes < 1:
        raise ShunterError(
            "--reps, --layers, --tokens and --max-lanes must be at least 1, --warmup at least 0"
        )
    bandwidth = parse_host_bandwidths(args.bandwidth, args.hosts)
    trace_path = Path(args.trace) if args.trace else default_trace_path()
    trace = load_trace(trace_path)
    placements = _plan_placements(args.plan, trace, args.hosts, trace_path) if args.plan else None
    check_environment()

    with tempfile.TemporaryDirectory(prefix="shunter-a2a-") as scratch:
        result_path = Path(scratch) / "result.json"
        command = [
            sys.executable, "-m", "shunter.dist.a2a",
            "--trace", str(trace_path.resolve()),
            "--layers", str(args.layers), "--tokens", str(args.tokens), "--row-bytes", str(args.row_bytes),
            "--reps", str(args.reps), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
            "--probe-bytes", str(args.probe_bytes), "--max-lanes", str(args.max_lanes),
            "--out", str(result_path),
        ]  # fmt: skip
        if placements is not None:
            placement_path = Path(scratch) / "placement.json"
            placement_path.write_text(json.dumps(placements))
            command += ["--placement", str(placement_path)]
        # c10d warns that namespaces have no hostnames; nothing a user can act on.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        with EmulatedCluster(args.hosts, bandwidth) as cluster:
            # Rank output (progress, errors) goes to stderr so that --json stdout stays one object.
            status = run_on_cluster(cluster, command, port=args.port, out=sys.stderr, err=sys.stderr)
        if status != 0:
            raise ShunterError(f"the benchmark ranks failed (exit status {status}); their output is above")
        report = json.loads(result_path.read_text())
    if args.out:
        partial = Path(args.out).with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(args.out)
    if args.json:
        print_json(report)
    else:
        print_a2a_table(report)
    return 0


def _plan_placements(plan_path: str, trace, hosts: int, trace_path: Path) -> list[list[int]]:
    try:
        document = json.loads(Path(plan_path).read_text())
    except (OSError, ValueError) as exc:
        raise ShunterError(f"{plan_path}: cannot read the plan: {exc}") from None
    plan = read_plan(document, plan_path)
    if plan.num_devices != hosts:
        raise ShunterError(
            f"{plan_path}: the plan places experts on {plan.num_devices} devices but --hosts is {hosts}; "
            f"make a plan for {hosts} devices"
        )
    check_trace_against(plan, trace, str(trace_path))
    placements = []
    for layer, shares in enumerate(plan.shares_a):
        if plan.mode != "exclusive" or not np.all((shares == 0) | (shares == 1)):
            raise ShunterError(
                f"{plan_path}: layers[{layer}]: only exclusive placements (each expert on one device) "
                f"run here; this plan is {plan.mode}"
            )
        placements.append(shares.argmax(axis=1).tolist())
    return placements


def print_a2a_table(report: dict) -> None:
    calibration = report["calibration"]
    rates = ", ".join(f"{b * 8 / 1e6:g}" for b in report["bandwidth_bytes_s"])
    print(
        f"{report['hosts']} hosts, ports {rates} Mbit/s; one flow sustains {calibration['efficiency']:.3f} "
        f"of the shaped rate, all pairs at once {calibration['concurrent_efficiency']:.3f} of that after "
        f"{calibration['concurrent_startup_s'] * 1e3:.0f} ms, one flow per port "
        f"{calibration['matching_efficiency']:.3f} after {calibration['round_startup_s'] * 1e3:.1f} ms "
        "a round; "
        "latency "
        f"{calibration['latency_s'] * 1e6:.0f} us; {report['tokens_per_layer']} tokens "
        f"x {report['row_bytes']} B per layer; median of {report['reps']} after {report['warmup']} warm-up"
    )
    for layer in report["layers"]:
        print(
            f"\nlayer {layer['layer']}: {format_bytes(layer['remote_bytes'])} crosses the network each way; "
            f"lower bound {layer['lower_bound_s'] * 1e3:.1f} ms (dispatch + combine)"
        )
        print(f"  {'strategy':<13} {'measured':>10} {'predicted':>10} {'pred/meas':>9} {'x bound':>8}")
        for name, s in layer["strategies"].items():
            print(
                f"  {name:<13} {s['median_s'] * 1e3:>8.1f}ms {s['predicted_s'] * 1e3:>8.1f}ms "
                f"{s['predicted_over_measured']:>9.3f} {s['over_bound']:>8.3f}"
            )
        print(
            f"  schedule speedup: {layer['speedup_over_all_to_all']:.2f}x over all_to_all_single, "
            f"{layer['speedup_over_random_order']:.2f}x over random order"
        )
