"""The all-to-all benchmark's ranks: measure one MoE layer's dispatch + combine all-to-alls on a
real process group, three ways, beside the lower bound and the simulator's prediction for the
same traffic.

Run one process per host (`shunter bench a2a` launches it on the emulated cluster; torchrun works
too):

    python -m shunter.bench.a2a --trace T.npz --bandwidth 400Mbit/s --out result.json

Per MoE layer of the trace: tokens start evenly spread over the ranks (`token_home_devices`),
each (token, choice) goes to the rank holding its expert (a plan's exclusive placement, or even
blocks), and rows [n, n] of `row_bytes` each follow. Each strategy runs `warmup` + `reps` times,
interleaved so drift hits all alike; a rep's time is the slowest rank's, between barriers.

The simulator is told what the network sustains, measured first on the same group: each ordered
pair alone moves a probe (the efficiency of a port: measured rate / shaped rate, median over
pairs) and a tiny message ping-pongs (the per-message latency). Predictions then use
`shunter.network.cost.all_to_all_time_s` with that calibration (`shunter.network.calibration`
fits it from the times measured here). The lower bound is `port_lower_bound_s` at the same
sustained rates (and, for reference, at the shaped rates).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import ShunterError
from shunter.model.loader import default_trace_path
from shunter.network.bounds import port_lower_bound_s
from shunter.network.calibration import (
    LinkCalibration,
    fit_port_share,
    fit_round_startup,
    fit_startup_and_efficiency,
    most_contended_seed,
)
from shunter.network.cost import RoundCost, all_to_all_time_s, fair_share_time_s, sender_queue_time_s
from shunter.network.transport import STRATEGIES, TRANSPORT_OF_STRATEGY, Strategy
from shunter.parallel.cluster import parse_host_bandwidths
from shunter.parallel.exchange import Links, exchange, open_links, plan_exchange
from shunter.parallel.moe import as_slots, contiguous_placement, rows_between_ranks
from shunter.parallel.runtime import init_from_environment, run_rank
from shunter.plan.schedule import Schedule, merge_rounds, schedule_all_to_all
from shunter.plan.slots import ExpertSlots, read_slots
from shunter.plan.traffic import routed_counts
from shunter.shapes import MIXTRAL_8X7B
from shunter.trace.routing_trace import load_trace

BANDWIDTH_VARIABLE = "SHUNTER_CLUSTER_BANDWIDTHS"  # bytes/s per host, set by `shunter cluster run`
DEFAULT_ROW_BYTES = MIXTRAL_8X7B.token_bytes  # one Mixtral-sized hidden state in bf16 (8192)
ELEMENT = torch.float32  # rows are opaque bytes on the wire; fp32 is what every backend moves
CALIBRATION_SCALES = (1, 2, 4)  # probe sizes of each calibration pattern, in probe units
CALIBRATION_REPS = 5


def layer_rows(expert_ids: np.ndarray, placement: ExpertSlots | np.ndarray, num_ranks: int) -> np.ndarray:
    """[n, n] int64 rows from rank i to rank j for one layer's choices expert_ids [N, k] under a
    placement (slots, or an exclusive device_of_expert [E])."""
    num_experts = placement.num_experts if isinstance(placement, ExpertSlots) else len(placement)
    counts = routed_counts(expert_ids, num_experts, num_ranks)
    return rows_between_ranks(counts, placement)


def calibrate(
    rank: int, world: int, bandwidth: np.ndarray, probe_bytes: int, links: Links, group=None
) -> LinkCalibration:
    """Time each ordered pair alone (probe_bytes) and a 4-byte ping-pong between ranks 0 and 1, then
    fit the all-pairs, one-flow-per-port and random-order patterns (the point-to-point ones sent
    over `links`, as the strategies are)."""
    probe = torch.empty(max(probe_bytes // 4, 1), dtype=ELEMENT)
    efficiency = np.ones((world, world))
    # Twice over: the first pass warms every connection up; the second is kept.
    for src, dst in 2 * [(s, d) for s in range(world) for d in range(world) if s != d]:
        dist.barrier(group)
        started = time.perf_counter()
        if rank == src:
            dist.send(probe, dst, group=group)
            dist.recv(probe[:1], dst, group=group)  # the receiver's acknowledgement
        elif rank == dst:
            dist.recv(probe, src, group=group)
            dist.send(probe[:1], src, group=group)
        own = time.perf_counter() - started if rank == src else 0.0
        (elapsed,) = _slowest([own], group)
        efficiency[src, dst] = probe.numel() * 4 / elapsed / min(bandwidth[src], bandwidth[dst])
    tiny = torch.zeros(1, dtype=ELEMENT)
    round_trips = []
    dist.barrier(group)
    for _ in range(30):
        started = time.perf_counter()
        if rank == 0:
            dist.send(tiny, 1, group=group)
            dist.recv(tiny, 1, group=group)
        elif rank == 1:
            dist.recv(tiny, 0, group=group)
            dist.send(tiny, 0, group=group)
        round_trips.append(time.perf_counter() - started)
    (latency,) = _slowest([float(np.median(round_trips[5:])) / 2 if rank == 0 else 0.0], group)
    off = float(np.median(efficiency[~np.eye(world, dtype=bool)]))

    # Every pair at once (all_to_all), one flow per port (a shift permutation, scheduled) and every
    # pair in random order, each at CALIBRATION_SCALES sizes: time = startup + fluid time / efficiency.
    every_pair = np.ones((world, world), dtype=np.int64)
    shift = np.roll(np.eye(world, dtype=np.int64), 1, axis=1)  # rank i -> rank i + 1
    rates = bandwidth * off
    uniform_efficiency, startup = _fit_pattern(
        rank, every_pair, probe.numel(), "all_to_all",
        lambda rows: fair_share_time_s(rows * 4.0, rates, 0.0), bandwidth, links, group,
    )  # fmt: skip
    concurrent = fit_port_share(every_pair * probe.numel() * 4.0, rates, "fair_share", uniform_efficiency)
    matching, _ = _fit_pattern(
        rank, shift, probe.numel(), "scheduled",
        lambda rows: schedule_all_to_all(rows * 4.0, rates).makespan_s, bandwidth, links, group,
    )  # fmt: skip
    largest = every_pair * probe.numel() * max(CALIBRATION_SCALES)
    round_startup = _fit_round_startup(rank, largest, bandwidth, links, group)
    all_at_once, _ = _fit_pattern(
        rank, every_pair, probe.numel(), "scheduled",
        lambda rows: port_lower_bound_s(rows * 4.0, rates), bandwidth, links, group,
    )  # fmt: skip
    shared = 1.0
    if world >= 3:
        shared = _fit_shared_port_efficiency(rank, every_pair, probe.numel(), bandwidth, off, links, group)
    return LinkCalibration(
        off, latency, concurrent, startup, matching, round_startup, shared, efficiency.round(4).tolist(),
        min(all_at_once / matching, 1.0),
    )  # fmt: skip


def _one_round(traffic_bytes: np.ndarray, bandwidth: np.ndarray) -> Schedule:
    """Every transfer of the schedule at once, as one round (one flow per port stays one round)."""
    schedule = schedule_all_to_all(traffic_bytes, bandwidth)
    return merge_rounds(schedule, bandwidth, np.ones(schedule.num_rounds, dtype=bool))


def _fit_round_startup(rank: int, rows: np.ndarray, bandwidth: np.ndarray, links: Links, group) -> float:
    """Seconds a round costs beyond its bytes: rows [n, n] run as plain matchings (n - 1 rounds for
    every pair) and as one round, median of CALIBRATION_REPS after a warm-up each
    (calibration.fit_round_startup). The matching schedule's rounds meet at barriers and each
    starts its flows afresh; the one round keeps every port busy while it has bytes."""
    chunk = torch.empty(int(rows[rank].sum()), 1, dtype=ELEMENT)
    rounds = schedule_all_to_all(rows * 4.0, bandwidth, max_lanes_per_device=1)
    once = _one_round(rows * 4.0, bandwidth)
    measured = []
    for schedule in (rounds, once):
        times = []
        for _ in range(1 + CALIBRATION_REPS):
            dist.barrier(group)
            started = time.perf_counter()
            exchange(chunk, rows, "scheduled", schedule=schedule, group=group, links=links)
            times += _slowest([time.perf_counter() - started], group)
        measured.append(float(np.median(times[1:])))
    return fit_round_startup(rounds.num_rounds, rounds.makespan_s, once.makespan_s, *measured)


def _fit_shared_port_efficiency(
    rank: int, pattern: np.ndarray, unit_rows: int, bandwidth: np.ndarray, off: float, links: Links, group
) -> float:
    """Random order's shared-port efficiency: the pattern run in random order (under the seed whose
    order makes flows meet the most), its fitted slowdown over the fluid time turned into the share
    of a port that flows meeting there would explain."""
    rates = bandwidth * off
    unit_bytes = pattern * unit_rows * 4.0
    seed = most_contended_seed(unit_bytes, rates)

    def fluid_s(rows: np.ndarray) -> float:
        return sender_queue_time_s(rows * 4.0, rates, "random_order", seed, 0.0)

    efficiency, _ = _fit_pattern(
        rank, pattern, unit_rows, "random_order", fluid_s, bandwidth, links, group, seed
    )
    return fit_port_share(unit_bytes, rates, "random_order", efficiency, seed)


def _slowest(seconds: list[float], group) -> list[float]:
    """Each value's maximum over the ranks: a step takes as long as its slowest rank."""
    values = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(values, dist.ReduceOp.MAX, group=group)
    return values.tolist()


