"""The expert-parallel benchmark's ranks: per-batch time of a stream of batches through the MoE
layers, routed as a real trace routes them, under four placements, and two colocated models against
each alone on half the hosts, each beside the simulator's prediction for the same run.

Run one process per host (`shunter bench ep` launches it on the emulated cluster; torchrun works
too):

    python -m shunter.bench.ep --trace T.npz --bandwidth 400Mbit/s --out result.json

A batch is --batch-tokens consecutive tokens of the trace (after the first --profile-tokens, which
profile Lina's path estimator and size the EPLB-style plan), spread evenly over the ranks
(`token_home_devices`). Per MoE layer each rank all-gathers the per-expert counts, sends each
(token, choice) row to a slot of its expert (`exchange`, --strategy), runs its slots' experts
(`expert_mlp` on synthetic weights of --hidden x --intermediate) and sends the outputs back; the
batch's time is the slowest rank's, between barriers. Attention and the gate are left out, on both
sides: measured and predicted figures are the MoE layers' time. Policies:
- static: contiguous blocks of experts (DeepSpeed's placement);
- eplb: `eplb_replicate` on the profile's counts per layer (one spare slot per rank), a replicated
  expert's rows split by the plan's shares;
- lina: `plan_lina_layer` per layer and batch (path estimate, phase-2 re-plan), rows split by the
  batch's counts (`split_by_load`); as in Lina and the simulator, every expert a rank holds beyond
  its static ones is copied in from host RAM (the "checkpoint") for the batch, and that copy is timed;
- ideal: a perfectly balanced gate (`balanced_expert_ids`) on the static placement.
Colocation (Aurora): a second model (the trace's routing with experts relabelled e -> E-1-e and the
tokens taken from the end, so hot experts differ) runs beside the first, both static on every host,
each on its own thread and process group; against each alone on half the hosts at the same time.
The prediction is `sim.lina.inference_batch` with the expert's time per row count measured on each
rank alone (a ComputeProfile), the copy rate, the counts all-gather's per-message latency, this
machine's cores shared by the ranks (`os.sched_getaffinity`, recorded as "shared_cores"; the
timeline shares them among the ranks computing at each instant, TimelineOptions.cores), the shaped
port rates, no attention (colocation: no
prediction); and once more with each port's tbf bucket modelled ("predicted_with_bucket":
FluidNetwork's burst_bytes, `tbf_burst_bytes` of each rate). `plot_per_batch` draws both series
per policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.bench.latency import ring_message_latency_s
from shunter.errors import ShunterError
from shunter.model.layers import expert_mlp
from shunter.model.loader import default_trace_path
from shunter.model.weights import MLPWeights
from shunter.network.transport import STRATEGIES
from shunter.parallel.cluster import parse_host_bandwidths, tbf_burst_bytes
from shunter.parallel.exchange import exchange, open_links, plan_exchange
from shunter.parallel.live import split_by_load
from shunter.parallel.moe import _rows_of_slot_counts, as_slots, contiguous_placement, split_by_shares
from shunter.parallel.runtime import init_from_environment, run_rank
from shunter.plan.cluster import ClusterSpec, Device
from shunter.plan.replication import build_path_estimator, eplb_replicate, plan_lina_layer
from shunter.plan.slots import ExpertSlots
from shunter.plan.traffic import token_home_devices
from shunter.shapes import MoEShapes
from shunter.sim.cost import ComputeModel, ComputeProfile
from shunter.sim.lina import InferenceSetup, balanced_expert_ids, inference_batch, split_batches
from shunter.trace.routing_trace import RoutingTrace, load_trace

BANDWIDTH_VARIABLE = "SHUNTER_CLUSTER_BANDWIDTHS"
POLICIES = ("static", "eplb", "lina", "ideal")
# row counts the expert time is measured at, for the prediction: one call per expert on a rank, so a
# batch's calls run 0 to ~k N / (n E / 2) rows; the per-row cost steps up past ~256 rows (cache)
PROFILE_ROWS = (16, 64, 128, 256, 384, 512, 768, 1024)


class Experts:
    """Synthetic expert weights of every (layer, expert) in host RAM: the "checkpoint" a rank copies
    experts in from. fp32, gate_up [2I, H], down [H, I], scaled so outputs stay small."""

    def __init__(self, layers: int, num_experts: int, hidden: int, intermediate: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.store = [
            [
                MLPWeights(
                    torch.randn(2 * intermediate, hidden, generator=generator) / hidden**0.5,
                    torch.randn(hidden, intermediate, generator=generator) / intermediate**0.5,
                )
                for _ in range(num_experts)
            ]
            for _ in range(layers)
        ]
        self.expert_bytes = 3 * hidden * intermediate * 4
        self.num_experts = num_experts

    def copy_in(self, layer: int, expert: int) -> MLPWeights:
        source = self.store[layer][expert]
        return MLPWeights(source.gate_up.clone(), source.down.clone())


PHASES = ("counts", "copy", "dispatch", "expert", "combine", "other")


def batch_seconds(
    ids_of_layer: list[np.ndarray],
    slots_of_layer: list[ExpertSlots],
    split_live: bool,
    resident_of_layer: list[ExpertSlots],
    experts: Experts,
    hidden: int,
    strategy: str,
    bandwidth: np.ndarray,
    group,
    links,
) -> tuple[float, float, np.ndarray]:
    """(seconds, copy seconds, phases [n, len(PHASES)]) of one batch through every layer on this
    rank's group: seconds and copy seconds the slowest rank's, phases every rank's seconds in each of
    PHASES summed over the layers ("other": the rest of its time between the barrier and its end,
    i.e. bookkeeping and the expert labels). ids_of_layer[l] [N, k]: every token's choices (rank r
    owns its even block); resident_of_layer[l]: the slots whose experts a rank holds all along (any
    other expert of its slots is copied in from host RAM for the batch)."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    phase = dict.fromkeys(PHASES, 0.0)
    most_rows = max(ids.size for ids in ids_of_layer)
    # hidden states to send, made before the clock starts (a runtime's are the attention's output)
    source_rows = torch.randn(most_rows, hidden, generator=torch.Generator().manual_seed(rank))
    dist.barrier(group)
    started = time.perf_counter()
    for layer, (ids, slots) in enumerate(zip(ids_of_layer, slots_of_layer, strict=True)):
        home = token_home_devices(ids.shape[0], n)
        mine = torch.from_numpy(np.bincount(ids[home == rank].ravel(), minlength=slots.num_experts))
        everyone = [torch.empty_like(mine) for _ in range(n)]
        mark = time.perf_counter()
        dist.all_gather(everyone, mine, group=group)
        phase["counts"] += time.perf_counter() - mark
        counts = torch.stack(everyone).numpy()
        slot_counts = split_by_load(counts, slots) if split_live else split_by_shares(counts, slots)
        rows = _rows_of_slot_counts(slot_counts, slots)
        my_slots = np.flatnonzero(slots.slot_device == rank)
        mark = time.perf_counter()
        weights = {}
        for expert in sorted(set(slots.slot_expert[my_slots].tolist())):
            resident = resident_of_layer[layer]
            held = resident.slot_device[resident.slot_expert == expert]
            weights[expert] = experts.store[layer][expert] if rank in held else experts.copy_in(layer, expert)
        phase["copy"] += time.perf_counter() - mark
        traffic = rows.astype(np.float64) * hidden * 4
        schedules = (None, None)
        if strategy == "scheduled":
            schedules = (plan_exchange(traffic, bandwidth), plan_exchange(traffic.T, bandwidth))
        send = source_rows[: int(rows[rank].sum())]  # the rows leave in the order of their destinations
        mark = time.perf_counter()
        received = exchange(send, rows, strategy, schedule=schedules[0], group=group, links=links)
        phase["dispatch"] += time.perf_counter() - mark
        labels = np.concatenate([np.repeat(my_slots, slot_counts[s, my_slots]) for s in range(n)])
        out = torch.empty_like(received)
        mark = time.perf_counter()
        for slot in my_slots.tolist():
            index = torch.from_numpy(np.flatnonzero(labels == slot))
            if index.numel():
                out[index] = expert_mlp(received[index], weights[int(slots.slot_expert[slot])])
        phase["expert"] += time.perf_counter() - mark
        mark = time.perf_counter()
        exchange(out, rows.T, strategy, schedule=schedules[1], seed=1, group=group, links=links)
        phase["combine"] += time.perf_counter() - mark
    mine_s = time.perf_counter() - started
    phase["other"] = mine_s - sum(phase[name] for name in PHASES if name != "other")
    figures = torch.tensor([phase[name] for name in PHASES], dtype=torch.float64)
    everyone = [torch.empty_like(figures) for _ in range(n)]
    dist.all_gather(everyone, figures, group=group)
    phases = torch.stack(everyone).numpy()
    # a rank's total is its phases' sum; the batch ends when the slowest rank's does
    return float(phases.sum(axis=1).max()), float(phases[:, PHASES.index("copy")].max()), phases


