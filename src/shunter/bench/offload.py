"""`shunter bench offload`: offload contenders side by side, each in its own memory-capped process.

commands/bench.py reads the options and prints; run_benchmark runs it. Every run of a contender is
a fresh worker process (bench.workers) inside a fresh memory cgroup (bench.sandbox), the runs
interleaved in rounds (bench.rounds); the report's rows and tables are bench.report's.

Contenders at S sequences in flight (each sequence a 16-token prompt, greedy, no stop token):
  accelerate    transformers + accelerate, experts offloaded to disk, batch S (and at its best
                batch of a sweep);
  simple        the engine one sequence at a time, whole layers prefetched;
  multi-batch   all S sequences in one forward, n = min(S, planner's n) micro-batches sharing
                each layer's load, whole layers prefetched;
  hot-prefetch  + only the predicted hot experts prefetched;
  reorder       + hot experts first (= Shunter's default pipeline);
  predicted     the planner's cost model at S (no process: computed from the machine profile);
  in-memory     the in-memory executor, no cap (the compute-only ceiling).
Plus a sweep of the reorder rung at one sequence per micro-batch (what the planner models), and
the planner's n beside it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from shunter.bench.report import ContenderRow, SweepRow, fastest, ratio
from shunter.bench.rounds import InterleavedRuns
from shunter.bench.sandbox import check_environment
from shunter.bench.workers import PROMPT_TOKENS
from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.loader import TRACE_FILE, model_trace
from shunter.model.spec import ModelSpec, load_spec
from shunter.offload import most_sequences_that_fit, offload_placement
from shunter.offload.engine import PipelineOptions
from shunter.offload.planner import (
    BatchPlan,
    expert_share_from_trace,
    pipeline_times,
    plan_batches,
    predicted_step,
)
from shunter.offload.profile import MachineProfile, machine_profile
from shunter.sim.klotski import PipelineResult
from shunter.units import format_bytes

# the cgroup counts the Python and torch runtime and the page cache of its shared libraries too
DEFAULT_RUNTIME_RESERVE_BYTES = 768 * 2**20
DEFAULT_RUN_TIMEOUT_S = 1200.0  # a run past 20 minutes is thrashing, not measuring
LADDER = ("simple", "multi-batch", "hot-prefetch", "reorder")
SHUNTER_OPTIONS = PipelineOptions(1, "hot", hot_first=True)  # the reorder rung: what Shunter runs


@dataclass(frozen=True)
class BenchConfig:
    """What `shunter bench offload` runs. Sizes in bytes; lists are sequences in flight."""

    model_dir: Path
    cap_bytes: int  # every capped contender's cgroup: weights + KV + runtime + page cache
    runtime_reserve_bytes: int  # of the cap, left to the Python/torch runtime; the rest is weights
    sequences: list[int]
    accelerate_batches: list[int]
    sweep: list[int]
    new_tokens: int
    reps: int
    warmup: int
    work_dir: Path  # accelerate's offload folder goes here
    max_batches: int  # the planner's search limit
    run_timeout_s: float | None = None  # a run past this is killed and its contender marked timed out

    @property
    def weight_budget_bytes(self) -> int:
        """Engine's --memory and accelerate's max_memory["cpu"]: the same weight budget for both."""
        return self.cap_bytes - self.runtime_reserve_bytes


def default_work_dir(model_dir: Path) -> Path:
    """A cache directory next to the model: MODEL.shunter-bench/."""
    return model_dir.resolve().parent / f"{model_dir.resolve().name}.shunter-bench"


def checkpoint_bytes(checkpoint: Checkpoint) -> int:
    """Bytes of every tensor in the checkpoint, as stored."""
    return sum(loc.num_bytes for loc in checkpoint.locations.values())


def budget_shortfall(
    spec: ModelSpec, config: BenchConfig, sequences: int, options: PipelineOptions
) -> str | None:
    """Why the engine cannot run `sequences` in one forward with `options` under the weight
    budget (sized exactly as load_offloaded sizes it), or None when it can."""
    element = torch.tensor([], dtype=spec.torch_dtype).element_size()
    try:
        offload_placement(
            spec, config.weight_budget_bytes, element, options, sequences, PROMPT_TOKENS + config.new_tokens
        )
    except ShunterError as exc:
        # offload_placement names the budget "--memory", which here is the cap less the reserve
        return str(exc).replace(f"--memory {format_bytes(config.weight_budget_bytes)}", "the budget", 1)
    return None


def check_budget_fits(spec: ModelSpec, config: BenchConfig, max_sequences: int) -> None:
    """ShunterError naming --memory unless Shunter's pipeline can run max_sequences in one forward
    under the weight budget, before hours of runs find out."""
    why = budget_shortfall(spec, config, max_sequences, SHUNTER_OPTIONS)
    if why is not None:
        raise ShunterError(
            f"--memory {format_bytes(config.cap_bytes)} leaves {format_bytes(config.weight_budget_bytes)} "
            f"for the engine after --runtime-reserve, too little for {max_sequences} sequences in flight: "
            f"{why}"
        )


def model_figures_tok_s(
    spec: ModelSpec,
    profile: MachineProfile,
    sequences: int,
    num_batches: int,
    context_tokens: int,
    expert_share: np.ndarray | None,
    disk_bytes_s: float | None,
) -> tuple[float, float, float]:
    """The planner's cost model at `sequences` in `num_batches` micro-batches: (the predicted decode
    tok/s, as plan_batches predicts it; the bound; the bound at the profile's disk rate).

    The bound is the same step's disk reads and compute fully overlapped, sequences / max(compute,
    reads), which no schedule beats. It reads at `disk_bytes_s`, the rate a run's own reads got
    (None: the profile's): this disk moves between 0.5 and 2.5 GB/s minutes apart, so the
    profile's second of reads at the start of a benchmark is no bound for a run half an hour later."""

    def step(at: MachineProfile) -> PipelineResult:
        times = pipeline_times(
            spec, at, sequences / num_batches, context_tokens, expert_share, num_batches=num_batches
        )
        return predicted_step(times, num_batches, spec.top_k)

    at_profile = step(profile)
    predicted = sequences / at_profile.step_s
    bound_at_profile = sequences / max(at_profile.compute_s, at_profile.link_busy_s)
    if disk_bytes_s is None:
        return predicted, bound_at_profile, bound_at_profile
    in_run = step(replace(profile, read_bytes_s=disk_bytes_s))
    return predicted, sequences / max(in_run.compute_s, in_run.link_busy_s), bound_at_profile


# ---------------------------------------------------------------------------------------------
# the benchmark, step by step


@dataclass(frozen=True)
class _Setting:
    """What every table of one benchmark shares: the model, its routing, the planner's choice."""

    path: Path
    spec: ModelSpec
    model_bytes: int
    expert_share: np.ndarray | None  # from the model's routing trace; None: uniform
    context_tokens: int  # the mean context of a decode step
    profile: MachineProfile
    plan: BatchPlan

    def model_figures(
        self, sequences: int, num_batches: int, disk_bytes_s: float | None
    ) -> tuple[float, float, float]:
        """(predicted, bound, bound at the profile's disk rate) tok/s: model_figures_tok_s."""
        return model_figures_tok_s(
            self.spec,
            self.profile,
            sequences,
            num_batches,
            self.context_tokens,
            self.expert_share,
            disk_bytes_s,
        )


def _plan_under_the_cap(config: BenchConfig, progress: IO[str]) -> _Setting:
    """The planner's n for the model under the weight budget, checked to fit before any run."""
    path = config.model_dir
    spec = load_spec(path)
    checkpoint = Checkpoint(path)
    model_size = checkpoint_bytes(checkpoint)
    trace = model_trace(path)
    if trace is not None:
        trace.check_fits(spec, str(path / TRACE_FILE))
    share = expert_share_from_trace(trace) if trace is not None else None
    context_tokens = PROMPT_TOKENS + config.new_tokens // 2
    profile = machine_profile(spec, path, spec.torch_dtype, batch_size=1)
    # Klotski's planner is bounded by memory too: no more sequences than the budget holds
    element = torch.tensor([], dtype=spec.torch_dtype).element_size()
    slots = PROMPT_TOKENS + config.new_tokens
    fits = most_sequences_that_fit(
        spec, config.weight_budget_bytes, element, SHUNTER_OPTIONS, slots, config.max_batches
    )
    plan = plan_batches(spec, profile, 1, context_tokens, share, max(fits, 1))
    check_budget_fits(spec, config, max([*config.sequences, *config.sweep, plan.num_batches]))
    print(
        f"model {path.name}: {format_bytes(model_size)}, cap {format_bytes(config.cap_bytes)} per "
        f"contender ({format_bytes(config.weight_budget_bytes)} for weights); "
        f"planner's n = {plan.num_batches}",
        file=progress,
        flush=True,
    )
    return _Setting(path, spec, model_size, share, context_tokens, profile, plan)


class _Jobs:
    """The benchmark's runs, each added once under its label; a rung that cannot fit under the cap
    is not run and is given the reason instead (its key is its label)."""

    def __init__(self, config: BenchConfig, setting: _Setting, progress: IO[str]) -> None:
        self.config, self.setting, self.progress = config, setting, progress
        self.runs = InterleavedRuns()
        self.skipped: dict[str, str] = {}  # run key -> why that rung cannot run under the cap

    def engine(self, sequences: int, batches: int, prefetch: str, hot_first: bool, label: str) -> str:
        options = PipelineOptions(batches, prefetch, hot_first)
        why = budget_shortfall(self.setting.spec, self.config, sequences, options)
        if why is not None:  # this rung needs more memory than the cap leaves: a row without a run
            print(f"{label}: not run, {why}", file=self.progress, flush=True)
            self.skipped[label] = why
            return label
        job = {
            "kind": "shunter",
            "model": str(self.setting.path),
            "memory_bytes": self.config.weight_budget_bytes,
            "new_tokens": self.config.new_tokens,
            "sequences": sequences,
            "num_batches": batches,
            "prefetch": prefetch,
            "hot_first": hot_first,
        }
        return self.runs.add(job, self.config.cap_bytes, label)

    def accelerate(self, batch: int) -> str:
        job = {
            "kind": "accelerate",
            "model": str(self.setting.path),
            "cpu_bytes": self.config.weight_budget_bytes,
            "offload_folder": str(self.config.work_dir / "accelerate-offload"),
            "new_tokens": self.config.new_tokens,
            "sequences": batch,
        }
        return self.runs.add(job, self.config.cap_bytes, f"accelerate batch {batch}")

    def in_memory(self, sequences: int) -> str:
        job = {
            "kind": "in-memory",
            "model": str(self.setting.path),
            "new_tokens": self.config.new_tokens,
            "sequences": sequences,
        }
        return self.runs.add(job, None, f"in-memory S={sequences}")

    def run(self) -> dict[str, dict[str, Any]]:
        """Every run's summary by key; a rung that cannot fit under the cap is a row that says why,
        as a timed-out run is."""
        config = self.config
        self.runs.run(config.reps, config.warmup, self.progress, config.run_timeout_s)
        return self.runs.summaries | {key: {"not_run": why} for key, why in self.skipped.items()}


@dataclass(frozen=True)
class _Keys:
    """The run key of every row: per S, (contender, micro-batches, key) for each measured rung."""

    ladders: dict[int, list[tuple[str, int | None, str]]]
    accelerate_batches: dict[int, str]
    sweep: dict[int, str]
    planner: str  # the reorder rung at the planner's n
    planner_in_memory: str  # the compute ceiling at the planner's n


def _add_jobs(jobs: _Jobs, config: BenchConfig, planner_n: int) -> _Keys:
    ladders: dict[int, list[tuple[str, int | None, str]]] = {}
    for S in config.sequences:
        n = min(S, planner_n)
        at = f"S={S}"
        ladders[S] = [
            ("accelerate", None, jobs.accelerate(S)),
            # one sequence at a time runs S identical one-sequence generations back to back: its
            # decode rate is the one-sequence run's (measured once), only S times longer
            ("simple", 1, jobs.engine(1, 1, "layer", False, f"simple {at}")),
            ("multi-batch", n, jobs.engine(S, n, "layer", False, f"multi-batch {at} n={n}")),
            ("hot-prefetch", n, jobs.engine(S, n, "hot", False, f"hot-prefetch {at} n={n}")),
            ("reorder", n, jobs.engine(S, n, "hot", True, f"reorder {at} n={n}")),
            ("in-memory", None, jobs.in_memory(S)),
        ]
    return _Keys(
        ladders=ladders,
        accelerate_batches={b: jobs.accelerate(b) for b in config.accelerate_batches},
        sweep={S: jobs.engine(S, S, "hot", True, f"reorder S={S} n={S}") for S in config.sweep},
        planner=jobs.engine(planner_n, planner_n, "hot", True, f"reorder S={planner_n} n={planner_n}"),
        # the same sequences with every weight in memory
        planner_in_memory=jobs.in_memory(planner_n),
    )


def _ladder_table(
    setting: _Setting,
    S: int,
    measured: list[tuple[str, int | None, str]],
    summary: dict[str, dict[str, Any]],
    best_accelerate_tok_s: float | None,
) -> dict[str, Any]:
    """One table: every contender at S sequences, each over the references at S."""
    rows = {
        name: ContenderRow.from_summary(name, S, batches, summary.get(key)) for name, batches, key in measured
    }
    n = min(S, setting.plan.num_batches)
    disk_bytes_s = rows["reorder"].decode_disk_bytes_s  # the disk as Shunter's runs found it
    predicted, bound, bound_at_profile = setting.model_figures(S, n, disk_bytes_s)
    rows["predicted"] = ContenderRow.from_summary("predicted", S, n, {"decode_tok_s": predicted})
    rows["bound"] = ContenderRow.from_summary("bound", S, n, {"decode_tok_s": bound})
    rows = {name: rows[name] for name in ["accelerate", *LADDER, "predicted", "bound", "in-memory"]}
    for row in rows.values():
        row.set_ratios(
            accelerate=rows["accelerate"].decode_tok_s,
            accelerate_best=best_accelerate_tok_s,
            predicted=predicted,
            bound=bound,
            in_memory=rows["in-memory"].decode_tok_s,
        )
    ladder_ids = [rows[name].generated_ids for name in LADDER if rows[name].generated_ids is not None]
    return {
        "sequences": S,
        "rows": {name: row.to_dict() for name, row in rows.items()},
        "bound_disk_bytes_s": disk_bytes_s,
        "bound_at_profile_tok_s": bound_at_profile,
        # the simple rung's one-sequence run is compared on the sequences it generated
        "tokens_equal_across_rungs": all(ids == ladder_ids[-1][: len(ids)] for ids in ladder_ids),
        "tokens_equal_in_memory": rows["reorder"].generated_ids == rows["in-memory"].generated_ids,
    }


def _sweep_row(
    setting: _Setting,
    S: int,
    summary: dict[str, Any] | None,
    best_accelerate_tok_s: float | None,
    in_memory: float | None = None,
) -> SweepRow:
    """The reorder rung at S sequences in S micro-batches, beside the cost model's figures at S."""
    row = SweepRow.from_summary("reorder", S, S, summary)
    predicted, bound, row.bound_at_profile_tok_s = setting.model_figures(S, S, row.decode_disk_bytes_s)
    row.set_ratios(
        accelerate_best=best_accelerate_tok_s, predicted=predicted, bound=bound, in_memory=in_memory
    )
    row.predicted_tok_s = predicted
    row.bound_tok_s = bound
    row.in_memory_tok_s = in_memory
    return row


def _report(
    config: BenchConfig,
    setting: _Setting,
    results: list[dict[str, Any]],
    accelerate_rows: list[ContenderRow],
    sweep_rows: list[SweepRow],
    planner_row: SweepRow,
) -> dict[str, Any]:
    plan, spec = setting.plan, setting.spec
    best_accelerate = fastest(accelerate_rows)
    best_tok_s = best_accelerate.decode_tok_s if best_accelerate else None
    # the planner's n is a point of the sweep too: is any n in the list better than it?
    best_sweep = fastest([*sweep_rows, planner_row])
    best_sweep_tok_s = best_sweep.decode_tok_s if best_sweep else None
    return {
        "model": str(setting.path),
        "family": spec.family,
        "dtype": str(spec.torch_dtype).removeprefix("torch."),
        "model_bytes": setting.model_bytes,
        "cap_bytes": config.cap_bytes,
        "runtime_reserve_bytes": config.runtime_reserve_bytes,
        "weight_budget_bytes": config.weight_budget_bytes,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": config.new_tokens,
        "reps": config.reps,
        "warmup": config.warmup,
        "threads": torch.get_num_threads(),
        "planner": {
            "num_batches": plan.num_batches,
            "bubble_free": plan.bubble_free,
            "binding": plan.binding,
            "context_tokens": setting.context_tokens,
            "predicted_tok_s": plan.predicted_tok_s,
            "profile_read_bytes_s": setting.profile.read_bytes_s,  # the disk rate it planned with
        },
        "results": results,
        "accelerate_batches": {
            "rows": [row.to_dict() for row in accelerate_rows],
            "best_batch": best_accelerate.sequences if best_accelerate else None,
        },
        "sweep": {
            "rows": [row.to_dict() for row in sweep_rows],
            "planner_row": planner_row.to_dict(),
            "best_sequences": best_sweep.sequences if best_sweep else None,
            "best_over_planner": ratio(best_sweep_tok_s, planner_row.decode_tok_s),
        },
        # each at its own best: Shunter's best point of the sweep over accelerate's best batch
        "best_over_accelerate_best": ratio(best_sweep_tok_s, best_tok_s),
    }


def run_benchmark(config: BenchConfig, progress: IO[str] = sys.stderr) -> dict[str, Any]:
    """Every contender at every number of sequences, the accelerate batch sweep and the reorder
    sweep; the report as plain JSON values (see docs/offload.md, "Benchmarking"). ShunterError
    unless root with the cgroup v1 memory controller, or when the budget cannot hold the runs."""
    check_environment()
    setting = _plan_under_the_cap(config, progress)
    jobs = _Jobs(config, setting, progress)
    keys = _add_jobs(jobs, config, setting.plan.num_batches)
    summary = jobs.run()

    accelerate_rows = [
        ContenderRow.from_summary("accelerate", b, None, summary[key])
        for b, key in keys.accelerate_batches.items()
    ]
    best_accelerate = fastest(accelerate_rows)
    best_tok_s = best_accelerate.decode_tok_s if best_accelerate else None
    results = [
        _ladder_table(setting, S, measured, summary, best_tok_s) for S, measured in keys.ladders.items()
    ]
    for row in accelerate_rows:
        row.set_ratios(accelerate_best=best_tok_s)
    sweep_rows = [_sweep_row(setting, S, summary.get(key), best_tok_s) for S, key in keys.sweep.items()]
    planner_n = setting.plan.num_batches
    planner_in_memory = summary[keys.planner_in_memory].get("decode_tok_s")
    planner_row = _sweep_row(setting, planner_n, summary.get(keys.planner), best_tok_s, planner_in_memory)
    return _report(config, setting, results, accelerate_rows, sweep_rows, planner_row)
