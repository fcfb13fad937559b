"""The KV cache of a server: one row per sequence in flight, sequences joining and leaving at will.

The executors (in memory and offload) write a forward's keys at one shared cache position for
all rows, and take per-row positions and a per-row mask of valid key slots (`Batch`). The pool
keeps that contract and still lets sequences at different lengths share a decode step:

- active sequences occupy rows [0, active); a sequence leaving moves the last active row into
  its place, so a forward always runs over a contiguous block of rows (no padding rows, no
  experts loaded for them);
- every active sequence is right-aligned at one write column `cursor`: row r holds its
  `lengths[r]` tokens in columns [cursor - lengths[r], cursor), and a decode step writes column
  `cursor` for all rows at once, each at its own position (its length);
- new prompts are prefilled together, left-padded, into the rows after the active ones so that
  they too end at the cursor (the active rows shift right first when a prompt is longer than
  the cursor);
- when the cursor reaches the last column, all rows shift left together to the longest length.

A single sequence in an empty pool starts at column 0 with position 0, exactly the layout of
`generate`, so its tokens are the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shunter.model.executor import Batch, KVCache

if TYPE_CHECKING:
    from shunter.model.executor import InMemoryModel
    from shunter.offload import OffloadedModel


class RowsView(KVCache):
    """A KVCache over a block of the pool's rows: its tensors are views of the pool's, so a
    forward writes into the pool; the write position (`length`) is the view's own."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int, max_slots: int):
        # no KVCache.__init__: it would allocate; the view shares the pool's tensors instead
        self.keys, self.values, self.length, self.max_slots = keys, values, length, max_slots


class KVPool:
    """Rows for up to `rows` sequences of up to `columns` cached tokens each.

    `cache` is the executor's own KVCache (`model.new_cache(rows, columns)`), so it lives on the
    compute device and counts in the offload placement's KV budget."""

    def __init__(self, cache: KVCache, rows: int, columns: int) -> None:
        self.cache, self.rows, self.columns = cache, rows, columns
        self.lengths: list[int] = []  # cached tokens per active row
        self.cursor = 0  # the column the next decode step writes

    @property
    def active(self) -> int:
        return len(self.lengths)

    @property
    def free(self) -> int:
        return self.rows - self.active

    def view(self, first: int, last: int, length: int) -> RowsView:
        rows = slice(first, last)
        return RowsView(
            [k[rows] for k in self.cache.keys], [v[rows] for v in self.cache.values], length, self.columns
        )

    def prefill_batch(self, prompts: list[list[int]]) -> tuple[Batch, RowsView]:
        """The forward that prefills `prompts` into the next free rows, and the cache it writes.
        Call `admit` after the forward."""
        assert prompts and len(prompts) <= self.free, "more prompts than free rows"
        longest = max(len(p) for p in prompts)
        assert longest < self.columns, "a prompt must leave a column for its first decode step"
        self._make_room(longest)
        pads = torch.tensor([longest - len(p) for p in prompts])
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens[i, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        positions = (torch.arange(longest)[None, :] - pads[:, None]).clamp(min=0)
        start = self.cursor - longest
        key_valid = torch.arange(self.cursor)[None, :] >= (start + pads)[:, None]  # [n, cursor]
        first = self.active
        return Batch(tokens, positions, key_valid, start), self.view(first, first + len(prompts), start)

    def admit(self, prompt_lengths: list[int]) -> list[int]:
        """Mark the rows `prefill_batch` just filled as active; returns their row indices."""
        first = self.active
        self.lengths.extend(prompt_lengths)
        return list(range(first, self.active))

    def decode_batch(self, tokens: torch.Tensor) -> tuple[Batch, RowsView]:
        """The forward of one new token per active row (tokens [active] int64) and the cache it
        writes. Call `advance` after the forward."""
        assert tokens.shape == (self.active,) and self.active > 0
        if self.cursor >= self.columns:
            self._shift_left()
        lengths = torch.tensor(self.lengths)
        key_valid = torch.arange(self.cursor + 1)[None, :] >= (self.cursor - lengths)[:, None]
        batch = Batch(tokens[:, None], lengths[:, None], key_valid, self.cursor)
        return batch, self.view(0, self.active, self.cursor)

    def advance(self) -> None:
        """After a decode step: every active row holds one more token."""
        self.cursor += 1
        self.lengths = [n + 1 for n in self.lengths]

    def release(self, row: int) -> int | None:
        """Free `row`; the last active row moves into it. Returns the row that moved (its old
        index), or None when `row` was the last."""
        last = self.active - 1
        moved = None
        if row != last:
            columns = slice(self.cursor - self.lengths[last], self.cursor)
            for tensors in (self.cache.keys, self.cache.values):
                for t in tensors:
                    t[row, :, columns] = t[last, :, columns]
            self.lengths[row] = self.lengths[last]
            moved = last
        self.lengths.pop()
        if not self.lengths:
            self.cursor = 0  # an empty pool starts over at column 0, generate's layout
        return moved

    def _shift(self, new_cursor: int) -> None:
        """Move every active row's tokens so that they end at `new_cursor`."""
        if self.lengths and new_cursor != self.cursor:
            longest = max(self.lengths)
            source = slice(self.cursor - longest, self.cursor)
            target = slice(new_cursor - longest, new_cursor)
            rows = slice(0, self.active)
            for tensors in (self.cache.keys, self.cache.values):
                for t in tensors:
                    t[rows, :, target] = t[rows, :, source].clone()  # the ranges may overlap
        self.cursor = new_cursor

    def _make_room(self, prompt_length: int) -> None:
        if self.cursor < prompt_length:
            self._shift(prompt_length)

    def _shift_left(self) -> None:
        self._shift(max(self.lengths))


class PoolForwards:
    """A server's forwards over its KV pool, in one process: each call is one forward (or one
    release) of the continuous batcher. `ExpertParallelForwards` (serve/expert_parallel.py) runs
    the same calls on every rank of an expert-parallel group."""

    def __init__(self, model: InMemoryModel | OffloadedModel, rows: int, columns: int) -> None:
        self.model = model
        self.pool = KVPool(model.new_cache(rows, columns), rows, columns)

    def prefill(self, prompts: list[list[int]], recorder: object | None) -> torch.Tensor:
        """Prefill `prompts` into the next free rows; their last position's logits [n, V]."""
        batch, cache = self.pool.prefill_batch(prompts)
        logits = self.model.forward(batch, cache, recorder, last_only=True)[:, -1]
        self.pool.admit([len(p) for p in prompts])
        return logits

    def decode(self, tokens: list[int], recorder: object | None) -> torch.Tensor:
        """One new token per active row; the logits [active, V]."""
        batch, cache = self.pool.decode_batch(torch.tensor(tokens, dtype=torch.long))
        logits = self.model.forward(batch, cache, recorder, last_only=True)[:, -1]
        self.pool.advance()
        return logits

    def release(self, row: int) -> int | None:
        """KVPool.release."""
        return self.pool.release(row)

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.pool.lengths.clear()
        self.pool.cursor = 0

    def close(self) -> None:
        """Nothing to end in one process."""
