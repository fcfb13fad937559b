"""Lina's inference with replication and its training step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from shunter.network.cost import GBIT_S
from shunter.plan.cluster import ClusterSpec
from shunter.plan.replication import build_path_estimator, eplb_replicate
from shunter.shapes import LINA_MOE
from shunter.sim.cost import ComputeModel
from shunter.sim.lina import (
    InferenceSetup,
    TrainingSetup,
    balanced_expert_ids,
    inference_batch,
    split_batches,
    static_shares,
    training_step,
)
from shunter.trace.synthetic import zipf_trace

CLUSTER = ClusterSpec.uniform(8, 100 * GBIT_S, 312e12)
SHAPES = replace(LINA_MOE, num_experts=8, num_layers=4)


@pytest.fixture(scope="module")
def served() -> tuple[list, object]:
    trace = zipf_trace(4, 4096 * 3, 8, 2, 1.2, 0.5, 0)
    batches = split_batches(trace, 4096)
    return batches[1:], build_path_estimator(batches[0], 3)


def test_the_ideal_gate_gives_every_expert_the_same_tokens_and_distinct_choices() -> None:
    """Oracle: N k / E pairs per expert; a token's k choices differ."""
    ids = balanced_expert_ids(96, 8, 2)
    assert np.bincount(ids.ravel(), minlength=8).tolist() == [24] * 8
    assert np.all(ids[:, 0] != ids[:, 1])


def test_replication_balances_a_skewed_batch_and_beats_static_placement(served: tuple) -> None:
    """Oracle: Lina's packing brings max/mean device load down; the batch gets faster; the ideal
    gate is the floor."""
    batches, estimator = served
    setup = InferenceSetup(SHAPES, CLUSTER, ComputeModel(efficiency=0.5), host_link_bytes_s=float("inf"))
    static = inference_batch(batches[0], setup, "static")
    lina = inference_batch(batches[0], setup, "lina", estimator)
    ideal = inference_batch(batches[0], setup, "ideal")
    assert lina.max_over_mean.mean() < static.max_over_mean.mean()
    assert ideal.time_s <= lina.time_s < static.time_s


def test_an_eplb_plan_of_static_shares_is_the_static_batch_and_a_balanced_one_is_faster(
    served: tuple,
) -> None:
    """Oracles: the eplb policy with the static placement's shares is the static policy exactly;
    the EPLB-style balancer's plan from the batch's own counts (every replica resident) lowers the
    busiest device's load and the batch time."""
    batches, _ = served
    batch = batches[0]
    setup = InferenceSetup(SHAPES, CLUSTER, ComputeModel(efficiency=0.5), host_link_bytes_s=float("inf"))
    static = inference_batch(batch, setup, "static")
    same = inference_batch(batch, setup, "eplb", layer_shares=[static_shares(8, 8)] * batch.num_layers)
    assert same.time_s == static.time_s and np.array_equal(same.max_over_mean, static.max_over_mean)
    counts = [np.bincount(batch.expert_ids[layer].ravel(), minlength=8) for layer in range(batch.num_layers)]
    planned = [eplb_replicate(c, 8, 2).shares for c in counts]
    balanced = inference_batch(batch, setup, "eplb", layer_shares=planned)
    assert balanced.max_over_mean.mean() < static.max_over_mean.mean() and balanced.time_s < static.time_s
    assert balanced.swap_bytes == 0
    with pytest.raises(ValueError, match="layer_shares"):
        inference_batch(batch, setup, "eplb")


def test_swap_ins_over_a_slow_host_link_cost_time(served: tuple) -> None:
    """Oracle: the same plan with a 1000x slower host link cannot be faster."""
    batches, estimator = served
    fast = InferenceSetup(SHAPES, CLUSTER, ComputeModel(efficiency=0.5), host_link_bytes_s=1e12)
    slow = replace(fast, host_link_bytes_s=1e9)
    assert (
        inference_batch(batches[0], slow, "lina", estimator).time_s
        > inference_batch(batches[0], fast, "lina", estimator).time_s
    )


