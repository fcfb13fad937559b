"""`shunter bench decode`: Shunter against llama.cpp at the same precision, in memory and under a cap.

For each precision (a Shunter checkpoint beside the same weights as a GGUF file: bf16/bf16,
8-bit/Q8_0, 4-bit/Q4_0) and each number of sequences S: decode tok/s summed over the S
sequences, every sequence its own random 16-token prompt, both with the same threads.
  in memory   no cap: Shunter's in-memory executor, llama.cpp's `llama-batched-bench`;
  capped      each run in a fresh memory cgroup at --cap (it counts the page cache), the page
              cache dropped first: Shunter as `shunter generate --memory` would run it (in memory
              when the checkpoint fits the weight budget, cap less --runtime-reserve; else the
              offload engine with min(S, --batches) micro-batches), llama.cpp memory-mapping its
              file (the cap bounds its page cache).
The runs of all contenders are interleaved in rounds (bench.rounds), median of --reps after
--warmup. Each row has Shunter / llama.cpp, peak memory and what was read from disk.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shunter.bench.rounds import InterleavedRuns
from shunter.bench.sandbox import check_environment
from shunter.bench.workers import PROMPT_TOKENS
from shunter.model.checkpoint import Checkpoint
from shunter.offload.engine import PipelineOptions

DEFAULT_RUNTIME_RESERVE_BYTES = 400 * 2**20  # torch and the engine's buffers, measured: 0.23-0.4 GB
CONDITIONS = ("in memory", "capped")


@dataclass(frozen=True)
class Precision:
    """One precision's pair: a Shunter checkpoint and llama.cpp's GGUF file of the same weights."""

    name: str  # "bf16", "8-bit", "4-bit"
    checkpoint: Path
    gguf: Path


@dataclass(frozen=True)
class DecodeBenchConfig:
    precisions: list[Precision]
    sequences: list[int]
    cap_bytes: int
    runtime_reserve_bytes: int
    llama_batched_bench: Path
    threads: int
    new_tokens: int
    reps: int
    warmup: int
    max_batches: int = 8  # the offload engine's micro-batches: min(S, this)
    run_timeout_s: float | None = None

    @property
    def weight_budget_bytes(self) -> int:
        return self.cap_bytes - self.runtime_reserve_bytes


def checkpoint_bytes(path: Path) -> int:
    return sum(loc.num_bytes for loc in Checkpoint(path).locations.values())


def shunter_job(config: DecodeBenchConfig, precision: Precision, sequences: int, capped: bool) -> dict:
    """What `shunter generate` runs for this point: in memory unless capped and the checkpoint is
    larger than the weight budget, then the offload engine with Shunter's default pipeline."""
    common = {"model": str(precision.checkpoint), "new_tokens": config.new_tokens, "sequences": sequences}
    if not capped or checkpoint_bytes(precision.checkpoint) <= config.weight_budget_bytes:
        return {"kind": "in-memory", **common}
    default = PipelineOptions()
    return {
        "kind": "shunter",
        **common,
        "memory_bytes": config.weight_budget_bytes,
        "num_batches": min(sequences, config.max_batches),
        "prefetch": default.prefetch,
        "hot_first": default.hot_first,
    }


def llama_job(config: DecodeBenchConfig, precision: Precision, sequences: int) -> dict:
    return {
        "kind": "llama.cpp",
        "binary": str(config.llama_batched_bench),
        "gguf": str(precision.gguf),
        "sequences": sequences,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": config.new_tokens,
        "threads": config.threads,
    }


def _row(summary: dict[str, Any] | None) -> dict[str, Any]:
    if summary is None or "not_run" in summary:
        return {"decode_tok_s": None, "not_run": (summary or {}).get("not_run")}
    keep = (
        "decode_tok_s", "decode_tok_s_reps", "peak_cgroup_bytes", "disk_read_bytes", "bytes_read",
        "retried_runs",
    )  # fmt: skip
    return {key: summary.get(key) for key in keep}


def run_benchmark(config: DecodeBenchConfig, progress: IO[str] = sys.stderr) -> dict[str, Any]:
    check_environment()
    runs = InterleavedRuns()
    keys: list[tuple[str, str, int, str, str]] = []  # (precision, condition, S, shunter key, llama key)
    for precision in config.precisions:
        for S in config.sequences:
            for condition in CONDITIONS:
                capped = condition == "capped"
                cap = config.cap_bytes if capped else None
                at = f"{precision.name} S={S} {condition}"
                ours = runs.add(shunter_job(config, precision, S, capped), cap, f"shunter {at}")
                theirs = runs.add(llama_job(config, precision, S), cap, f"llama.cpp {at}")
                keys.append((precision.name, condition, S, ours, theirs))
    runs.run(config.reps, config.warmup, progress, config.run_timeout_s)
    rows = []
    for name, condition, S, ours, theirs in keys:
        shunter, llama = _row(runs.summaries.get(ours)), _row(runs.summaries.get(theirs))
        a, b = shunter["decode_tok_s"], llama["decode_tok_s"]
        rows.append(
            {
                "precision": name,
                "condition": condition,
                "sequences": S,
                "engine": runs.jobs[ours][0]["kind"],
                "shunter": shunter,
                "llama_cpp": llama,
                "shunter_over_llama_cpp": a / b if a and b else None,
            }
        )
    return {
        "cap_bytes": config.cap_bytes,
        "runtime_reserve_bytes": config.runtime_reserve_bytes,
        "threads": config.threads,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": config.new_tokens,
        "reps": config.reps,
        "warmup": config.warmup,
        "precisions": [
            {
                "name": p.name,
                "checkpoint": str(p.checkpoint),
                "checkpoint_bytes": checkpoint_bytes(p.checkpoint),
                "gguf": str(p.gguf),
                "gguf_bytes": p.gguf.stat().st_size,
            }
            for p in config.precisions
        ],
        "rows": rows,
    }


def print_decode_table(report: dict[str, Any], out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    columns = ("precision", 10), ("condition", 10), ("S", -3), ("engine", 10), ("shunter", -9)
    columns += ("llama.cpp", -9), ("ratio", -6)
    print(" ".join(f"{name:<{w}}" if w > 0 else f"{name:>{-w}}" for name, w in columns), file=out)
    for row in report["rows"]:

        def rate(side: dict[str, Any]) -> str:
            return "-" if side["decode_tok_s"] is None else f"{side['decode_tok_s']:.2f}"

        ratio = row["shunter_over_llama_cpp"]
        print(
            f"{row['precision']:<10} {row['condition']:<10} {row['sequences']:>3} {row['engine']:<10} "
            f"{rate(row['shunter']):>9} {rate(row['llama_cpp']):>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>6}",
            file=out,
        )
