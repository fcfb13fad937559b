"""`shunter bench serve`'s harness against a real server: every level's requests complete with the
fixed length, and the report prints and plots."""

from __future__ import annotations

import json

from shunter.bench.serve import ServeBenchConfig, held_out_prompts, plot_throughput, run_benchmark
from shunter.cli import main
from shunter.model.loader import resolve_model_dir
from shunter.serve.scheduler import BatcherOptions
from tests.serve.harness import served


def test_levels_of_concurrent_clients_each_get_their_fixed_length(tmp_path, capsys):
    with served(resolve_model_dir("shunter-tiny"), BatcherOptions(4, 8, 128)) as url:
        config = ServeBenchConfig(
            concurrency=(1, 3), max_tokens=4, requests_per_client=2, peer_url=url + "/v1"
        )
        report = run_benchmark(config)
    json.dumps(report)  # plain JSON values
    assert report["model"] == "shunter-tiny"
    for level in report["levels"]:
        assert level["failed"] == 0 and level["requests"] == 2 * level["concurrency"]
        assert level["output_tokens"] == 4 * level["requests"]  # ignore_eos: every completion is full
        assert (
            level["output_tok_s"] > 0 and level["ttft_p50_s"] > 0 and level["itl_p95_s"] >= level["itl_p50_s"]
        )
    plot_throughput([report], tmp_path / "throughput.png")
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_held_out_prompts_are_distinct():
    prompts = held_out_prompts(16, 32)
    assert len(set(prompts)) == 16 and all(prompts)


def test_runs_naming_an_unknown_server_is_one_line(capsys):
    assert main(["bench", "serve", "--runs", "shunter,vllm"]) == 2
    assert "--runs: expected some of shunter, one-at-a-time, peer" in capsys.readouterr().err
    assert main(["bench", "serve", "--runs", "peer"]) == 2
    assert "--runs peer needs --peer-url" in capsys.readouterr().err
