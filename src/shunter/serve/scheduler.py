"""Continuous batching: requests join the running batch at a step boundary and leave when done.

One engine thread owns the model and the KV pool. Each step it
  1. drops cancelled requests (a client that went away frees its row here),
  2. admits waiting requests while the pool has free rows and prefills them together in one
     forward (left-padded), sampling each one's first token,
  3. runs ONE decode forward over every active sequence (each at its own position), so with the
     offload engine every layer's weights are loaded once per step for all of them,
  4. samples each sequence's next token with its own parameters and generator, and hands the new
     text to its request; finished sequences leave the pool.
The HTTP side submits requests from any thread and receives events through the request's
`deliver` callback, which runs on the engine thread (the app forwards it to its event loop).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shunter.model.executor import InMemoryModel
from shunter.model.sampling import SamplingParams, TokenCounts, new_generator, next_tokens
from shunter.model.spec import ModelSpec
from shunter.model.tokenizer import Tokenizer
from shunter.offload import OffloadedModel
from shunter.serve.kv_pool import KVPool, PoolForwards
from shunter.serve.metrics import ExpertCounter, ServerMetrics
from shunter.serve.text import TextStream, text_decoder

# how many columns beyond the longest sequence the pool keeps, as a share of it: when the shared
# write column reaches the end, every row shifts left (a copy of the cache); the slack makes that
# happen once per this share of a context instead of every step
SHIFT_SLACK = 0.25


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already."""