def _fit_pattern(
    rank: int,
    pattern: np.ndarray,
    unit_rows: int,
    strategy: Strategy,
    fluid_s: Callable[[np.ndarray], float],
    bandwidth: np.ndarray,
    links: Links,
    group,
    seed: int = 0,
) -> tuple[float, float]:
    """(efficiency, startup_s) with measured = startup_s + fluid_s(rows) / efficiency, a least-squares
    line through rows = pattern x 1, 2 and 4 unit_rows (median of CALIBRATION_REPS after a warm-up
    each). Two sizes made the line a difference of two noisy times: one retransmission timeout in
    either swung the efficiency by 20% between runs. A negative startup is fitted again as 0."""
    measured, fluid = [], []
    for scale in CALIBRATION_SCALES:
        rows = pattern * scale * unit_rows
        chunk = torch.empty(int(rows[rank].sum()), 1, dtype=ELEMENT)
        schedule = _one_round(rows * 4.0, bandwidth) if strategy == "scheduled" else None
        times = []
        for _ in range(1 + CALIBRATION_REPS):
            dist.barrier(group)
            started = time.perf_counter()
            exchange(chunk, rows, strategy, schedule=schedule, seed=seed, group=group, links=links)
            times += _slowest([time.perf_counter() - started], group)
        measured.append(float(np.median(times[1:])))
        fluid.append(fluid_s(rows))
    return fit_startup_and_efficiency(np.array(fluid), np.array(measured))


