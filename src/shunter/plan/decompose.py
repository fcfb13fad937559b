"""Split a non-negative square matrix into rounds of partial matchings (Birkhoff–von Neumann /
König): pad it until every row and column sums to the largest line sum, peel off weighted perfect
matchings, drop the padding. The matching schedules in plan/schedule.py are built on it.

Large matrices are first folded: rows (and columns) whose sums fit together under the largest line
sum share one super-line, the small super-matrix is decomposed, and each super-entry's time line is
unrolled back into the device pairs it carries (`decompose_by_folding`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shunter.plan.matching import UNMATCHED, bottleneck_perfect_matching, maximum_matching

_RELATIVE_TOLERANCE = 1e-12

# Up to this many devices every round is the widest perfect matching (a bottleneck matching per
# round, O(m^2.5 log m) each) instead of the previous round's matching repaired by augmenting
# paths. On a real network every round costs a synchronisation and a ramp-up, so fewer, fuller
# rounds run faster; beyond this size planning time wins (a round's overhead is a smaller share).
WIDEST_ROUNDS_MAX_DEVICES = 16

# From this many rows on, lines are folded before decomposing (`decompose_by_folding`). Below it
# the padded decomposition is fast enough (0.17 s a layer at 64 devices) and its rounds are fewer
# (the folded one's cuts fall wherever any folded entry changes pair: +16% rounds on the 64-device
# trace of docs/benchmarks.md, +3% at 256, +0.1% at 1024), while at 1024 devices it is 40x slower.
FOLD_MIN_DEVICES = 128

# Repairing the matching after a round: one augmenting path per emptied entry while few emptied,
# a fresh compiled maximum matching when many did (each Python path costs about a BFS of [m, m]).
AUGMENT_MAX_EMPTIED = 16


@dataclass(frozen=True)
class _Rounds:
    """Pieces of a decomposition, in the decomposed matrix's units, sorted by round."""

    round_of: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    amounts: np.ndarray
    num_rounds: int


def decompose_into_matchings(matrix: np.ndarray) -> _Rounds:
    """Split a non-negative square matrix into rounds, each a partial matching of rows to columns,
    such that sum over rounds of (largest amount in the round) equals the largest row or column sum.

    Below FOLD_MIN_DEVICES rows, or when no two lines fit together under the largest line sum, this
    is `decompose_padded`; otherwise `decompose_by_folding`, which gives the same sum of round
    maxima on a matrix a fraction of the size.

    Args:
        matrix [m, m] float64, non-negative, zero diagonal expected (the diagonal is not special here).
    """
    real = np.array(matrix, dtype=np.float64)
    if real.shape[0] >= FOLD_MIN_DEVICES:
        row_group, col_group = fold_lines(real)
        if max(row_group.max(), col_group.max()) + 1 < real.shape[0]:
            return decompose_by_folding(real, row_group, col_group)
    return decompose_padded(real)


def decompose_padded(matrix: np.ndarray) -> _Rounds:
    """`decompose_into_matchings` on the matrix itself, with no folding.

    Birkhoff–von Neumann on the padded matrix: pad every row and column up to the largest line sum
    T (north-west corner rule), then repeatedly take a perfect matching of the positive entries,
    move the smallest matched entry theta along all of it, and drop the padding from the pieces.
    Entries only ever shrink and each round empties at least one, so there are at most nnz rounds
    (and at most T rounds for integer matrices). The matching is repaired between rounds by one
    augmenting path per emptied entry, or recomputed when many emptied.

    Args:
        matrix [m, m] float64, non-negative, zero diagonal expected (the diagonal is not special here).
    """
    real = np.array(matrix, dtype=np.float64)
    m = real.shape[0]
    pieces_rows: list[np.ndarray] = []
    pieces_cols: list[np.ndarray] = []
    pieces_amounts: list[np.ndarray] = []
    while real.any():
        done = _decompose_padded(real, pieces_rows, pieces_cols, pieces_amounts)
        # A restart only happens when rounding left the padded matrix without a perfect matching;
        # the residual is then decomposed afresh with its own padding.
        if done:
            break
    counts = np.array([len(r) for r in pieces_rows], dtype=np.int64)
    if m == 0 or not pieces_rows:
        empty = np.zeros(0, dtype=np.int64)
        return _Rounds(empty, empty, empty, np.zeros(0), 0)
    return _Rounds(
        round_of=np.repeat(np.arange(len(pieces_rows), dtype=np.int64), counts),
        rows=np.concatenate(pieces_rows),
        cols=np.concatenate(pieces_cols),
        amounts=np.concatenate(pieces_amounts),
        num_rounds=len(pieces_rows),
    )


