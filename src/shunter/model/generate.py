"""Batched generation: left-padded prompts of different lengths, KV cache, greedy or sampled
(with OpenAI's frequency and presence penalties)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shunter.model.executor import Batch, InMemoryModel
from shunter.model.sampling import GREEDY, SamplingParams, TokenCounts, new_generator, next_tokens
from shunter.trace.routing_trace import RoutingRecorder


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, prompt excluded, stop token included
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: int
    per_step_s: list[float] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens produced per second by decode forwards (the batch counts once per sequence)."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (tokens [B, P] left-padded, pad_lengths [B])."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pads = torch.tensor([longest - len(p) for p in prompts])
    for b, prompt in enumerate(prompts):
        tokens[b, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    return tokens, pads


def _finish(logits: torch.Tensor) -> None:
    """Wait for a GPU's queued kernels, so that a step's time is its compute, not its launches."""
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)


def generate(
    model: InMemoryModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop_ids: Sequence[int] = (),
    on_step: Callable[[list[int | None]], None] | None = None,
    recorder: RoutingRecorder | None = None,
) -> GenerationResult:
    """Generate up to max_new_tokens per prompt. `on_step` gets each step's new token per sequence
    (None for sequences that already stopped), for streaming."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    tokens, pads = left_pad(prompts)
    B, P = tokens.shape
    slots = P + max_new_tokens
    key_valid = torch.arange(slots)[None, :] >= pads[:, None]  # [B, slots]
    positions = (torch.arange(P)[None, :] - pads[:, None]).clamp(min=0)
    cache = model.new_cache(B, slots)
    generator = new_generator(sampling)
    counts = TokenCounts(B, model.spec.vocab_size, sampling)
    stop = set(stop_ids)

    started = time.perf_counter()
    logits = model.forward(Batch(tokens, positions, key_valid[:, :P], 0), cache, recorder, last_only=True)
    _finish(logits)
    prefill_s = time.perf_counter() - started

    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    last_positions = positions[:, -1]
    per_step: list[float] = []
    for step in range(max_new_tokens):
        # sampled on the host, where the generator and the penalties' counts live (from a GPU
        # that is one [B, V] copy a step)
        next_ids = next_tokens(logits[:, -1].cpu(), sampling, generator, counts)
        counts.add(next_ids)
        emitted: list[int | None] = []
        for b, token in enumerate(next_ids.tolist()):
            if finished[b]:
                emitted.append(None)
                continue
            outputs[b].append(token)
            emitted.append(token)
            finished[b] = token in stop
        if on_step is not None:
            on_step(emitted)
        if all(finished) or step == max_new_tokens - 1:
            break
        last_positions = last_positions + 1
        step_start = time.perf_counter()
        batch = Batch(next_ids[:, None], last_positions[:, None], key_valid[:, : P + step + 1], P + step)
        logits = model.forward(batch, cache, recorder)
        _finish(logits)
        per_step.append(time.perf_counter() - step_start)
    return GenerationResult(
        tokens=outputs,
        prompt_tokens=sum(len(p) for p in prompts),
        prefill_s=prefill_s,
        decode_s=sum(per_step),
        decode_steps=len(per_step),
        batch=B,
        per_step_s=per_step,
    )
