"""`shunter bench offload`: bad input is one line naming the option; a tiny run reports every
contender with consistent ratios and equal tokens across the ladder, and leaves no cgroup behind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shunter.bench import offload, rounds, sandbox
from shunter.bench.report import ContenderRow
from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model.export import mixtral_config, random_weights, save_checkpoint
from shunter.model.spec import load_spec, spec_from_config
from shunter.offload.profile import MachineProfile

RESERVE_BYTES = 900 * 2**20  # the runtime's share of the cap: accelerate's process peaks near 600 MiB
WEIGHT_BUDGET_BYTES = 14_000_000  # about half the tiny model: room for 128 sequences in flight
ROW_FIELDS = {
    "contender",
    "description",
    "sequences",
    "batches",
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
    "vs_accelerate",
    "vs_accelerate_best",
    "vs_predicted",
    "vs_bound",
    "vs_in_memory",
}
CONTENDERS = [
    "accelerate", "simple", "multi-batch", "hot-prefetch", "reorder", "predicted", "bound", "in-memory"
]  # fmt: skip

needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or sandbox.own_memory_cgroup() is None,
    reason="the offload benchmark needs root and the cgroup v1 memory controller",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """24 MiB fp32 Mixtral layout, mostly experts (hidden 32, 8 experts of 1024, 8 layers), so the
    weight budget streams most experts while 128 sequences' activations still fit."""
    config = mixtral_config(
        vocab_size=128,
        hidden_size=32,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        num_experts=8,
        top_k=2,
        intermediate_size=1024,
        max_position_embeddings=256,
    )
    weights = random_weights(spec_from_config(config), seed=0, std=0.05, router_std=0.5)
    return save_checkpoint(config, weights, tmp_path_factory.mktemp("bench") / "tiny")


def _run_cgroups(pid: int) -> list[Path]:
    """The run cgroups process `pid` made that still exist (a benchmark running beside the tests
    has its own, named after its pid)."""
    return list(sandbox.own_memory_cgroup().glob(f"{sandbox.CGROUP_PREFIX}{pid}-*"))


def _bench(model: Path, *options: str) -> int:
    return main(["bench", "offload", str(model), "--runtime-reserve", str(RESERVE_BYTES), *options])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--memory", "2GB"], "for weights after --runtime-reserve, more than the whole model (24.1 MiB)"),
        (["--memory", str(RESERVE_BYTES)], "--memory 900.0 MiB is not above --runtime-reserve"),
        (["--memory", "1GB", "--sequences", "0"], "--sequences: every number must be at least 1, got 0"),
        (["--memory", "1GB", "--sweep", "1,x"], "--sweep: expected comma-separated positive integers"),
        (["--memory", "1GB", "--new-tokens", "1"], "--new-tokens: the decode rate needs at least 2"),
        (["--memory", "lots"], "--memory: cannot read 'lots' as a size"),
    ],
)
def test_bad_input_is_one_line(tiny_model, capsys, options, message):
    assert _bench(tiny_model, *options) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["bench", "offload", str(tmp_path / "nothing"), "--memory", "1GB"]) == 2
    err = capsys.readouterr().err
    assert "nothing: no such model directory" in err and err.count("\n") == 1


