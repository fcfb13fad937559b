"""One all-to-all of token rows between ranks, executed three ways.

Every rank holds `send` [sum_j rows[rank, j], H]: its rows grouped by destination rank, in rank
order. `rows` [n, n] (rows from rank i to rank j) is known to every rank. The exchange returns
`recv` [sum_i rows[i, rank], H]: the rows sent to this rank, grouped by source rank, in rank order.
The diagonal is a local copy and never touches the network.

Strategies (the runtime's names for network.transport's transports: "all_to_all" is fair_share,
"scheduled" is planned):
- "all_to_all": one `all_to_all_single` with split sizes. Every flow starts at once and the
  transport shares the ports (the baseline every expert-parallel runtime uses).
- "scheduled": Shunter's schedule (`plan_exchange`) executed round by round: each round's sends
  and receives of this rank are posted together with `batch_isend_irecv` and finished, and the
  ranks meet at a barrier before the next round (see `_run_rounds`). A transfer the planner split
  over several rounds is split at row boundaries in proportion to its bytes.
- "random_order": each sender sends its flows one at a time in a random order (the simulator's
  seeded `sender_queues`, the same on every rank); receivers accept them as they come (Aurora's
  RCS baseline).

The two point-to-point strategies send over `Links`: one process group per direction between a
pair of ranks (see `open_links`). all_to_all_single runs on the group it is given, as every peer
runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shunter.network.cost import RoundCost
from shunter.network.fluid import sender_queues
from shunter.network.transport import STRATEGIES, Strategy
from shunter.parallel.runtime import new_group
from shunter.plan.schedule import Schedule, schedule_with_round_cost


def plan_exchange(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray,
    max_lanes_per_device: int = 16,
    round_cost: RoundCost | None = None,
) -> Schedule:
    """The schedule the "scheduled" strategy runs for traffic_bytes [n, n] on ports
    bandwidth_bytes_s [n]: lanes or plain matchings, and which rounds run as one, whichever costs
    least with every round paying round_cost (default RoundCost(): the emulated cluster's figures;
    `shunter bench a2a` passes its calibration's) (plan.schedule.schedule_with_round_cost)."""
    cost = RoundCost() if round_cost is None else round_cost
    return schedule_with_round_cost(traffic_bytes, bandwidth_bytes_s, cost, max_lanes_per_device)


@dataclass(frozen=True)
class Links:
    """The process groups point-to-point rows travel on: `ascending` from a lower rank to a higher
    one, `descending` from a higher rank to a lower one.

    Gloo opens one TCP connection per pair of ranks in a group and carries both directions on it.
    Measured on the emulated cluster (4 hosts, 400/320/200/160 Mbit/s, 16 MiB each way): a pair
    sending both ways at once on one connection moved each direction at 0.48-0.52 of the shaped
    rate in 3-5 of the 6 pairs (which ones changes from run to run), and at 0.91-0.96 with one
    connection per direction, as raw sockets do. A schedule's rounds pair ranks both ways, so
    Shunter sends each direction on its own group."""

    ascending: dist.ProcessGroup | None
    descending: dist.ProcessGroup | None

    def toward(self, src: int, dst: int) -> dist.ProcessGroup | None:
        return self.ascending if src < dst else self.descending


def open_links(group: dist.ProcessGroup | None = None) -> Links:
    """Links over the ranks of `group` (None: the default group). Collective: every rank of the
    group calls it, in the same order as its other group creations. With gloo, two new groups of the
    same ranks; with other backends (NCCL gives each peer its own channels) the group both ways."""
    if dist.get_backend(group) != "gloo":
        return Links(group, group)
    ranks = None if group is None else dist.get_process_group_ranks(group)
    return Links(new_group(ranks, backend="gloo"), new_group(ranks, backend="gloo"))


@dataclass(frozen=True)
class Transfer:
    """Rows [start, stop) of this rank's send (or receive) buffer, to (or from) one peer."""

    peer: int
    start: int
    stop: int


@dataclass(frozen=True)
class RankRounds:
    """The rounds of one rank: per round the transfers it sends and the ones it receives."""

    sends: list[list[Transfer]]
    receives: list[list[Transfer]]


def rows_per_round(schedule: Schedule, rows: np.ndarray) -> np.ndarray:
    """[R, n, n] int64 rows moved from i to j in each round of a schedule of rows [n, n].

    The schedule moves bytes; rows are indivisible, so each pair's cumulative share of its bytes
    after round r is rounded to rows. The last round a pair appears in carries it to all its rows,
    and every rank computes the same split from the same inputs."""
    rows = np.asarray(rows, dtype=np.int64)
    n = rows.shape[0]
    per_round = np.zeros((max(schedule.num_rounds, 1), n, n))
    np.add.at(per_round, (schedule.round_of, schedule.src, schedule.dst), schedule.bytes)
    total = per_round.sum(axis=0)
    fraction = np.divide(np.cumsum(per_round, axis=0), total, out=np.zeros_like(per_round), where=total > 0)
    cumulative_rows = np.rint(fraction * rows).astype(np.int64)
    moved = np.diff(cumulative_rows, axis=0, prepend=0)
    np.einsum("rii->ri", moved)[:] = 0  # local rows are copied, never scheduled
    return moved


def rank_rounds(rank: int, moved: np.ndarray, rows: np.ndarray) -> RankRounds:
    """This rank's transfers in each round, as row ranges of its send and receive buffers.

    Args:
        moved [R, n, n]: rows_per_round of the schedule.
        rows [n, n]: rows from each rank to each rank.
    """
    send_offsets = np.concatenate([[0], np.cumsum(rows[rank])])
    recv_offsets = np.concatenate([[0], np.cumsum(rows[:, rank])])
    sent_so_far = np.zeros(rows.shape[0], dtype=np.int64)
    received_so_far = np.zeros(rows.shape[0], dtype=np.int64)
    sends: list[list[Transfer]] = []
    receives: list[list[Transfer]] = []
    for r in range(moved.shape[0]):
        round_sends, round_receives = [], []
        for peer in np.flatnonzero(moved[r, rank]).tolist():
            start = int(send_offsets[peer] + sent_so_far[peer])
            round_sends.append(Transfer(peer, start, start + int(moved[r, rank, peer])))
            sent_so_far[peer] += moved[r, rank, peer]
        for peer in np.flatnonzero(moved[r, :, rank]).tolist():
            start = int(recv_offsets[peer] + received_so_far[peer])
            round_receives.append(Transfer(peer, start, start + int(moved[r, peer, rank])))
            received_so_far[peer] += moved[r, peer, rank]
        sends.append(round_sends)
        receives.append(round_receives)
    return RankRounds(sends, receives)


def exchange(
    send: torch.Tensor,
    rows: np.ndarray,
    strategy: Strategy,
    *,
    schedule: Schedule | None = None,
    seed: int = 0,
    group: dist.ProcessGroup | None = None,
    links: Links | None = None,
) -> torch.Tensor:
    """Run one all-to-all of rows; see the module docstring for the buffer layout.

    Args:
        send [sum_j rows[rank, j], H]: rows grouped by destination rank.
        rows [n, n] int: rows from rank i to rank j (the same array on every rank).
        schedule: the byte schedule for "scheduled" (required there, ignored otherwise).
        seed: the send order of "random_order".
        group: the ranks taking part (None: the default group).
        links: the groups "scheduled" and "random_order" send on (`open_links(group)`); None
            sends both directions on `group` itself.
    Returns:
        recv [sum_i rows[i, rank], H]: rows grouped by source rank.
    """
    rank = dist.get_rank(group)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape != (dist.get_world_size(group),) * 2:
        raise ValueError(f"rows has shape {rows.shape}, expected the world size squared")
    if send.shape[0] != rows[rank].sum():
        raise ValueError(f"send has {send.shape[0]} rows, rows[{rank}] sums to {rows[rank].sum()}")
    send = send.contiguous()
    recv = send.new_empty((int(rows[:, rank].sum()), *send.shape[1:]))
    if strategy == "all_to_all":
        dist.all_to_all_single(recv, send, rows[:, rank].tolist(), rows[rank].tolist(), group=group)
        return recv
    _copy_local(send, recv, rows, rank)
    links = links or Links(group, group)
    if strategy == "scheduled":
        if schedule is None:
            raise ValueError("the scheduled strategy needs a schedule")
        rounds = rank_rounds(rank, rows_per_round(schedule, rows), rows)
        _run_rounds(send, recv, rank, rounds, links, group)
    elif strategy == "random_order":
        _run_random_order(send, recv, rows, rank, seed, links)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return recv


def _copy_local(send: torch.Tensor, recv: torch.Tensor, rows: np.ndarray, rank: int) -> None:
    send_start = int(rows[rank, :rank].sum())
    recv_start = int(rows[:rank, rank].sum())
    count = int(rows[rank, rank])
    recv[recv_start : recv_start + count] = send[send_start : send_start + count]


def _run_rounds(
    send: torch.Tensor,
    recv: torch.Tensor,
    rank: int,
    rounds: RankRounds,
    links: Links,
    group: dist.ProcessGroup | None,
) -> None:
    """Round by round, with a barrier of the group between rounds.

    Why the barrier: a send completes once its bytes are in the kernel's socket buffer (up to
    4 MiB, 80 ms at 400 Mbit/s), not once they arrive, so without it a rank starts its next round's
    send while its last one is still leaving, and the two share its port: measured on the emulated
    cluster (4 x 400 Mbit/s, 8192 tokens), a round of one 88 ms flow took 138 ms, and the schedule
    1.105x the bound; with the barrier, when every receive of the round is complete, 1.058x."""
    # The tag is the round: a pair split over several rounds never confuses its pieces.
    for r, (sends, receives) in enumerate(zip(rounds.sends, rounds.receives, strict=True)):
        ops = [_op(dist.irecv, recv, t, r, links.toward(t.peer, rank)) for t in receives]
        ops += [_op(dist.isend, send, t, r, links.toward(rank, t.peer)) for t in sends]
        for work in _post(ops):
            work.wait()
        if r < len(rounds.sends) - 1:
            dist.barrier(group)


def _post(ops: list[dist.P2POp]) -> list:
    """Start ops; batch_isend_irecv takes one group per call (NCCL fuses each call's ops, so a
    round's sends and receives cannot deadlock on each other), so ops are batched per group."""
    works = []
    for group in dict.fromkeys(op.group for op in ops):
        works += dist.batch_isend_irecv([op for op in ops if op.group is group])
    return works


def _run_random_order(
    send: torch.Tensor,
    recv: torch.Tensor,
    rows: np.ndarray,
    rank: int,
    seed: int,
    links: Links,
) -> None:
    n = rows.shape[0]
    send_offsets = np.concatenate([[0], np.cumsum(rows[rank])])
    recv_offsets = np.concatenate([[0], np.cumsum(rows[:, rank])])
    # Every receive is posted first, so one sender at a time can never deadlock on a peer.
    pending = [
        dist.irecv(recv[recv_offsets[i] : recv_offsets[i + 1]], i, group=links.toward(i, rank), tag=0)
        for i in range(n)
        if i != rank and rows[i, rank]
    ]
    for peer in sender_queues(rows, "random_order", seed)[rank]:
        chunk = send[send_offsets[peer] : send_offsets[peer + 1]]
        dist.isend(chunk, peer, group=links.toward(rank, peer), tag=0).wait()
    for work in pending:
        work.wait()


def _op(
    fn, buffer: torch.Tensor, transfer: Transfer, tag: int, group: dist.ProcessGroup | None
) -> dist.P2POp:
    return dist.P2POp(fn, buffer[transfer.start : transfer.stop], transfer.peer, group, tag)
