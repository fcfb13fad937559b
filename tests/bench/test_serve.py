"""`shunter bench serve`'s harness: levels of streaming clients against real servers, runs stopped at
--max-run-seconds, the report's schema with servers it starts itself, and its argument errors."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from shunter.bench import sandbox
from shunter.bench.serve import (
    ServeBenchConfig,
    held_out_prompt_ids,
    plot_throughput,
    print_serve_table,
    run_benchmark,
)
from shunter.cli import main
from shunter.model.loader import resolve_model_dir
from shunter.serve.scheduler import BatcherOptions
from tests.serve.harness import served

needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or sandbox.own_memory_cgroup() is None,
    reason="--cap needs root and the cgroup v1 memory controller",
)
LEVEL_FIGURES = {"output_tok_s", "output_tok_s_min", "output_tok_s_max", "ttft_p50_s", "ttft_p95_s"}
LEVEL_FIGURES |= {"itl_p50_s", "itl_p95_s", "requests", "failed", "unfinished", "runs"}
LEVEL_FIGURES |= {"peak_rss_bytes", "peak_cgroup_bytes", "disk_read_bytes", "engine_steps"}


def test_levels_of_concurrent_clients_each_get_their_fixed_length(tmp_path, capsys):
    with served(resolve_model_dir("shunter-tiny"), BatcherOptions(4, 8, 128)) as url:
        config = ServeBenchConfig(
            concurrency=(1, 3), max_tokens=4, prompt_tokens=8, requests_per_client=2, reps=2,
            contenders=("peer",), peer_url=url + "/v1",
        )  # fmt: skip
        report = run_benchmark(config)
    json.dumps(report)  # plain JSON values
    for level in report["levels"]:
        row = level["contenders"]["peer"]
        assert row.keys() >= LEVEL_FIGURES and len(row["runs"]) == 2
        assert (
            row["failed"] == 0 and row["unfinished"] == 0 and row["requests"] == 2 * 2 * level["concurrency"]
        )
        for run in row["runs"]:
            assert run["output_tokens"] == 4 * run["requests"]  # ignore_eos: every completion is full
        assert row["output_tok_s_min"] <= row["output_tok_s"] <= row["output_tok_s_max"]
        assert row["ttft_p50_s"] > 0 and row["itl_p95_s"] >= row["itl_p50_s"]
        assert row["engine_steps"] >= 4 and row["disk_read_bytes"] == 0  # in memory: nothing read
    print_serve_table(report)
    assert "peer" in capsys.readouterr().out
    plot_throughput(report, tmp_path / "throughput.png")
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_a_run_stopped_at_max_run_seconds_counts_its_tokens_and_leaves_the_server_idle():
    # one row and three long completions: no machine streams 3 x 500 tokens in a tenth of a second
    with served(resolve_model_dir("shunter-tiny"), BatcherOptions(1, 8, 1024)) as url:
        config = ServeBenchConfig(
            concurrency=(3,), max_tokens=500, prompt_tokens=8, requests_per_client=1, max_run_s=0.1,
            contenders=("peer",), peer_url=url + "/v1",
        )  # fmt: skip
        run = run_benchmark(config)["levels"][0]["contenders"]["peer"]["runs"][0]
        health = httpx.get(url + "/health").json()
    assert run["unfinished"] >= 1 and run["failed"] == 0 and run["wall_s"] == pytest.approx(0.1)
    assert health["active_sequences"] == 0 and health["queued_requests"] == 0  # the stopped ones left


def test_started_servers_and_generate_report_one_schema(capsys):
    # shunter serve twice (batched and one at a time) and shunter generate, each its own process
    report = run_benchmark(
        ServeBenchConfig(
            concurrency=(1,),
            max_tokens=3,
            prompt_tokens=8,
            requests_per_client=1,
            contenders=("shunter", "one-at-a-time", "generate"),
        )
    )
    json.dumps(report)
    level = report["levels"][0]
    assert list(level["contenders"]) == ["shunter", "one-at-a-time", "generate"]
    assert set(level["ratios"]) == {"shunter_over_one_at_a_time", "shunter_over_generate"}
    for name, row in level["contenders"].items():
        assert row.keys() >= LEVEL_FIGURES and row["failed"] == 0 and row["requests"] == 1, name
        assert row["runs"][0]["output_tokens"] == 3
    assert level["contenders"]["shunter"]["peak_rss_bytes"] > 0  # read before the server stops
    assert level["contenders"]["generate"]["engine_steps"] is None  # not a server


@needs_cgroups
def test_capped_servers_report_their_cgroup_peak_under_the_cap():
    cap = 3 * 2**30
    report = run_benchmark(
        ServeBenchConfig(
            concurrency=(1,),
            max_tokens=2,
            prompt_tokens=8,
            requests_per_client=1,
            contenders=("one-at-a-time",),
            cap_bytes=cap,
        )
    )
    row = report["levels"][0]["contenders"]["one-at-a-time"]
    assert row["failed"] == 0 and 0 < row["peak_cgroup_bytes"] <= cap


def test_held_out_prompts_are_distinct_token_ids():
    prompts = held_out_prompt_ids(16, 32, first=100)
    assert len({tuple(p) for p in prompts}) == 16 and all(len(p) == 32 for p in prompts)
    assert held_out_prompt_ids(1, 32, first=101)[0] == prompts[1]  # rounds take consecutive windows


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "shunter,vllm"], "--runs: expected some of shunter, one-at-a-time, llama-server"),
        (["--runs", "peer"], "--runs peer needs --peer-url"),
        (["--runs", "llama-server"], "--runs llama-server needs --llama-server PATH and --gguf FILE"),
        (["--llama-server", "/nonexistent/llama-server", "--gguf", "m.gguf"], "not an executable file"),
        (["--runs", "generate", "--concurrency", "4"], "--runs generate is measured at concurrency 1"),
        (["--reps", "0"], "--reps: must be at least 1"),
        (["--warmup", "-1"], "--warmup: must be at least 0"),
        (["--max-run-seconds", "0"], "--max-run-seconds: must be greater than 0"),
    ],
)
def test_bad_options_are_one_line(argv, message, capsys):
    try:
        status = main(["bench", "serve", *argv])
    except SystemExit as exc:  # argparse's own checks (a flag's type) exit with its usage error
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_llama_server_needs_its_gguf(tmp_path, capsys):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert main(["bench", "serve", "--llama-server", str(binary), "--gguf", str(tmp_path / "no.gguf")]) == 2
    assert f"--gguf {tmp_path / 'no.gguf'}: no such file" in capsys.readouterr().err


def test_cap_needs_root_and_room_for_the_runtime(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["bench", "serve", "--cap", "1GB"]) == 2
    assert "--cap needs root" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox, "own_memory_cgroup", lambda: sandbox.MEMORY_CGROUP_ROOT)
    assert main(["bench", "serve", "--cap", "300MiB", "--runtime-reserve", "400MiB"]) == 2
    assert "--cap 300.0 MiB is not above --runtime-reserve 400.0 MiB" in capsys.readouterr().err


def test_a_server_that_died_during_a_run_stops_the_benchmark():
    import subprocess
    import sys

    from shunter.bench.serve import StartedServer, check_alive
    from shunter.errors import ShunterError

    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
    process.wait()
    with pytest.raises(ShunterError, match="shunter exited with status 9 during its run"):
        check_alive("shunter", StartedServer("http://127.0.0.1:1/v1", process, None))
    check_alive("peer", StartedServer("http://127.0.0.1:1/v1", None, None))  # not started: nothing to check
