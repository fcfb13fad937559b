"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling, and
OpenAI's frequency and presence penalties. `shunter generate` and `shunter serve` share these."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shunter.errors import ShunterError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; otherwise softmax(logits / temperature) cut to the top_p mass.

    Penalties follow OpenAI's definition over the tokens generated so far (the prompt does not
    count): logits -= frequency_penalty * count + presence_penalty * (count > 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's bounds on frequency_penalty and presence_penalty


GREEDY = SamplingParams()


def check_penalty(value: float, field: str) -> None:
    low, high = PENALTY_RANGE
    if not low <= value <= high:
        raise ShunterError(f"{field}: must lie in [{low:g}, {high:g}], got {value:g}")


def check_finite(logits: torch.Tensor) -> None:
    """One check per step: argmax of NaN picks token 0 silently."""
    if not bool(torch.isfinite(logits).all()):
        raise ShunterError("the model computed NaN or infinite logits: its weights hold NaN or inf values")


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] fp32 and counts [B, V] (how often each token was generated so far) -> the
    penalised logits [B, V]; the input itself when there is no penalty."""
    if not params.penalised:
        return logits
    counts = counts.to(logits.dtype)
    present = (counts > 0).to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * present


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of (already penalised) logits [B, V] -> [B] int64."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(1, choice).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """The random stream of one sampled run (None when greedy: argmax draws nothing)."""
    return torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None


class TokenCounts:
    """How often each of B sequences generated each token so far: counts [B, V] for the penalties
    (kept only when a penalty applies)."""

    def __init__(self, batch: int, vocab_size: int, params: SamplingParams) -> None:
        self.counts = torch.zeros(batch, vocab_size, dtype=torch.int32) if params.penalised else None

    def add(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """tokens [B] (or [R] for the given rows) were just generated."""
        if self.counts is None:
            return
        rows = torch.arange(self.counts.shape[0]) if rows is None else rows
        self.counts[rows, tokens] += 1


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    counts: TokenCounts | None = None,
) -> torch.Tensor:
    """The next token per row of logits [B, V] -> [B] int64: checked, penalised, sampled."""
    check_finite(logits)
    if counts is not None and counts.counts is not None:
        logits = apply_penalties(logits.float(), counts.counts, params)
    return sample_tokens(logits, params, generator)
