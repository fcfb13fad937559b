"""Tiny random MoE checkpoints built with transformers, the oracle for the runtime tests."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "ernie4_5_moe",
    "llama4_text",
    "gpt_oss",
    "minimax_m2",
    "qwen3_next",
)

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.08,  # larger than default so routing and argmax are far from ties
    tie_word_embeddings=False,
)
# Each family with its own top-k, shared experts where it has them, >= 8 experts.
FAMILY_CONFIGS = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_experts=8,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=32,
        norm_topk_prob=True,
    ),
    "olmoe": dict(
        intermediate_size=48, num_experts=8, num_experts_per_tok=2, num_key_value_heads=4, clip_qkv=8.0
    ),
    "deepseek_v2": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        num_key_value_heads=4,
        routed_scaling_factor=1.5,
    ),
    "deepseek_v3": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        num_key_value_heads=4,
        routed_scaling_factor=2.5,
    ),
    # GLM-4.5: partial rotary (half of each head), qk-norm, q/k/v bias, DeepSeek-V3 routing
    "glm4_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        attention_bias=True,
    ),
    # ERNIE 4.5: softmax routing with a correction bias, shared experts, MoE from layer 1
    "ernie4_5_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_interval=1,
    ),
    # Llama 4: MoE every other layer, layer 3 NoPE with temperature tuning (floor_scale small enough
    # to matter in a short test), chunked attention over 8 tokens on the RoPE layers
    "llama4_text": dict(
        num_hidden_layers=4,
        head_dim=16,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        floor_scale=4,
        attn_scale=0.1,
        use_qk_norm=True,
    ),
    # sliding, full, sliding layers with a window shorter than the prompts; a SwiGLU limit the
    # tiny activations reach, so the clamp is exercised; YaRN without truncation, as gpt-oss ships
    "gpt_oss": dict(
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=5,
        swiglu_limit=0.5,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "rope_theta": 150000.0,
        },
    ),
    # RoPE on half of each head (rotary_dim 8 of head_dim 16)
    "minimax_m2": dict(
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        rotary_dim=8,
        bos_token_id=None,
        eos_token_id=None,
    ),
    # hybrid: Gated DeltaNet (linear) layers around one gated full-attention layer, 2 value heads
    # per key head, partial RoPE; a shared expert with a sigmoid gate
    "qwen3_next": dict(
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        partial_rotary_factor=0.5,
        mlp_only_layers=[1],
    ),
}


def hf_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_COMMON, **FAMILY_CONFIGS[family], **overrides})


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with random weights; routers sharpened so top-k choices are not near-ties."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # gate.weight: most families; router.weight: gpt-oss and Llama 4
            if name.endswith(("gate.weight", "router.weight")) and "shared_expert_gate" not in name:
                param.mul_(10.0)
            if name.endswith(("proj_bias", "sinks")):  # gpt-oss initialises these to zero or near it
                param.copy_(torch.randn_like(param) * 0.5)
            if name.endswith("e_score_correction_bias"):  # ERNIE 4.5 keeps it as a parameter
                param.copy_(torch.randn_like(param) * 0.1)
        if family == "qwen3_next":  # its RMSNorms scale by 1 + w and start at w = 0: test the offset
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(torch.randn_like(param) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


def save_tiny(
    family: str,
    directory: Path,
    fused: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny model of `family` in the per-expert (default) or fused expert layout."""
    model = build_hf_model(family, seed=seed).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if fused:
        kwargs["save_original_format"] = False
    model.save_pretrained(directory, **kwargs)
    return Path(directory)
