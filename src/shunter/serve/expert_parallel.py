"""`shunter serve` expert-parallel (under torchrun): every rank runs the server's forwards.

Rank 0 runs the HTTP server and the continuous batcher; each pool operation it makes (prefill,
decode, release, reset, stop) goes first to every rank over a control group, and every rank then
applies it to its own copy of the KV pool, so the pools' bookkeeping stays identical.

Attention is data-parallel: a sequence belongs to the rank `row % world` of the pool row it sits in,
and that rank alone computes its row in every forward (a strided block of rows: views, so the
forward writes the pool in place) and holds its keys and values. Every MoE layer runs
expert-parallel over all ranks (`ExpertParallelModel`), so every rank runs every forward: one that
owns no row of it runs a discarded row against a scratch cache. Rank 0 gathers each forward's
logits and samples every sequence, as the one-process server does, so greedy tokens are the same.
When releasing a row moves the last sequence into it (KVPool.release) and the two rows belong to
different ranks, the old owner sends the sequence's keys and values to the new one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from shunter.model.executor import Batch, KVCache
from shunter.parallel.inference import ExpertParallelModel
from shunter.serve.kv_pool import KVPool, PoolForwards, RowsView

# The control group's timeout: a follower waits on it for rank 0's next operation, however long
# the server sits idle. (torchrun ends every rank when one fails, so nothing waits on a dead peer.)
IDLE_TIMEOUT = timedelta(days=365)


class ExpertParallelForwards(PoolForwards):
    """PoolForwards on every rank of `ep`'s group; rank 0 leads (its batcher calls the methods),
    the other ranks `follow` until rank 0 closes. Collective: every rank constructs it."""

    def __init__(self, ep: ExpertParallelModel, rows: int, columns: int) -> None:
        super().__init__(ep.model, rows, columns)
        self.ep, self.rank, self.world = ep, ep.rank, ep.world
        self.group = ep.group
        self.control = dist.new_group(list(range(self.world)), backend="gloo", timeout=IDLE_TIMEOUT)
        self.scratch = ep.model.new_cache(1, columns)  # a forward's discarded row, when none is ours
        self.closed = False

    # -- rank 0 ----------------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], recorder: object | None) -> torch.Tensor:
        return self._lead(("prefill", prompts), recorder)

    def decode(self, tokens: list[int], recorder: object | None) -> torch.Tensor:
        return self._lead(("decode", list(tokens)), recorder)

    def release(self, row: int) -> int | None:
        return self._lead(("release", row), None)

    def reset(self) -> None:
        self._lead(("reset",), None)

    def close(self) -> None:
        """Rank 0: end every follower's loop (once)."""
        if self.rank == 0 and not self.closed:
            self.closed = True
            self._send(("stop",))

    def _lead(self, operation: tuple, recorder: object | None):
        try:
            self._send(operation)
            return self._apply(operation, recorder)
        except Exception as exc:  # the ranks no longer agree on the pool: the group cannot go on
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"shunter: error: rank 0: a step of the expert-parallel server failed: {first_line}",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(1)  # as run_rank does after a failed collective; torchrun ends the other ranks

    def _send(self, operation: tuple) -> None:
        dist.broadcast_object_list([operation], src=0, group=self.control)

    # -- every other rank ------------------------------------------------------------------------
    def follow(self) -> None:
        """Apply rank 0's operations until it stops."""
        while True:
            received: list[tuple | None] = [None]
            dist.broadcast_object_list(received, src=0, group=self.control)
            operation = received[0]
            assert operation is not None
            if operation[0] == "stop":
                return
            self._apply(operation, None)

    # -- every rank ------------------------------------------------------------------------------
    def _apply(self, operation: tuple, recorder: object | None):
        kind = operation[0]
        pool = self.pool
        if kind == "prefill":
            prompts = operation[1]
            first = pool.active
            batch, cache = pool.prefill_batch(prompts)
            logits = self._forward(batch, cache, first, recorder)
            pool.admit([len(p) for p in prompts])
            return logits
        if kind == "decode":
            batch, cache = pool.decode_batch(torch.tensor(operation[1], dtype=torch.long))
            logits = self._forward(batch, cache, 0, recorder)
            pool.advance()
            return logits
        if kind == "release":
            return self._release(operation[1])
        if kind == "reset":
            return super().reset()
        raise ValueError(f"unknown pool operation {kind!r}")

    def _forward(self, batch: Batch, cache: RowsView, first_row: int, recorder: object | None):
        """This rank's rows of a forward over pool rows [first_row, first_row + n); rank 0 returns
        every row's logits [n, V] (the others None)."""
        n = batch.tokens.shape[0]
        offset = (self.rank - first_row) % self.world
        if offset < n:
            mine = slice(offset, n, self.world)
            part = Batch(batch.tokens[mine], batch.positions[mine], batch.key_valid[mine], batch.start)
            view = _rows(cache, mine)
        else:  # no row here: a discarded copy of the first keeps this rank in every exchange
            part = Batch(batch.tokens[:1], batch.positions[:1], batch.key_valid[:1], batch.start)
            view = _rows(self.scratch, slice(0, 1), cache.length)
        logits = self.model.forward(part, view, recorder, last_only=True)[:, -1].float()
        parts: list[torch.Tensor | None] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(logits if offset < n else None, parts, dst=0, group=self.group)
        if parts is None:
            return None
        full = torch.empty(n, logits.shape[-1])
        for rank, rows in enumerate(parts):
            if rows is not None:
                full[(rank - first_row) % self.world :: self.world] = rows
        return full

    def _release(self, row: int) -> int | None:
        pool = self.pool
        moved = pool.release(row)
        if moved is None or moved % self.world == row % self.world:
            return moved
        # the sequence now at `row` was computed by rank moved % world: its keys and values go over
        source = moved % self.world
        columns = slice(pool.cursor - pool.lengths[row], pool.cursor)
        slices = [t[row, :, columns] for t in _tensors(pool)]
        if self.rank == source:
            flat = torch.cat([s.reshape(-1) for s in slices])
        else:
            flat = torch.empty(sum(s.numel() for s in slices), dtype=slices[0].dtype)
        dist.broadcast(flat, src=source, group=self.group)
        if self.rank != source:
            offset = 0
            for s in slices:
                s.copy_(flat[offset : offset + s.numel()].view_as(s))
                offset += s.numel()
        return moved


def _rows(cache: KVCache, rows: slice, length: int | None = None) -> RowsView:
    """A view of some rows of a cache (strided rows are views too), writing at `length`."""
    return RowsView(
        [k[rows] for k in cache.keys],
        [v[rows] for v in cache.values],
        cache.length if length is None else length,
        cache.max_slots,
    )


def _tensors(pool: KVPool) -> Sequence[torch.Tensor]:
    return [*pool.cache.keys, *pool.cache.values]
