"""Continuous batching against `generate` run on each prompt alone (the oracle): sequences that
join, wait and leave a running batch at different lengths get exactly their solo tokens."""

from __future__ import annotations

import pytest

from shunter.model import generate, load_model
from shunter.model.sampling import SamplingParams
from shunter.serve.kv_pool import KVPool
from shunter.serve.metrics import ServerMetrics
from shunter.serve.scheduler import BatcherOptions, ContinuousBatcher, GenerationRequest, QueueFull

GREEDY = SamplingParams()


class Collector:
    """A request's deliver callback that keeps its token ids and end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None

    def __call__(self, event) -> None:
        assert self.finish is None, "an event after the end"
        self.tokens += event.token_ids
        self.text += event.text
        self.finish = event.finish_reason
        self.error = event.error


def request(prompt: list[int], max_tokens: int) -> tuple[GenerationRequest, Collector]:
    collector = Collector()
    return GenerationRequest(prompt, max_tokens, GREEDY, collector), collector


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_sequences_joining_and_leaving_get_their_solo_tokens(tiny_checkpoint, family, monkeypatch):
    loaded = load_model(tiny_checkpoint(family))
    model, spec = loaded.model, loaded.spec
    jobs = {
        "a": ([6, 7, 8, 9], 10),
        "b": ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 6),
        "c": ([8, 8, 1], 12),
        "d": (list(range(30, 50)), 4),  # longer than the cursor when it arrives: the rows shift right
        "e": ([11, 12], 13),  # waits for a free row
        "f": ([4, 5], 9),  # the mixtral ends at its stop token
    }
    eos = spec.eos_token_ids
    expected = {k: generate(model, [p], n, stop_ids=eos).tokens[0] for k, (p, n) in jobs.items()}
    shifts = []
    original_shift = KVPool._shift
    monkeypatch.setattr(
        KVPool, "_shift", lambda pool, c: (shifts.append((pool.cursor, c)), original_shift(pool, c))
    )

    batcher = ContinuousBatcher(model, spec, None, BatcherOptions(3, 8, 24), ServerMetrics())
    made = {k: request(p, n) for k, (p, n) in jobs.items()}
    arrivals = {0: "a", 2: "bc", 5: "def"}
    for step in range(40):
        for key in arrivals.get(step, ""):
            batcher.submit(made[key][0])
        batcher.step()
    for key, (_, collector) in made.items():
        assert collector.tokens == expected[key], (key, collector.error)
        assert collector.finish == ("stop" if expected[key][-1] in eos else "length")
    assert batcher.counts == (0, 0) and batcher.pool.active == 0
    assert any(new > old for old, new in shifts) and any(new < old for old, new in shifts)


def test_a_cancelled_request_frees_its_row_at_the_next_step(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("mixtral"))
    batcher = ContinuousBatcher(loaded.model, loaded.spec, None, BatcherOptions(1, 4, 32), ServerMetrics())
    first, first_out = request([1, 2, 3], 20)
    second, second_out = request([6, 7, 8, 9], 3)
    batcher.submit(first)
    batcher.submit(second)
    batcher.step()
    assert batcher.counts == (1, 1)  # one row: the second waits
    batcher.cancel(first)
    for _ in range(4):
        batcher.step()
    assert first_out.finish is None and len(first_out.tokens) == 2  # nothing after the cancel
    assert second_out.tokens == generate(loaded.model, [[6, 7, 8, 9]], 3).tokens[0]
    assert batcher.counts == (0, 0)


def test_past_max_queue_a_request_is_refused(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("mixtral"))
    batcher = ContinuousBatcher(loaded.model, loaded.spec, None, BatcherOptions(1, 2, 32), ServerMetrics())
    batcher.submit(request([1], 2)[0])
    batcher.submit(request([1], 2)[0])
    with pytest.raises(QueueFull):
        batcher.submit(request([1], 2)[0])


def test_ignore_eos_generates_past_the_stop_token(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("mixtral"))
    batcher = ContinuousBatcher(loaded.model, loaded.spec, None, BatcherOptions(1, 4, 32), ServerMetrics())
    stopping, stopped = request([4, 5], 6)  # this prompt's second token is the stop token
    ignoring, ignored = request([4, 5], 6)
    ignoring.ignore_eos = True
    for r in (stopping, ignoring):
        batcher.submit(r)
    for _ in range(8):
        batcher.step()
    assert stopped.tokens == generate(loaded.model, [[4, 5]], 6, stop_ids=loaded.spec.eos_token_ids).tokens[0]
    assert stopped.finish == "stop" and len(stopped.tokens) == 2
    assert ignored.tokens == generate(loaded.model, [[4, 5]], 6).tokens[0] and ignored.finish == "length"


def test_a_failed_step_ends_its_sequences_with_the_error_and_the_engine_carries_on(
    tiny_checkpoint, monkeypatch
):
    loaded = load_model(tiny_checkpoint("mixtral"))
    batcher = ContinuousBatcher(loaded.model, loaded.spec, None, BatcherOptions(2, 4, 32), ServerMetrics())
    broken, broken_out = request([6, 7, 8, 9], 4)
    batcher.submit(broken)
    forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    batcher.step()
    assert broken_out.finish == "error" and broken_out.error == "boom"
    assert batcher.counts == (0, 0) and batcher.pool.active == 0
    monkeypatch.setattr(loaded.model, "forward", forward)
    healthy, healthy_out = request([6, 7, 8, 9], 4)
    batcher.submit(healthy)
    for _ in range(4):
        batcher.step()
    assert healthy_out.tokens == generate(loaded.model, [[6, 7, 8, 9]], 4).tokens[0]
