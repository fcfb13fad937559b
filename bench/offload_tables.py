"""Markdown tables of `shunter bench offload --json` reports, as docs/benchmarks.md shows them.

.venv/bin/python bench/offload_tables.py offload-mixtral.json [offload-olmoe.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def _size(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rate(row: dict[str, Any]) -> str:
    if row["decode_tok_s"] is None:
        return f"not run: {row.get('not_run') or 'no result'}"
    reps = row.get("decode_tok_s_reps")
    spread = f" ({min(reps):.3f}-{max(reps):.3f})" if reps else ""
    return f"{row['decode_tok_s']:.3f}{spread}"


def _read(row: dict[str, Any]) -> str:
    if row["bytes_read"] is None:
        return "-"
    return f"{_size(row['bytes_read'])} / {_size(row['planned_bytes_read'])}"


def _hits(row: dict[str, Any]) -> str:
    return "-" if row["prefetch_hit_rate"] is None else f"{row['prefetch_hit_rate']:.2f}"


def _disk(row: dict[str, Any]) -> str:
    rate = row.get("decode_disk_bytes_s")
    return "-" if rate is None else f"{rate / 1e9:.2f}"


HEADER = (
    "| S | n | contender | decode tok/s (min-max) | vs accelerate | vs bound | vs predicted "
    "| read / planned | peak | hits | disk GB/s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _line(row: dict[str, Any], name: str | None = None) -> str:
    first = f"| {row['sequences']} | {row['batches'] or '-'} | {name or row['contender']} | {_rate(row)} "
    if row["decode_tok_s"] is None:
        return first + "||||||||"
    return (
        first + f"| {_times(row.get('vs_accelerate'))} | {_times(row.get('vs_bound'))} "
        f"| {_times(row.get('vs_predicted'))} | {_read(row)} | {_size(row['peak_cgroup_bytes'])} "
        f"| {_hits(row)} | {_disk(row)} |"
    )


def _ladder_at_equal_disk(result: dict[str, Any]) -> str:
    """S: each streamed rung's tok/s over its own runs' decode disk rate (GB/s), in ladder order."""
    cells = []
    for name in ("simple", "multi-batch", "hot-prefetch", "reorder"):
        row = result["rows"][name]
        rate, disk = row["decode_tok_s"], row.get("decode_disk_bytes_s")
        cells.append(f"{name} {rate / (disk / 1e9):.2f}" if rate and disk else f"{name} -")
    return f"- S = {result['sequences']}: " + ", ".join(cells)


def tables(report: dict[str, Any]) -> str:
    planner = report["planner"]
    budget_mib = report["weight_budget_bytes"] / 2**20
    free = "bubble free" if planner["bubble_free"] else "not bubble free"
    out = [
        f"Cap {report['cap_bytes'] / 1e9:.2f} GB ({report['cap_bytes'] / GIB:.2f} GiB) per contender, model "
        f"{report['model_bytes'] / 1e9:.2f} GB; weight budget {budget_mib:.0f} MiB; "
        f"{report['new_tokens']} new tokens; median of {report['reps']} after {report['warmup']} warm-up. "
        f"Planner: n = {planner['num_batches']} ({free}, "
        f"({planner['binding']}) binds).",
        "",
        HEADER,
    ]
    ladders = []
    for result in report["results"]:
        out += [_line(row) for row in result["rows"].values()]
        ladders.append(_ladder_at_equal_disk(result))
        out.append(
            f"| {result['sequences']} | | tokens equal across the ladder / reorder = in-memory | "
            f"{result['tokens_equal_across_rungs']} / {result['tokens_equal_in_memory']} ||||||||"
        )
    out += ["", "Median decode tok/s over the median GB/s its runs' reads got (disk swings divided out):"]
    out.append("")
    out += ladders
    out += ["", "Accelerate by batch and the sweep (reorder rung, one sequence per micro-batch):", "", HEADER]
    out += [_line(row, "accelerate") for row in report["accelerate_batches"]["rows"]]
    sweep = report["sweep"]
    out += [_line(row, "reorder (sweep)") for row in sweep["rows"]]
    out.append(_line(sweep["planner_row"], "reorder at the planner's n"))
    planner_row = sweep["planner_row"]
    in_memory = planner_row.get("in_memory_tok_s")
    out += [
        "",
        f"At the planner's n: predicted {planner_row.get('predicted_tok_s') or 0:.2f} tok/s (profile's disk "
        f"{(planner.get('profile_read_bytes_s') or 0) / 1e9:.2f} GB/s), bound "
        f"{planner_row.get('bound_tok_s') or 0:.2f} at the run's disk {_disk(planner_row)} GB/s "
        f"({planner_row.get('bound_at_profile_tok_s') or 0:.2f} at the profile's), in memory "
        + ("-" if in_memory is None else f"{in_memory:.2f}")
        + f". Best of the sweep / planner's n: {_times(sweep['best_over_planner'])} (best at "
        f"{sweep['best_sequences']}); best over accelerate's best batch "
        f"({report['accelerate_batches']['best_batch']}): {_times(report.get('best_over_accelerate_best'))}.",
    ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in argv:
        report = json.loads(Path(path).read_text())
        print(f"### {Path(report['model']).name}\n\n{tables(report)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
