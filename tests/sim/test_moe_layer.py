"""MoE layer timelines: exclusive (Aurora Eq. 1) and two colocated models (Aurora Table 2)."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.network.bounds import port_lower_bound_s
from shunter.plan.cluster import ClusterSpec
from shunter.plan.placement import placement_from_devices
from shunter.plan.schedule import schedule_all_to_all
from shunter.sim.cost import ComputeModel
from shunter.sim.moe_layer import (
    LayerCosts,
    TokenCosts,
    layer_all_to_all_s,
    layer_costs,
    simulate_colocated,
    simulate_exclusive,
)
from shunter.trace.synthetic import zipf_trace

CLUSTER = ClusterSpec.uniform(4, 1e9, 1e12)
COSTS = TokenCosts(
    bytes_per_token=1000.0,
    expert_flops_per_token=1e6,
    gate_flops_per_token=1e4,
    aggregation_flops_per_token=1e3,
)


def costs_of(trace_seed: int, skew: float, transport: str | None = "planned") -> list[LayerCosts]:
    trace = zipf_trace(2, 512, 4, 1, skew, 0.5, trace_seed)
    shares = placement_from_devices(np.arange(4), 4, "").shares
    return [
        layer_costs(trace.expert_ids[l], shares, CLUSTER, COSTS, ComputeModel(), transport) for l in range(2)
    ]  # type: ignore[arg-type]


def test_planned_all_to_all_is_the_port_bound_plus_one_latency_per_round() -> None:
    """Oracle: Aurora Thm 4.2 (equal ports: the bound is reached) plus rounds x latency."""
    traffic = np.random.default_rng(0).integers(0, 1000, (5, 5)).astype(float)
    rounds = schedule_all_to_all(traffic, 10.0).num_rounds
    expected = port_lower_bound_s(traffic, 10.0) + rounds * 0.5
    assert layer_all_to_all_s(traffic, np.full(5, 10.0), "planned", 0.5) == pytest.approx(expected)


def test_layer_compute_counts_tokens_where_they_live_and_where_their_expert_is() -> None:
    """Oracle: 8 tokens on 4 devices (2 each) all routed to expert 0 on device 0: gate 2 tokens per
    device, expert 8 tokens on device 0 only; traffic: devices 1-3 send 2 tokens each to device 0."""
    ids = np.zeros((8, 1), dtype=np.int64)
    shares = placement_from_devices(np.arange(4), 4, "").shares
    layer = layer_costs(ids, shares, CLUSTER, COSTS, ComputeModel(), None)
    assert layer.gate_s == pytest.approx(np.full(4, 2 * 1e4 / 1e12))
    assert layer.expert_s == pytest.approx([8 * 1e6 / 1e12, 0, 0, 0])
    assert layer.dispatch_bytes[1:, 0] == pytest.approx([2000.0] * 3)
    assert np.isnan(layer.all_to_all_s)


def test_exclusive_timeline_is_the_sum_of_its_layers() -> None:
    """Oracle: per layer max G + N + max F + C + max A, layers back to back."""
    layers = costs_of(0, 1.0)
    expected = sum(
        l.gate_s.max() + 2 * l.all_to_all_s + l.expert_s.max() + l.aggregation_s.max() for l in layers
    )
    assert simulate_exclusive(layers, CLUSTER, "planned", 0.0).makespan_s == pytest.approx(expected)


def test_interleaving_two_models_is_never_slower_than_running_them_in_turn() -> None:
    """Oracle: the interleaved timeline only adds overlap (same ops, fewer waits)."""
    a, b = costs_of(1, 1.2, None), costs_of(2, 0.5, None)
    interleaved = simulate_colocated(a, b, CLUSTER, True, "fair_share")
    sequential = simulate_colocated(a, b, CLUSTER, False, "fair_share")
    assert interleaved.makespan_s <= sequential.makespan_s * (1 + 1e-12)
    assert interleaved.mean_utilisation >= sequential.mean_utilisation * (1 - 1e-12)


def test_interleaved_gpus_compute_in_table_two_order() -> None:
    """Oracle: Aurora Table 2: on each GPU G_a, G_b, F_a, F_b, A_a, A_b start in this order."""
    a, b = costs_of(1, 1.2, None), costs_of(2, 0.5, None)
    timeline = simulate_colocated(a, b, CLUSTER, True, "fair_share")
    order = ["Ga0", "Gb0", "Fa0", "Fb0", "Aa0", "Ab0"]
    starts = np.array([timeline.compute_start_s[name] for name in order])  # [6, n]
    assert np.all(np.diff(starts, axis=0) >= -1e-15)


def test_one_models_all_to_all_overlaps_the_other_models_compute() -> None:
    """Oracle: with compute as long as communication, the interleaved pair of layers takes less
    than the sum of each model's exclusive time."""
    a, b = costs_of(1, 1.2, None), costs_of(2, 0.5, None)
    interleaved = simulate_colocated(a, b, CLUSTER, True, "fair_share").makespan_s
    alone = (
        simulate_exclusive(a, CLUSTER, "fair_share", 0.0).makespan_s
        + simulate_exclusive(b, CLUSTER, "fair_share", 0.0).makespan_s
    )
    assert interleaved < 0.95 * alone
