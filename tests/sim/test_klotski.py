"""Klotski's pipeline cost model: closed forms, the bubble-free n, and the ablation's shape."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from shunter.sim.klotski import (
    PipelineOptions,
    PipelineTimes,
    klotski_step_time,
    smallest_bubble_free_batches,
)

TIMES = PipelineTimes(
    attention_compute_s=1.0,
    gate_compute_s=0.5,
    expert_tokens_per_batch=np.array([4.0, 3.0, 2.0, 1.0, 0.0, 1.0]),
    expert_compute_s_per_token=0.1,
    expert_min_compute_s=0.2,
    attention_transfer_s=2.0,
    gate_transfer_s=0.1,
    expert_transfer_s=3.0,
    num_layers=3,
)
ORDERS = [
    PipelineOptions("layer", "by_batch"),
    PipelineOptions("layer", "hot_first"),
    PipelineOptions("hot", "by_batch"),
    PipelineOptions("hot", "hot_first"),
]


def free_transfers(times: PipelineTimes) -> PipelineTimes:
    return replace(times, attention_transfer_s=0.0, gate_transfer_s=0.0, expert_transfer_s=0.0)


@pytest.mark.parametrize("options", ORDERS)
def test_zero_transfer_time_gives_pure_compute_time(options: PipelineOptions) -> None:
    """Oracle: L (n (tc_A + tc_G) + expert runs), no bubble: by batch n runs per expert of
    max(tokens x 0.1, 0.2) s, hot first one run per expert over n batches' tokens."""
    times = free_transfers(TIMES)
    result = klotski_step_time(times, 4, options)
    by_batch = 4 * sum(max(t * 0.1, 0.2) for t in (4, 3, 2, 1, 1))
    hot_first = sum(max(4 * t * 0.1, 0.2) for t in (4, 3, 2, 1, 1))
    experts = by_batch if options.expert_order == "by_batch" else hot_first
    assert result.step_s == pytest.approx(3 * (4 * 1.5 + experts))
    assert result.step_s == pytest.approx(times.pure_compute_s(4, options.expert_order))
    assert result.bubble_s == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("options", ORDERS)
def test_a_step_takes_at_least_its_compute_and_its_link_time(options: PipelineOptions) -> None:
    """Oracle: one compute stream and one link: step >= max(sum of compute, sum of transfers)."""
    for n in (1, 3, 8):
        result = klotski_step_time(TIMES, n, options)
        transfers = TIMES.num_layers * (2.0 + 0.1 + 5 * 3.0)
        assert result.step_s >= TIMES.pure_compute_s(n, options.expert_order) - 1e-9
        assert result.step_s >= transfers - 1e-9
        assert result.link_busy_s == pytest.approx(transfers)


def test_more_batches_amortise_the_weight_transfers() -> None:
    """Oracle: weights cross once per step whatever n, so time per batch falls as n grows."""
    per_batch = [klotski_step_time(TIMES, n, ORDERS[3]).step_s / n for n in (1, 2, 4, 8)]
    assert all(later < earlier for earlier, later in itertools.pairwise(per_batch))


def test_the_simulators_first_prefetch_spellings_mean_hot_and_layer() -> None:
    """Oracle: the one vocabulary is "none", "hot", "layer" (the offload engine's too);
    "whole_layer" and "hot_only" (sim/reproduce.py's) are read as "layer" and "hot"."""
    assert PipelineOptions("whole_layer", "by_batch") == ORDERS[0]
    assert PipelineOptions("hot_only", "hot_first") == ORDERS[3]
    with pytest.raises(ValueError, match="prefetch 'cold' is not one of none, hot, layer"):
        PipelineOptions("cold")


def test_no_prefetch_is_hot_only_prefetch_of_no_experts() -> None:
    """Oracle: with nothing prefetched every expert a layer uses loads after its gate, as the
    engine's "none" does: the same graph as "hot" with K = 0."""
    for n in (1, 4):
        for order in ("by_batch", "hot_first"):
            none = klotski_step_time(TIMES, n, PipelineOptions("none", order))
            hot_zero = klotski_step_time(TIMES, n, PipelineOptions("hot", order, num_hot_experts=0))
            assert none == hot_zero


def test_hot_first_reorder_never_loses_to_the_batch_order_with_hot_only_prefetch() -> None:
    """Oracle: expert-major order runs each expert once (one floor) and starts on the hot experts
    already loaded while cold ones arrive."""
    for n in (1, 4, 16):
        by_batch = klotski_step_time(TIMES, n, ORDERS[2]).step_s
        hot_first = klotski_step_time(TIMES, n, ORDERS[3]).step_s
        assert hot_first <= by_batch + 1e-9


def test_a_wasted_prefetch_costs_link_time() -> None:
    """Oracle: accuracy 0.5 with K = 2 wastes one expert transfer per layer on the link."""
    exact = klotski_step_time(TIMES, 4, PipelineOptions(prefetch_accuracy=1.0))
    half = klotski_step_time(TIMES, 4, PipelineOptions(prefetch_accuracy=0.5))
    assert half.link_busy_s == pytest.approx(exact.link_busy_s + TIMES.num_layers * 3.0)


def test_smallest_bubble_free_n_solves_the_four_inequalities_by_hand() -> None:
    """Oracle (klotski.md §7, by hand): (5) n 1.5 >= 0.1 + 2 * 3 holds from n = 5; (7) needs
    n 1.5 + hot (0.4 n + 0.3 n) + cold (0.2 n + 0.1 n + 0.1 n) >= 0.1 + 5 * 3 + 2 = 17.1:
    n = 6 gives 15.6, n = 7 gives 18.2 -> n = 7, bound by (7)."""
    result = smallest_bubble_free_batches(TIMES, 2)
    assert result.num_batches == 7
    assert result.binding == "7"


def test_when_only_the_gate_matters_inequality_four_binds() -> None:
    """Oracle: (4) n tc_A >= tIO_G with tc_A = 1 s and tIO_G = 3.5 s and free experts: n = 4."""
    times = replace(TIMES, gate_transfer_s=3.5, expert_transfer_s=0.0, attention_transfer_s=0.0)
    assert smallest_bubble_free_batches(times, 2).num_batches == 4


def test_smallest_bubble_free_n_is_none_when_kv_outgrows_compute() -> None:
    """Oracle: each batch adds 10 s of KV transfer and 1.5 s of compute: no n catches up."""
    assert (
        smallest_bubble_free_batches(replace(TIMES, kv_load_s=10.0), 2, max_batches=200).num_batches is None
    )


def test_at_the_bubble_free_n_the_steady_layers_have_almost_no_bubble() -> None:
    """Oracle: the inequalities hold at n*, so beyond the first layer (nothing to overlap with)
    compute hides the transfers: the bubble is at most the first layer's loads."""
    n = smallest_bubble_free_batches(TIMES, 2).num_batches
    assert n is not None
    result = klotski_step_time(replace(TIMES, num_layers=6), n, ORDERS[3])
    first_layer_loads = 2.0 + 0.1 + 2 * 3.0
    assert result.bubble_s <= first_layer_loads + 1e-9
    few = klotski_step_time(replace(TIMES, num_layers=6), 1, ORDERS[3])
    assert few.bubble_s > result.bubble_s