def fold_lines(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of rows, and of columns, whose sums fit together under the largest line sum T.

    First-fit decreasing bin packing of the row sums (and separately the column sums) into bins of
    capacity T. Rows in one group never send in the same round of a folded decomposition, so a
    group behaves as one row whose sum is at most T: the bound is unchanged.

    Returns:
        row_group [m] int64 and col_group [m] int64: the group of each row / column, numbered
        from 0; lines with a zero sum join group 0.
    """
    row_sums, col_sums = matrix.sum(axis=1), matrix.sum(axis=0)
    capacity = max(row_sums.max(initial=0.0), col_sums.max(initial=0.0))
    return _first_fit_decreasing(row_sums, capacity), _first_fit_decreasing(col_sums, capacity)


def _first_fit_decreasing(sizes: np.ndarray, capacity: float) -> np.ndarray:
    """[n] bin of each size; bins hold at most `capacity`, zero sizes go to bin 0."""
    group = np.zeros(sizes.shape[0], dtype=np.int64)
    loads = np.zeros(0)
    for index in np.argsort(-sizes, kind="stable").tolist():
        size = sizes[index]
        if size <= 0:
            break
        fits = np.flatnonzero(loads + size <= capacity)
        if fits.size:
            group[index] = fits[0]
            loads[fits[0]] += size
        else:
            group[index] = loads.size
            loads = np.append(loads, size)
    return group


def decompose_by_folding(matrix: np.ndarray, row_group: np.ndarray, col_group: np.ndarray) -> _Rounds:
    """`decompose_into_matchings` through a folded matrix: the rows of each row group (and the
    columns of each column group) become one line, the small folded matrix is decomposed by
    `decompose_padded`, and each folded entry's time line is unrolled into the pairs it carries.

    Folded round k lasts L_k (its largest amount) and starts at the sum of the earlier L's, so the
    folded rounds end at the largest line sum T. A folded entry (R, C) is busy for its amount at the
    start of each round it is in; its pairs (i in R, j in C) take turns along that busy time, one
    at a time. Cutting the time line at every change of any pair gives the rounds: in each, a
    group holds at most one folded entry and an entry at most one pair, so every round is a
    matching of devices, and the rounds' maxima add up to T again.

    Args:
        matrix [m, m] non-negative; row_group, col_group [m] int64 from `fold_lines` (any grouping
        whose group sums stay within the largest line sum keeps the bound).
    """
    m = matrix.shape[0]
    k = int(max(row_group.max(initial=0), col_group.max(initial=0))) + 1
    pair_rows, pair_cols = np.nonzero(matrix)
    pair_amounts = matrix[pair_rows, pair_cols]
    pair_entry = row_group[pair_rows] * k + col_group[pair_cols]
    folded = np.bincount(pair_entry, weights=pair_amounts, minlength=k * k).reshape(k, k)
    rounds = decompose_padded(folded)
    if rounds.num_rounds == 0 or m == 0:
        return rounds
    round_length = np.zeros(rounds.num_rounds)
    np.maximum.at(round_length, rounds.round_of, rounds.amounts)
    round_start = np.concatenate([[0.0], np.cumsum(round_length)])  # [rounds + 1]

    # Each folded entry's busy time, in the entry's own clock: pieces in round order, pairs in
    # (row, column) order, each laid end to end from 0.
    piece_entry = rounds.rows * k + rounds.cols
    piece_order = np.lexsort((rounds.round_of, piece_entry))
    piece_entry, piece_round = piece_entry[piece_order], rounds.round_of[piece_order]
    piece_amount = rounds.amounts[piece_order]
    piece_clock = _clock_within(piece_entry, piece_amount)
    pair_order = np.lexsort((pair_cols, pair_rows, pair_entry))
    pair_entry, pair_rows, pair_cols = pair_entry[pair_order], pair_rows[pair_order], pair_cols[pair_order]
    pair_amounts = pair_amounts[pair_order]
    pair_clock = _clock_within(pair_entry, pair_amounts)

    # Stretches of an entry's clock with one piece and one pair: events sorted by (entry, clock);
    # a piece or pair holds from its start until the next one of its kind in the same entry.
    n_pieces = piece_entry.size
    event_entry = np.concatenate([piece_entry, pair_entry])
    event_clock = np.concatenate([piece_clock, pair_clock])
    event_is_pair = np.concatenate([np.zeros(n_pieces, bool), np.ones(pair_entry.size, bool)])
    order = np.lexsort((event_clock, event_entry))
    event_entry, event_clock, event_is_pair = event_entry[order], event_clock[order], event_is_pair[order]
    index = np.concatenate([np.arange(n_pieces), np.arange(pair_entry.size)])[order]
    piece_of = np.maximum.accumulate(np.where(event_is_pair, -1, index))
    pair_of = np.maximum.accumulate(np.where(event_is_pair, index, -1))
    last_of_clock = np.ones(order.size, dtype=bool)
    last_of_clock[:-1] = (event_entry[1:] != event_entry[:-1]) | (event_clock[1:] != event_clock[:-1])
    entry, start = event_entry[last_of_clock], event_clock[last_of_clock]
    piece_of, pair_of = piece_of[last_of_clock], pair_of[last_of_clock]
    entry_end = np.bincount(pair_entry, weights=pair_amounts, minlength=k * k)
    end = np.append(start[1:], 0.0)
    last_in_entry = np.append(entry[1:] != entry[:-1], True)
    end[last_in_entry] = entry_end[entry[last_in_entry]]

    # On the shared time line: round start + time into the piece, never past the round's end.
    # (One expression for both ends, so a stretch ends exactly where the next one in its piece starts.)
    rounds_of = piece_round[piece_of]
    time_start = round_start[rounds_of] + (start - piece_clock[piece_of])
    time_end = np.minimum(round_start[rounds_of] + (end - piece_clock[piece_of]), round_start[rounds_of + 1])
    keep = time_end > time_start
    time_start, time_end, pair_of = time_start[keep], time_end[keep], pair_of[keep]

    # Cut at every start and end: each stretch becomes one piece per cut segment it spans.
    cuts = np.unique(np.concatenate([time_start, time_end]))
    first = np.searchsorted(cuts, time_start)
    after = np.searchsorted(cuts, time_end)
    spans = after - first
    segment = np.repeat(first - np.cumsum(spans) + spans, spans) + np.arange(spans.sum())
    pair = np.repeat(pair_of, spans)
    amount = cuts[segment + 1] - cuts[segment]
    used, round_of = np.unique(segment, return_inverse=True)
    order = np.argsort(round_of, kind="stable")
    return _Rounds(
        round_of=round_of[order].astype(np.int64),
        rows=pair_rows[pair[order]],
        cols=pair_cols[pair[order]],
        amounts=amount[order],
        num_rounds=int(used.size),
    )


def _clock_within(entry: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """[n] start of each item on its entry's clock: items sorted by entry, laid end to end from 0."""
    total = np.cumsum(amount) - amount
    first_of_entry = np.ones(entry.size, dtype=bool)
    first_of_entry[1:] = entry[1:] != entry[:-1]
    entry_base = np.maximum.accumulate(np.where(first_of_entry, np.arange(entry.size), 0))
    return total - total[entry_base]


def _decompose_padded(
    real: np.ndarray,
    pieces_rows: list[np.ndarray],
    pieces_cols: list[np.ndarray],
    pieces_amounts: list[np.ndarray],
) -> bool:
    """One BvN pass over `real` (modified in place). True when everything was delivered."""
    m = real.shape[0]
    row_sums, col_sums = real.sum(axis=1), real.sum(axis=0)
    target = max(row_sums.max(), col_sums.max())
    integral = bool(np.all(real == np.round(real))) and target < 2.0**52
    tolerance = 0.0 if integral else _RELATIVE_TOLERANCE * target
    padding = _northwest_corner(target - row_sums, target - col_sums, tolerance)
    total = real + padding
    support = total > 0

    col_of_row = maximum_matching(support)
    if np.any(col_of_row == UNMATCHED):
        return _give_up_padding(real, pieces_rows, pieces_cols, pieces_amounts)
    row_of_col = np.empty(m, dtype=np.int64)
    row_of_col[col_of_row] = np.arange(m)
    rows = np.arange(m)
    positive_entries = int(np.count_nonzero(real))  # a counter, not a scan of [m, m] every round
    while True:
        if m <= WIDEST_ROUNDS_MAX_DEVICES:
            col_of_row = _widest_matching(total)
            row_of_col[col_of_row] = rows
        cols = col_of_row
        matched = total[rows, cols]
        theta = matched.min()
        real_here = real[rows, cols]
        take = np.where(real_here <= theta + tolerance, real_here, theta)
        padding_take = np.maximum(theta - take, 0.0)
        real[rows, cols] = real_here - take
        positive_entries -= int(np.count_nonzero((real_here > 0) & (real_here - take <= 0)))
        left = padding[rows, cols] - padding_take
        left[left <= tolerance] = 0.0
        padding[rows, cols] = left
        total[rows, cols] = real[rows, cols] + left
        moved = take > 0
        if moved.any():
            pieces_rows.append(rows[moved])
            pieces_cols.append(cols[moved].copy())
            pieces_amounts.append(take[moved])
        emptied = total[rows, cols] <= 0
        if positive_entries == 0:
            return True
        free_rows = rows[emptied]
        support[free_rows, cols[emptied]] = False
        if free_rows.size > AUGMENT_MAX_EMPTIED:
            col_of_row = maximum_matching(support)
            if np.any(col_of_row == UNMATCHED):
                return False
            row_of_col[col_of_row] = rows
            continue
        row_of_col[cols[emptied]] = UNMATCHED
        col_of_row[free_rows] = UNMATCHED
        for u in free_rows.tolist():
            if not _augment(u, support, col_of_row, row_of_col):
                return False


def _widest_matching(total: np.ndarray) -> np.ndarray:
    """[m] the perfect matching of positive entries whose smallest entry is largest: the round
    that moves the most (Birkhoff's theta), so rounds are few and none is a sliver."""
    cost = np.where(total > 0, -total, np.inf)
    return bottleneck_perfect_matching(cost).right_of_left


def _give_up_padding(
    real: np.ndarray,
    pieces_rows: list[np.ndarray],
    pieces_cols: list[np.ndarray],
    pieces_amounts: list[np.ndarray],
) -> bool:
    """Rounding broke regularity at the very start: fall back to one entry per round."""
    for i, j in zip(*np.nonzero(real), strict=True):
        pieces_rows.append(np.array([i]))
        pieces_cols.append(np.array([j]))
        pieces_amounts.append(np.array([real[i, j]]))
    real[:] = 0.0
    return True


def _northwest_corner(row_deficit: np.ndarray, col_deficit: np.ndarray, tolerance: float) -> np.ndarray:
    """[m, m] non-negative padding with the given row and column sums (equal totals)."""
    m = row_deficit.shape[0]
    padding = np.zeros((m, m))
    rows, cols = row_deficit.copy(), col_deficit.copy()
    i = j = 0
    while i < m and j < m:
        if rows[i] <= tolerance:
            i += 1
            continue
        if cols[j] <= tolerance:
            j += 1
            continue
        amount = min(rows[i], cols[j])
        padding[i, j] += amount
        rows[i] -= amount
        cols[j] -= amount
    return padding


def _augment(u: int, support: np.ndarray, col_of_row: np.ndarray, row_of_col: np.ndarray) -> bool:
    """Match free row u by one augmenting path (BFS, one vectorised step per level)."""
    m = support.shape[0]
    parent_of_col = np.full(m, UNMATCHED, dtype=np.int64)
    visited = np.zeros(m, dtype=bool)
    frontier = np.array([u], dtype=np.int64)
    while frontier.size:
        reach = support[frontier] & ~visited  # [f, m]
        new_cols = np.flatnonzero(reach.any(axis=0))
        if new_cols.size == 0:
            return False
        parent_of_col[new_cols] = frontier[reach[:, new_cols].argmax(axis=0)]
        visited[new_cols] = True
        free = new_cols[row_of_col[new_cols] == UNMATCHED]
        if free.size:
            v = int(free[0])
            while v != UNMATCHED:
                r = int(parent_of_col[v])
                previous = int(col_of_row[r])
                col_of_row[r] = v
                row_of_col[v] = r
                v = previous
            return True
        frontier = row_of_col[new_cols]
    return False
