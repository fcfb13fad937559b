"""What gpt-oss and MiniMax-M2 add beyond the FAMILIES-parametrized tests: their config errors,
quantised checkpoints, attention sinks and sliding layers, and the sizes the planner costs.

Oracles: transformers' gpt-oss attention function; the checkpoints' own tensor sizes; closed forms.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.layers import attention_with_sinks, keys_in_window
from shunter.model.spec import load_spec
from tests.tiny_models import _COMMON, FAMILY_CONFIGS

NEW_FAMILIES = ("gpt_oss", "minimax_m2")


def _write_config(tmp_path, family: str, edit) -> None:
    config = {"model_type": family, **_COMMON, **FAMILY_CONFIGS[family]}
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))


BAD_CONFIGS = [
    ("gpt_oss", lambda c: c.pop("head_dim"), "field 'head_dim' is missing"),
    ("gpt_oss", lambda c: c.pop("sliding_window"), "field 'sliding_window' is missing"),
    ("gpt_oss", lambda c: c.update(sliding_window=0), "field 'sliding_window' must be at least 1"),
    ("gpt_oss", lambda c: c.update(layer_types=["sliding_attention"]), "field 'layer_types' must list 3"),
    (
        "gpt_oss",
        lambda c: c.update(layer_types=["sliding_attention", "full_attention", "chunked"]),
        "field 'layer_types' must list 3",
    ),
    ("gpt_oss", lambda c: c.update(swiglu_limit="7"), "field 'swiglu_limit' must be a positive number"),
    ("gpt_oss", lambda c: c.pop("num_local_experts"), "none of the fields num_local_experts"),
    ("minimax_m2", lambda c: c.pop("intermediate_size"), "field 'intermediate_size' is missing"),
    ("minimax_m2", lambda c: c.update(rotary_dim=7.5), "field 'rotary_dim' must be a non-negative integer"),
    ("minimax_m2", lambda c: c.update(rotary_dim=32), "field 'rotary_dim' must be an even number"),
    (
        "minimax_m2",
        lambda c: (c.pop("rotary_dim"), c.update(rope_parameters={"partial_rotary_factor": "half"})),
        "field 'partial_rotary_factor' must be a number in (0, 1]",
    ),
    ("minimax_m2", lambda c: c.update(scoring_func="softmax"), "field 'scoring_func' must be 'sigmoid'"),
    ("minimax_m2", lambda c: c.update(head_dim=None), "field 'head_dim' is missing"),
]


@pytest.mark.parametrize("family, edit, message", BAD_CONFIGS, ids=[m for _, _, m in BAD_CONFIGS])
def test_a_missing_or_mistyped_field_is_one_line_naming_file_and_field(tmp_path, family, edit, message):
    _write_config(tmp_path, family, edit)
    with pytest.raises(ShunterError) as error:
        load_spec(tmp_path)
    text = str(error.value)
    assert message in text and str(tmp_path / "config.json") in text and "\n" not in text


def test_an_mxfp4_checkpoint_is_one_line_saying_how_to_dequantise(tmp_path, capsys):
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    _write_config(tmp_path, "gpt_oss", lambda c: c.update(quantization_config=quantization))
    status = main(["generate", str(tmp_path), "--prompt-ids", "1,2", "--max-new-tokens", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert "quant_method 'mxfp4'" in lines[0] and "is not read yet" in lines[0]
    assert "Mxfp4Config(dequantize=True)" in lines[0] and "save_pretrained" in lines[0]


def test_an_fp8_checkpoint_is_one_line_too(tmp_path):
    # MiniMax-M2 ships block-quantised fp8 weights
    quantization = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": [128, 128]}
    _write_config(tmp_path, "minimax_m2", lambda c: c.update(quantization_config=quantization))
    with pytest.raises(ShunterError, match=r"quant_method 'fp8' is not read yet; save the model dequantised"):
        load_spec(tmp_path)


def _reference_sink_attention(q, k, v, additive_mask, sinks):
    from torch import nn
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = nn.Module()
    module.sinks = nn.Parameter(sinks)
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    out, _ = eager_attention_forward(module.eval(), q, k, v, additive_mask, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)  # [B, heads, T, d]


@pytest.mark.parametrize("num_new", [6, 1], ids=["prefill", "decode"])
def test_sink_attention_equals_transformers_gpt_oss_attention(num_new):
    """Four query heads over two KV heads, the first sequence left-padded by two slots, and for
    the sliding case a window of 3 slots applied by `keys_in_window` (oracle: the window mask
    transformers builds, q - s < window, on the whole cache)."""
    torch.manual_seed(0)
    B, heads, kv_heads, S, d = 2, 4, 2, 9, 8
    q = torch.randn(B, heads, num_new, d)
    k, v = torch.randn(B, kv_heads, S, d), torch.randn(B, kv_heads, S, d)
    sinks = torch.randn(heads)
    q_slot = torch.arange(S - num_new, S)[:, None]
    k_slot = torch.arange(S)[None, :]
    real = torch.ones(B, S, dtype=torch.bool)
    real[0, :2] = False
    for window in (None, 3):
        allowed = (k_slot <= q_slot)[None] & real[:, None, :]
        if window is not None:
            allowed = allowed & (q_slot - k_slot < window)[None]
        mask = allowed[:, None]  # [B, 1, T, S]
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        expected = _reference_sink_attention(q, k, v, additive, sinks)
        if window is None:
            actual = attention_with_sinks(q, k, v, mask, d**-0.5, sinks)
        else:
            k_in, v_in, mask_in = keys_in_window(k, v, (k_slot[None] >= 0) & real[:, None, None], num_new, 3)
            assert k_in.shape[2] == min(S, num_new + window - 1)  # a decode step reads the window only
            actual = attention_with_sinks(q, k_in, v_in, mask_in, d**-0.5, sinks)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_expert_size_from_the_spec_matches_the_checkpoint(tiny_checkpoint, family):
    """Oracle: the checkpoint's own expert tensors (gpt-oss's carry biases), what the planner streams."""
    for fused in (False, True):
        path = tiny_checkpoint(family, fused=fused)
        spec, checkpoint = load_spec(path), Checkpoint(path)
        for layer in range(spec.num_layers):
            prefix = f"model.layers.{layer}."
            names = [n for n in checkpoint.names() if n.startswith(prefix) and ".experts." in n]
            elements = sum(int(np.prod(checkpoint.shape(n))) for n in names)
            assert spec.expert_parameters() * spec.num_experts == elements, (family, fused, layer)


def test_sliding_layers_make_the_planner_cost_less_attention():
    """gpt-oss's tiny model slides on layers 0 and 2 with a window of 5: at 100 cached tokens a
    decode step reads (5 + 100 + 5) / 3 per layer on average (closed form); the profile times the
    full-attention layer 1, whose slope that average scales."""
    import dataclasses

    from shunter.model.spec import spec_from_config
    from shunter.offload.planner import pipeline_times
    from shunter.offload.profile import MachineProfile, timed_layer

    spec = spec_from_config({"model_type": "gpt_oss", **_COMMON, **FAMILY_CONFIGS["gpt_oss"]})
    assert spec.layer_windows == (5, 0, 5) and timed_layer(spec) == 1
    assert spec.mean_attended_tokens(100) == pytest.approx(110 / 3)
    assert spec.mean_attended_tokens(3) == 3
    profile = MachineProfile(
        dtype="float32",
        threads=1,
        batch_size=1,
        attention_s_per_token=1e-4,
        attention_s_per_token_per_context_token=1e-6,
        gate_s_per_token=1e-5,
        expert_s_per_token=1e-5,
        expert_min_s=1e-5,
        read_bytes_s=1e9,
    )
    sliding = pipeline_times(spec, profile, 2, 100).attention_compute_s
    full = pipeline_times(dataclasses.replace(spec, layer_windows=()), profile, 2, 100).attention_compute_s
    assert sliding == pytest.approx(2 * (1e-4 + 1e-6 * 110 / 3))
    assert full == pytest.approx(2 * (1e-4 + 1e-6 * 100))


# rope_parameters is left out: the parsing every family shares takes any truthy value for a dict
FIELDS_READ = {
    "gpt_oss": (
        "head_dim",
        "intermediate_size",
        "layer_types",
        "sliding_window",
        "attention_bias",
        "swiglu_limit",
        "swiglu_alpha",
        "quantization_config",
    ),
    "minimax_m2": (
        "head_dim",
        "intermediate_size",
        "rotary_dim",
        "scoring_func",
        "quantization_config",
    ),
}
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_value_of_a_field_the_family_reads_is_refused_or_read(family, data):
    """Random JSON in one of the family's fields: a ModelSpec or a ShunterError, never another exception."""
    from shunter.model.spec import ModelSpec, spec_from_config

    field = data.draw(st.sampled_from(FIELDS_READ[family]))
    value = data.draw(_JSON)
    config = {"model_type": family, **_COMMON, **FAMILY_CONFIGS[family], field: value}
    try:
        assert isinstance(spec_from_config(config), ModelSpec)
    except ShunterError as error:
        assert "\n" not in str(error)
