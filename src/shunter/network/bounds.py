"""Port bounds of an all-to-all on a big switch: no schedule on these ports can be faster.

The model (Aurora's "big switch"): device i has a full-duplex port of bandwidth_bytes_s[i]; the
network core never blocks, so contention happens only at ports. Local traffic (the diagonal) is
free and never sent.
"""

from __future__ import annotations

import numpy as np


def off_diagonal(traffic_bytes: np.ndarray) -> np.ndarray:
    """[n, n] copy of the traffic with the (free, local) diagonal zeroed."""
    matrix = np.array(traffic_bytes, dtype=np.float64)
    np.fill_diagonal(matrix, 0.0)
    return matrix


def bandwidth_vector(bandwidth_bytes_s: np.ndarray | float, n: int) -> np.ndarray:
    """[n] float64 port bandwidths from one rate or n of them; raises ValueError unless all are
    positive and finite."""
    bandwidth = np.broadcast_to(np.asarray(bandwidth_bytes_s, dtype=np.float64), (n,)).copy()
    if np.any(~(bandwidth > 0)) or np.any(~np.isfinite(bandwidth)):
        raise ValueError("every bandwidth must be positive and finite")
    return bandwidth


def port_lower_bound_s(traffic_bytes: np.ndarray, bandwidth_bytes_s: np.ndarray) -> float:
    """max_i max(row_i, col_i) / B_i: no schedule on any network of these ports can be faster."""
    matrix = off_diagonal(traffic_bytes)
    bandwidth = bandwidth_vector(bandwidth_bytes_s, matrix.shape[0])
    if matrix.size == 0:
        return 0.0
    return float(np.max(np.maximum(matrix.sum(axis=1), matrix.sum(axis=0)) / bandwidth))


def matching_lower_bound_s(traffic_bytes: np.ndarray, bandwidth_bytes_s: np.ndarray) -> float:
    """The bound for one transfer per port at a time at rate min(B_src, B_dst):
    max_i max(sum_j D_ij / min(B_i, B_j), sum_j D_ji / min(B_i, B_j)). Equals the port bound when
    all bandwidths are equal."""
    matrix = off_diagonal(traffic_bytes)
    bandwidth = bandwidth_vector(bandwidth_bytes_s, matrix.shape[0])
    if matrix.size == 0:
        return 0.0
    seconds = matrix / np.minimum.outer(bandwidth, bandwidth)
    return float(max(seconds.sum(axis=1).max(), seconds.sum(axis=0).max()))