def time_exchanges(
    send: torch.Tensor,
    rows: np.ndarray,
    schedules: tuple[Schedule, Schedule],
    seed: int,
    warmup: int,
    reps: int,
    links: Links,
    group=None,
) -> dict[str, np.ndarray]:
    """Per strategy, [reps, 2] seconds (dispatch, combine), each the slowest rank's."""
    times: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
    for rep in range(warmup + reps):
        # Rotate the order every rep: slow drift of the machine hits every strategy alike.
        order = STRATEGIES[rep % len(STRATEGIES) :] + STRATEGIES[: rep % len(STRATEGIES)]
        for strategy in order:
            dist.barrier(group)
            started = time.perf_counter()
            received = exchange(
                send, rows, strategy, schedule=schedules[0], seed=seed, group=group, links=links
            )
            dispatched = time.perf_counter() - started
            dist.barrier(group)
            started = time.perf_counter()
            exchange(
                received, rows.T, strategy, schedule=schedules[1], seed=seed + 1, group=group, links=links
            )
            combined = time.perf_counter() - started
            slowest = _slowest([dispatched, combined], group)
            if rep >= warmup:
                times[strategy].append(slowest)
    return {s: np.array(t) for s, t in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shunter.bench.a2a", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=None, help="routing trace .npz (default: the built-in model's)")
    parser.add_argument(
        "--bandwidth", default=None, help=f"shaped port rate(s); default ${BANDWIDTH_VARIABLE}"
    )
    parser.add_argument(
        "--placement", default=None, help="JSON file: per layer, a slot table or device_of_expert [E]"
    )
    parser.add_argument("--layers", type=int, default=2, help="how many MoE layers of the trace (default 2)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per layer, from the trace's start")
    parser.add_argument("--row-bytes", type=int, default=DEFAULT_ROW_BYTES, help="bytes of one token row")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--probe-bytes", type=int, default=4 << 20, help="bytes per pair when calibrating")
    parser.add_argument(
        "--max-lanes",
        type=int,
        default=16,
        help="lanes per port the schedule may use on mixed ports (1: matchings)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random-order seed")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may wait")
    parser.add_argument("--out", default=None, help="rank 0 writes the JSON result here (default stdout)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.tokens < 1 or args.row_bytes < 4 or args.layers < 1:
        raise ShunterError("--reps, --tokens, --layers must be >= 1, --row-bytes >= 4, --warmup >= 0")
    rank, world = init_from_environment(args.timeout)
    rates_text = args.bandwidth or os.environ.get(BANDWIDTH_VARIABLE)
    if not rates_text:
        raise ShunterError(f"--bandwidth: not given and ${BANDWIDTH_VARIABLE} is not set")
    bandwidth = np.array(parse_host_bandwidths(rates_text, world))
    trace_path = Path(args.trace) if args.trace else default_trace_path()
    trace = load_trace(trace_path)
    layers = min(args.layers, trace.num_layers)
    placements = _placements(args.placement, trace.num_experts, world, layers)
    tokens = min(args.tokens, trace.num_tokens)

    links = open_links()
    calibration = calibrate(rank, world, bandwidth, args.probe_bytes, links)
    sustained = bandwidth * calibration.efficiency
    row_elements = args.row_bytes // 4
    row_bytes = row_elements * 4
    results = []
    for layer in range(layers):
        rows = layer_rows(trace.expert_ids[layer, :tokens], placements[layer], world)
        traffic = rows.astype(np.float64) * row_bytes
        round_cost = RoundCost(calibration.round_startup_s, calibration.merged_round_efficiency)
        schedules = (
            plan_exchange(traffic, bandwidth, args.max_lanes, round_cost),
            plan_exchange(traffic.T, bandwidth, args.max_lanes, round_cost),
        )
        send = torch.randn(int(rows[rank].sum()), row_elements, generator=torch.Generator().manual_seed(rank))
        seed = args.seed + 2 * layer
        times = time_exchanges(send, rows, schedules, seed, args.warmup, args.reps, links)
        bound = port_lower_bound_s(traffic, sustained) + port_lower_bound_s(traffic.T, sustained)
        entry: dict[str, object] = {
            "layer": int(trace.layer_indices[layer]),
            "rows": rows.tolist(),
            "remote_bytes": float(traffic.sum() - np.trace(traffic)),
            "lower_bound_s": bound,
            "lower_bound_shaped_s": (
                port_lower_bound_s(traffic, bandwidth) + port_lower_bound_s(traffic.T, bandwidth)
            ),
            "rounds": [schedules[0].num_rounds, schedules[1].num_rounds],
            "strategies": {},
        }
        for strategy in STRATEGIES:
            total = times[strategy].sum(axis=1)
            transport = TRANSPORT_OF_STRATEGY[strategy]
            predicted = all_to_all_time_s(
                traffic, bandwidth, transport, seed=seed, schedule=schedules[0], calibration=calibration
            ) + all_to_all_time_s(
                traffic.T, bandwidth, transport, seed=seed + 1, schedule=schedules[1], calibration=calibration
            )
            median = float(np.median(total))
            entry["strategies"][strategy] = {  # type: ignore[index]
                "median_s": median,
                "min_s": float(total.min()),
                "max_s": float(total.max()),
                "dispatch_median_s": float(np.median(times[strategy][:, 0])),
                "combine_median_s": float(np.median(times[strategy][:, 1])),
                "predicted_s": predicted,
                "predicted_over_measured": predicted / median,
                "over_bound": median / bound,
            }
        s = entry["strategies"]
        entry["schedule_over_bound"] = s["scheduled"]["over_bound"]  # type: ignore[index]
        entry["speedup_over_all_to_all"] = s["all_to_all"]["median_s"] / s["scheduled"]["median_s"]  # type: ignore[index]
        entry["speedup_over_random_order"] = s["random_order"]["median_s"] / s["scheduled"]["median_s"]  # type: ignore[index]
        results.append(entry)
        if rank == 0:
            print(_layer_line(entry), file=sys.stderr, flush=True)
    if rank == 0:
        report = {
            "hosts": world,
            "bandwidth_bytes_s": bandwidth.tolist(),
            "trace": str(trace_path),
            "tokens_per_layer": tokens,
            "row_bytes": row_bytes,
            "max_lanes": args.max_lanes,
            "reps": args.reps,
            "warmup": args.warmup,
            "calibration": asdict(calibration),
            "layers": results,
        }
        text = json.dumps(report, indent=1)
        if args.out:
            partial = Path(args.out).with_suffix(".partial")
            partial.write_text(text)
            partial.replace(args.out)
        else:
            print(text)
    dist.barrier()
    return 0


def _layer_line(entry: dict) -> str:
    ms = {name: value["median_s"] * 1e3 for name, value in entry["strategies"].items()}
    return (
        f"layer {entry['layer']}: scheduled {ms['scheduled']:.1f} ms ({entry['schedule_over_bound']:.3f}x "
        f"bound), all_to_all {ms['all_to_all']:.1f} ms, random_order {ms['random_order']:.1f} ms"
    )


def _placements(path: str | None, num_experts: int, world: int, layers: int) -> list[ExpertSlots]:
    """Per layer, the slots in the --placement file: a list of slot tables ({device, expert, share}, as
    in the plan document) or of device_of_expert lists; without a file, even blocks."""
    if path is None:
        return [as_slots(contiguous_placement(num_experts, world), num_experts, world)] * layers
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ShunterError(f"{path}: cannot read the placement JSON: {exc}") from None
    if not isinstance(document, list) or len(document) < layers:
        raise ShunterError(f"{path}: expected a list of at least {layers} placements (one per layer)")
    out = []
    for layer, placement in enumerate(document[:layers]):
        where = f"{path}: [{layer}]"
        try:
            if isinstance(placement, dict):
                placement = read_slots(placement, world, where)
            out.append(as_slots(placement, num_experts, world))
        except (ShunterError, TypeError, ValueError) as exc:
            raise ShunterError(
                f"{where}: {exc} (need {num_experts} experts on {world} devices: the plan has more "
                "devices than the cluster has hosts, or is for a different model)"
            ) from None
    return out


if __name__ == "__main__":
    sys.exit(run_rank(main))
