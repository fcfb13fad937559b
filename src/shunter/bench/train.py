"""`shunter bench train`: expert-parallel training steps under each allreduce scheduler, on the
emulated cluster (one rank per host, ports shaped), beside the simulator and Lina's ablation.

Variants (Lina's ablation, lina.md; `shunter.train.comm` for the schedulers):
- overlap: DDP's buckets, each allreduced as soon as ready, alongside the all-to-alls (the
  baseline, DeepSpeed's behaviour);
- priority: the same buckets, launched only while no all-to-all is pending (no partitioning);
- priority+partitioning: priority with the gradients cut into micro-ops (`--comm lina`);
- lina: priority+partitioning with every all-to-all also cut into 4 chunks along tokens,
  pipelined with the expert FFN (`--comm lina --a2a-chunks 4`, the simulator's `a2a_chunks`);
- lina+packing: full Lina, also packing experts (`--expert-packing --packing-rule lina`, Lina's
  rule: halve the expert-parallel ranks while an FFN micro-op is shorter than an all-to-all
  micro-op; the ranks' log says what the default, priced rule would decide), decided
  from the step before the last warm-up step on, so the measured steps run packed if the rule
  packs; run where the hosts can be halved (an even number, at least 4).

Overlap and priority allreduce buckets of one block's dense gradients (`--bucket-bytes`, default
the dense gradients / layers), as the simulator's DeepSpeed does: DDP's 25 MB bucket would hold a
small model's every gradient and leave nothing to overlap.

Every variant trains the same model from the same seed for warmup + steps steps (`shunter train
--expert-parallel N --stop-after`), each rank writing its per-step timing (steps.rankR.jsonl). A
step's time is the slowest rank's; the breakdown is the mean over ranks; each figure is the
median over the steps after warm-up.

The simulator (`shunter.sim.lina.training_step`) gets the model's shapes (fp32), the shaped port
rate, this model's dense-gradient bytes per block (the embedding's after the whole backward, when
its gradient is complete), this machine's cores (`os.sched_getaffinity`, recorded as "cores"):
the ranks are processes sharing them, so a rank computing while the others wait in an all-to-all
runs at full speed and four computing at once on two cores at half (TimelineOptions.cores); a
compute speed calibrated so that the shared simulation's mean compute time per rank equals the
measured one of the overlap run (forward + backward without communication, a wall time taken
while the ranks shared the cores; see `predict`), the measured optimizer step (as time alone on a
core), the per-message latency measured on the same ranks before the variants run
(`shunter.bench.latency`: a ring all-gather of a few bytes, over its n - 1 steps), and the routing
of the measured steps: each step is simulated with its own
dispatch rows between ranks per layer (early in training the gate is far from balanced and moves
from step to step; the hot ranks' ports and experts set each all-to-all's time), and the median
over the steps is reported. The prediction is then about communication alone. Its variants:
deepspeed for overlap, priority with one micro-op per block's gradient for priority, priority with
the micro-op size for priority+partitioning, lina (4 all-to-all chunks) for lina, and for
lina+packing the lina variant with the expert-parallel degree its measured steps ran with and
their own routing (all-to-alls inside the groups; the replicas' expert-gradient allreduce after
the dense one, as the runtime runs it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shunter.errors import ShunterError
from shunter.model.spec import spec_from_config
from shunter.plan.cluster import ClusterSpec
from shunter.shapes import MoEShapes
from shunter.sim.cores import shared_rate
from shunter.sim.cost import ComputeModel
from shunter.sim.lina import TrainingSetup, training_step
from shunter.train import TrainConfig, Trainer
from shunter.train.trainer import parameters

# (name, --comm, uses micro-ops, --a2a-chunks, --expert-packing)
VARIANTS = (
    ("overlap", "overlap", False, 1, False),
    ("priority", "priority", False, 1, False),
    ("priority+partitioning", "lina", True, 1, False),
    ("lina", "lina", True, 4, False),
    ("lina+packing", "lina", True, 4, True),
)
# Lina's ablation (step-time speedup over DeepSpeed): priority alone, with partitioning, whole system
PAPER_SPEEDUP = {
    "priority": "1.24x",
    "priority+partitioning": "1.36-1.42x",
    "lina": "-",
    "lina+packing": "1.57x (average)",
}
BREAKDOWN = (
    "forward_compute_s",
    "backward_compute_s",
    "a2a_forward_s",
    "a2a_backward_s",
    "allreduce_s",
    "allreduce_exposed_s",
    "a2a_with_allreduce_s",
    "expert_allreduce_s",
    "optimizer_s",
)

# A model whose dense gradients (7.4 MB in fp32) take about as long on a 400 Mbit/s port as its
# all-to-alls, as in Lina's setting; small enough for CPU ranks.
DEFAULT_MODEL = TrainConfig(
    vocab_size=4096,
    hidden_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    num_experts=8,
    top_k=2,
    expert_intermediate_size=512,
    max_position_embeddings=256,
    seq_len=128,
    batch_size=16,
    steps=1000,
    warmup_steps=10,
    checkpoint_every=100_000,  # no checkpoint inside the measured steps
    heldout_percent=10,
    save_dtype="float32",
    bf16_autocast=False,
)

Launcher = Callable[[list[str]], int]  # runs one command on every rank; returns the exit status


def read_model_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    values = dataclasses.asdict(DEFAULT_MODEL)
    if path is not None:
        try:
            values |= tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ShunterError(f"{path}: cannot read the model config ({exc})") from None
    values |= overrides
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ShunterError(f"{path}: unknown key {unknown[0]!r}")
    config = TrainConfig(**values)
    config.validate()
    return config


def prepare_work_dir(config: TrainConfig, corpus: Path, scratch: Path) -> Path:
    """Tokenizer and token streams made once (single process), copied into each variant's run."""
    trainer = Trainer(config, corpus, scratch / "prepared", scratch / "prepared.work", log=lambda _: None)
    del trainer
    return scratch / "prepared.work"


