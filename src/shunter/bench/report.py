"""The offload benchmark's report: typed rows, their ratios, the JSON file and the tables.

A report is plain JSON values (docs/offload.md, "Benchmarking"); a row is a ContenderRow until the
report is assembled, then its to_dict(). The tables read the JSON form, so a saved report prints
the same as a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shunter.units import format_bytes

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
# the table's short names; the JSON's "description" says each in words
TABLE_NAMES = {
    "accelerate": "accelerate",
    "simple": "simple",
    "multi-batch": "multi-batch",
    "hot-prefetch": "hot-prefetch",
    "reorder": "reorder (Shunter)",
    "predicted": "predicted (planner)",
    "bound": "bound (overlapped)",
    "in-memory": "in-memory (no cap)",
}
RATIO_FIELDS = ("vs_accelerate", "vs_accelerate_best", "vs_predicted", "vs_bound", "vs_in_memory")


@dataclass
class ContenderRow:
    """One contender at `sequences` in flight in `batches` micro-batches: what its runs measured
    (bench.rounds' summary, medians over the repetitions; None where a figure does not apply or
    nothing ran) and its decode tok/s over each reference (None where the reference does not
    apply)."""

    contender: str
    description: str
    sequences: int
    batches: int | None
    # measured
    decode_tok_s: float | None = None
    decode_tok_s_reps: list[float] | None = None
    bytes_read: int | None = None
    planned_bytes_read: int | None = None
    disk_read_bytes: float | None = None
    peak_cgroup_bytes: int | None = None
    prefetch_hit_rate: float | None = None
    decode_disk_bytes_s: float | None = None
    decode_io_busy: float | None = None
    wall_s: float | None = None
    generated_ids: list[list[int]] | None = None
    not_run: str | None = None  # why nothing was measured: timed out, or does not fit the cap
    retried_runs: int = 0  # runs that failed once and were run again (bench.rounds)
    # decode_tok_s over each reference
    vs_accelerate: float | None = None
    vs_accelerate_best: float | None = None
    vs_predicted: float | None = None
    vs_bound: float | None = None
    vs_in_memory: float | None = None

    @classmethod
    def from_summary(
        cls, contender: str, sequences: int, batches: int | None, summary: dict[str, Any] | None
    ) -> ContenderRow:
        """A row of `summary`'s figures (InterleavedRuns.summaries, or {"decode_tok_s": x} for a
        figure of the cost model); the ratios are set later."""
        return cls(contender, DESCRIPTIONS[contender], sequences, batches, **(summary or {}))

    def set_ratios(
        self,
        *,
        accelerate: float | None = None,
        accelerate_best: float | None = None,
        predicted: float | None = None,
        bound: float | None = None,
        in_memory: float | None = None,
    ) -> None:
        """decode_tok_s over each reference (None where the reference does not apply)."""
        ours = self.decode_tok_s
        self.vs_accelerate = ratio(ours, accelerate)
        self.vs_accelerate_best = ratio(ours, accelerate_best)
        self.vs_predicted = ratio(ours, predicted)
        self.vs_bound = ratio(ours, bound)
        self.vs_in_memory = ratio(ours, in_memory)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(ContenderRow)}


@dataclass
class SweepRow(ContenderRow):
    """A point of the reorder sweep, with the cost model's figures it is compared with."""

    bound_at_profile_tok_s: float | None = None  # the bound at the profile's disk rate
    predicted_tok_s: float | None = None
    bound_tok_s: float | None = None  # the bound at the rate this row's own decode reads got
    in_memory_tok_s: float | None = None  # the in-memory executor at the same sequences (planner's n only)

    def to_dict(self) -> dict[str, Any]:
        # the cost model's bound at the profile comes before the ratios, its other figures after
        row = super().to_dict()
        ratios = {name: row.pop(name) for name in RATIO_FIELDS}
        return {
            **row,
            "bound_at_profile_tok_s": self.bound_at_profile_tok_s,
            **ratios,
            "predicted_tok_s": self.predicted_tok_s,
            "bound_tok_s": self.bound_tok_s,
            "in_memory_tok_s": self.in_memory_tok_s,
        }


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def fastest(rows: list[ContenderRow]) -> ContenderRow | None:
    """The row with the highest decode tok/s among those that ran (None when none did)."""
    ran = [row for row in rows if row.decode_tok_s is not None]
    return max(ran, key=lambda row: row.decode_tok_s) if ran else None


