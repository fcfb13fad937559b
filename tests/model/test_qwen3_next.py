"""Qwen3-Next's spec: which layers are linear, what its cache holds, and one clear line for a bad
config. Its logits, tokens and routing against transformers are in test_families.py."""

from __future__ import annotations

import json

import pytest

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model import load_model
from shunter.model.executor import KVCache
from shunter.model.spec import spec_from_config
from tests.tiny_models import _COMMON, FAMILY_CONFIGS


def _config(**changes) -> dict:
    config = {"model_type": "qwen3_next", **_COMMON, **FAMILY_CONFIGS["qwen3_next"], **changes}
    return {key: value for key, value in config.items() if value is not None}


def test_linear_layers_follow_layer_types_or_transformers_full_attention_interval():
    """Oracle: transformers' Qwen3NextConfig.layer_types for the same fields."""
    spec = spec_from_config(_config())
    assert spec.linear_attention_layers == tuple(
        t == "linear_attention" for t in FAMILY_CONFIGS["qwen3_next"]["layer_types"]
    )
    from transformers import AutoConfig

    for interval in (2, 4):
        config = _config(
            layer_types=None, num_hidden_layers=8, mlp_only_layers=[], full_attention_interval=interval
        )
        fields = {key: value for key, value in config.items() if key != "model_type"}
        expected = AutoConfig.for_model("qwen3_next", **fields).layer_types
        assert "full_attention" in expected and "linear_attention" in expected
        spec = spec_from_config(config)
        assert spec.linear_attention_layers == tuple(t == "linear_attention" for t in expected)


def test_the_cache_holds_kv_for_full_attention_layers_and_a_fixed_state_for_linear_ones():
    """Oracle: the bytes the runtime's cache allocates, at two context lengths (so the per-token
    and the per-sequence parts are both pinned)."""
    spec = spec_from_config(_config())
    for slots in (16, 64):
        cache = KVCache(spec, 3, slots, spec.torch_dtype)
        tensors = [t for t in cache.keys + cache.values if t is not None]
        tensors += [t for s in cache.linear_states if s is not None for t in (s.conv, s.recurrent)]
        assert spec.cache_bytes(3, slots, 4) == sum(t.numel() * t.element_size() for t in tensors)
    assert spec.num_kv_layers == 1
    assert spec.cache_bytes(1, 1000, 4) - spec.cache_bytes(1, 999, 4) == spec.kv_bytes_per_token(4)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("linear_num_key_heads", None, "field 'linear_num_key_heads' is missing"),
        ("linear_key_head_dim", "16", "field 'linear_key_head_dim' must be a non-negative integer, got '16'"),
        ("linear_conv_kernel_dim", 0, "field 'linear_conv_kernel_dim' must be a positive integer, got 0"),
        ("linear_num_value_heads", 3, "linear_num_value_heads=3 is not a multiple of linear_num_key_heads=2"),
        ("layer_types", ["linear_attention"], "field 'layer_types' must list 'linear_attention' or"),
        ("layer_types", "full_attention", "field 'layer_types' must list"),
        ("partial_rotary_factor", "half", "field 'partial_rotary_factor' must be in \\(0, 1\\], got 'half'"),
        ("shared_expert_intermediate_size", None, "field 'shared_expert_intermediate_size' is missing"),
    ],
)
def test_a_missing_or_mistyped_field_is_one_line_naming_it(tmp_path, field, value, message):
    config = _config(**{field: value})
    if value is None:
        config.pop(field, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShunterError, match=f"config.json: {message}") as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value)


def test_the_command_line_shows_a_bad_field_as_one_line_and_exit_2(tmp_path, capsys):
    config = _config()
    del config["linear_value_head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "field 'linear_value_head_dim' is missing" in err and len(err.strip().splitlines()) == 1
