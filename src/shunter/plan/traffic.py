"""Traffic matrices of one MoE layer: who sends how many bytes to whom, under a placement.

Tokens live on devices (the attention that produced them ran there); tokens start evenly spread:
token t of N lives on device floor(t * n / N). Dispatch sends each (token, choice) to a device
holding its expert, split over replicas by their token shares; combine returns the results, so
the combine matrix is the transpose of the dispatch matrix.
"""

from __future__ import annotations

import math

import numpy as np

from shunter.errors import ShunterError


def token_home_devices(num_tokens: int, num_devices: int) -> np.ndarray:
    """[N] int64: the device each token starts on (contiguous, even blocks)."""
    return (np.arange(num_tokens, dtype=np.int64) * num_devices) // max(num_tokens, 1)


def shares_from_device_of_expert(device_of_expert: np.ndarray, num_devices: int) -> np.ndarray:
    """[E, n] float64 one-hot token shares of an exclusive placement (device_of_expert [E])."""
    device_of_expert = np.asarray(device_of_expert, dtype=np.int64)
    shares = np.zeros((device_of_expert.shape[0], num_devices))
    shares[np.arange(device_of_expert.shape[0]), device_of_expert] = 1.0
    return shares


def routed_counts(expert_ids: np.ndarray, num_experts: int, num_devices: int) -> np.ndarray:
    """[n, E] int64: (token, choice) pairs starting on each device that chose each expert.

    Args:
        expert_ids [N, k]: one layer of a RoutingTrace.
    """
    num_tokens = expert_ids.shape[0]
    home = token_home_devices(num_tokens, num_devices)
    flat = np.repeat(home, expert_ids.shape[1]) * num_experts + expert_ids.reshape(-1).astype(np.int64)
    return np.bincount(flat, minlength=num_devices * num_experts).reshape(num_devices, num_experts)


def dispatch_traffic(
    expert_ids: np.ndarray, shares: np.ndarray, bytes_per_token: float, num_devices: int
) -> np.ndarray:
    """[n, n] float64 bytes from device i to device j in the dispatch all-to-all of one layer.

    Args:
        expert_ids [N, k] int: expert choices of each token at this layer.
        shares [E, n]: share of expert e's tokens processed on device d (rows sum to 1).
        bytes_per_token: size of one token's hidden state on the wire.

    The diagonal is zero: tokens whose expert is on their own device never cross the network.
    """
    from scipy.sparse import csr_array  # here: scipy turns a Ctrl-C during its import into an ImportError

    counts = routed_counts(expert_ids, shares.shape[0], num_devices)
    # Sparse product: each token reaches k experts and each expert lives on a few devices, so a
    # dense [n, E] @ [E, n] (4 GFLOP at 4096 devices x 256 experts) is almost all zeros.
    traffic = (csr_array(counts) @ csr_array(shares)).toarray() * float(bytes_per_token)
    np.fill_diagonal(traffic, 0.0)
    return traffic


def combine_traffic(dispatch_bytes: np.ndarray) -> np.ndarray:
    """[n, n] the combine all-to-all: results travel back along the dispatch paths."""
    return np.ascontiguousarray(np.asarray(dispatch_bytes).T)


def tokens_per_device(expert_ids: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """[n] float64 (token, choice) pairs each device's experts process at this layer."""
    load = np.bincount(expert_ids.reshape(-1), minlength=shares.shape[0]).astype(np.float64)
    return load @ shares


MAX_TRAFFIC_BYTES = float(2**63)


def check_traffic_matrix(matrix: object, source: str = "traffic") -> np.ndarray:
    """A traffic matrix as [n, n] float64, or a ShunterError saying what is wrong with it."""
    array = np.asarray(matrix)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ShunterError(
            f"{source}: traffic must be a square n x n matrix of bytes, got shape {list(array.shape)}"
        )
    if array.shape[0] < 1:
        raise ShunterError(f"{source}: traffic matrix is empty")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ShunterError(f"{source}: traffic must hold numbers of bytes, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        i, j = np.argwhere(~np.isfinite(array))[0]
        raise ShunterError(f"{source}: traffic[{i}, {j}] is {array[i, j]}, expected a finite number of bytes")
    if np.any(array < 0):
        i, j = np.argwhere(array < 0)[0]
        raise ShunterError(f"{source}: traffic[{i}, {j}] is {array[i, j]:g}, bytes cannot be negative")
    # the schedules subtract and compare sums of rows and columns; past 2^63 bytes (9.2 EB) they
    # lose every small entry to rounding, or overflow to inf, and the decomposition never ends
    total = float(array.sum(dtype=np.float64)) if np.all(array < MAX_TRAFFIC_BYTES) else math.inf
    if not total < MAX_TRAFFIC_BYTES:
        raise ShunterError(
            f"{source}: the matrix holds {total:.3g} bytes in all; at most {MAX_TRAFFIC_BYTES:.3g} (2^63) "
            "can be scheduled"
        )
    return array
