"""`shunter bench decode`: llama.cpp's output read right, the job each point runs, bad input named.

llama.cpp itself is not built in the tests (its build takes minutes); the benchmark's runs are
measured by hand (docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import json

import pytest

from shunter.bench import decode, llama
from shunter.bench.workers import prompts
from shunter.cli import main
from shunter.errors import ShunterError

# two lines as llama-batched-bench 0.3.36 prints them with --output-format jsonl, among its logs
BATCHED_BENCH_OUTPUT = """main: n_kv_max = 1552, n_batch = 2048, n_ubatch = 512, flash_attn = -1
{"n_kv_max": 1552, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 8, "pl": 1, "n_kv": 24, "t_pp": 0.061, "speed_pp": 262.2, "t_tg": 0.140, "speed_tg": 57.1, "t": 0.201, "speed": 119.4}
{"n_kv_max": 1552, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 8, "pl": 8, "n_kv": 192, "t_pp": 0.41, "speed_pp": 312.2, "t_tg": 0.52, "speed_tg": 123.1, "t": 0.93, "speed": 206.4}
llama_perf_context_print: total time = 1200 ms
"""  # noqa: E501


def test_the_point_of_the_asked_sequences_is_read():
    assert llama.parse_batched_bench(BATCHED_BENCH_OUTPUT, 8) == {
        "decode_tok_s": 123.1,
        "decode_s": 0.52,
        "prefill_tok_s": 312.2,
    }
    assert llama.parse_batched_bench(BATCHED_BENCH_OUTPUT, 1)["decode_tok_s"] == 57.1
    with pytest.raises(ShunterError, match="no result line for 64 sequences"):
        llama.parse_batched_bench(BATCHED_BENCH_OUTPUT, 64)


def test_llama_cpp_gets_every_sequence_in_its_context_and_the_same_threads():
    argv = llama.batched_bench_argv("llama-batched-bench", "m.gguf", 64, 16, 8, 2)
    flag = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert int(flag["-c"]) >= 64 * (16 + 8)
    assert (flag["-npl"], flag["-npp"], flag["-ntg"], flag["-t"], flag["-tb"]) == ("64", "16", "8", "2", "2")


def test_every_sequence_gets_its_own_prompt_the_same_in_every_run():
    first, again = prompts(64, 4096), prompts(64, 4096)
    assert first == again and len({tuple(p) for p in first}) == 64
    # not shifted copies of one sequence: no prompt is another moved by one position
    assert not any(a[1:] == b[:-1] for a, b in itertools.pairwise(first))


def test_shunter_streams_only_when_the_checkpoint_exceeds_the_weight_budget(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")
    size = decode.checkpoint_bytes(path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    precision = decode.Precision("bf16", path, gguf)

    def config(cap: int) -> decode.DecodeBenchConfig:
        return decode.DecodeBenchConfig(
            [precision], [1, 8], cap, 100, tmp_path / "bin", 2, 8, 1, 0, max_batches=4
        )

    roomy, tight = config(size + 200), config(size // 2)
    assert decode.shunter_job(roomy, precision, 8, capped=True)["kind"] == "in-memory"
    assert decode.shunter_job(tight, precision, 8, capped=False)["kind"] == "in-memory"
    streamed = decode.shunter_job(tight, precision, 8, capped=True)
    assert streamed["kind"] == "shunter" and streamed["num_batches"] == 4
    assert streamed["memory_bytes"] == size // 2 - 100


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (["--precision", "bf16"], "expected NAME=CHECKPOINT,GGUF"),
        (["--precision", "bf16=MODEL,/nonexistent.gguf"], "/nonexistent.gguf is not a file"),
        (["--precision", "bf16=MODEL,GGUF", "--cap", "100MiB", "--runtime-reserve", "200MiB"], "not above"),
        (["--precision", "bf16=MODEL,GGUF", "--new-tokens", "1"], "at least 2"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(tiny_checkpoint, tmp_path, capsys, tail, message):
    binary = tmp_path / "llama-batched-bench"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    model = str(tiny_checkpoint("mixtral"))
    tail = [t.replace("MODEL", model).replace("GGUF", str(gguf)) for t in tail]
    argv = ["bench", "decode", "--llama-batched-bench", str(binary), "--cap", "1GiB", *tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_missing_binary_is_named(tmp_path, capsys):
    argv = ["bench", "decode", "--llama-batched-bench", str(tmp_path / "none"), "--cap", "1GiB"]
    assert main([*argv, "--precision", "a=b,c"]) == 2
    assert "not an executable file" in capsys.readouterr().err


def test_the_table_prints_a_row_per_point(capsys):
    side = {"decode_tok_s": 2.0, "decode_tok_s_reps": [2.0], "peak_cgroup_bytes": 1, "disk_read_bytes": 0}
    report = {
        "rows": [
            {
                "precision": "4-bit",
                "condition": "capped",
                "sequences": 8,
                "engine": "shunter",
                "shunter": side,
                "llama_cpp": side | {"decode_tok_s": 1.0},
                "shunter_over_llama_cpp": 2.0,
            }
        ]
    }
    decode.print_decode_table(report)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["precision", "condition", "S", "engine", "shunter", "llama.cpp", "ratio"]
    assert out[1].split() == ["4-bit", "capped", "8", "shunter", "2.00", "1.00", "2.00x"]
    json.dumps(report)
