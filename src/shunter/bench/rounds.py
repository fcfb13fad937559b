"""Benchmark jobs run interleaved: every job once per round, each run capped (bench.sandbox).

A slow spell of the machine then spreads over all contenders instead of landing on one; the same
job at the same cap is one measurement however many tables ask for it; a job that runs past its
time limit is reported as timed out and not run again; one that fails is run again once in the
same round (a peer binary now and then exits without its result line), and not run again after a
second failure (killed at its cap, or broken).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from typing import IO, Any

from shunter.bench.sandbox import CappedRun, RunTimedOut, run_capped
from shunter.errors import ShunterError
from shunter.units import format_bytes


class InterleavedRuns:
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
        """Every job warmup + reps times. A job that runs past timeout_s is recorded as such and
        not run again (a contender thrashing under the cap would take hours per round); one that
        fails is run again at once, and after a second failure in a row (killed at its memory cap:
        one that cannot fit says so in its row) not run again. `retried_runs` counts the reruns."""
        timed: dict[str, list[CappedRun]] = {key: [] for key in self.jobs}
        timed_out: dict[str, str] = {}
        retried = dict.fromkeys(self.jobs, 0)
        for round_number in range(warmup + reps):
            which = "warm-up" if round_number < warmup else f"rep {round_number - warmup + 1}/{reps}"
            for key, (job, cap_bytes, label) in self.jobs.items():
                if key in timed_out:
                    continue
                run, why, reruns = _run_retrying_once(job, cap_bytes, label, which, timeout_s, progress)
                retried[key] += reruns
                if run is None:
                    timed_out[key] = str(why)
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
                "retried_runs": retried[key],
            }


def _run_retrying_once(
    job: dict[str, Any],
    cap_bytes: int | None,
    label: str,
    which: str,
    timeout_s: float | None,
    progress: IO[str],
) -> tuple[CappedRun | None, str | None, int]:
    """(the run, or None and why the job is not to be run again; how many runs were retried)."""
    reruns = 0
    while True:
        try:
            return run_capped(job, cap_bytes, f"{label} ({which})", timeout_s), None, reruns
        except RunTimedOut:
            why = f"timed out: no result within {timeout_s:g} s ({which}), not run again"
        except ShunterError as exc:  # killed at the cap, or failed: a row that says so
            if reruns == 0:
                reruns = 1
                print(f"{label:<34} {which:>9}: failed, running it again", file=progress, flush=True)
                continue
            why = f"failed twice ({which}), not run again: {exc}"
        print(f"{label:<34} {which:>9}: {why}", file=progress, flush=True)
        return None, why, reruns


def _median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