def training_setup(**changes: object) -> TrainingSetup:
    h = SHAPES.hidden_size
    base = TrainingSetup(
        shapes=replace(SHAPES, num_layers=3),
        cluster=CLUSTER,
        compute=ComputeModel(efficiency=0.5),
        tokens_per_device=2048,
        context_tokens=512,
        dense_gradient_bytes_per_block=16 * h * h * 2,
        dense_flops_per_token_per_block=2 * 12 * h * h,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_allreduce_slows_deepspeeds_backward_all_to_all() -> None:
    """Oracle: forward all-to-alls run alone; backward ones share ports with the allreduce."""
    step = training_step(training_setup(), "deepspeed")
    assert step.backward_a2a_s > 1.3 * step.forward_a2a_s


def test_priority_keeps_the_backward_all_to_all_fast_and_the_step_shorter() -> None:
    """Oracle: an all-to-all waits at most one micro-op, so it is faster than under DeepSpeed, and
    the step is no longer."""
    setup = training_setup(tokens_per_device=8192)  # the allreduce fits in the compute
    deepspeed = training_step(setup, "deepspeed")
    priority = training_step(setup, "priority")
    assert priority.backward_a2a_s < deepspeed.backward_a2a_s
    assert priority.step_s < deepspeed.step_s


def test_without_dense_gradients_priority_changes_nothing() -> None:
    """Oracle: no allreduce: DeepSpeed and priority run the same graph."""
    setup = training_setup(dense_gradient_bytes_per_block=0.0)
    assert training_step(setup, "priority").step_s == pytest.approx(training_step(setup, "deepspeed").step_s)


def test_measured_rows_of_the_ideal_gate_give_the_ideal_gates_step() -> None:
    """Oracle: replaying the ideal gate's own rows as measured routing changes nothing; piling every
    row onto one device's experts can only lengthen the step; the optimizer step adds its time."""
    from shunter.plan.traffic import routed_counts
    from shunter.sim.lina import balanced_expert_ids, static_shares

    setup = training_setup()
    n, E, blocks = CLUSTER.num_devices, setup.shapes.num_experts, setup.shapes.num_layers
    ids = balanced_expert_ids(setup.tokens_per_device * n, E, setup.shapes.top_k)
    rows = routed_counts(ids, E, n) @ static_shares(E, n)  # [n, n] rows device i sends device j
    replayed = replace(setup, dispatch_rows=np.stack([rows] * blocks))
    for variant in ("deepspeed", "priority", "lina"):
        assert training_step(replayed, variant).step_s == pytest.approx(training_step(setup, variant).step_s)
    piled = np.zeros((blocks, n, n))
    piled[:, :, 0] = rows.sum(axis=1)  # every device sends all its rows to device 0
    assert (
        training_step(replace(setup, dispatch_rows=piled), "deepspeed").step_s
        > training_step(setup, "deepspeed").step_s
    )
    with_optimizer = training_step(replace(setup, optimizer_s=0.25), "deepspeed").step_s
    assert with_optimizer == pytest.approx(training_step(setup, "deepspeed").step_s + 0.25)


@pytest.mark.parametrize("expert_parallel", [4, 2])
def test_packed_experts_exchange_inside_groups_and_sum_replicas_in_closed_form(expert_parallel) -> None:
    """Oracle, closed form: with packing (P devices per group, 8 / P replicas of every expert) no
    all-to-all byte leaves a group; after the dense allreduces, each block's expert gradients (E/P
    experts per device) are summed by one ring per position, alone on the network: 2 (m - 1) / m of
    their bytes over a port, m = n / P replicas, plus one message latency."""
    from shunter.sim.lina import training_ops
    from shunter.sim.timeline import Collective, TimelineOptions, run_timeline

    n, P = CLUSTER.num_devices, expert_parallel
    setup = training_setup(expert_parallel=P, latency_s=1e-4)
    ops = training_ops(setup, "deepspeed")
    in_group = np.kron(np.eye(n // P), np.ones((P, P))) > 0
    for op in ops:
        if isinstance(op, Collective) and op.kind.endswith("a2a"):
            assert in_group[op.src, op.dst].all()
    timeline = run_timeline(ops, CLUSTER.bandwidth_bytes_s, TimelineOptions("fair_share", 1e-4))
    m = n // P
    expert_bytes = setup.shapes.num_experts / P * setup.shapes.expert_bytes
    expected = 1e-4 + 2 * (m - 1) / m * expert_bytes / CLUSTER.bandwidth_bytes_s[0]
    dense_end = max(
        timeline.collective_finish_s[op.name]
        for op in ops
        if isinstance(op, Collective) and op.kind == "allreduce"
    )
    starts = [timeline.collective_start_s[f"x{b}R"] for b in range(setup.shapes.num_layers)]
    assert starts[0] >= dense_end
    for b in range(setup.shapes.num_layers):
        took = timeline.collective_finish_s[f"x{b}R"] - timeline.collective_start_s[f"x{b}R"]
        assert took == pytest.approx(expected, rel=1e-9)
    assert training_step(replace(setup, expert_parallel=n), "deepspeed").step_s == pytest.approx(
        training_step(replace(setup, expert_parallel=None), "deepspeed").step_s
    )
