"""GLM-4.5, ERNIE 4.5 and Llama 4 configs: what each needs, read into the spec, and one clear
error naming the field when it is missing or of the wrong type."""

from __future__ import annotations

import json

import pytest
import torch

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model.layers import attention_mask, chunked_attention_mask
from shunter.model.spec import spec_from_config
from tests.tiny_models import _COMMON, FAMILY_CONFIGS


def _config(family: str, **changes) -> dict:
    config = {"model_type": family, **_COMMON, **FAMILY_CONFIGS[family], **changes}
    return {k: v for k, v in config.items() if v is not _DROP}


_DROP = object()


def test_glm4_moe_reads_partial_rotary_routing_and_dense_prefix():
    spec = spec_from_config(_config("glm4_moe"))
    assert spec.head_dim == 16 and spec.rotary_dim == 8  # partial_rotary_factor 0.5
    assert spec.moe_layers == (False, True, True)  # first_k_dense_replace=1
    assert (spec.scoring, spec.topk_method, spec.router_correction_bias) == ("sigmoid", "noaux_tc", True)
    assert spec.qkv_bias and not spec.o_bias and spec.qk_norm == "per_head"
    assert spec.shared_intermediate_size == 32


def test_glm4_moe_reads_the_rotary_factor_from_rope_parameters_as_transformers_saves_it():
    config = _config("glm4_moe", partial_rotary_factor=_DROP)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert spec_from_config(config).rotary_dim == 4


def test_ernie_moe_layers_follow_start_end_and_interval():
    spec = spec_from_config(
        _config(
            "ernie4_5_moe",
            num_hidden_layers=6,
            moe_layer_start_index=1,
            moe_layer_end_index=4,
            moe_layer_interval=2,
        )
    )
    assert spec.moe_layers == (False, True, False, True, False, False)
    assert spec.num_experts == 8 and spec.top_k == 2 and spec.rope_interleaved
    assert spec.tie_word_embeddings is False  # the tiny config says so; transformers' default is True
    assert spec_from_config(_config("ernie4_5_moe", tie_word_embeddings=_DROP)).tie_word_embeddings


def test_llama4_derives_moe_nope_and_chunked_layers_as_transformers_does():
    spec = spec_from_config(_config("llama4_text"))
    assert spec.moe_layers == (False, True, False, True)  # interleave_moe_layer_step=2
    assert spec.nope_layers == (False, False, False, True)  # a NoPE layer every 4th
    assert spec.chunked_attention_layers == (True, True, True, False) and spec.attention_chunk_size == 8
    assert spec.gate_on_expert_input and spec.shared_intermediate_size == spec.expert_intermediate_size
    explicit = spec_from_config(_config("llama4_text", moe_layers=[0, 2], no_rope_layers=[0, 1, 1, 1]))
    assert explicit.moe_layers == (True, False, True, False)
    assert explicit.nope_layers == (True, False, False, False)
    assert explicit.chunked_attention_layers == (False, True, True, True)


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("glm4_moe", {"moe_intermediate_size": _DROP}, "field 'moe_intermediate_size' is missing"),
        ("glm4_moe", {"use_qk_norm": "yes"}, "field 'use_qk_norm' must be true or false, got 'yes'"),
        ("glm4_moe", {"partial_rotary_factor": 2}, "field 'partial_rotary_factor' must be in (0, 1], got 2"),
        ("glm4_moe", {"n_group": 3}, "field 'n_group' (3) must divide n_routed_experts=8"),
        (
            "glm4_moe",
            {"routed_scaling_factor": "2.5"},
            "field 'routed_scaling_factor' must be a positive number",
        ),
        ("ernie4_5_moe", {"moe_k": _DROP}, "field 'moe_k' is missing"),
        ("ernie4_5_moe", {"moe_num_experts": _DROP}, "moe_num_experts is present"),
        (
            "ernie4_5_moe",
            {"moe_layer_end_index": "last"},
            "field 'moe_layer_end_index' must be an integer >= -1",
        ),
        ("ernie4_5_moe", {"moe_layer_interval": 0}, "field 'moe_layer_interval' must be a positive integer"),
        ("ernie4_5_moe", {"use_bias": True}, "field 'use_bias' is true"),
        ("llama4_text", {"intermediate_size": _DROP}, "field 'intermediate_size' is missing"),
        ("llama4_text", {"intermediate_size_mlp": _DROP}, "field 'intermediate_size_mlp' is missing"),
        (
            "llama4_text",
            {"attention_chunk_size": 8.5},
            "field 'attention_chunk_size' must be a non-negative integer",
        ),
        (
            "llama4_text",
            {"no_rope_layers": [1, 2, 1, 1]},
            "field 'no_rope_layers' must be a list of one integer",
        ),
        ("llama4_text", {"no_rope_layers": [1, 1]}, "field 'no_rope_layers' must be a list of one integer"),
        ("llama4_text", {"moe_layers": [1, 7]}, "field 'moe_layers' must be a list of integers in [0, 4)"),
        ("llama4_text", {"layer_types": ["sliding_attention"] * 4}, "field 'layer_types' must list"),
        ("llama4_text", {"use_qk_norm": 1}, "field 'use_qk_norm' must be true or false, got 1"),
        ("llama4_text", {"attn_scale": -1}, "field 'attn_scale' must be a positive number"),
    ],
)
def test_a_missing_or_mistyped_field_is_one_error_naming_it(family, changes, message):
    with pytest.raises(ShunterError) as error:
        spec_from_config(_config(family, **changes), source="model/config.json")
    text = str(error.value)
    assert text.startswith("model/config.json: ") and message in text and "\n" not in text


def test_the_multimodal_llama4_config_points_at_the_text_model(tmp_path, capsys):
    config = {"model_type": "llama4", "text_config": {**_COMMON, **FAMILY_CONFIGS["llama4_text"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    status = main(["generate", str(tmp_path), "--prompt-ids", "1,2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert "model_type 'llama4' is the multimodal Llama 4" in lines[0] and "'llama4_text'" in lines[0]


def test_chunked_mask_is_the_causal_mask_within_each_sequences_chunks():
    """Oracle: brute force over (sequence, query, key) with positions counted from the first real
    token, as transformers' chunked mask counts them under left padding."""
    key_valid = torch.tensor(
        [[False, False, True, True, True, True, True, True, True, True, True, True]] * 1 + [[True] * 12]
    )
    chunk = 4
    for start, num_new in ((0, 12), (9, 3), (11, 1)):
        valid = key_valid[:, : start + num_new]
        mask = chunked_attention_mask(valid, start, num_new, chunk)
        causal = attention_mask(valid, start, num_new)
        for b in range(2):
            pad = int((~valid[b]).cumsum(0).eq(torch.arange(1, valid.shape[1] + 1)).sum())
            for t in range(num_new):
                q = start + t
                for s in range(start + num_new):
                    in_chunk = (q - pad) // chunk == (s - pad) // chunk
                    plain = bool(causal[b, 0, t, s]) if causal is not None else s <= q
                    assert bool(mask[b, 0, t, s]) == ((plain and in_chunk) or s == q), (start, b, t, s)
