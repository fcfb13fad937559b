"""Run offload contenders side by side, each in its own memory-capped process.

`shunter bench offload` (commands/bench.py) parses the options and prints; this module runs it.
Every run of a contender is a fresh `python -m shunter.offload.bench JOB RESULT` process inside a
cgroup-v1 memory cgroup made for that run (the cap counts the page cache too, so the weights that
"stream from disk" really come from the disk), with the page cache dropped first; the cgroup is
removed after, also on failure and Ctrl-C. Peak = the cgroup's memory.max_usage_in_bytes.

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

import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint, TensorLocation
from shunter.model.loader import model_trace
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.weights import CheckpointLayout
from shunter.offload import most_sequences_that_fit, offload_placement
from shunter.offload.engine import OffloadedModel, PipelineOptions
from shunter.offload.placement import OffloadPlacement
from shunter.offload.planner import (
    BatchPlan,
    MachineProfile,
    expected_touched_experts,
    expert_share_from_trace,
    machine_profile,
    pipeline_times,
    plan_batches,
    predicted_step,
)
from shunter.units import format_bytes

PROMPT_TOKENS = 16
FIRST_PROMPT_ID = 100  # sequence s is the ids 100+s, 101+s, ... (modulo the vocabulary)
MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
CGROUP_PREFIX = "shunter-bench-"
# the cgroup counts the Python and torch runtime and the page cache of its shared libraries too
DEFAULT_RUNTIME_RESERVE_BYTES = 768 * 2**20
DEFAULT_RUN_TIMEOUT_S = 1200.0  # a run past 20 minutes is thrashing, not measuring
LADDER = ("simple", "multi-batch", "hot-prefetch", "reorder")
DESCRIPTIONS = {
    "accelerate": "transformers + accelerate, disk offload",
    "simple": "simple: one sequence at a time, whole layers",
    "multi-batch": "+ multi-batch: the sequences share each layer's load",
    "hot-prefetch": "+ hot-only prefetch (correlation table)",
    "reorder": "+ hot-first expert order (= Shunter)",
    "predicted": "planner's prediction (reorder rung, measured profile)",
    "bound": "bound: disk reads and compute of a step fully overlapped (the run's disk rate)",
    "in-memory": "in-memory executor, uncapped",
}


def prompts(sequences: int, vocab_size: int) -> list[list[int]]:
    """[sequences][PROMPT_TOKENS] token ids, all prompts the same length (no padding)."""
    return [[(FIRST_PROMPT_ID + s + i) % vocab_size for i in range(PROMPT_TOKENS)] for s in range(sequences)]


# ---------------------------------------------------------------------------------------------
# memory cgroups and the page cache


def own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory cgroup directory; None when there is no v1 memory controller."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            group = MEMORY_CGROUP_ROOT / path.lstrip("/")
            return group if (group / "memory.max_usage_in_bytes").is_file() else None
    return None


def check_environment() -> Path:
    """The memory cgroup to make run cgroups under; ShunterError unless root with cgroup-v1 memory."""
    if os.geteuid() != 0:
        raise ShunterError(
            "shunter bench offload needs root (memory cgroups, dropping the page cache); run it with sudo"
        )
    group = own_memory_cgroup()
    if group is None:
        raise ShunterError(
            f"shunter bench offload needs the cgroup v1 memory controller ({MEMORY_CGROUP_ROOT}), "
            "which caps page cache and process memory together; this machine has none"
        )
    return group


def drop_page_cache() -> None:
    """Write dirty pages back and drop the clean ones, so the next run reads from the device."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


_group_numbers = itertools.count()


@contextlib.contextmanager
def memory_cgroup(cap_bytes: int | None) -> Iterator[Path]:
    """A fresh memory cgroup under this process's, capped at cap_bytes (None: no cap, just
    measured); removed on exit, after killing whatever is still in it."""
    parent = own_memory_cgroup()
    if parent is None:
        raise ShunterError(f"no cgroup v1 memory controller at {MEMORY_CGROUP_ROOT}")
    group = parent / f"{CGROUP_PREFIX}{os.getpid()}-{next(_group_numbers)}"
    group.mkdir()
    try:
        if cap_bytes is not None:
            (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        yield group
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group: Path) -> None:
    # only the run's own process tree can be in it: a worker that outlived an interrupt
    deadline = time.monotonic() + 10.0
    while True:
        pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        if not pids:
            try:
                group.rmdir()
                return
            except OSError:  # EBUSY for a moment after the last process exits
                pass
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            print(f"shunter: warning: could not remove the cgroup {group}", file=sys.stderr)
            return
        time.sleep(0.02)


