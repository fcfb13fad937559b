"""Lina's replication and the EPLB-style baseline."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.errors import ShunterError
from shunter.plan.placement import placement_from_devices
from shunter.plan.replication import (
    build_path_estimator,
    eplb_replica_counts,
    eplb_replicate,
    estimate_popularity,
    max_over_mean_load,
    pack_first_fit_decreasing,
    plan_lina_layer,
    replica_counts,
    replicate_hot_experts,
    top_experts_differ,
)
from shunter.trace.synthetic import zipf_trace


def test_replica_counts_follow_predicted_work() -> None:
    """Oracle: n_e = N * share_e rounded up, at least one replica each (hand computation)."""
    share = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    assert replica_counts(share, 4).tolist() == [2, 1, 1, 1, 1]


def test_replica_counts_fit_four_experts_per_device() -> None:
    """Oracle: with 12 experts on 3 devices every slot is taken, so nothing is replicated."""
    share = np.r_[0.9, np.full(11, 0.1 / 11)]
    assert replica_counts(share, 3).tolist() == [1] * 12
    with pytest.raises(ShunterError, match="fewer devices than the placement needs"):
        replica_counts(np.full(13, 1 / 13), 3)


def test_first_fit_decreasing_respects_slots_and_distinct_devices() -> None:
    """Oracle: the packing rules: at most 4 experts per device, replicas of one expert on distinct
    devices, token shares of each expert summing to 1."""
    rng = np.random.default_rng(0)
    share = rng.dirichlet(np.full(20, 0.3))
    placement = replicate_hot_experts(share, 8)
    assert placement.experts_per_device().max() <= 4
    np.testing.assert_allclose(placement.shares.sum(axis=1), 1.0)
    counts = replica_counts(share, 8)
    assert ((placement.shares > 0).sum(axis=1) == counts).all()


def test_first_fit_decreasing_balances_a_skewed_layer() -> None:
    """Oracle: hand-made shares that pack perfectly: 0.5 = two full devices, 0.25 + 0.125 + 0.125."""
    share = np.array([0.5, 0.25, 0.125, 0.125])
    placement = pack_first_fit_decreasing(share, replica_counts(share, 4), 4)
    np.testing.assert_allclose(share @ placement.shares, [0.25] * 4)


def test_path_estimator_is_exact_when_paths_decide_the_next_experts() -> None:
    """Oracle: with correlation 1 every token's choices at layer l+1 follow from its top choice at
    layer l, so a profile of the same tokens predicts the next layer's popularity exactly."""
    trace = zipf_trace(4, 2000, 8, 2, 1.0, correlation=1.0, seed=3)
    estimator = build_path_estimator(trace, path_length=1)
    for layer in range(1, 4):
        actual = np.bincount(trace.expert_ids[layer].ravel(), minlength=8) / trace.expert_ids[layer].size
        np.testing.assert_allclose(estimate_popularity(estimator, trace, layer), actual, atol=1e-12)


def test_path_estimator_backs_off_to_the_layer_marginal_for_unseen_paths() -> None:
    """Oracle: at layer 0 there is no path, so the estimate is the profile's popularity."""
    profile = zipf_trace(2, 500, 8, 2, 1.0, 0.5, seed=1)
    batch = zipf_trace(2, 300, 8, 2, 1.0, 0.5, seed=2)
    estimator = build_path_estimator(profile, path_length=3)
    expected = np.bincount(profile.expert_ids[0].ravel(), minlength=8) / profile.expert_ids[0].size
    np.testing.assert_allclose(estimate_popularity(estimator, batch, 0), expected)


def test_phase_two_replans_when_the_top_2k_experts_differ() -> None:
    """Oracle: Lina's rule on hand-made popularities (k = 1, so the top 2 matter)."""
    assert not top_experts_differ(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.3, 0.4, 0.1, 0.2]), 1)
    assert top_experts_differ(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.4, 0.1, 0.3, 0.2]), 1)


def test_eplb_gives_each_extra_replica_to_the_highest_load_per_replica() -> None:
    """Oracle: hand computation: loads [9, 4, 2, 1], 6 replicas -> 9 gets two more copies (9 > 4,
    then 4.5 > 4)."""
    assert eplb_replica_counts(np.array([9.0, 4.0, 2.0, 1.0]), 6).tolist() == [3, 1, 1, 1]


def test_eplb_packs_replicas_heaviest_first_onto_the_least_loaded_device() -> None:
    """Oracle: hand computation: replicas 4, 3, 3, 3, 2, 1 on 3 devices of 2 slots -> 4+1, 3+3, 3+2."""
    placement = eplb_replicate(np.array([9.0, 4.0, 2.0, 1.0]), num_devices=3, slots_per_device=2)
    device_load = np.array([9.0, 4.0, 2.0, 1.0]) @ placement.shares
    assert sorted(device_load.tolist()) == [5.0, 5.0, 6.0]


def test_replication_lowers_the_max_over_mean_device_load_on_skewed_traces() -> None:
    """Oracle: one expert per device is the reference; Lina and EPLB must both beat it clearly."""
    trace = zipf_trace(4, 4000, 16, 2, 1.4, 0.6, seed=0)
    estimator = build_path_estimator(trace, 3)
    for layer in range(4):
        load = np.bincount(trace.expert_ids[layer].ravel(), minlength=16).astype(np.float64)
        none = max_over_mean_load(load, placement_from_devices(np.arange(16), 16, "one per device"))
        lina = max_over_mean_load(load, plan_lina_layer(estimator, trace, layer, 16).placement)
        eplb = max_over_mean_load(load, eplb_replicate(load, 16, 2))
        assert lina < 0.5 * none and eplb < 0.5 * none
