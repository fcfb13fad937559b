"""`shunter serve` expert-parallel: ranks launched as torchrun would (RANK, WORLD_SIZE, ...),
rank 0 serving HTTP, driven by the official openai client.

Oracle: single-process `shunter generate --json` for each prompt alone. More concurrent requests
than pool rows make sequences join and leave mid-run, so rows move between ranks (a released row
takes the last one), and every stream must still be the solo completion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from shunter.cli import main
from tests.parallel.test_expert_parallel import _free_port
from tests.serve.test_server import CONCURRENT_PROMPTS, generate_ids

PROMPTS = CONCURRENT_PROMPTS
NEW_TOKENS = 7


def _start_ranks(world: int, model, port: int, *flags: str) -> list[subprocess.Popen]:
    master = str(_free_port())
    ranks = []
    for rank in range(world):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        command = [sys.executable, "-m", "shunter", "serve", str(model), "--port", str(port)]
        command += ["--max-sequences", "4", "--max-context", "64", "--timeout", "60", *flags]
        ranks.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return ranks


def _wait_healthy(url: str, ranks: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(r.poll() is not None for r in ranks):
            raise AssertionError("a rank exited: " + "".join(r.communicate()[1][-2000:] for r in ranks))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not start")


@pytest.mark.parametrize(
    "world,flags", [(2, ()), (3, ("--balance", "live"))], ids=["2-ranks", "3-ranks-live"]
)
def test_concurrent_streams_from_expert_parallel_ranks_equal_solo_generate(
    tiny_checkpoint, capsys, world, flags
):
    path = tiny_checkpoint("mixtral")
    expected = [generate_ids(capsys, path, p, NEW_TOKENS) for p in PROMPTS]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ranks = _start_ranks(world, path, port, *flags)
    got: dict[int, tuple[list[int], str | None]] = {}

    def run(index: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(
            model="tiny", prompt=PROMPTS[index], max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        ids, finish = [], None
        for chunk in stream:
            ids += chunk.choices[0].model_extra["token_ids"]
            finish = chunk.choices[0].finish_reason or finish
        got[index] = (ids, finish)

    try:
        _wait_healthy(url, ranks)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        health = httpx.get(url + "/health").json()
    finally:
        ranks[0].send_signal(signal.SIGINT)  # rank 0's server stops; it ends every follower's loop
        outputs = [r.communicate(timeout=60) for r in ranks]
    for i, ids in enumerate(expected):
        assert got.get(i) == (ids, "stop" if ids[-1] == 2 else "length"), PROMPTS[i]
    assert health == {"status": "ok", "active_sequences": 0, "queued_requests": 0}
    assert [r.returncode for r in ranks] == [0] * world, [err[-2000:] for _, err in outputs]
    assert f"expert-parallel on {world} ranks" in outputs[0][1]


def test_a_colocated_plan_or_the_offload_flags_are_one_line(tmp_path, capsys):
    assert main(["serve", "--plan", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["serve", "--balance", "live", "--memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert "--memory is for the offload engine" in err and err.count("\n") == 1