class RunTimedOut(ShunterError):
    """A worker ran past its time limit and was killed (a contender thrashing under the cap)."""


@dataclass(frozen=True)
class CappedRun:
    result: dict[str, Any]  # what the worker wrote
    peak_cgroup_bytes: int  # memory.max_usage_in_bytes: processes + page cache, at the highest
    wall_s: float  # the process, start to exit


def run_capped(
    job: dict[str, Any], cap_bytes: int | None, label: str, timeout_s: float | None = None
) -> CappedRun:
    """Run one job in a fresh worker process in a fresh memory cgroup capped at cap_bytes, with the
    page cache dropped first. ShunterError (the worker's output tail on stderr) when it fails;
    RunTimedOut when it runs past timeout_s (the worker is killed with the cgroup)."""
    with tempfile.TemporaryDirectory(prefix="shunter-bench-") as scratch:
        job_path, result_path = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job_path.write_text(json.dumps(job))
        argv = [sys.executable, "-m", "shunter.offload.bench", str(job_path), str(result_path)]
        drop_page_cache()
        with memory_cgroup(cap_bytes) as group:
            procs = str(group / "cgroup.procs")

            def enter() -> None:  # in the child, before exec: everything it maps counts
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

            started = time.perf_counter()
            try:
                done = subprocess.run(
                    argv, preexec_fn=enter, capture_output=True, text=True, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                raise RunTimedOut(f"{label}: no result within {timeout_s:g} s; killed") from None
            wall_s = time.perf_counter() - started
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            oom_kills = _oom_kills(group)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            why = f"exit status {done.returncode}"
            if oom_kills or done.returncode == -signal.SIGKILL:
                why += f", killed at the memory cap (peak {format_bytes(peak)}): raise --memory"
            raise ShunterError(f"{label} failed ({why}); its last output is above")
        return CappedRun(json.loads(result_path.read_text()), peak, wall_s)


def _oom_kills(group: Path) -> int:
    with contextlib.suppress(OSError):
        for line in (group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# what the placement says the engine reads


class _ByteCounter:
    """A CheckpointLayout fetch that reads nothing: it adds up each tensor's bytes on disk (as
    DirectReader.stats.bytes_read counts them) and hands back an empty meta tensor of its shape."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, loc: TensorLocation) -> torch.Tensor:
        self.bytes += loc.num_bytes
        return torch.empty(loc.shape, dtype=loc.dtype, device="meta")


def planned_read_bytes(
    spec: ModelSpec,
    checkpoint: Checkpoint,
    placement: OffloadPlacement,
    dtype: torch.dtype,
    touched_experts: float | None = None,
) -> tuple[int, int]:
    """(bytes read once at load: embeddings, head and what the placement pins; bytes streamed per
    forward), in checkpoint bytes.

    A forward streams every layer block the placement leaves on disk and, per MoE layer, either
    every expert it leaves on disk (touched_experts None: whole-layer prefetch, exact) or the
    expected `touched_experts` of them, at the layer's mean streamed expert size (hot-only
    prefetch; a mispredicted prefetch adds to what is read)."""
    counter = _ByteCounter()
    layout = CheckpointLayout(spec, checkpoint, fetch=counter)
    embed = layout.embed(dtype)
    layout.final_norm(dtype)
    layout.lm_head(dtype, embed)
    for layer in sorted(placement.resident_blocks):
        layout.layer(layer, dtype, False)
    for layer, expert in sorted(placement.resident_experts):
        layout.expert(layer, expert, dtype)
    at_load, counter.bytes = counter.bytes, 0
    for layer in range(spec.num_layers):
        if layer not in placement.resident_blocks:
            layout.layer(layer, dtype, False)
        if not spec.moe_layers[layer]:
            continue
        before = counter.bytes
        streamed = [e for e in range(spec.num_experts) if (layer, e) not in placement.resident_experts]
        for expert in streamed:
            layout.expert(layer, expert, dtype)
        if touched_experts is not None and streamed:
            layer_bytes = counter.bytes - before
            # touched experts are spread over resident and streamed ones alike
            counter.bytes = before + round(
                layer_bytes / spec.num_experts * min(touched_experts, spec.num_experts)
            )
    return at_load, counter.bytes


def process_read_bytes() -> int:
    """Bytes this process has fetched from storage (/proc/self/io read_bytes): O_DIRECT reads,
    page faults of memory-mapped files and readahead alike."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# the workers: each runs in its own process and returns a JSON-able dict


def shunter_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The offload engine on job["sequences"] prompts in one forward."""
    from shunter.model.generate import generate
    from shunter.offload import PipelineOptions, load_offloaded

    path = Path(job["model"])
    spec = load_spec(path)
    sequence_prompts = prompts(job["sequences"], spec.vocab_size)
    options = PipelineOptions(job["num_batches"], job["prefetch"], job["hot_first"])
    read_before = process_read_bytes()
    model: OffloadedModel = load_offloaded(
        path,
        job["memory_bytes"],
        options=options,
        sequences=len(sequence_prompts),
        max_slots=PROMPT_TOKENS + job["new_tokens"],
        trace=model_trace(path),
    )
    stats = model.reader.stats
    at_first_step: list[tuple[int, float]] = []  # (bytes read, read seconds) when decoding starts

    def mark_decode_start(_tokens: list[int | None]) -> None:
        if not at_first_step:
            at_first_step.append((stats.bytes_read, stats.seconds))

    try:
        result = generate(model, sequence_prompts, job["new_tokens"], on_step=mark_decode_start)
        decode_bytes = stats.bytes_read - at_first_step[0][0]
        decode_read_s = stats.seconds - at_first_step[0][1]
        checkpoint = Checkpoint(path)
        share = np.full(spec.num_experts, 1.0 / spec.num_experts)

        def streamed_per_forward(tokens: int) -> int:
            touched = (
                None if options.prefetch == "layer" else expected_touched_experts(share, spec.top_k, tokens)
            )
            return planned_read_bytes(spec, checkpoint, model.placement, model.dtype, touched)[1]

        at_load, _ = planned_read_bytes(spec, checkpoint, model.placement, model.dtype)
        # the prefill (every prompt token), then one forward per decode step (a token per sequence)
        planned = streamed_per_forward(len(sequence_prompts) * PROMPT_TOKENS)
        planned += result.decode_steps * streamed_per_forward(len(sequence_prompts))
        return {
            "decode_tok_s": result.decode_tok_s,
            "bytes_read": stats.bytes_read,
            "planned_bytes_read": at_load + planned,
            "disk_read_bytes": process_read_bytes() - read_before,
            # the rate this run's decode reads got from the disk: bytes over the seconds spent in
            # them (not the idle time between them), the disk as it was during this run
            "decode_disk_bytes_s": decode_bytes / decode_read_s if decode_read_s > 0 else None,
            # how much of the decode the I/O thread spent reading: near 1, reads bind and it never waits
            "decode_io_busy": decode_read_s / result.decode_s if result.decode_s > 0 else None,
            "prefetch_hit_rate": model.prefetcher.hit_rate if options.prefetch == "hot" else None,
            "generated_ids": result.tokens,
        }
    finally:
        model.close()


def in_memory_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The in-memory executor on job["sequences"] prompts in one batch."""
    from shunter.model.generate import generate
    from shunter.model.loader import load_model

    read_before = process_read_bytes()
    loaded = load_model(job["model"])
    result = generate(loaded.model, prompts(job["sequences"], loaded.spec.vocab_size), job["new_tokens"])
    return {
        "decode_tok_s": result.decode_tok_s,
        "disk_read_bytes": process_read_bytes() - read_before,
        "generated_ids": result.tokens,
    }


def accelerate_worker(job: dict[str, Any]) -> dict[str, Any]:
    """transformers + accelerate: device_map="auto" keeps up to cpu_bytes of weights in RAM and
    memory-maps the rest from offload_folder; batch job["sequences"]. Decode tok/s is timed with a
    streamer: from the first generated token to the last."""
    from transformers import AutoModelForCausalLM

    read_before = process_read_bytes()
    model = AutoModelForCausalLM.from_pretrained(
        job["model"],
        dtype="auto",
        device_map="auto",
        max_memory={"cpu": job["cpu_bytes"]},
        offload_folder=job["offload_folder"],
    )
    ids = torch.tensor(prompts(job["sequences"], model.config.vocab_size))
    times: list[float] = []

    class Clock:  # transformers calls put() with the prompt, then once per generated token
        def put(self, _value: torch.Tensor) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    new = job["new_tokens"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=Clock(),
            pad_token_id=0,
        )
    return {
        "decode_tok_s": job["sequences"] * (new - 1) / (times[-1] - times[1]),
        "disk_read_bytes": process_read_bytes() - read_before,
        "generated_ids": out[:, PROMPT_TOKENS:].tolist(),
    }


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "shunter": shunter_worker,
    "in-memory": in_memory_worker,
    "accelerate": accelerate_worker,
}


