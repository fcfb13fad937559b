"""Matchings: Hopcroft–Karp (scipy's and the Python reference) and the bottleneck matching
against brute force."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.plan.matching import (
    UNMATCHED,
    bottleneck_matching_brute_force,
    bottleneck_perfect_matching,
    hopcroft_karp,
    maximum_matching,
    maximum_matching_size_brute_force,
)


@st.composite
def bipartite_graphs(draw: st.DrawFn, max_side: int = 6) -> np.ndarray:
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max_side))
    density = draw(st.sampled_from([0.1, 0.3, 0.6, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((rows, cols)) < density


@st.composite
def cost_matrices(draw: st.DrawFn, max_n: int = 7) -> np.ndarray:
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        return rng.integers(0, 5, (n, n)).astype(np.float64)  # many ties
    return rng.random((n, n))


@settings(max_examples=150, deadline=None)
@given(bipartite_graphs(), st.sampled_from([hopcroft_karp, maximum_matching]))
def test_hopcroft_karp_finds_a_maximum_matching(adjacency: np.ndarray, matching) -> None:
    """Oracle: the largest matching found by trying every injective assignment (both the compiled
    matching and the Python reference)."""
    match = matching(adjacency)
    matched = np.flatnonzero(match != UNMATCHED)
    assert all(adjacency[u, match[u]] for u in matched)
    assert len(set(match[matched].tolist())) == matched.size  # no right vertex used twice
    assert matched.size == maximum_matching_size_brute_force(adjacency)


@settings(max_examples=200, deadline=None)
@given(cost_matrices())
def test_bottleneck_matching_equals_brute_force_for_n_up_to_7(cost: np.ndarray) -> None:
    """Oracle: the smallest largest cost over all n! permutations."""
    fast = bottleneck_perfect_matching(cost)
    reference = bottleneck_matching_brute_force(cost)
    assert bottleneck_perfect_matching(cost, reference=True).bottleneck == reference.bottleneck
    n = cost.shape[0]
    assert sorted(fast.right_of_left.tolist()) == list(range(n))  # a perfect matching
    assert fast.bottleneck == reference.bottleneck
    assert cost[np.arange(n), fast.right_of_left].max() == fast.bottleneck


def test_hopcroft_karp_handles_long_augmenting_paths() -> None:
    """A staircase graph whose greedy matching must be undone along a path of length ~2n
    (oracle: the perfect matching u -> u exists)."""
    n = 1500  # deeper than Python's default recursion limit
    adjacency = np.eye(n, dtype=bool) | np.eye(n, k=1, dtype=bool)
    match = hopcroft_karp(adjacency)
    assert np.all(match != UNMATCHED)
