"""The matching decomposition: folded (fast) against padded (reference) and König's bound.

Oracle: König's theorem. A non-negative matrix splits into partial matchings whose largest amounts
add up to exactly its largest line sum T, and no split does better; so every valid decomposition
has round maxima summing to T, and the padded Birkhoff–von Neumann reference meets it too.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.plan.decompose import (
    FOLD_MIN_DEVICES,
    decompose_by_folding,
    decompose_into_matchings,
    decompose_padded,
    fold_lines,
)


def _problems(matrix: np.ndarray, rounds) -> list[str]:
    """What is wrong with a decomposition: bytes missing, a round that is not a matching."""
    problems = []
    delivered = np.zeros_like(matrix)
    np.add.at(delivered, (rounds.rows, rounds.cols), rounds.amounts)
    if not np.allclose(delivered, matrix, rtol=0, atol=1e-9 * max(matrix.max(initial=0), 1)):
        problems.append("delivered differs from the matrix")
    if np.any(rounds.amounts <= 0):
        problems.append("a piece of zero or negative amount")
    key_rows = rounds.round_of * matrix.shape[0] + rounds.rows
    key_cols = rounds.round_of * matrix.shape[0] + rounds.cols
    if np.unique(key_rows).size < key_rows.size or np.unique(key_cols).size < key_cols.size:
        problems.append("a round uses a row or a column twice")
    if np.any(np.diff(rounds.round_of) < 0):
        problems.append("pieces not sorted by round")
    return problems


def _sum_of_round_maxima(rounds) -> float:
    largest = np.zeros(rounds.num_rounds)
    np.maximum.at(largest, rounds.round_of, rounds.amounts)
    return float(largest.sum())


def _largest_line_sum(matrix: np.ndarray) -> float:
    return float(max(matrix.sum(axis=0).max(), matrix.sum(axis=1).max()))


@st.composite
def skewed_matrices(draw: st.DrawFn, max_n: int = 40) -> np.ndarray:
    """Sparse traffic with a few hot columns (experts), integer or real, so lines fold."""
    n = draw(st.integers(2, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    matrix = rng.random((n, n)) * (rng.random((n, n)) < draw(st.sampled_from([0.1, 0.4, 1.0])))
    hot = rng.integers(0, n, draw(st.integers(0, 3)))
    matrix[:, hot] *= rng.integers(2, 50, hot.size)
    if draw(st.booleans()):
        matrix = np.round(matrix * 10)
    np.fill_diagonal(matrix, 0)
    return matrix


@settings(max_examples=300, deadline=None)
@given(skewed_matrices())
def test_folded_decomposition_is_valid_and_meets_koenigs_bound(matrix: np.ndarray) -> None:
    rounds = decompose_by_folding(matrix, *fold_lines(matrix))
    assert _problems(matrix, rounds) == []
    T = _largest_line_sum(matrix)
    assert abs(_sum_of_round_maxima(rounds) - T) <= 1e-9 * max(T, 1)


@settings(max_examples=100, deadline=None)
@given(skewed_matrices(max_n=24))
def test_folded_and_padded_reference_agree_on_the_makespan(matrix: np.ndarray) -> None:
    folded = decompose_by_folding(matrix, *fold_lines(matrix))
    reference = decompose_padded(matrix)
    assert _problems(matrix, reference) == []
    difference = abs(_sum_of_round_maxima(folded) - _sum_of_round_maxima(reference))
    assert difference <= 1e-9 * max(_largest_line_sum(matrix), 1)


def test_an_integer_matrix_folds_into_at_most_its_largest_line_sum_rounds() -> None:
    """Every cut of the folded time line falls on a whole unit, so there are at most T rounds."""
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 3, (64, 64)).astype(np.float64) * (rng.random((64, 64)) < 0.2)
    matrix[:, :4] *= 30
    np.fill_diagonal(matrix, 0)
    rounds = decompose_by_folding(matrix, *fold_lines(matrix))
    assert _problems(matrix, rounds) == []
    assert rounds.num_rounds <= _largest_line_sum(matrix)
    assert _sum_of_round_maxima(rounds) == _largest_line_sum(matrix)


def test_lines_are_grouped_first_fit_decreasing_under_the_largest_line_sum() -> None:
    """Closed form: column sums 10, 6, 4, 3, 1 with T = 10 pack as {10}, {6, 4}, {3, 1}."""
    matrix = np.zeros((5, 5))
    matrix[0, 1], matrix[1, 0] = 6.0, 10.0
    matrix[3, 2], matrix[4, 3], matrix[2, 4] = 4.0, 3.0, 1.0
    _, col_group = fold_lines(matrix)
    assert col_group.tolist() == [0, 1, 1, 2, 2]


def test_a_matrix_whose_lines_cannot_fold_is_decomposed_unfolded() -> None:
    """A permutation scaled by 5: every line already sums to T, so nothing folds; one round."""
    n = FOLD_MIN_DEVICES
    matrix = np.roll(np.eye(n), 1, axis=1) * 5.0
    row_group, col_group = fold_lines(matrix)
    assert len(set(row_group.tolist())) == n and len(set(col_group.tolist())) == n
    rounds = decompose_into_matchings(matrix)
    assert rounds.num_rounds == 1 and _problems(matrix, rounds) == []
