"""The offload report's typed rows keep the JSON key order of the reports already written
(docs/benchmarks.md's tables are made from them), with None where a figure does not apply."""

from __future__ import annotations

from shunter.bench.report import ContenderRow, SweepRow

MEASURED = [
    "decode_tok_s", "decode_tok_s_reps", "bytes_read", "planned_bytes_read", "disk_read_bytes",
    "peak_cgroup_bytes", "prefetch_hit_rate", "decode_disk_bytes_s", "decode_io_busy", "wall_s",
    "generated_ids", "not_run", "retried_runs",
]  # fmt: skip
RATIOS = ["vs_accelerate", "vs_accelerate_best", "vs_predicted", "vs_bound", "vs_in_memory"]


def test_a_contender_row_lists_its_figures_then_its_ratios() -> None:
    row = ContenderRow.from_summary("predicted", 8, 4, {"decode_tok_s": 2.0})
    row.set_ratios(predicted=4.0, bound=None)
    assert list(row.to_dict()) == ["contender", "description", "sequences", "batches", *MEASURED, *RATIOS]
    assert row.to_dict()["description"] == "planner's prediction (reorder rung, measured profile)"
    assert (row.vs_predicted, row.vs_bound, row.not_run) == (0.5, None, None)


def test_a_sweep_row_puts_the_bound_at_the_profile_before_the_ratios_and_the_references_after() -> None:
    row = SweepRow.from_summary("reorder", 2, 2, {"not_run": "timed out"})
    assert list(row.to_dict()) == [
        "contender", "description", "sequences", "batches", *MEASURED, "bound_at_profile_tok_s",
        *RATIOS, "predicted_tok_s", "bound_tok_s", "in_memory_tok_s",
    ]  # fmt: skip
    assert row.to_dict()["not_run"] == "timed out" and row.decode_tok_s is None
