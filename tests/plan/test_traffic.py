"""Traffic matrices against a per-token for-loop reference."""

from __future__ import annotations

import numpy as np

from shunter.plan.placement import placement_from_devices
from shunter.plan.traffic import (
    combine_traffic,
    dispatch_traffic,
    token_home_devices,
    tokens_per_device,
)


def reference_dispatch(
    expert_ids: np.ndarray, shares: np.ndarray, bytes_per_token: float, n: int
) -> np.ndarray:
    """Readable reference: walk every (token, choice) and split it over the expert's replicas."""
    traffic = np.zeros((n, n))
    home = token_home_devices(expert_ids.shape[0], n)
    for token, choices in enumerate(expert_ids):
        for expert in choices:
            for device in range(n):
                if device != home[token]:
                    traffic[home[token], device] += shares[expert, device] * bytes_per_token
    return traffic


def test_tokens_start_evenly_spread() -> None:
    """Oracle: 10 tokens on 4 devices -> blocks of 2 or 3, in order."""
    assert token_home_devices(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_dispatch_traffic_matches_the_per_token_reference() -> None:
    """Oracle: reference_dispatch, with replicated experts (fractional shares) included."""
    rng = np.random.default_rng(0)
    expert_ids = np.stack([rng.choice(6, 2, replace=False) for _ in range(37)])
    shares = rng.random((6, 4)) * (rng.random((6, 4)) < 0.6)
    shares[shares.sum(axis=1) == 0, 0] = 1.0
    shares /= shares.sum(axis=1, keepdims=True)
    fast = dispatch_traffic(expert_ids, shares, 8192, 4)
    np.testing.assert_allclose(fast, reference_dispatch(expert_ids, shares, 8192, 4), rtol=1e-12)


def test_exclusive_dispatch_moves_every_off_device_choice_once() -> None:
    """Oracle: total bytes = bytes_per_token * (choices whose expert is on another device)."""
    rng = np.random.default_rng(1)
    expert_ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(64)])
    device_of_expert = np.arange(8) % 4
    placement = placement_from_devices(device_of_expert, 4, "test")
    traffic = dispatch_traffic(expert_ids, placement.shares, 100, 4)
    home = token_home_devices(64, 4)
    remote = (device_of_expert[expert_ids] != home[:, None]).sum()
    assert traffic.sum() == 100 * remote
    assert np.all(np.diag(traffic) == 0)


def test_combine_is_the_transpose_of_dispatch() -> None:
    """Oracle: results travel back along the dispatch paths."""
    matrix = np.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(combine_traffic(matrix), matrix.T)


def test_tokens_per_device_counts_processed_choices() -> None:
    """Oracle: with a one-hot placement each device processes its experts' loads."""
    expert_ids = np.array([[0, 1], [1, 2], [1, 0]])
    placement = placement_from_devices(np.array([0, 1, 1]), 2, "test")
    assert tokens_per_device(expert_ids, placement.shares).tolist() == [2.0, 4.0]