def train_command(
    config_path: Path, corpus: Path, out: Path, hosts: int, comm: str, total_steps: int, args: dict[str, str]
) -> list[str]:
    return [
        sys.executable, "-m", "shunter", "train", "--out", str(out), "--corpus", str(corpus),
        "--config", str(config_path), "--expert-parallel", str(hosts), "--comm", comm,
        "--stop-after", str(total_steps), *[f"--{k}={v}" if v else f"--{k}" for k, v in args.items()],
    ]  # fmt: skip


def summarize(work: Path, hosts: int, warmup: int) -> dict[str, Any]:
    """Median over the steps after warm-up of the slowest rank's step time and of the mean over
    ranks of each breakdown field."""
    per_rank = []
    for rank in range(hosts):
        path = work / f"steps.rank{rank}.jsonl"
        if not path.is_file():
            raise ShunterError(f"{path}: rank {rank} recorded no steps")
        per_rank.append([json.loads(line) for line in path.read_text().splitlines()][warmup:])
    steps = min(len(records) for records in per_rank)
    if steps < 1:
        raise ShunterError(f"{work}: no step after the warm-up was recorded")
    step_s = [max(records[i]["step_s"] for records in per_rank) for i in range(steps)]
    summary: dict[str, Any] = {"steps": steps, "step_s": statistics.median(step_s), "step_s_all": step_s}
    for name in BREAKDOWN:
        summary[name] = statistics.median(
            statistics.fmean(records[i][name] for records in per_rank) for i in range(steps)
        )
    summary["compute_s"] = summary["forward_compute_s"] + summary["backward_compute_s"]
    # each measured step's routing: per layer the dispatch rows [L, n, n]; each rank records its
    # expert-parallel group's [L, P, P] (the same on every rank of it), placed on the diagonal
    degrees = [per_rank[0][i].get("expert_parallel", hosts) for i in range(steps)]
    summary["expert_parallel"] = degrees
    summary["dispatch_rows"] = []
    for i, P in enumerate(degrees):
        rows = np.zeros((len(per_rank[0][i]["dispatch_rows"]), hosts, hosts), dtype=np.int64)
        for first in range(0, hosts, P):
            rows[:, first : first + P, first : first + P] = per_rank[first][i]["dispatch_rows"]
        summary["dispatch_rows"].append(rows.tolist())
    summary["per_rank_last_step"] = [records[steps - 1] for records in per_rank]
    return summary


