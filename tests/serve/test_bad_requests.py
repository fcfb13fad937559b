"""Bad requests get OpenAI's error JSON with a 4xx status, never take the server down and never
leak a sequence slot: after each, /health answers with no sequence active or queued."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from shunter.serve.scheduler import BatcherOptions
from tests.serve.harness import served

CONTEXT = 64
VOCAB = 96  # tests/tiny_models.py


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    with served(tiny_checkpoint("mixtral"), BatcherOptions(2, 16, CONTEXT)) as base:
        yield base


def engine_steps(url: str) -> float:
    """The server's engine step counter, from its Prometheus metrics."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("shunter_engine_steps_total "):
            return float(line.split()[1])
    raise AssertionError("no shunter_engine_steps_total in /metrics")


def assert_idle(url: str) -> None:
    """/health answers, and nothing stays in flight: a cancel lands at the next engine step and any
    other sequence ends within CONTEXT steps, so the bound counts steps, not seconds. (The stall
    guard only catches an engine that stops stepping altogether.)"""
    first = engine_steps(url)
    last_step_seen, steps = time.monotonic(), first
    while True:
        health = httpx.get(url + "/health").json()
        if health["active_sequences"] == 0 and health["queued_requests"] == 0:
            break
        now_steps = engine_steps(url)
        assert now_steps - first <= CONTEXT + 2, health
        if now_steps != steps:
            last_step_seen, steps = time.monotonic(), now_steps
        assert time.monotonic() - last_step_seen < 120, f"the engine made no step in 120 s: {health}"
        time.sleep(0.05)
    assert health["status"] == "ok"


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}

BAD_BODIES = {
    "max_tokens 0": ({**GOOD, "max_tokens": 0}, "max_tokens"),
    "max_tokens beyond the context": ({**GOOD, "max_tokens": CONTEXT}, "max_tokens"),
    "prompt longer than the context": ({**GOOD, "prompt": [1] * CONTEXT}, "prompt"),
    "token id above the vocabulary": ({**GOOD, "prompt": [1, VOCAB]}, "prompt"),
    "negative token id": ({**GOOD, "prompt": [1, -1]}, "prompt"),
    "n > 1": ({**GOOD, "n": 2}, "n"),
    "unknown field": ({**GOOD, "colour": "blue"}, "colour"),
    "known field of the wrong type": ({**GOOD, "max_tokens": "ten"}, "max_tokens"),
    "temperature out of range": ({**GOOD, "temperature": 5}, "temperature"),
    "stream of the wrong type": ({**GOOD, "stream": {"yes": 1}}, "stream"),
    "empty prompt": ({**GOOD, "prompt": []}, "prompt"),
    "text prompt without a tokenizer": ({**GOOD, "prompt": "hello"}, "prompt"),
    "two prompts": ({**GOOD, "prompt": [[1], [2]]}, "prompt"),
    "five stop strings": ({**GOOD, "stop": list("abcde")}, "stop"),
    "no prompt": ({"model": "tiny"}, "prompt"),
}


@pytest.mark.parametrize("body,param", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_bad_completion_request_is_a_400_with_the_openai_error(url, body, param):
    assert_openai_error(httpx.post(url + "/v1/completions", json=body), 400, param)
    assert_idle(url)


@pytest.mark.parametrize(
    "content", [b"{bad json", b"[1, 2]", b"", b"\xff\xfe"], ids=["broken", "list", "empty", "bytes"]
)
def test_a_body_that_is_not_a_json_object_is_a_400(url, content):
    headers = {"content-type": "application/json"}
    assert_openai_error(httpx.post(url + "/v1/completions", content=content, headers=headers), 400)
    assert_idle(url)


def test_a_bad_chat_request_is_a_400(url):
    for body in [
        {"model": "tiny", "messages": []},
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},  # needs a tokenizer
    ]:
        assert_openai_error(httpx.post(url + "/v1/chat/completions", json=body), 400)
    assert_idle(url)


def test_an_unknown_path_is_a_404_with_the_openai_error(url):
    assert_openai_error(httpx.get(url + "/v1/engines"), 404)


def test_the_official_client_raises_bad_request_for_n_above_1(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=2, n=2)
    assert_idle(url)


def generated_tokens(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text.splitlines()
    return float(
        next(line for line in metrics if line.startswith("shunter_generation_tokens_total")).split()[-1]
    )


def test_a_client_that_disconnects_mid_stream_frees_its_slot(url):
    body = {**GOOD, "max_tokens": CONTEXT - 3, "stream": True, "temperature": 0}
    before = generated_tokens(url)
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
    assert_idle(url)
    # the row was freed early: the cancel lands at a step boundary, long before the 61st token
    assert generated_tokens(url) - before < body["max_tokens"]
    assert httpx.post(url + "/v1/completions", json=GOOD).status_code == 200


def test_200_requests_at_once_past_max_queue_get_429_and_the_rest_complete(url):
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            body = {**GOOD, "max_tokens": 3}
            return await asyncio.gather(*(http.post(url + "/v1/completions", json=body) for _ in range(200)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 16
    for r in responses:
        if r.status_code == 429:
            assert assert_openai_error(r, 429)["code"] == "rate_limit_exceeded"
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    assert_idle(url)