@dataclass
class TokenEvent:
    """What one step produced for one request: new token ids, the new text to send (text that
    may still turn out to be a stop string waits), and when it ends, why."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" (stop token or string), "length" (max_tokens), "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    deliver: Callable[[TokenEvent], None]  # runs on the engine thread
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # the model's stop tokens do not end it (benchmarks with fixed lengths)
    arrived_s: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set from any thread; honoured at the next step boundary


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    counts: TokenCounts
    generator: torch.Generator | None
    text: TextStream
    ids: list[int] = field(default_factory=list)
    last_token_s: float | None = None


@dataclass(frozen=True)
class BatcherOptions:
    # capacity
    max_sequences: int = 8  # rows of the KV pool: sequences in one step
    max_queue: int = 64  # requests waiting for a row; one more gets QueueFull
    max_context: int = 1024  # prompt + generated tokens of one sequence


def pool_columns(max_context: int) -> int:
    """KV columns per row for sequences of up to max_context tokens (see SHIFT_SLACK)."""
    return max_context + max(1, int(max_context * SHIFT_SLACK))


class ContinuousBatcher:
    """The engine thread. `plan_num_batches(active_sequences, mean_context_tokens) -> n` sets the
    offload engine's micro-batches per step (None keeps its own). `forwards` runs the pool's
    forwards (default: `PoolForwards` over `model` in this process; expert-parallel: every rank's)."""

    def __init__(
        self,
        model: InMemoryModel | OffloadedModel,
        spec: ModelSpec,
        tokenizer: Tokenizer | None,
        options: BatcherOptions,
        metrics: ServerMetrics,
        plan_num_batches: Callable[[int, int], int] | None = None,
        forwards: PoolForwards | None = None,
    ) -> None:
        self.model, self.spec, self.options, self.metrics = model, spec, options, metrics
        self.decode = text_decoder(tokenizer)
        self.forwards = forwards or PoolForwards(
            model, options.max_sequences, pool_columns(options.max_context)
        )
        self.plan_num_batches = plan_num_batches
        self.recorder = ExpertCounter(metrics, spec.num_experts) if spec.num_moe_layers else None
        self.stop_ids = set(spec.eos_token_ids)
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[_Sequence] = []  # index = pool row
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="shunter-engine", daemon=True)
        self._bytes_read = 0

    # -- any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def pool(self) -> KVPool:
        return self.forwards.pool

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()
        self.forwards.close()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (checked by the caller: prompt and max_tokens fit max_context, ids in
        the vocabulary). Raises QueueFull when --max-queue requests wait already."""
        assert request.prompt and len(request.prompt) + request.max_tokens <= self.options.max_context
        with self._wake:
            if len(self._waiting) >= self.options.max_queue:
                raise QueueFull
            self._waiting.append(request)
            self.metrics.queued_sequences.set(len(self._waiting))
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def counts(self) -> tuple[int, int]:
        """(active sequences, waiting requests)."""
        with self._wake:
            return len(self._running), len(self._waiting)

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One step boundary: admit what fits, prefill it, decode every active sequence once.
        The engine thread calls it in a loop; a test may call it directly (without `start`)."""
        with self._wake:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.pool.rows:
                admitted.append(self._waiting.popleft())
            self.metrics.queued_sequences.set(len(self._waiting))
        try:
            self._step(admitted)
        except Exception as exc:  # the server outlives a failed step; its sequences end with the error
            self._fail_all(admitted, exc)
        self.metrics.active_sequences.set(len(self._running))

    def _step(self, admitted: list[GenerationRequest]) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].request.cancelled:
                self._release(row)
        admitted = [r for r in admitted if not r.cancelled]
        if not admitted and not self._running:
            return
        self.metrics.engine_steps.inc()
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()
        self._update_offload_metrics()

    @torch.inference_mode()
    def _prefill(self, requests: list[GenerationRequest]) -> None:
        prompts = [r.prompt for r in requests]
        self._plan_step(len(prompts), max(len(p) for p in prompts))
        logits = self.forwards.prefill(prompts, self.recorder)  # [n, V]
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        new = [
            _Sequence(
                r, TokenCounts(1, self.spec.vocab_size, r.sampling), new_generator(r.sampling),
                TextStream(self.decode, r.stop),
            )
            for r in requests
        ]  # fmt: skip
        self._running.extend(new)
        first = len(self._running) - len(new)
        self._sample_and_deliver(logits, range(first, len(self._running)))

    @torch.inference_mode()
    def _decode(self) -> None:
        self._plan_step(len(self._running), sum(self.pool.lengths) // len(self._running))
        self.metrics.step_sequences.observe(len(self._running))
        logits = self.forwards.decode([s.ids[-1] for s in self._running], self.recorder)  # [active, V]
        self._sample_and_deliver(logits, range(len(self._running)))

    def _sample_and_deliver(self, logits: torch.Tensor, rows: range) -> None:
        """logits [len(rows), V] for the running sequences at `rows`: sample, deliver, and
        release the finished (highest row first, as releasing moves the last row)."""
        finished = []
        logits = logits.float().cpu()
        now = time.perf_counter()
        for i, row in enumerate(rows):
            seq = self._running[row]
            params = seq.request.sampling
            token = int(next_tokens(logits[i : i + 1], params, seq.generator, seq.counts)[0])
            seq.counts.add(torch.tensor([token]))
            seq.ids.append(token)
            if seq.last_token_s is None:
                self.metrics.time_to_first_token.observe(now - seq.request.arrived_s)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_s)
            seq.last_token_s = now
            self.metrics.generation_tokens.inc()
            text, stopped = seq.text.push(seq.ids)
            reason = None
            if stopped or (token in self.stop_ids and not seq.request.ignore_eos):
                reason = "stop"
            elif len(seq.ids) >= seq.request.max_tokens or len(seq.request.prompt) + len(seq.ids) >= (
                self.options.max_context
            ):
                reason = "length"
            if reason is not None and not stopped:
                text += seq.text.finish(seq.ids)
            event = TokenEvent([token], text, reason)
            if reason is not None:
                event.prompt_tokens, event.completion_tokens = len(seq.request.prompt), len(seq.ids)
                finished.append(row)
            seq.request.deliver(event)
        for row in sorted(finished, reverse=True):
            self._release(row)

    def _release(self, row: int) -> None:
        moved = self.forwards.release(row)
        if moved is not None:
            self._running[row] = self._running[moved]
        self._running.pop()

    def _fail_all(self, admitted: list[GenerationRequest], exc: Exception) -> None:
        message = str(exc) or type(exc).__name__
        owners = {id(s.request): s.request for s in self._running} | {id(r): r for r in admitted}
        while self._running:
            self._release(len(self._running) - 1)
        self.forwards.reset()
        for request in owners.values():
            request.deliver(TokenEvent([], "", "error", error=message))

    def _plan_step(self, sequences: int, mean_context_tokens: int) -> None:
        """The offload planner's micro-batch count for this forward's number of sequences."""
        if self.plan_num_batches is None or not isinstance(self.model, OffloadedModel):
            return
        n = max(1, min(sequences, self.plan_num_batches(sequences, mean_context_tokens)))
        if n != self.model.options.num_batches:
            self.model.options = dataclasses.replace(self.model.options, num_batches=n)

    def _update_offload_metrics(self) -> None:
        if not isinstance(self.model, OffloadedModel):
            return
        read = self.model.reader.stats.bytes_read
        self.metrics.disk_read_bytes.inc(read - self._bytes_read)
        self._bytes_read = read
        self.metrics.prefetch_hit_rate.set(self.model.prefetcher.hit_rate)
