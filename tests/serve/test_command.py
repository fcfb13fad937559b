"""`shunter serve` on the command line: its flags reach the server, mistakes are one line."""

from __future__ import annotations

import httpx
import pytest
import uvicorn

from shunter.cli import main
from tests.serve.harness import running


def test_serve_runs_the_app_on_the_given_address(monkeypatch, capsys):
    """uvicorn.run is replaced by the test harness's server; the app is the command's own."""
    seen = {}

    def fake_run(app, host, port, **_):
        seen["address"] = (host, port)
        with running(app) as url:
            body = {"model": "x", "prompt": "def", "max_tokens": 3, "temperature": 0}
            seen["answer"] = httpx.post(url + "/v1/completions", json=body).json()
            seen["models"] = httpx.get(url + "/v1/models").json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--port", "8123", "--max-context", "64", "--name", "tiny"]) == 0
    assert seen["address"] == ("127.0.0.1", 8123)
    assert seen["answer"]["usage"]["completion_tokens"] == 3 and seen["answer"]["model"] == "tiny"
    assert seen["models"]["data"][0]["max_model_len"] == 64
    assert "shunter serve: shunter-tiny (in memory) on http://127.0.0.1:8123/v1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-sequences", "0"], "--max-sequences: must be at least 1"),
        (["--max-queue", "0"], "--max-queue: must be at least 1"),
        (["--max-context", "5000"], "--max-context: must lie in [2, 1024]"),
        (["--port", "70000"], "--port: must lie in [0, 65535]"),
        (["--memory", "48MB"], "the KV pool of --max-sequences 8 x --max-context 1024"),
    ],
)
def test_a_bad_flag_is_one_line(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
