"""The compute cost model against closed forms (the network's is tests/network)."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.errors import ShunterError
from shunter.shapes import MIXTRAL_8X7B
from shunter.sim.cost import ComputeModel, ComputeProfile, kv_cache_bytes, parse_compute_profile


def test_compute_time_is_flops_over_speed_with_a_memory_floor() -> None:
    """Oracle: 1e12 FLOP at 1e14 * 0.5 FLOP/s = 20 ms; a tiny op cannot beat reading its 1 GB at 1 TB/s."""
    model = ComputeModel(efficiency=0.5, memory_bandwidth_bytes_s=1e12)
    assert model.op_time_s("expert", 1000.0, 1e9, 1e6, 1e14) == pytest.approx(0.02)
    assert model.op_time_s("expert", 1.0, 1e9, 1e9, 1e14) == pytest.approx(1e-3)
    assert model.op_time_s("expert", 0.0, 1e9, 1e9, 1e14) == 0.0


def test_a_measured_profile_replaces_the_flop_estimate_and_interpolates() -> None:
    """Oracle: linear between (100, 1 ms) and (300, 2 ms); extrapolated along the last segment."""
    profile = ComputeProfile({"expert": np.array([100.0, 300.0])}, {"expert": np.array([1e-3, 2e-3])})
    model = ComputeModel(profile=profile)
    assert model.op_time_s("expert", np.array([200.0, 500.0]), 1e9, 0.0, 1e14) == pytest.approx(
        [1.5e-3, 3e-3]
    )
    assert model.op_time_s("gate", 100.0, 1e9, 0.0, 1e14) == pytest.approx(1e-3)  # not profiled: FLOPs


def test_a_bad_profile_is_a_clear_error() -> None:
    """Oracle: the message names the file and the op."""
    with pytest.raises(ShunterError, match=r"p\.json: expert: tokens must increase"):
        parse_compute_profile({"expert": {"tokens": [2, 1], "seconds": [1, 1]}}, "p.json")
    with pytest.raises(ShunterError, match="unknown op 'mlp'"):
        parse_compute_profile({"mlp": {"tokens": [1], "seconds": [1]}}, "p.json")


def test_a_kv_cache_is_sequences_times_tokens_times_layers_of_one_tokens_keys_and_values() -> None:
    """Oracle: Mixtral keeps 8 KV heads of 128 in bf16, 4 KiB per token and layer: 32 sequences of
    1024 tokens at 32 layers are 4 GiB."""
    assert MIXTRAL_8X7B.kv_bytes_per_token == 4096
    assert kv_cache_bytes(MIXTRAL_8X7B.kv_bytes_per_token, 32, 1024, MIXTRAL_8X7B.num_layers) == 4 * 2**30
