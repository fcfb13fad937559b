"""MoEShapes: the one model description the planner and simulator cost, against a real ModelSpec."""

from __future__ import annotations

import pytest

from shunter.errors import ShunterError
from shunter.model.spec import spec_from_config
from shunter.shapes import MIXTRAL_8X7B, MoEShapes
from tests.tiny_models import FAMILY_CONFIGS

# Mixtral-8x7B-v0.1's config.json as published (transformers' MixtralConfig field names).
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_mixtral_shapes_give_its_known_sizes() -> None:
    """Oracle: Mixtral-8x7B has 176M parameters per expert (3 x 4096 x 14336) and ~46.7B in total."""
    mixtral = MIXTRAL_8X7B
    assert mixtral.expert_params == 3 * 4096 * 14336
    total = mixtral.num_layers * (8 * mixtral.expert_params + mixtral.attention_params)
    assert total == pytest.approx(46.5e9, rel=0.01)


def test_shapes_from_mixtral_config_equal_the_mixtral_preset() -> None:
    """Oracle: the MIXTRAL_8X7B preset, written from the Klotski paper's model, in every size and
    cost the simulator derives from shapes."""
    shapes = MoEShapes.from_spec(spec_from_config(MIXTRAL_8X7B_CONFIG))
    preset = MIXTRAL_8X7B
    assert shapes.expert_bytes == preset.expert_bytes
    assert shapes.attention_bytes == preset.attention_bytes
    assert shapes.gate_bytes == preset.gate_bytes
    assert shapes.weight_bytes == preset.weight_bytes
    assert shapes.kv_bytes_per_token == preset.kv_bytes_per_token
    assert shapes.token_bytes == preset.token_bytes
    assert shapes.expert_flops_per_token == preset.expert_flops_per_token
    assert shapes.gate_flops_per_token == preset.gate_flops_per_token
    assert shapes.aggregation_flops_per_token == preset.aggregation_flops_per_token
    assert shapes.attention_flops_per_token(1000.0) == preset.attention_flops_per_token(1000.0)
    assert MoEShapes.from_spec(spec_from_config(MIXTRAL_8X7B_CONFIG), name="Mixtral-8x7B") == preset


def tiny_config(family: str) -> dict[str, object]:
    """A config.json of the tests' tiny model of `family` (tests/tiny_models.py), without transformers."""
    base = dict(model_type=family, hidden_size=64, num_hidden_layers=3, vocab_size=96)
    return {**base, "num_attention_heads": 4, "num_key_value_heads": 2, **FAMILY_CONFIGS[family]}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "minimax_m2"])
def test_shapes_from_a_spec_hold_as_many_kv_bytes_per_token_as_the_runtime_caches(family: str) -> None:
    """Oracle: ModelSpec.kv_bytes_per_token, what the runtime's KV cache holds (qwen3_moe's
    head_dim 32 is not hidden / heads)."""
    spec = spec_from_config(tiny_config(family))
    shapes = MoEShapes.from_spec(spec)
    assert shapes.kv_bytes_per_token == spec.kv_bytes_per_token(spec.dtype_bytes)
    assert shapes.num_layers == spec.num_moe_layers
    assert shapes.expert_params == spec.expert_parameters()


@pytest.mark.parametrize(
    ("family", "what"),
    [("qwen2_moe", "shared experts"), ("deepseek_v3", "mla"), ("qwen3_next", "linear attention")],
)
def test_shapes_refuse_a_model_they_cannot_describe(family: str, what: str) -> None:
    """Oracle: MoEShapes has grouped-query attention and routed experts only; an estimate that drops
    Qwen2-MoE's shared experts or DeepSeek's latent attention would be silently wrong."""
    with pytest.raises(ShunterError, match=what):
        MoEShapes.from_spec(spec_from_config(tiny_config(family)))
