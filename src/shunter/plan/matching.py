"""Bipartite matchings: maximum matching, bottleneck perfect matching, and their references.

`maximum_matching` runs scipy's Hopcroft–Karp (C); `hopcroft_karp` is the same algorithm in
readable Python, kept as its reference. The brute-force functions are the test oracles for both;
they are exponential and only meant for n <= 8.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

UNMATCHED = -1


def maximum_matching(adjacency: np.ndarray) -> np.ndarray:
    """Maximum matching of a bipartite graph, as `hopcroft_karp` but in compiled code.

    Args:
        adjacency [n_left, n_right] bool: adjacency[u, v] is True when left u may pair with right v.

    Returns:
        right_of_left [n_left] int64: the right vertex matched to each left vertex, or -1.
    """
    # imported here: scipy's compiled modules turn a Ctrl-C during their import into an ImportError
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_bipartite_matching

    adjacency = np.asarray(adjacency, dtype=bool)
    if adjacency.size == 0:
        return np.full(adjacency.shape[0], UNMATCHED, dtype=np.int64)
    graph = csr_array(adjacency)
    right_of_left = maximum_bipartite_matching(graph, perm_type="column")
    return np.asarray(right_of_left, dtype=np.int64)


def hopcroft_karp(adjacency: np.ndarray) -> np.ndarray:
    """Maximum matching of a bipartite graph.

    Args:
        adjacency [n_left, n_right] bool: adjacency[u, v] is True when left u may pair with right v.

    Returns:
        right_of_left [n_left] int64: the right vertex matched to each left vertex, or -1.

    O(E sqrt(V)): BFS builds layers of shortest alternating paths from all free left vertices, then
    an (iterative, so no recursion limit) DFS augments along vertex-disjoint shortest paths.
    """
    adjacency = np.asarray(adjacency, dtype=bool)
    n_left, n_right = adjacency.shape
    neighbours = [np.flatnonzero(row).tolist() for row in adjacency]
    right_of_left = [UNMATCHED] * n_left
    left_of_right = [UNMATCHED] * n_right
    infinity = n_left + n_right + 1

    while True:
        # BFS: distance of each left vertex along alternating paths from the free left vertices.
        distance = [infinity] * n_left
        queue: deque[int] = deque()
        for u in range(n_left):
            if right_of_left[u] == UNMATCHED:
                distance[u] = 0
                queue.append(u)
        found_free_right = False
        while queue:
            u = queue.popleft()
            for v in neighbours[u]:
                w = left_of_right[v]
                if w == UNMATCHED:
                    found_free_right = True
                elif distance[w] == infinity:
                    distance[w] = distance[u] + 1
                    queue.append(w)
        if not found_free_right:
            break

        # DFS along the layers; a dead-end vertex gets distance infinity so it is not retried.
        next_edge = [0] * n_left
        for root in range(n_left):
            if right_of_left[root] != UNMATCHED:
                continue
            path = [root]
            while path:
                u = path[-1]
                if next_edge[u] >= len(neighbours[u]):
                    distance[u] = infinity
                    path.pop()
                    continue
                v = neighbours[u][next_edge[u]]
                next_edge[u] += 1
                w = left_of_right[v]
                if w == UNMATCHED:
                    # Augment: flip every edge on the path root -> ... -> u -> v.
                    for left in reversed(path):
                        previous = right_of_left[left]
                        right_of_left[left] = v
                        left_of_right[v] = left
                        v = previous
                    break
                if distance[w] == distance[u] + 1:
                    path.append(w)
    return np.asarray(right_of_left, dtype=np.int64)


def maximum_matching_size_brute_force(adjacency: np.ndarray) -> int:
    """Reference for `hopcroft_karp`: the largest matching, by trying every injective assignment."""
    adjacency = np.asarray(adjacency, dtype=bool)
    n_left, n_right = adjacency.shape
    best = 0
    for size in range(min(n_left, n_right), 0, -1):
        for lefts in itertools.combinations(range(n_left), size):
            for rights in itertools.permutations(range(n_right), size):
                if all(adjacency[u, v] for u, v in zip(lefts, rights, strict=True)):
                    return size
    return best


@dataclass(frozen=True)
class BottleneckMatching:
    """A perfect matching minimising its largest cost.

    right_of_left [n] int64: the right vertex assigned to each left vertex.
    bottleneck: the largest cost[u, right_of_left[u]] (same unit as the cost matrix).
    """

    right_of_left: np.ndarray
    bottleneck: float


def bottleneck_perfect_matching(cost: np.ndarray, *, reference: bool = False) -> BottleneckMatching:
    """Perfect matching of a complete bipartite graph that minimises the largest edge cost.

    Args:
        cost [n, n] float: cost[u, v] of pairing left u with right v.

    Binary search over the sorted distinct costs for the smallest threshold whose graph
    {cost <= threshold} has a perfect matching (Hopcroft–Karp): O(n^2 sqrt(n) log n).
    `reference=True` runs the Python Hopcroft–Karp instead of scipy's (same thresholds).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"cost must be square, got shape {cost.shape}")
    if n == 0:
        return BottleneckMatching(np.zeros(0, dtype=np.int64), 0.0)
    matching = hopcroft_karp if reference else maximum_matching
    thresholds = np.unique(cost)
    low, high = 0, len(thresholds) - 1  # the largest threshold always admits a perfect matching
    while low < high:
        middle = (low + high) // 2
        if np.all(matching(cost <= thresholds[middle]) != UNMATCHED):
            high = middle
        else:
            low = middle + 1
    best = matching(cost <= thresholds[low])
    assert np.all(best != UNMATCHED)
    return BottleneckMatching(best, float(cost[np.arange(n), best].max()))


def bottleneck_matching_brute_force(cost: np.ndarray) -> BottleneckMatching:
    """Reference for `bottleneck_perfect_matching`: every permutation (n <= 8)."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if n == 0:
        return BottleneckMatching(np.zeros(0, dtype=np.int64), 0.0)
    permutations = np.array(list(itertools.permutations(range(n))), dtype=np.int64)  # [n!, n]
    largest = cost[np.arange(n), permutations].max(axis=1)  # [n!]
    best = int(np.argmin(largest))
    return BottleneckMatching(permutations[best], float(largest[best]))
