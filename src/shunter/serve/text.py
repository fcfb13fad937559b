"""Token ids to streamed text: what a sequence may send so far, and where a stop string ends it.

OpenAI streams text, not tokens, and never sends a stop string: text that might still become
one (a suffix that is a prefix of a stop string) is held back until the next token settles it,
and so is a trailing U+FFFD (a UTF-8 character whose bytes span tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shunter.model.tokenizer import Tokenizer

INCOMPLETE_CHARACTER = "\ufffd"


def text_decoder(tokenizer: Tokenizer | None) -> Callable[[list[int]], str]:
    """ids -> text: the tokenizer's decode, or for a model without tokenizer.json the ids as
    `shunter generate` prints them ("17 4 9 ")."""
    if tokenizer is None:
        return lambda ids: "".join(f"{i} " for i in ids)
    return tokenizer.decode


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text must wait: the longest suffix that begins a stop
    string, and a trailing incomplete character."""
    hold = len(text) - len(text.rstrip(INCOMPLETE_CHARACTER))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if stop.startswith(text[len(text) - size :]):
                hold = size
                break
    return hold


class TextStream:
    """The text of one sequence as its tokens arrive: `push(ids)` returns the new text to send and
    whether a stop string ended it; `finish()` returns what was held back at the end."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self.decode, self.stops = decode, [s for s in stops if s]
        self.sent = ""

    def push(self, ids: list[int]) -> tuple[str, bool]:
        text = self.decode(ids)
        stop_at = find_stop(text, self.stops)
        if stop_at is not None:
            return self._send(text[:stop_at]), True
        return self._send(text[: len(text) - held_back(text, self.stops)]), False

    def finish(self, ids: list[int]) -> str:
        text = self.decode(ids)
        stop_at = find_stop(text, self.stops)
        return self._send(text if stop_at is None else text[:stop_at])

    def _send(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new settled yet (or a decode that rewrote the past: wait)
        new, self.sent = text[len(self.sent) :], text
        return new