def test_not_root(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _bench(tiny_model, "--memory", str(RESERVE_BYTES + WEIGHT_BUDGET_BYTES)) == 2
    assert "needs root" in capsys.readouterr().err


@needs_cgroups
def test_budget_below_the_engines_minimum_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHUNTER_CACHE_DIR", str(tmp_path))
    assert _bench(tiny_model, "--memory", str(RESERVE_BYTES + 500_000), "--work-dir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "--memory 900.5 MiB leaves 488.3 KiB for the engine after --runtime-reserve" in err
    assert "is below the minimum this model needs" in err and err.count("\n") == 1


def test_the_bound_is_reads_or_compute_whichever_takes_longer(tiny_model):
    """Closed form: on a disk slow enough that reads bind, the bound scales with the disk rate;
    on one fast enough that compute binds, the disk rate does not move it; the prediction always
    uses the profile's rate."""
    spec = load_spec(tiny_model)
    profile = MachineProfile(
        dtype="float32", threads=1, batch_size=1, attention_s_per_token=1e-4,
        attention_s_per_token_per_context_token=1e-7, gate_s_per_token=1e-5, expert_s_per_token=1e-5,
        expert_min_s=1e-5, read_bytes_s=1e8,
    )  # fmt: skip

    def at_disk(rate: float | None) -> tuple[float, float, float]:
        return offload.model_figures_tok_s(spec, profile, 8, 8, 20, None, rate)

    predicted, at_profile, _ = at_disk(None)
    assert at_disk(1e8) == (predicted, at_profile, at_profile)
    slow = [at_disk(rate)[1] for rate in (1e3, 2e3)]
    assert slow[1] == pytest.approx(2 * slow[0])
    assert all(at_disk(rate)[0] == predicted and at_disk(rate)[2] == at_profile for rate in (1e3, 1e15))
    fast = [at_disk(rate)[1] for rate in (1e15, 2e15)]
    assert fast[0] == pytest.approx(fast[1]) and fast[0] > at_profile > slow[1]


def _assert_ratios(row: dict, reference: dict[str, float | None]) -> None:
    for field, theirs in reference.items():
        if theirs is None:
            assert row[field] is None, field
        else:
            assert row[field] == pytest.approx(row["decode_tok_s"] / theirs), field


@pytest.mark.slow
@needs_cgroups
def test_tiny_run_reports_every_contender_and_leaves_no_cgroup(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    cap_bytes = RESERVE_BYTES + WEIGHT_BUDGET_BYTES
    command = [
        sys.executable, "-m", "shunter.cli", "bench", "offload", str(tiny_model),
        "--memory", str(cap_bytes), "--runtime-reserve", str(RESERVE_BYTES),
        "--sequences", "2", "--sweep", "1,2", "--accelerate-batches", "1",
        "--new-tokens", "2", "--reps", "1", "--warmup", "0",
        "--work-dir", str(tmp_path / "work"), "--json", "--out", str(out),
    ]  # fmt: skip
    env = os.environ | {"SHUNTER_CACHE_DIR": str(tmp_path / "cache")}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        stdout, stderr = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "report.json", "work"]  # no temp files
    assert "reorder S=2 n=2" in done.stderr and "rep 1/1" in done.stderr  # progress, per run

    assert report["cap_bytes"] == cap_bytes and report["weight_budget_bytes"] == WEIGHT_BUDGET_BYTES
    planner_n = report["planner"]["num_batches"]
    best_accelerate = report["accelerate_batches"]["rows"][0]["decode_tok_s"]
    assert report["accelerate_batches"]["best_batch"] == 1
    assert [result["sequences"] for result in report["results"]] == [2]  # one level: 1 is the sweep's
    for result in report["results"]:
        S, rows = result["sequences"], result["rows"]
        assert list(rows) == CONTENDERS
        for name, row in rows.items():
            assert set(row) >= ROW_FIELDS and row["contender"] == name and row["sequences"] == S
            assert row["decode_tok_s"] > 0
            _assert_ratios(
                row,
                {
                    "vs_accelerate": rows["accelerate"]["decode_tok_s"],
                    "vs_accelerate_best": best_accelerate,
                    "vs_predicted": rows["predicted"]["decode_tok_s"],
                    "vs_bound": rows["bound"]["decode_tok_s"],
                    "vs_in_memory": rows["in-memory"]["decode_tok_s"],
                },
            )
        for name in ["simple", "multi-batch", "hot-prefetch", "reorder"]:
            row = rows[name]
            assert row["bytes_read"] > 0
            assert 0 < row["peak_cgroup_bytes"] <= cap_bytes
            # the simple rung serves one sequence at a time: measured once, on one sequence
            sequences = 1 if name == "simple" else S
            assert len(row["generated_ids"]) == sequences and all(
                len(ids) == 2 for ids in row["generated_ids"]
            )
        # whole-layer prefetch reads exactly what the placement streams; hot-only reads the
        # expected touched experts plus what a mispredicted prefetch wastes
        for name in ["simple", "multi-batch"]:
            assert rows[name]["bytes_read"] == rows[name]["planned_bytes_read"]
            assert rows[name]["prefetch_hit_rate"] is None
        for name in ["hot-prefetch", "reorder"]:
            assert 0.5 <= rows[name]["bytes_read"] / rows[name]["planned_bytes_read"] <= 2
            assert 0 <= rows[name]["prefetch_hit_rate"] <= 1
        assert rows["reorder"]["batches"] == min(S, planner_n)
        # the bound reads at the rate the reorder runs' own decode reads got; at the profile's
        # rate, the rate the prediction used, it is at least the prediction
        assert result["bound_disk_bytes_s"] == rows["reorder"]["decode_disk_bytes_s"] > 1e6
        assert 0 < rows["reorder"]["decode_io_busy"] <= 1.05  # decode seconds exclude sampling
        assert result["bound_at_profile_tok_s"] >= rows["predicted"]["decode_tok_s"]
        assert rows["accelerate"]["peak_cgroup_bytes"] <= cap_bytes
        assert result["tokens_equal_across_rungs"] and result["tokens_equal_in_memory"]
        ladder = {tuple(map(tuple, rows[name]["generated_ids"])) for name in CONTENDERS[2:5]}
        assert len(ladder) == 1
        assert rows["simple"]["generated_ids"] == rows["reorder"]["generated_ids"][:1]

    sweep = report["sweep"]
    assert [row["sequences"] for row in sweep["rows"]] == [1, 2]
    assert sweep["planner_row"]["sequences"] == planner_n == sweep["planner_row"]["batches"]
    for row in [*sweep["rows"], sweep["planner_row"]]:
        assert set(row) >= ROW_FIELDS and row["contender"] == "reorder" and row["bytes_read"] > 0
        assert row["decode_disk_bytes_s"] > 1e6 and row["bound_at_profile_tok_s"] >= row["predicted_tok_s"]
        _assert_ratios(
            row,
            {
                "vs_accelerate": None,
                "vs_accelerate_best": best_accelerate,
                "vs_predicted": row["predicted_tok_s"],
                "vs_bound": row["bound_tok_s"],
                "vs_in_memory": row["in_memory_tok_s"],
            },
        )
        assert (row["in_memory_tok_s"] is None) == (row is not sweep["planner_row"])
    best = max([*sweep["rows"], sweep["planner_row"]], key=lambda row: row["decode_tok_s"])
    assert sweep["best_sequences"] == best["sequences"]
    assert sweep["best_over_planner"] == pytest.approx(
        best["decode_tok_s"] / sweep["planner_row"]["decode_tok_s"]
    )
    assert report["best_over_accelerate_best"] == pytest.approx(best["decode_tok_s"] / best_accelerate)
    assert _run_cgroups(proc.pid) == []


@needs_cgroups
def test_a_run_past_its_time_limit_is_killed_with_its_cgroup(tiny_model, tmp_path):
    job = {"kind": "in-memory", "model": str(tiny_model), "new_tokens": 2, "sequences": 1}
    with pytest.raises(sandbox.RunTimedOut, match=r"in-memory: no result within 0.05 s; killed"):
        sandbox.run_capped(job, None, "in-memory", timeout_s=0.05)  # Python alone takes longer to start
    assert _run_cgroups(os.getpid()) == []


def _fake_runs(monkeypatch, failure) -> list[str]:
    """Jobs that run at 2 tok/s, except where failure(job, label, calls so far, timeout_s) gives an
    exception to raise; returns the labels of the runs, as they are made."""
    calls: list[str] = []

    def fake_run_capped(job, cap_bytes, label, timeout_s=None):
        calls.append(label)
        exc = failure(job, label, calls, timeout_s)
        if exc is not None:
            raise exc
        result = {"decode_tok_s": 2.0, "disk_read_bytes": 0, "generated_ids": [[1]]}
        return sandbox.CappedRun(result, peak_cgroup_bytes=1, wall_s=0.1)

    monkeypatch.setattr(rounds, "run_capped", fake_run_capped)
    return calls


def test_a_timed_out_job_is_reported_and_not_run_again(monkeypatch):
    def failure(job, label, calls, timeout_s):
        if job["kind"] == "slow":
            return sandbox.RunTimedOut(f"{label}: no result within {timeout_s:g} s; killed")
        return None

    calls = _fake_runs(monkeypatch, failure)
    runs = rounds.InterleavedRuns()
    slow, fast = runs.add({"kind": "slow"}, 1, "slow"), runs.add({"kind": "fast"}, 1, "fast")
    progress = io.StringIO()
    runs.run(reps=3, warmup=1, progress=progress, timeout_s=60)
    assert calls.count("slow (warm-up)") == 1 and not any(c.startswith("slow (rep") for c in calls)
    assert sum(c.startswith("fast") for c in calls) == 4
    assert runs.summaries[slow] == {"not_run": "timed out: no result within 60 s (warm-up), not run again"}
    assert runs.summaries[fast]["decode_tok_s"] == 2.0
    assert "slow" in progress.getvalue() and "timed out" in progress.getvalue()
    row = ContenderRow.from_summary("accelerate", 8, None, runs.summaries[slow])
    assert row.decode_tok_s is None and row.not_run.startswith("timed out")


def test_a_failed_run_is_run_again_once_and_a_second_failure_ends_the_job(monkeypatch):
    """A peer that now and then exits without its result line loses one run, not its row; one
    that fails twice in a row (killed at its cap) is not run again."""

    def failure(job, label, calls, timeout_s):
        if job["kind"] == "broken" or (label == "flaky (rep 1/3)" and calls.count(label) == 1):
            return ShunterError(f"{label}: printed no result line")
        return None

    calls = _fake_runs(monkeypatch, failure)
    runs = rounds.InterleavedRuns()
    flaky, broken = runs.add({"kind": "flaky"}, 1, "flaky"), runs.add({"kind": "broken"}, 1, "broken")
    progress = io.StringIO()
    runs.run(reps=3, warmup=1, progress=progress)
    assert calls[:3] == ["flaky (warm-up)", "broken (warm-up)", "broken (warm-up)"]
    assert calls.count("flaky (rep 1/3)") == 2 and len(runs.summaries[flaky]["decode_tok_s_reps"]) == 3
    assert runs.summaries[flaky]["retried_runs"] == 1
    assert runs.summaries[broken] == {
        "not_run": "failed twice (warm-up), not run again: broken (warm-up): printed no result line"
    }
    assert "broken" in progress.getvalue() and "running it again" in progress.getvalue()