def embedding_gradient_bytes(config: TrainConfig) -> int:
    """fp32 bytes of the input embedding's gradient (tied or not: its lookup is the forward's first
    op, so backward completes it last)."""
    return config.vocab_size * config.hidden_size * 4


def dense_gradient_bytes(config: TrainConfig) -> int:
    """fp32 bytes of the dense gradients every step allreduces (what `parameters(experts=False)`
    holds), from the model's shapes."""
    from shunter.model.export import random_weights

    spec = spec_from_config(config.model_config(eos_token_id=0), source="bench config")
    weights = random_weights(spec, 0, std=0.02, router_std=0.02)
    return sum(p.numel() * 4 for p in parameters(weights, experts=False))


def predict(
    config: TrainConfig,
    hosts: int,
    bandwidth_bytes_s: float,
    compute_s: float,
    micro_op_bytes: int,
    routing: Sequence[np.ndarray] | None = None,
    optimizer_s: float = 0.0,
    cores: float | None = None,
    latency_s: float = 0.0,
    packed: tuple[int, Sequence[np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """The simulator's step for each variant (see the module docstring), compute calibrated to
    compute_s seconds per step per rank (measured), with the measured optimizer step; each measured
    step simulated with its own routing (routing: per step the dispatch rows [L, n, n]; None: the
    ideal gate), and the median over the steps reported, as for the measured steps.

    cores: the ranks ran as processes on this many shared cores (the emulated cluster or loopback
    on one machine); None: each rank on cores of its own. The measured compute_s and optimizer_s
    are wall times taken while the ranks shared the cores, so with cores the simulator, which
    shares them too, is given each rank's time alone on a core: the compute speed is solved for so
    that the *shared* simulation of the overlap run (its routing, step by step) gives the measured
    mean compute per rank (a fixed point: the slowdown from sharing depends on the speed, through
    how long ranks wait for each other in the all-to-alls), and the optimizer, which every rank
    runs at once after the last allreduce, gets optimizer_s x min(1, cores / hosts) alone.

    latency_s: every message's start-up (`shunter.bench.latency`, measured on the same ranks): each
    all-to-all (or chunk of one) and each allreduce op idles that long before its bytes move, which
    is what cutting the allreduce into micro-ops and the all-to-all into chunks costs.

    packed: (expert-parallel degree, per step the dispatch rows [L, n, n]) of the lina+packing
    run's measured steps, predicted as the lina variant with that packing and routing.
    """
    spec = spec_from_config(config.model_config(eos_token_id=0), source="bench config")
    shapes = MoEShapes.from_spec(spec, bytes_per_param=4, bytes_per_activation=4, name="bench")
    final = embedding_gradient_bytes(config)
    per_block = (dense_gradient_bytes(config) - final) / config.num_layers

    def setup(
        flop_s: float,
        micro: float,
        rows: np.ndarray | None,
        optimizer: float,
        expert_parallel: int | None = None,
    ) -> TrainingSetup:
        return TrainingSetup(
            shapes=shapes,
            cluster=ClusterSpec.uniform(hosts, bandwidth_bytes_s, flop_s),
            compute=ComputeModel(),
            tokens_per_device=config.batch_size // hosts * config.seq_len,
            context_tokens=config.seq_len,
            dense_gradient_bytes_per_block=per_block,
            dense_flops_per_token_per_block=0.0,
            micro_op_bytes=micro,
            dispatch_rows=rows,
            optimizer_s=optimizer,
            final_gradient_bytes=final,
            latency_s=latency_s,
            shared_cores=cores,
            expert_parallel=expert_parallel,
        )

    steps = [None] if routing is None else list(routing)

    def simulated_compute_s(flop_s: float, rows_of_steps: Sequence[np.ndarray | None]) -> float:
        """Median over the steps of the mean over devices of the wall time spent computing."""
        probes = [
            training_step(setup(flop_s, micro_op_bytes, rows, 0.0), "deepspeed") for rows in rows_of_steps
        ]
        return statistics.median(p.step_s * p.utilisation for p in probes)

    # Calibration. Without sharing, compute time is inversely proportional to the speed and its mean
    # over devices the same under any routing of as many rows: one probe on the ideal gate.
    probe_flop_s = 1e12
    flop_s = probe_flop_s * simulated_compute_s(probe_flop_s, [None]) / max(compute_s, 1e-9)
    optimizer_alone_s = optimizer_s
    if cores is not None:
        for _ in range(50):
            ratio = simulated_compute_s(flop_s, steps) / max(compute_s, 1e-9)
            flop_s *= ratio
            if abs(ratio - 1) < 1e-4:
                break
        optimizer_alone_s = optimizer_s * shared_rate(cores, hosts)
    whole = per_block + final  # one micro-op per block's gradients: priority without partitioning
    variants = {
        "overlap": ("deepspeed", micro_op_bytes),
        "priority": ("priority", whole),
        "priority+partitioning": ("priority", micro_op_bytes),
        "lina": ("lina", micro_op_bytes),
    }
    runs = {name: (variant, micro, None, steps) for name, (variant, micro) in variants.items()}
    if packed is not None:
        runs["lina+packing"] = ("lina", micro_op_bytes, packed[0], list(packed[1]))
    predicted: dict[str, dict[str, float]] = {}
    for name, (variant, micro, degree, routing_of_steps) in runs.items():
        results = [
            training_step(setup(flop_s, micro, rows, optimizer_alone_s, degree), variant)
            for rows in routing_of_steps
        ]
        predicted[name] = {
            "step_s": statistics.median(r.step_s for r in results),
            "backward_a2a_s": statistics.median(r.backward_a2a_s for r in results),
            "forward_a2a_s": statistics.median(r.forward_a2a_s for r in results),
        }
    return predicted | {"calibrated_compute_flop_s": {"value": flop_s}}


def torchrun_launcher(hosts: int, port: int) -> Launcher:
    """Ranks on this machine's loopback under torchrun: no shaping (for tests and machines
    without root); `command` is `python -m MODULE ...`."""

    def launch(command: list[str]) -> int:
        assert command[1] == "-m"
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={hosts}",
            f"--master-port={port}", "-m", *command[2:],
        ]  # fmt: skip
        with subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as ranks:
            assert ranks.stdout is not None
            for line in ranks.stdout:  # the ranks' output, as it comes, on stderr (stdout may be --json)
                sys.stderr.write(line)
        return ranks.returncode

    return launch


def run_bench(
    config: TrainConfig,
    corpus: Path,
    hosts: int,
    bandwidth_bytes_s: float,
    steps: int,
    warmup: int,
    micro_op_bytes: int,
    timeout_s: float,
    scratch: Path,
    launch: Launcher,
    bucket_bytes: int | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run every variant through `launch` and return the report (see the module docstring)."""
    if config.batch_size % hosts:
        raise ShunterError(f"--batch-size: {config.batch_size} sequences do not split over {hosts} hosts")
    if config.num_experts < hosts:
        raise ShunterError(
            f"--num-experts: {config.num_experts} experts for {hosts} hosts; need at least one each"
        )
    config = dataclasses.replace(config, steps=max(config.steps, warmup + steps))
    prepared = prepare_work_dir(config, corpus, scratch)
    config_path = scratch / "model.toml"
    config_path.write_text(_toml(config))
    if bucket_bytes is None:  # one bucket per block's worth of gradients, as the simulator has it
        bucket_bytes = max(dense_gradient_bytes(config) // config.num_layers, 1)
    log(f"bench train: the message latency of {hosts} ranks")
    latency_file = scratch / "latency.json"
    status = launch([sys.executable, "-m", "shunter.bench.latency", str(latency_file)])
    if status != 0:
        raise ShunterError(f"the latency probe's ranks failed (exit status {status}); their output is above")
    latency_s = float(json.loads(latency_file.read_text())["message_latency_s"])
    measured: dict[str, Any] = {}
    can_pack = hosts % 2 == 0 and hosts // 2 >= 2
    for name, comm, micro, a2a_chunks, packing in VARIANTS:
        if packing and not can_pack:
            log(f"bench train: {name} skipped: {hosts} hosts cannot be halved into groups of at least 2")
            continue
        out = scratch / name / "model"
        work = out.with_name("model.work")
        work.mkdir(parents=True)
        for file in ("tokenizer.json", "train-tokens.npy", "heldout-tokens.npy"):
            shutil.copy(prepared / file, work / file)
        extra = {"timeout": str(timeout_s), "bucket-bytes": str(bucket_bytes)}
        if micro:
            extra["micro-op-bytes"] = str(micro_op_bytes)
        if a2a_chunks > 1:
            extra["a2a-chunks"] = str(a2a_chunks)
        if packing:  # decided from the step before the last warm-up step: measured steps run packed
            extra["expert-packing"] = ""
            extra["packing-rule"] = "lina"  # the paper's rule (the default one also prices the bytes)
            extra["packing-from-step"] = str(max(1, warmup - 1))
        log(f"bench train: {name} ({warmup} + {steps} steps on {hosts} ranks)")
        status = launch(train_command(config_path, corpus, out, hosts, comm, warmup + steps, extra))
        if status != 0:
            raise ShunterError(f"the {name} ranks failed (exit status {status}); their output is above")
        measured[name] = summarize(work, hosts, warmup)
    baseline = measured["overlap"]
    for summary in measured.values():
        summary["speedup"] = baseline["step_s"] / summary["step_s"]
        summary["backward_a2a_speedup"] = baseline["a2a_backward_s"] / max(summary["a2a_backward_s"], 1e-12)
    # Every launcher here runs the ranks on this machine (the emulated cluster's hosts or loopback),
    # sharing its cores; recorded so that a re-prediction offline uses the measuring machine's count.
    cores = len(os.sched_getaffinity(0))
    predicted = predict(
        config,
        hosts,
        bandwidth_bytes_s,
        baseline["compute_s"],
        micro_op_bytes,
        [np.asarray(rows) for rows in baseline["dispatch_rows"]],
        baseline["optimizer_s"],
        cores,
        latency_s,
        _packed_routing(measured.get("lina+packing")),
    )
    rows = []
    for name in predicted:
        if name == "calibrated_compute_flop_s":
            continue
        m = measured.get(name)
        p = predicted[name]
        rows.append(
            {
                "variant": name,
                "measured_step_s": None if m is None else m["step_s"],
                "measured_speedup": None if m is None else m["speedup"],
                "predicted_step_s": p["step_s"],
                "predicted_speedup": predicted["overlap"]["step_s"] / p["step_s"],
                "predicted_over_measured": None if m is None else p["step_s"] / m["step_s"],
                "paper_speedup": PAPER_SPEEDUP.get(name, "1.00x (baseline)"),
            }
        )
    return {
        "hosts": hosts,
        "bandwidth_bytes_s": bandwidth_bytes_s,
        "steps": steps,
        "warmup": warmup,
        "micro_op_bytes": micro_op_bytes,
        "bucket_bytes": bucket_bytes,
        "cores": cores,
        "message_latency_s": latency_s,
        "model": dataclasses.asdict(config),
        "dense_gradient_bytes": dense_gradient_bytes(config),
        "rows": rows,
        "measured": measured,
        "predicted": predicted,
    }


def _packed_routing(summary: dict[str, Any] | None) -> tuple[int, list[np.ndarray]] | None:
    """(degree, routing) of a lina+packing run's measured steps, for `predict` (None: not run)."""
    if summary is None:
        return None
    degrees = set(summary["expert_parallel"])
    if len(degrees) != 1:
        raise ShunterError(
            f"lina+packing changed its expert-parallel degree inside the measured steps ({sorted(degrees)}); "
            "give more --warmup steps"
        )
    return degrees.pop(), [np.asarray(rows) for rows in summary["dispatch_rows"]]


def print_train_table(report: dict[str, Any]) -> None:
    print(
        f"{report['hosts']} ranks, ports {report['bandwidth_bytes_s'] * 8 / 1e6:.0f} Mbit/s, dense gradients "
        f"{report['dense_gradient_bytes'] / 1e6:.1f} MB in buckets of {report['bucket_bytes'] / 1e6:.2f} MB, "
        f"micro-op {report['micro_op_bytes'] / 1e6:.2f} MB; "
        f"median of {report['steps']} steps after {report['warmup']} warm-up"
    )
    header = f"{'variant':24}{'step ms':>9}{'speedup':>9}{'sim ms':>9}{'sim x':>8}{'sim/meas':>9}  paper"
    print(header)
    for row in report["rows"]:
        measured = "-" if row["measured_step_s"] is None else f"{row['measured_step_s'] * 1e3:.1f}"
        speedup = "-" if row["measured_speedup"] is None else f"{row['measured_speedup']:.2f}x"
        ratio = "-" if row["predicted_over_measured"] is None else f"{row['predicted_over_measured']:.2f}"
        print(
            f"{row['variant']:24}{measured:>9}{speedup:>9}{row['predicted_step_s'] * 1e3:>9.1f}"
            f"{row['predicted_speedup']:>7.2f}x{ratio:>9}  {row['paper_speedup']}"
        )
    print()
    names = list(report["measured"])
    print(f"{'breakdown (ms, mean over ranks)':34}" + "".join(f"{n:>24}" for n in names))
    for field in BREAKDOWN:
        values = "".join(f"{report['measured'][n][field] * 1e3:>24.1f}" for n in names)
        print(f"{field:34}{values}")


def plot_timelines(report: dict[str, Any], path: Path) -> None:
    """Per variant, per rank, the last measured step: forward, backward, optimizer, and above them the
    all-to-alls and the allreduces in flight, on one clock (ms since the first rank began the step)."""
    from shunter.sim.plots import pyplot, save_figure

    plt = pyplot()
    names = list(report["measured"])
    figure, axes = plt.subplots(len(names), 1, figsize=(10, 1.2 + 0.9 * report["hosts"] * len(names)))
    axes = [axes] if len(names) == 1 else list(axes)
    colors = {
        "forward": "#9ecae1",
        "backward": "#3182bd",
        "optimizer": "#bbbbbb",
        "a2a": "#e6550d",
        "allreduce": "#31a354",
        "expert_allreduce": "#756bb1",
    }
    lanes = {
        "forward": 0.0,
        "backward": 0.0,
        "optimizer": 0.0,
        "a2a": 0.33,
        "allreduce": 0.66,
        "expert_allreduce": 0.66,
    }
    for ax, name in zip(axes, names, strict=True):
        records = report["measured"][name]["per_rank_last_step"]
        first = min(record.get("began_s", 0.0) for record in records)
        for record in records:
            y = record["rank"]
            offset = record.get("began_s", first) - first  # the ranks on one clock, from the first to begin
            for kind, spans in record["intervals"].items():
                bars = [((offset + a) * 1e3, (b - a) * 1e3) for a, b in spans]
                ax.broken_barh(bars, (y + lanes[kind], 0.3), color=colors[kind], label=kind)
        ax.set_title(f"{name}: step {report['measured'][name]['step_s'] * 1e3:.0f} ms (median)", fontsize=9)
        ax.set_yticks(
            [r + 0.5 for r in range(report["hosts"])], [f"rank {r}" for r in range(report["hosts"])]
        )
        ax.set_xlabel("ms since the first rank began the step")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[0].legend(unique.values(), unique.keys(), loc="upper right", fontsize=7, ncol=5)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def _toml(config: TrainConfig) -> str:
    lines = []
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"