def worker_main(argv: list[str]) -> int:
    """`python -m shunter.offload.bench JOB.json RESULT.json`: run one job, write its result."""
    job_path, result_path = argv
    job = json.loads(Path(job_path).read_text())
    try:
        result = WORKERS[job["kind"]](job)
    except ShunterError as exc:
        print(f"shunter: error: {exc}", file=sys.stderr)
        return 2
    Path(result_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# the benchmark


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


SHUNTER_OPTIONS = PipelineOptions(1, "hot", hot_first=True)  # the reorder rung: what Shunter runs


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


def predicted_and_bound_tok_s(
    spec: ModelSpec,
    profile: MachineProfile,
    sequences: int,
    num_batches: int,
    context_tokens: int,
    expert_share: np.ndarray | None,
) -> tuple[float, float]:
    """The planner's cost model at `sequences` in `num_batches` micro-batches: (the predicted decode
    tok/s, as plan_batches predicts it; the bound: the same step's disk reads and compute fully
    overlapped, sequences / max(compute, reads), which no schedule beats on this profile)."""
    times = pipeline_times(
        spec, profile, sequences / num_batches, context_tokens, expert_share, num_batches=num_batches
    )
    step = predicted_step(times, num_batches, spec.top_k)
    return sequences / step.step_s, sequences / max(step.compute_s, step.link_busy_s)


def model_figures_tok_s(
    spec: ModelSpec,
    profile: MachineProfile,
    sequences: int,
    num_batches: int,
    context_tokens: int,
    expert_share: np.ndarray | None,
    disk_bytes_s: float | None,
) -> tuple[float, float, float]:
    """(predicted, bound, bound at the profile's disk rate) tok/s, as predicted_and_bound_tok_s.
    The bound reads at `disk_bytes_s`, the rate a run's own reads got (None: the profile's): this
    disk moves between 0.5 and 2.5 GB/s minutes apart, so the profile's second of reads at the
    start of a benchmark is no bound for a run half an hour later."""
    args = (sequences, num_batches, context_tokens, expert_share)
    predicted, bound_at_profile = predicted_and_bound_tok_s(spec, profile, *args)
    if disk_bytes_s is None:
        return predicted, bound_at_profile, bound_at_profile
    _, bound = predicted_and_bound_tok_s(spec, replace(profile, read_bytes_s=disk_bytes_s), *args)
    return predicted, bound, bound_at_profile


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _fastest(rows: list[dict]) -> dict | None:
    """The row with the highest decode tok/s among those that ran (None when none did)."""
    ran = [row for row in rows if row["decode_tok_s"] is not None]
    return max(ran, key=lambda row: row["decode_tok_s"]) if ran else None


class _Runs:
    """Jobs to run, deduplicated (the same job at the same cap is one measurement), run in rounds:
    every job once per round, so a slow spell of the machine spreads over all contenders."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[dict[str, Any], int | None, str]] = {}
        self.summaries: dict[str, dict[str, Any]] = {}

    def add(self, job: dict[str, Any], cap_bytes: int | None, label: str) -> str:
        key = json.dumps([job, cap_bytes], sort_keys=True)
        self.jobs.setdefault(key, (job, cap_bytes, label))
        return key

    def run(self, reps: int, warmup: int, progress: IO[str], timeout_s: float | None = None) -> None:
        """Every job warmup + reps times. A job that runs past timeout_s is recorded as timed out
        and not run again (a contender thrashing under the cap would take hours per round)."""
        timed: dict[str, list[CappedRun]] = {key: [] for key in self.jobs}
        timed_out: dict[str, str] = {}
        for round_number in range(warmup + reps):
            which = "warm-up" if round_number < warmup else f"rep {round_number - warmup + 1}/{reps}"
            for key, (job, cap_bytes, label) in self.jobs.items():
                if key in timed_out:
                    continue
                try:
                    run = run_capped(job, cap_bytes, f"{label} ({which})", timeout_s)
                except RunTimedOut:
                    timed_out[key] = f"timed out: no result within {timeout_s:g} s ({which}), not run again"
                    print(f"{label:<34} {which:>9}: {timed_out[key]}", file=progress, flush=True)
                    continue
                if round_number >= warmup:
                    timed[key].append(run)
                result = run.result
                read = f", read {format_bytes(result['bytes_read'])}" if "bytes_read" in result else ""
                print(
                    f"{label:<34} {which:>9}: decode {result['decode_tok_s']:9.3f} tok/s, "
                    f"peak {format_bytes(run.peak_cgroup_bytes)}{read}, {run.wall_s:.1f} s",
                    file=progress,
                    flush=True,
                )
        for key, why in timed_out.items():
            self.summaries[key] = {"not_run": why}
        for key, runs in timed.items():
            if key in timed_out:
                continue
            rates = [r.result["decode_tok_s"] for r in runs]
            last = runs[-1].result
            self.summaries[key] = {
                "decode_tok_s": statistics.median(rates),
                "decode_tok_s_reps": rates,
                "bytes_read": last.get("bytes_read"),
                "planned_bytes_read": last.get("planned_bytes_read"),
                "disk_read_bytes": statistics.median(r.result["disk_read_bytes"] for r in runs),
                "peak_cgroup_bytes": max(r.peak_cgroup_bytes for r in runs),
                "prefetch_hit_rate": last.get("prefetch_hit_rate"),
                "decode_disk_bytes_s": _median_or_none(r.result.get("decode_disk_bytes_s") for r in runs),
                "decode_io_busy": _median_or_none(r.result.get("decode_io_busy") for r in runs),
                "wall_s": statistics.median(r.wall_s for r in runs),
                "generated_ids": last["generated_ids"],
            }


def _median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _row(contender: str, sequences: int, batches: int | None, summary: dict[str, Any] | None) -> dict:
    """One contender's figures (None where they do not apply); the ratios are filled in later."""
    empty = dict.fromkeys(
        [
            "decode_tok_s",
            "decode_tok_s_reps",
            "bytes_read",
            "planned_bytes_read",
            "disk_read_bytes",
            "peak_cgroup_bytes",
            "prefetch_hit_rate",
            "decode_disk_bytes_s",
            "decode_io_busy",
            "wall_s",
            "generated_ids",
            "not_run",
        ]
    )
    return {
        "contender": contender,
        "description": DESCRIPTIONS[contender],
        "sequences": sequences,
        "batches": batches,
        **empty,
        **(summary or {}),
    }


def _add_ratios(
    row: dict,
    *,
    accelerate: float | None = None,
    accelerate_best: float | None = None,
    predicted: float | None = None,
    bound: float | None = None,
    in_memory: float | None = None,
) -> None:
    """row's decode tok/s over each reference (None where the reference does not apply)."""
    ours = row["decode_tok_s"]
    row["vs_accelerate"] = _ratio(ours, accelerate)
    row["vs_accelerate_best"] = _ratio(ours, accelerate_best)
    row["vs_predicted"] = _ratio(ours, predicted)
    row["vs_bound"] = _ratio(ours, bound)
    row["vs_in_memory"] = _ratio(ours, in_memory)


def run_benchmark(config: BenchConfig, progress: IO[str] = sys.stderr) -> dict[str, Any]:
    """Every contender at every number of sequences, the accelerate batch sweep and the reorder
    sweep; the report as plain JSON values (see docs/offload.md, "Benchmarking")."""
    path = config.model_dir
    spec = load_spec(path)
    checkpoint = Checkpoint(path)
    model_size = checkpoint_bytes(checkpoint)
    trace = model_trace(path)
    share = expert_share_from_trace(trace) if trace is not None else None
    context_tokens = PROMPT_TOKENS + config.new_tokens // 2  # the mean context of a decode step
    profile = machine_profile(spec, path, spec.torch_dtype, batch_size=1)
    # Klotski's planner is bounded by memory too: no more sequences than the budget holds
    element = torch.tensor([], dtype=spec.torch_dtype).element_size()
    slots = PROMPT_TOKENS + config.new_tokens
    fits = most_sequences_that_fit(
        spec, config.weight_budget_bytes, element, SHUNTER_OPTIONS, slots, config.max_batches
    )
    plan: BatchPlan = plan_batches(spec, profile, 1, context_tokens, share, max(fits, 1))
    planner_n = plan.num_batches
    check_budget_fits(spec, config, max([*config.sequences, *config.sweep, planner_n]))
    print(
        f"model {path.name}: {format_bytes(model_size)}, cap {format_bytes(config.cap_bytes)} per "
        f"contender ({format_bytes(config.weight_budget_bytes)} for weights); planner's n = {planner_n}",
        file=progress,
        flush=True,
    )

    budget = config.weight_budget_bytes
    offload_folder = str(config.work_dir / "accelerate-offload")
    runs = _Runs()
    skipped: dict[str, str] = {}  # run key -> why that rung cannot run under the cap

    def engine(sequences: int, batches: int, prefetch: str, hot_first: bool, label: str) -> str:
        why = budget_shortfall(spec, config, sequences, PipelineOptions(batches, prefetch, hot_first))
        if why is not None:  # this rung needs more memory than the cap leaves: a row without a run
            print(f"{label}: not run, {why}", file=progress, flush=True)
            skipped[label] = why
            return label
        job = {
            "kind": "shunter",
            "model": str(path),
            "memory_bytes": budget,
            "new_tokens": config.new_tokens,
            "sequences": sequences,
            "num_batches": batches,
            "prefetch": prefetch,
            "hot_first": hot_first,
        }
        return runs.add(job, config.cap_bytes, label)

    def accelerate(batch: int) -> str:
        job = {
            "kind": "accelerate",
            "model": str(path),
            "cpu_bytes": budget,
            "offload_folder": offload_folder,
            "new_tokens": config.new_tokens,
            "sequences": batch,
        }
        return runs.add(job, config.cap_bytes, f"accelerate batch {batch}")

    # what each row measures: (contender, sequences, micro-batches, run key)
    plans: dict[int, list[tuple[str, int | None, str]]] = {}
    for S in config.sequences:
        n = min(S, planner_n)
        at = f"S={S}"
        in_memory_job = {"kind": "in-memory", "model": str(path), "new_tokens": config.new_tokens}
        plans[S] = [
            ("accelerate", None, accelerate(S)),
            # one sequence at a time runs S identical one-sequence generations back to back: its
            # decode rate is the one-sequence run's (measured once), only S times longer
            ("simple", 1, engine(1, 1, "layer", False, f"simple {at}")),
            ("multi-batch", n, engine(S, n, "layer", False, f"multi-batch {at} n={n}")),
            ("hot-prefetch", n, engine(S, n, "hot", False, f"hot-prefetch {at} n={n}")),
            ("reorder", n, engine(S, n, "hot", True, f"reorder {at} n={n}")),
            ("in-memory", None, runs.add(in_memory_job | {"sequences": S}, None, f"in-memory {at}")),
        ]
    accelerate_keys = {b: accelerate(b) for b in config.accelerate_batches}
    sweep_keys = {S: engine(S, S, "hot", True, f"reorder S={S} n={S}") for S in config.sweep}
    planner_key = engine(planner_n, planner_n, "hot", True, f"reorder S={planner_n} n={planner_n}")
    # the compute ceiling at the planner's n: the same sequences with every weight in memory
    planner_in_memory_key = runs.add(
        {"kind": "in-memory", "model": str(path), "new_tokens": config.new_tokens, "sequences": planner_n},
        None,
        f"in-memory S={planner_n}",
    )
    runs.run(config.reps, config.warmup, progress, config.run_timeout_s)
    # a rung that cannot fit under the cap is a row that says why, as a timed-out run is
    summary = runs.summaries | {key: {"not_run": why} for key, why in skipped.items()}

    accelerate_rows = [_row("accelerate", b, None, summary[k]) for b, k in accelerate_keys.items()]
    best_accelerate = _fastest(accelerate_rows)
    best_tok_s = best_accelerate["decode_tok_s"] if best_accelerate else None

    def model_figures(S: int, n: int, disk_bytes_s: float | None) -> tuple[float, float, float]:
        return model_figures_tok_s(spec, profile, S, n, context_tokens, share, disk_bytes_s)

    results = []
    for S, measured in plans.items():
        rows = {name: _row(name, S, batches, summary.get(key)) for name, batches, key in measured}
        n = min(S, planner_n)
        disk_bytes_s = rows["reorder"]["decode_disk_bytes_s"]  # the disk as Shunter's runs found it
        predicted, bound, bound_at_profile = model_figures(S, n, disk_bytes_s)
        rows["predicted"] = _row("predicted", S, n, {"decode_tok_s": predicted})
        rows["bound"] = _row("bound", S, n, {"decode_tok_s": bound})
        rows = {name: rows[name] for name in ["accelerate", *LADDER, "predicted", "bound", "in-memory"]}
        for row in rows.values():
            _add_ratios(
                row,
                accelerate=rows["accelerate"]["decode_tok_s"],
                accelerate_best=best_tok_s,
                predicted=predicted,
                bound=bound,
                in_memory=rows["in-memory"]["decode_tok_s"],
            )
        ladder_ids = [
            rows[name]["generated_ids"] for name in LADDER if rows[name]["generated_ids"] is not None
        ]
        in_memory_ids = rows["in-memory"]["generated_ids"]
        results.append(
            {
                "sequences": S,
                "rows": rows,
                "bound_disk_bytes_s": disk_bytes_s,
                "bound_at_profile_tok_s": bound_at_profile,
                # the simple rung's one-sequence run is compared on the sequences it generated
                "tokens_equal_across_rungs": all(ids == ladder_ids[-1][: len(ids)] for ids in ladder_ids),
                "tokens_equal_in_memory": rows["reorder"]["generated_ids"] == in_memory_ids,
            }
        )
    for row in accelerate_rows:
        _add_ratios(row, accelerate_best=best_tok_s)

    def sweep_row(S: int, key: str, in_memory: float | None = None) -> dict:
        row = _row("reorder", S, S, summary.get(key))
        predicted, bound, row["bound_at_profile_tok_s"] = model_figures(S, S, row["decode_disk_bytes_s"])
        _add_ratios(row, accelerate_best=best_tok_s, predicted=predicted, bound=bound, in_memory=in_memory)
        row["predicted_tok_s"] = predicted
        row["bound_tok_s"] = bound
        row["in_memory_tok_s"] = in_memory
        return row

    sweep_rows = [sweep_row(S, key) for S, key in sweep_keys.items()]
    planner_row = sweep_row(planner_n, planner_key, summary[planner_in_memory_key].get("decode_tok_s"))
    # the planner's n is a point of the sweep too: is any n in the list better than it?
    best_sweep = _fastest([*sweep_rows, planner_row])
    return {
        "model": str(path),
        "family": spec.family,
        "dtype": str(spec.torch_dtype).removeprefix("torch."),
        "model_bytes": model_size,
        "cap_bytes": config.cap_bytes,
        "runtime_reserve_bytes": config.runtime_reserve_bytes,
        "weight_budget_bytes": budget,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": config.new_tokens,
        "reps": config.reps,
        "warmup": config.warmup,
        "threads": torch.get_num_threads(),
        "planner": {
            "num_batches": planner_n,
            "bubble_free": plan.bubble_free,
            "binding": plan.binding,
            "context_tokens": context_tokens,
            "predicted_tok_s": plan.predicted_tok_s,
            "profile_read_bytes_s": profile.read_bytes_s,  # the disk rate it planned with
        },
        "results": results,
        "accelerate_batches": {
            "rows": accelerate_rows,
            "best_batch": best_accelerate["sequences"] if best_accelerate else None,
        },
        "sweep": {
            "rows": sweep_rows,
            "planner_row": planner_row,
            "best_sequences": best_sweep["sequences"] if best_sweep else None,
            "best_over_planner": _ratio(
                best_sweep and best_sweep["decode_tok_s"], planner_row["decode_tok_s"]
            ),
        },
        # each at its own best: Shunter's best point of the sweep over accelerate's best batch
        "best_over_accelerate_best": _ratio(best_sweep and best_sweep["decode_tok_s"], best_tok_s),
    }


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
