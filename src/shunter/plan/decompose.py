"""Split a non-negative square matrix into rounds of partial matchings (Birkhoff–von Neumann /
König): pad it until every row and column sums to the largest line sum, peel off weighted perfect
matchings, drop the padding. The matching schedules in plan/schedule.py are built on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shunter.plan.matching import UNMATCHED, bottleneck_perfect_matching, hopcroft_karp

_RELATIVE_TOLERANCE = 1e-12

# Up to this many devices every round is the widest perfect matching (a bottleneck matching per
# round, O(m^2.5 log m) each) instead of the previous round's matching repaired by augmenting
# paths. On a real network every round costs a synchronisation and a ramp-up, so fewer, fuller
# rounds run faster; beyond this size planning time wins (a round's overhead is a smaller share).
WIDEST_ROUNDS_MAX_DEVICES = 16


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

    Birkhoff–von Neumann on the padded matrix: pad every row and column up to the largest line sum
    T (north-west corner rule), then repeatedly take a perfect matching of the positive entries,
    move the smallest matched entry theta along all of it, and drop the padding from the pieces.
    Entries only ever shrink and each round empties at least one, so there are at most nnz rounds
    (and at most T rounds for integer matrices). The matching is repaired between rounds by one
    augmenting path per emptied entry instead of being recomputed.

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

    col_of_row = hopcroft_karp(support)
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
