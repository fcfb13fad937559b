"""`shunter schedule TRAFFIC.npy --bandwidth 100Gbit/s[,...]`: schedule one all-to-all of a raw
n x n matrix of bytes, next to its lower bound and three transports without a plan."""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from shunter.errors import ShunterError
from shunter.plan.planner import plan_all_to_all
from shunter.plan.traffic import check_traffic_matrix
from shunter.units import flag_type, format_bytes, parse_rates, parse_seed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="schedule an all-to-all given as an n x n matrix of bytes (.npy)",
        description="Schedule an all-to-all (matrix of bytes from device i to device j, .npy) as rounds "
        "of matchings; print its makespan, the lower bound and the makespans of random order, "
        "shortest first and fair-share transports.",
    )
    parser.add_argument("traffic", help="an n x n .npy matrix: bytes from device i (row) to device j")
    parser.add_argument(
        "--bandwidth",
        required=True,
        help="port bandwidth: one for every device or a comma-separated list, one per device "
        "(e.g. 100Gbit/s or 100Gbit/s,100Gbit/s,50Gbit/s,50Gbit/s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--no-baselines", action="store_true", help="skip the three baseline simulations")
    parser.add_argument(
        "--seed", type=flag_type(parse_seed), default=0, help="seed of the random-order baseline (default 0)"
    )
    parser.set_defaults(func=run)


def load_traffic(path: str | Path) -> np.ndarray:
    """[n, n] float64 bytes from a .npy file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ShunterError(f"{path}: traffic file not found")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ShunterError(f"{path}: not a .npy matrix of bytes: {exc}") from None
    if not isinstance(matrix, np.ndarray):
        raise ShunterError(f"{path}: expected one .npy matrix, found an archive of several arrays")
    return check_traffic_matrix(matrix, str(path))


def parse_bandwidths(text: str, num_devices: int, field: str = "--bandwidth") -> np.ndarray:
    """[n] bytes/s from '100Gbit/s' (every device) or 'a,b,c,...' (one per device)."""
    return np.array(parse_rates(text, num_devices, field, "devices"))


def run(args: argparse.Namespace) -> int:
    traffic = load_traffic(args.traffic)
    n = traffic.shape[0]
    bandwidth = parse_bandwidths(args.bandwidth, n)
    plan = plan_all_to_all(traffic, bandwidth, baselines=not args.no_baselines, seed=args.seed)
    result = {
        "traffic": str(args.traffic),
        "devices": n,
        "total_bytes": float(traffic.sum() - np.trace(traffic)),
        "bandwidth_bytes_s": bandwidth.tolist(),
        "makespan_s": plan.makespan_s,
        "lower_bound_s": plan.lower_bound_s,
        "rounds": plan.schedule.num_rounds,
        "transfers": plan.schedule.num_transfers,
        "strategy": plan.schedule.strategy,
        "baselines": {key: float(value) for key, value in plan.baselines_s.items()},
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    equal = bool(np.all(bandwidth == bandwidth[0]))
    ports = f"{bandwidth[0] * 8 / 1e9:g} Gbit/s each" if equal else "unequal ports"
    print(f"{args.traffic}: {n} devices, {format_bytes(result['total_bytes'])} to move, {ports}")
    rows = [
        ("lower bound", plan.lower_bound_s),
        (f"planned ({plan.schedule.strategy}, {plan.schedule.num_rounds} rounds)", plan.makespan_s),
    ]
    names = {
        "random_order_s": "random order (RCS)",
        "shortest_first_s": "shortest first (SJF)",
        "fair_share_s": "fair share, all at once",
    }
    rows += [(names[key], value) for key, value in plan.baselines_s.items()]
    width = max(len(name) for name, _ in rows)
    print(f"{'schedule':<{width}}  {'makespan':>12}  {'vs bound':>8}")
    for name, seconds in rows:
        ratio = seconds / plan.lower_bound_s if plan.lower_bound_s > 0 else 1.0
        print(f"{name:<{width}}  {_format_seconds(seconds):>12}  {ratio:>8.3f}")
    return 0


def _format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"