def expert_seconds(expert: MLPWeights, hidden: int, repeats: int = 5) -> list[float]:
    """Seconds of one expert_mlp call at each of PROFILE_ROWS rows: the median of `repeats` calls
    after a warm one (a median, since the other processes on the machine make single calls slow)."""
    seconds = []
    for rows in PROFILE_ROWS:
        x = torch.randn(rows, hidden)
        expert_mlp(x, expert)
        calls = []
        for _ in range(repeats):
            started = time.perf_counter()
            expert_mlp(x, expert)
            calls.append(time.perf_counter() - started)
        seconds.append(float(np.median(calls)))
    return seconds


def measure_compute(experts: Experts, hidden: int, group) -> tuple[ComputeProfile, float, float, dict]:
    """(profile, copy bytes/s, message latency s, calibration) for the prediction, the slowest rank's
    figures. The expert is timed on each rank in turn while the others wait at a barrier: its time
    on a core of its own; the simulator adds the slowdown of ranks computing at once on the
    machine's shared cores (InferenceSetup.shared_cores, shared in the timeline). The latency is a
    ring all-gather of the per-expert counts (what each layer runs first) over its n - 1 steps."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    expert = experts.store[0][0]
    alone = torch.zeros(len(PROFILE_ROWS), dtype=torch.float64)
    for turn in range(n):
        dist.barrier(group)
        if turn == rank:
            alone = torch.tensor(expert_seconds(expert, hidden), dtype=torch.float64)
    dist.barrier(group)
    started = time.perf_counter()
    for _ in range(3):
        experts.copy_in(0, 0)
    copy_s = (time.perf_counter() - started) / 3
    gather_s, latency_s = ring_message_latency_s(group, values=experts.num_experts)
    figures = torch.cat([alone, torch.tensor([copy_s], dtype=torch.float64)])
    dist.all_reduce(figures, dist.ReduceOp.MAX, group=group)
    expert_s, copy_s = figures[: len(PROFILE_ROWS)].numpy(), float(figures[-1])
    zero = {"tokens": np.array([0.0, 1e9]), "seconds": np.array([0.0, 0.0])}
    profile = ComputeProfile(
        tokens={
            "expert": np.array(PROFILE_ROWS, float),
            "attention": zero["tokens"],
            "aggregation": zero["tokens"],
        },
        seconds={"expert": expert_s, "attention": zero["seconds"], "aggregation": zero["seconds"]},
    )
    calibration = {
        "rows": list(PROFILE_ROWS),
        "expert_s_alone": expert_s.tolist(),
        "counts_all_gather_s": gather_s,
        "message_latency_s": latency_s,
    }
    return profile, experts.expert_bytes / copy_s, latency_s, calibration


def summary(seconds: list[float]) -> dict[str, float]:
    values = np.array(seconds)
    return {
        "p50_s": float(np.median(values)),
        "p95_s": float(np.percentile(values, 95)),
        "mean_s": float(values.mean()),
    }


def relabelled(trace: RoutingTrace) -> RoutingTrace:
    """The second model of the colocation run: experts e -> E-1-e, tokens from the trace's end."""
    return RoutingTrace(
        (trace.num_experts - 1 - trace.expert_ids)[:, ::-1].copy(),
        trace.gate_weights[:, ::-1].copy(),
        trace.num_experts,
        trace.layer_indices,
        trace.model,
        trace.source,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shunter.bench.ep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=None, help="routing trace .npz (default: the built-in model's)")
    parser.add_argument(
        "--bandwidth", default=None, help=f"shaped port rate(s); default ${BANDWIDTH_VARIABLE}"
    )
    parser.add_argument("--layers", type=int, default=4, help="MoE layers of the trace (default 4)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per batch (default 1024)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per policy (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    parser.add_argument("--profile-tokens", type=int, default=16384, help="trace tokens that profile")
    parser.add_argument("--hidden", type=int, default=256, help="expert hidden size (row = hidden x 4 bytes)")
    parser.add_argument("--intermediate", type=int, default=512, help="expert intermediate size")
    parser.add_argument("--strategy", default="all_to_all", choices=STRATEGIES)
    parser.add_argument("--no-colocation", action="store_true", help="skip the colocation run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per rank (default 1: emulated hosts share this machine's cores, and "
        "oversubscribed OpenMP threads spin against each other)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may wait")
    parser.add_argument("--out", default=None, help="rank 0 writes the JSON result here (default stdout)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (
        min(args.layers, args.batch_tokens, args.batches, args.hidden, args.intermediate) < 1
        or args.warmup < 0
    ):
        raise ShunterError("--layers, --batch-tokens, --batches, --hidden, --intermediate must be >= 1")
    rank, world = init_from_environment(args.timeout)
    torch.set_num_threads(max(args.threads, 1))
    rates_text = args.bandwidth or os.environ.get(BANDWIDTH_VARIABLE)
    if not rates_text:
        raise ShunterError(f"--bandwidth: not given and ${BANDWIDTH_VARIABLE} is not set")
    bandwidth = np.array(parse_host_bandwidths(rates_text, world))
    trace_path = Path(args.trace) if args.trace else default_trace_path()
    full = load_trace(trace_path)
    layers = min(args.layers, full.num_layers)
    needed = args.profile_tokens + (args.warmup + args.batches) * args.batch_tokens
    if full.num_tokens < needed:
        raise ShunterError(
            f"{trace_path}: {full.num_tokens} tokens, the run needs {needed} (--profile-tokens + "
            "(--warmup + --batches) x --batch-tokens)"
        )
    trace = RoutingTrace(
        full.expert_ids[:layers], full.gate_weights[:layers], full.num_experts, full.layer_indices[:layers]
    )
    E, k = trace.num_experts, trace.top_k
    profile = split_batches(trace, args.profile_tokens)[0]
    stream = split_batches(
        RoutingTrace(
            trace.expert_ids[:, args.profile_tokens :], trace.gate_weights[:, args.profile_tokens :], E,
            trace.layer_indices,
        ),
        args.batch_tokens,
    )[: args.warmup + args.batches]  # fmt: skip
    estimator = build_path_estimator(profile)
    experts = Experts(layers, E, args.hidden, args.intermediate)
    links = open_links()
    static = as_slots(contiguous_placement(E, world), E, world)
    spare = -(-E // world) + 1
    eplb = [
        ExpertSlots.from_shares(
            eplb_replicate(np.bincount(profile.expert_ids[layer].ravel(), minlength=E), world, spare).shares
        )
        for layer in range(layers)
    ]
    compute, copy_bytes_s, latency_s, calibration = measure_compute(experts, args.hidden, None)
    shared_cores = len(os.sched_getaffinity(0))  # every emulated host's rank runs on this machine
    shapes = MoEShapes(
        name="bench-ep", hidden_size=args.hidden, expert_intermediate_size=args.intermediate,
        num_experts=E, top_k=k,
        num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=1, bytes_per_param=4, bytes_per_activation=4,
    )  # fmt: skip
    cluster = ClusterSpec(tuple(Device(f"host{i}", float(b), 1e12, 1 << 40) for i, b in enumerate(bandwidth)))
    setup = InferenceSetup(
        shapes, cluster, ComputeModel(profile=compute), 0, copy_bytes_s, latency_s, shared_cores
    )

    measured: dict[str, list[float]] = {p: [] for p in POLICIES}
    copies: dict[str, list[float]] = {p: [] for p in POLICIES}
    predicted: dict[str, list[float]] = {p: [] for p in POLICIES}
    with_bucket: dict[str, list[float]] = {p: [] for p in POLICIES}
    # The emulated cluster shapes every port with tbf, whose bucket lets a burst through above the
    # rate: predicted once more with the buckets modelled (FluidNetwork's burst_bytes), beside.
    bursting = replace(setup, port_burst_bytes=np.array([tbf_burst_bytes(float(b)) for b in bandwidth]))
    phases: dict[str, list[np.ndarray]] = {p: [] for p in POLICIES}
    replanned = 0
    for index, batch in enumerate(stream):
        # Every batch under every policy, the order rotating: drift of the machine hits all alike.
        order = POLICIES[index % len(POLICIES) :] + POLICIES[: index % len(POLICIES)]
        for policy in order:
            ids = [batch.expert_ids[layer] for layer in range(layers)]
            slots, resident, live = [static] * layers, [static] * layers, False
            if policy == "eplb":
                slots = resident = eplb
            elif policy == "ideal":
                ids = [balanced_expert_ids(batch.num_tokens, E, k)] * layers
            elif policy == "lina":
                plans = [plan_lina_layer(estimator, batch, layer, world) for layer in range(layers)]
                slots = [ExpertSlots.from_shares(p.placement.shares) for p in plans]
                replanned += sum(p.replanned for p in plans) if index >= args.warmup else 0
                live = True
            seconds, copy_s, phase_s = batch_seconds(
                ids, slots, live, resident, experts, args.hidden, args.strategy, bandwidth, None, links
            )
            if index < args.warmup:
                continue
            measured[policy].append(seconds)
            copies[policy].append(copy_s)
            phases[policy].append(phase_s)
    # predicted after the measurements: minutes of simulation between timed batches would leave the
    # links idle (TCP restarts slowly after idle) and the next batch slower than a stream's
    eplb_shares = [slots.shares() for slots in eplb]
    for policy in POLICIES:
        for batch in stream[args.warmup :]:
            result = inference_batch(batch, setup, policy, estimator, eplb_shares)  # type: ignore[arg-type]
            predicted[policy].append(result.time_s)
            with_bucket[policy].append(
                inference_batch(batch, bursting, policy, estimator, eplb_shares).time_s
            )  # type: ignore[arg-type]
    results: dict[str, dict] = {}
    for policy in POLICIES:
        results[policy] = {
            "measured": summary(measured[policy]),
            "predicted": summary(predicted[policy]) if predicted[policy] else None,
            "per_batch_s": measured[policy],
            "predicted_per_batch_s": predicted[policy] or None,
            "predicted_with_bucket": summary(with_bucket[policy]),
            "phases": list(PHASES),
            "phase_s_mean_per_rank": np.mean(phases[policy], axis=0).tolist(),
            "copy_s_mean": float(np.mean(copies[policy])),
        }
        if results[policy]["predicted"]:
            results[policy]["predicted_over_measured_p95"] = (
                results[policy]["predicted"]["p95_s"] / results[policy]["measured"]["p95_s"]
            )
        if rank == 0:
            print(_policy_line(policy, results[policy]), file=sys.stderr, flush=True)
    results["lina"]["phase2_replanned_layers"] = replanned
    for policy in ("eplb", "lina", "ideal"):
        for stat in ("p50_s", "p95_s"):
            results[policy][f"static_over_this_{stat[:3]}"] = (
                results["static"]["measured"][stat] / results[policy]["measured"][stat]
            )
    colocation = None if args.no_colocation or world < 2 else _colocation(args, trace, stream, experts, world)
    if rank == 0:
        report = {
            "hosts": world,
            "bandwidth_bytes_s": bandwidth.tolist(),
            "trace": str(trace_path),
            "layers": layers,
            "batch_tokens": args.batch_tokens,
            "batches": args.batches,
            "warmup": args.warmup,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "strategy": args.strategy,
            "copy_bytes_s": copy_bytes_s,
            "calibration": calibration,
            "shared_cores": shared_cores,
            "policies": results,
            "colocation": colocation,
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


def _colocation(args, trace: RoutingTrace, stream: list[RoutingTrace], experts: Experts, world: int) -> dict:
    """Two models' batch streams: both on every host at once (a thread and a group each), then each
    alone on half the hosts at the same time; seconds for the whole of both streams."""
    E, layers = trace.num_experts, trace.num_layers
    second = [relabelled(batch) for batch in stream]
    # all_to_all_single throughout: the point-to-point strategies' extra groups would have to be
    # opened by every rank for each half
    groups = [dist.new_group(list(range(world))) for _ in range(2)]
    half = world // 2
    halves = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    rank = dist.get_rank()
    mine = 0 if rank < half else 1

    def run_stream(batches, group, links, n) -> None:
        static = as_slots(contiguous_placement(E, n), E, n)
        for batch in batches:
            ids = [batch.expert_ids[layer] for layer in range(layers)]
            batch_seconds(
                ids, [static] * layers, False, [static] * layers, experts, args.hidden, "all_to_all",
                np.ones(n), group, None,
            )  # fmt: skip

    dist.barrier()
    started = time.perf_counter()
    threads = [
        threading.Thread(target=run_stream, args=(s, groups[i], None, world))
        for i, s in enumerate((stream, second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    colocated = _slowest(time.perf_counter() - started)
    dist.barrier()
    started = time.perf_counter()
    run_stream((stream, second)[mine], halves[mine], None, half if mine == 0 else world - half)
    alone = _slowest(time.perf_counter() - started)
    return {
        "colocated_s": colocated,
        "alone_on_half_s": alone,
        "throughput_gain": alone / colocated,
        "batches_per_model": len(stream),
        "predicted": None,
    }


def plot_per_batch(report: dict, path: Path) -> None:
    """One panel per policy: the measured seconds of each timed batch against its index, and the
    simulator's prediction for the same batch beside it."""
    from shunter.sim.plots import pyplot, save_figure

    plt = pyplot()
    policies = report["policies"]
    figure, axes = plt.subplots(len(policies), 1, figsize=(8, 1.2 + 1.8 * len(policies)), sharex=True)
    axes = [axes] if len(policies) == 1 else list(axes)
    rates = ", ".join(f"{b * 8 / 1e6:g}" for b in report["bandwidth_bytes_s"])
    for axis, (name, entry) in zip(axes, policies.items(), strict=True):
        measured = np.array(entry["per_batch_s"]) * 1e3
        batches = np.arange(len(measured))
        axis.plot(batches, measured, "o-", color="#3182bd", label="measured", markersize=3)
        title = f"{name}: measured p50 {entry['measured']['p50_s'] * 1e3:.1f} ms"
        if entry.get("predicted_per_batch_s"):
            predicted = np.array(entry["predicted_per_batch_s"]) * 1e3
            axis.plot(batches, predicted, "x--", color="#e6550d", label="predicted", markersize=4)
            title += f", predicted p50 {entry['predicted']['p50_s'] * 1e3:.1f} ms"
        axis.set_title(title, fontsize=9)
        axis.set_ylabel("ms per batch")
        axis.set_ylim(bottom=0)
    axes[0].legend(loc="lower right", fontsize=7)
    axes[-1].set_xlabel("batch (after the warm-up)")
    figure.suptitle(
        f"{report['hosts']} hosts, ports {rates} Mbit/s; {report['layers']} MoE layers, "
        f"{report['batch_tokens']} tokens a batch",
        fontsize=10,
    )
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, dist.ReduceOp.MAX)
    return float(value.item())


def _policy_line(policy: str, entry: dict) -> str:
    m, p = entry["measured"], entry["predicted"]
    line = f"{policy}: p50 {m['p50_s'] * 1e3:.1f} ms, p95 {m['p95_s'] * 1e3:.1f} ms"
    if p:
        line += f" (predicted p50 {p['p50_s'] * 1e3:.1f} ms, p95 {p['p95_s'] * 1e3:.1f} ms)"
    return line


if __name__ == "__main__":
    sys.exit(run_rank(main))
