"""`shunter cluster run --hosts N --bandwidth 1Gbit/s[,...] -- COMMAND ...`: run a distributed program
(one rank per emulated host, torchrun's variables) on network namespaces whose links are shaped to
the given bandwidths; `shunter cluster clean` removes what a killed run left behind. Needs root."""

from __future__ import annotations

import argparse
import sys

from shunter.errors import ShunterError
from shunter.parallel.cluster import (
    DEFAULT_CONGESTION_CONTROL,
    DEFAULT_PORT,
    ClusterInterrupted,
    EmulatedCluster,
    check_environment,
    clean_leftovers,
    parse_host_bandwidths,
    parse_latency,
)
from shunter.parallel.launch import DEFAULT_GRACE_S, run_on_cluster
from shunter.units import flag_type, parse_number


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="run a distributed program on an emulated cluster with shaped links (needs root)",
        description="Emulate a cluster on this machine: one network namespace per host behind a "
        "switch, every host's port shaped to its bandwidth. Needs root.",
    )
    actions = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    run_parser = actions.add_parser(
        "run",
        help="run COMMAND once per host, as torchrun would, with each host's link shaped",
        description="Create N hosts (network namespaces on one switch, each port shaped to its "
        "bandwidth in both directions), run COMMAND once per host with torchrun's variables (RANK, "
        "WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), stream every rank's output prefixed "
        "'[host i] ', and remove the hosts when it ends, fails or is interrupted.",
    )
    run_parser.add_argument("--hosts", type=int, required=True, help="number of hosts (ranks), 1 to 254")
    run_parser.add_argument(
        "--bandwidth",
        required=True,
        help="each host's port bandwidth, both directions: one for every host or a comma-separated "
        "list, one per host (e.g. 1Gbit/s or 1Gbit/s,1Gbit/s,200Mbit/s)",
    )
    run_parser.add_argument(
        "--latency",
        default="0ms",
        help="one-way delay between hosts, added once to every packet (a round trip takes twice it; "
        "e.g. 5ms; default 0ms); needs the kernel's netem qdisc",
    )
    add_congestion_control_argument(run_parser)
    run_parser.add_argument(
        "--timeout",
        type=flag_type(parse_number, minimum=0),
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help="once a rank fails, how long the others get to exit on their own before they are killed "
        f"(default {DEFAULT_GRACE_S:g})",
    )
    run_parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"MASTER_PORT (default {DEFAULT_PORT})"
    )
    run_parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the program every rank runs, e.g. -- python train.py --epochs 1",
    )
    run_parser.set_defaults(func=run)
    clean_parser = actions.add_parser(
        "clean",
        help="remove the namespaces of cluster runs that were killed before they could clean up",
        description="Remove the network namespaces and links that `shunter cluster run` left behind "
        "(after SIGKILL, say). Those of a run whose process is still alive are kept unless --force.",
    )
    clean_parser.add_argument(
        "--force", action="store_true", help="also remove those of runs that are still alive"
    )
    clean_parser.set_defaults(func=clean)


def add_congestion_control_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--congestion-control",
        default=DEFAULT_CONGESTION_CONTROL,
        metavar="NAME",
        help=f"every host's TCP congestion control (default {DEFAULT_CONGESTION_CONTROL}: loss-based "
        "like Linux's default; bbr stalls when queues delay its ACKs, see docs/distributed.md)",
    )


def run(args: argparse.Namespace) -> int:
    check_environment()
    if args.hosts < 1:
        raise ShunterError(f"--hosts: need at least 1 host, got {args.hosts}")
    bandwidths = parse_host_bandwidths(args.bandwidth, args.hosts)
    latency_s = parse_latency(args.latency)
    if not args.timeout >= 0:
        raise ShunterError(f"--timeout: must not be negative, got {args.timeout:g}")
    if not 1 <= args.port <= 65535:
        raise ShunterError(f"--port: must be between 1 and 65535, got {args.port}")
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ShunterError("COMMAND: nothing to run; give it after `--`, e.g. -- python train.py")
    try:
        with EmulatedCluster(args.hosts, bandwidths, latency_s, args.congestion_control) as cluster:
            return run_on_cluster(cluster, command, args.port, args.timeout)
    except ClusterInterrupted as exc:
        print(f"shunter: interrupted by {exc}; stopped the ranks and removed the cluster", file=sys.stderr)
        return 128 + exc.signum


def clean(args: argparse.Namespace) -> int:
    check_environment()
    report = clean_leftovers(force=args.force)
    if report.killed:
        print(f"killed {len(report.killed)} leftover rank processes: {' '.join(map(str, report.killed))}")
    for name in report.removed:
        print(f"removed network namespace {name}")
    for name in report.kept:
        print(f"kept network namespace {name}: the run that made it is still alive (--force removes it)")
    if not report.removed and not report.kept:
        print("nothing to remove")
    return 0
