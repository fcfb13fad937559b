"""`shunter serve` over HTTP, with the official openai client against a real uvicorn server.

Oracles: `shunter generate --json` (the command's own generated ids) for one request at a time,
in memory and streamed under --memory; the same ids for concurrent streams."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from shunter.cli import main
from shunter.model.loader import resolve_model_dir
from shunter.serve.scheduler import BatcherOptions
from tests.serve.harness import served

BUILTIN = resolve_model_dir("shunter-tiny")
TIGHT = 1_900_000  # bytes: streams the tiny checkpoints (as tests/offload does)


def generate_ids(capsys, model, prompt_ids: list[int], new_tokens: int, *flags: str) -> list[int]:
    ids = ",".join(map(str, prompt_ids))
    argv = ["generate", str(model), "--prompt-ids", ids, "--max-new-tokens", str(new_tokens), "--json"]
    assert main([*argv, *flags]) == 0
    return json.loads(capsys.readouterr().out)["generated_ids"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_completion_of_the_builtin_model_equals_generate(capsys):
    prompt = [83, 809, 17, 400, 21]
    expected = generate_ids(capsys, BUILTIN, prompt, 12)
    with served(BUILTIN, BatcherOptions(4, 8, 128)) as url:
        answer = client(url).completions.create(
            model="shunter-tiny", prompt=prompt, max_tokens=12, temperature=0
        )
        assert answer.choices[0].model_extra["token_ids"] == expected
        assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == len(expected)
        text = client(url).completions.create(model="m", prompt="def add(a, b):", max_tokens=6, temperature=0)
        assert text.choices[0].text and text.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("memory", [None, TIGHT], ids=["in-memory", "offload"])
def test_greedy_streamed_completion_of_a_checkpoint_equals_generate(tiny_checkpoint, capsys, memory):
    path = tiny_checkpoint("mixtral")
    prompt = [6, 7, 8, 9]
    flags = () if memory is None else ("--memory", str(memory), "--batches", "1")
    expected = generate_ids(capsys, path, prompt, 8, *flags)
    with served(path, BatcherOptions(2, 4, 64), memory) as url:
        stream = client(url).completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        metrics = httpx.get(url + "/metrics").text
    ids = [i for c in chunks for choice in c.choices for i in choice.model_extra["token_ids"]]
    assert ids == expected
    assert "".join(choice.text for c in chunks for choice in c.choices) == "".join(f"{i} " for i in expected)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    if memory is not None:
        read = [line for line in metrics.splitlines() if line.startswith("shunter_disk_read_bytes_total")]
        assert float(read[0].split()[-1]) > 0


def test_seeded_sampling_with_penalties_equals_generate(tiny_checkpoint, capsys):
    path = tiny_checkpoint("mixtral")
    prompt = [6, 7, 8, 9]
    sampling = {
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 7,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.3,
    }
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sampling.items()]
    expected = generate_ids(capsys, path, prompt, 10, *flags)
    with served(path, BatcherOptions(2, 4, 64)) as url:
        answer = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=10, **sampling)
    assert answer.choices[0].model_extra["token_ids"] == expected


# distinct prompts for concurrent streams (more than the test servers' rows)
CONCURRENT_PROMPTS = [
    [6, 7, 8, 9],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [8, 8, 1],
    [10, 20, 30],
    [40, 41, 42, 43, 44, 45],
    [1, 2, 3],
]


def test_concurrent_streams_each_get_their_complete_solo_completion(tiny_checkpoint, capsys):
    path = tiny_checkpoint("mixtral")
    prompts = CONCURRENT_PROMPTS
    expected = [generate_ids(capsys, path, p, 7) for p in prompts]
    got: dict[int, tuple[list[int], str | None]] = {}

    def run(index: int, url: str) -> None:
        stream = client(url).completions.create(
            model="tiny", prompt=prompts[index], max_tokens=7, temperature=0, stream=True
        )
        ids, finish = [], None
        for chunk in stream:
            ids += chunk.choices[0].model_extra["token_ids"]
            finish = chunk.choices[0].finish_reason or finish
        got[index] = (ids, finish)

    with served(path, BatcherOptions(4, 8, 64)) as url:
        threads = [threading.Thread(target=run, args=(i, url)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        health = httpx.get(url + "/health").json()
    for i, ids in enumerate(expected):
        assert got[i] == (ids, "stop" if ids[-1] == 2 else "length"), prompts[i]
    assert health == {"status": "ok", "active_sequences": 0, "queued_requests": 0}


def test_a_stop_string_ends_the_completion_and_is_not_sent(capsys):
    prompt = "The river"
    with served(BUILTIN, BatcherOptions(2, 4, 128)) as url:
        whole = client(url).completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        text = whole.choices[0].text
        stop = text[3:6]  # a string the greedy text holds, not at its start
        cut = client(url).completions.create(
            model="m", prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
        )
        streamed = client(url).completions.create(
            model="m", prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True
        )
        chunks = list(streamed)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_completion_uses_the_plain_template_without_one_in_the_model():
    with served(BUILTIN, BatcherOptions(2, 4, 128)) as url:
        answer = client(url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        chunks = list(
            client(url).chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                temperature=0,
                stream=True,
            )
        )
        models = client(url).models.list()
    from shunter.model.tokenizer import Tokenizer

    prompt = Tokenizer.from_model_dir(BUILTIN).encode("user: hi\nassistant:")
    assert answer.usage.prompt_tokens == len(prompt) and answer.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert [m.id for m in models.data] == ["shunter-tiny"]
