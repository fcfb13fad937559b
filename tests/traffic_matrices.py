"""Traffic matrices for property tests: integer or float bytes, dense, sparse, with zero lines, or
structured patterns."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

GBIT_S = 1e9 / 8


@st.composite
def traffic_matrices(draw: st.DrawFn, min_n: int = 2, max_n: int = 32) -> np.ndarray:
    """Integer or float bytes; dense, sparse, with zero rows and columns, or structured patterns."""
    n = draw(st.integers(min_n, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        matrix = rng.integers(0, draw(st.sampled_from([2, 10, 10**9])), (n, n)).astype(np.float64)
    else:
        matrix = rng.random((n, n)) * draw(st.sampled_from([1.0, 1e6, 1e12]))
    pattern = draw(
        st.sampled_from(["dense", "sparse", "zero_lines", "permutation", "hot_receiver", "one_row"])
    )
    if pattern == "sparse":
        matrix *= rng.random((n, n)) < 0.15
    elif pattern == "zero_lines":
        matrix[rng.random(n) < 0.3] = 0
        matrix[:, rng.random(n) < 0.3] = 0
    elif pattern == "permutation":
        matrix = np.zeros((n, n))
        matrix[np.arange(n), rng.permutation(n)] = rng.integers(1, 1000, n)
    elif pattern == "hot_receiver":
        matrix[:, rng.integers(n)] *= 50
    elif pattern == "one_row":
        matrix[np.arange(n) != rng.integers(n)] = 0
    return matrix