# ---------------------------------------------------------------------------------------------
# the tables


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _size(value: float | None) -> str:
    return "-" if value is None else format_bytes(value)


def _print_rows(rows: list[dict], names: list[str]) -> None:
    print(
        f"  {'contender':<26} {'seqs':>4} {'n':>3} {'decode tok/s':>12} {'x accel':>8} {'x pred':>7} "
        f"{'x bound':>7} "
        f"{'x in-mem':>8} {'read':>10} {'planned':>10} {'peak':>10} {'hits':>5}"
    )
    for name, row in zip(names, rows, strict=True):
        hits = row["prefetch_hit_rate"]
        if row["decode_tok_s"] is None:
            print(
                f"  {name:<26} {row['sequences']:>4} {row['batches'] or '-':>3}  "
                f"not run: {row.get('not_run')}"
            )
            continue
        print(
            f"  {name:<26} {row['sequences']:>4} {row['batches'] or '-':>3} {row['decode_tok_s']:>12.3f} "
            f"{_times(row['vs_accelerate']):>8} {_times(row['vs_predicted']):>7} "
            f"{_times(row['vs_bound']):>7} "
            f"{_times(row['vs_in_memory']):>8} {_size(row['bytes_read']):>10} "
            f"{_size(row['planned_bytes_read']):>10} {_size(row['peak_cgroup_bytes']):>10} "
            f"{'-' if hits is None else f'{hits:.2f}':>5}"
        )


def print_offload_table(report: dict) -> None:
    """The report (its JSON form) as one table per number of sequences in flight, accelerate's
    batches and the sweep, on stdout."""
    planner = report["planner"]
    print(
        f"{Path(report['model']).name} ({report['family']} {report['dtype']}, "
        f"{format_bytes(report['model_bytes'])}); cap {format_bytes(report['cap_bytes'])} per contender "
        f"({format_bytes(report['weight_budget_bytes'])} for weights); {report['prompt_tokens']}-token "
        f"prompts, {report['new_tokens']} new tokens; median of {report['reps']} after "
        f"{report['warmup']} warm-up; {report['threads']} threads"
    )
    print(
        f"planner: n = {planner['num_batches']} "
        f"({'bubble free' if planner['bubble_free'] else 'not bubble free'}, ({planner['binding']}) binds), "
        f"predicted {planner['predicted_tok_s']:.1f} tok/s at n"
    )
    for result in report["results"]:
        S = result["sequences"]
        print(f"\n{S} sequence{'s' * (S > 1)} in flight")
        rows = list(result["rows"].values())
        _print_rows(rows, [TABLE_NAMES[row["contender"]] for row in rows])
        equal = "yes" if result["tokens_equal_across_rungs"] else "NO"
        in_memory = "yes" if result["tokens_equal_in_memory"] else "NO"
        print(f"  tokens equal across the ladder: {equal}; reorder = in-memory: {in_memory}")
        disk = result.get("bound_disk_bytes_s")
        if disk is not None:
            print(
                f"  bound reads at {disk / 1e9:.2f} GB/s, the reorder runs' own decode reads "
                f"(at the profile's {planner['profile_read_bytes_s'] / 1e9:.2f} GB/s: "
                f"{result['bound_at_profile_tok_s']:.3f} tok/s)"
            )
    batches = report["accelerate_batches"]
    rates = ", ".join(
        f"batch {row['sequences']} "
        + ("timed out" if row["decode_tok_s"] is None else f"{row['decode_tok_s']:.3f}")
        for row in batches["rows"]
    )
    print(f"\naccelerate, decode tok/s by batch: {rates}; best batch {batches['best_batch']}")
    sweep = report["sweep"]
    print("\nsweep: the reorder rung at one sequence per micro-batch")
    rows = [*sweep["rows"], sweep["planner_row"]]
    names = [f"reorder, {row['sequences']} seq" for row in sweep["rows"]]
    names.append(f"reorder, planner's n = {sweep['planner_row']['sequences']}")
    _print_rows(rows, names)
    in_memory = sweep["planner_row"]["in_memory_tok_s"]
    print(
        f"  best of the sweep and the planner's n ({sweep['best_sequences']} sequences) / planner's n: "
        f"{_times(sweep['best_over_planner'])}; in memory at the planner's n "
        + ("-" if in_memory is None else f"{in_memory:.3f} tok/s")
    )
    print(
        "each at its best: Shunter's best of the sweep over accelerate's best batch: "
        f"{_times(report['best_over_accelerate_best'])}"
    )
