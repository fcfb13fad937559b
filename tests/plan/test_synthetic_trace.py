"""The Zipf-skewed synthetic trace generator (src/shunter/trace/synthetic.py)."""

from __future__ import annotations

import numpy as np

from shunter.trace.stats import expert_load, transition_counts
from shunter.trace.synthetic import zipf_trace


def test_zipf_trace_is_reproducible_and_well_formed() -> None:
    """Oracle: same seed, same trace; distinct experts per token; gates sorted and summing to 1."""
    a = zipf_trace(3, 500, 16, 4, 1.2, 0.5, seed=7)
    b = zipf_trace(3, 500, 16, 4, 1.2, 0.5, seed=7)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert a.expert_ids.shape == (3, 500, 4)
    assert all(len(set(row)) == 4 for row in a.expert_ids.reshape(-1, 4).tolist())
    np.testing.assert_allclose(a.gate_weights.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(np.diff(a.gate_weights, axis=-1) <= 0)


def test_skew_makes_some_experts_much_hotter() -> None:
    """Oracle: skew 0 is near uniform; skew 1.5 puts several times the mean on the hottest expert."""
    flat = expert_load(zipf_trace(1, 20000, 16, 1, 0.0, 0.0, seed=0))[0]
    skewed = expert_load(zipf_trace(1, 20000, 16, 1, 1.5, 0.0, seed=0))[0]
    assert flat.max() / flat.mean() < 1.2
    assert skewed.max() / skewed.mean() > 4


def test_correlation_makes_the_top_expert_predict_the_next_layer() -> None:
    """Oracle: with correlation 1, tokens that shared a top-1 expert share their next choice."""
    trace = zipf_trace(2, 3000, 8, 1, 1.0, 1.0, seed=0)
    transitions = transition_counts(trace)[0]
    assert np.all((transitions > 0).sum(axis=1) <= 1)
