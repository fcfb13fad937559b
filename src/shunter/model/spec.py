"""ModelSpec: one normalised description of an MoE model, read from a Hugging Face `config.json`.

Long because it holds every family's config reader beside the one type they fill; the readers
would move to a `model/families/` package once a family needs more than its field list.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from shunter.errors import ShunterError
from shunter.model.quant import QUANT_METHOD

SUPPORTED_FAMILIES = (
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
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the layer functions need to know about a model; no weights.

    Sizes are element counts. Per-layer facts (`moe_layers`) are tuples indexed by layer.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    dtype: str  # checkpoint dtype name: "float32", "bfloat16", "float16"
    tie_word_embeddings: bool
    max_position_embeddings: int
    # attention
    attention: Literal["gqa", "mla"]
    head_dim: int  # query/key head dim (MLA: nope + rope)
    v_head_dim: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: Literal["none", "per_head", "full", "l2"]  # l2: Llama 4's weightless norm, RoPE layers only
    clip_qkv: float | None
    sliding_window: int | None
    rope_theta: float
    rope_type: str
    rope_factor: float
    rope_scaling: dict[str, Any]  # the config's rope parameters (YaRN reads several)
    rope_interleaved: bool  # rotate pairs (2i, 2i+1) instead of halves (i, i + d/2)
    attention_scale: float  # softmax scale applied to q.k
    # multi-head latent attention (DeepSeek); zero when unused
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    # feed-forward
    moe_layers: tuple[bool, ...]
    dense_intermediate_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int  # 0: no shared expert
    shared_expert_gate: bool  # Qwen2-MoE scales the shared expert by sigmoid(x @ w)
    # routing
    scoring: Literal["softmax", "sigmoid"]
    topk_method: Literal["greedy", "group_limited", "noaux_tc"]
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    router_correction_bias: bool  # DeepSeek-V3 `e_score_correction_bias`
    router_in_fp32: bool  # DeepSeek computes router logits in fp32 from fp32 weights
    gate_weights_in_model_dtype: bool  # Qwen/OLMoE cast gate weights to the model dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # GLM-4.5, MiniMax-M2: RoPE rotates the leading `rotary_dim` dims of each head (0: all of them)
    rotary_dim: int = 0
    # gpt-oss
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window in slots, 0 full; () none
    attention_sinks: bool = False  # a learned per-head logit in the softmax denominator
    router_bias: bool = False
    expert_bias: bool = False  # gate_up and down biases on every routed expert
    swiglu_limit: float | None = None  # clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha g)
    swiglu_alpha: float = 1.0
    # Llama 4: layers without RoPE (NoPE), whose queries get a temperature that grows with
    # position: q *= 1 + scale * log1p(floor((slot + 1) / floor)); floor 0: no temperature
    nope_layers: tuple[bool, ...] = ()
    nope_temperature_floor: int = 0
    nope_temperature_scale: float = 0.0
    # Llama 4: these layers attend only within chunks of `attention_chunk_size` positions
    chunked_attention_layers: tuple[bool, ...] = ()
    attention_chunk_size: int = 0
    gate_on_expert_input: bool = False  # Llama 4 scales an expert's input by the gate, not its output

    def uses_rope(self, layer: int) -> bool:
        return not (self.nope_layers and self.nope_layers[layer])

    # hybrid attention (Qwen3-Next): Gated DeltaNet layers hold a fixed-size state instead of KV
    linear_attention_layers: tuple[bool, ...] = ()  # empty: every layer is full attention
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0  # causal conv1d width over q, k, v
    attention_output_gate: bool = False  # q_proj also yields a per-head sigmoid gate on the output
    zero_centred_norms: bool = False  # RMSNorm scales by 1 + w (folded into the weights on load)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one element in the checkpoint's dtype."""
        return self.torch_dtype.itemsize

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def kv_dims(self) -> tuple[int, int]:
        """(key dim, value dim) per head held in the KV cache."""
        return self.head_dim, self.v_head_dim

    @property
    def cached_kv_heads(self) -> int:
        """Heads the KV cache holds keys and values for: the KV heads, or with MLA every query head
        (the runtime caches keys and values expanded per head rather than the latent)."""
        return self.num_heads if self.attention == "mla" else self.num_kv_heads

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Bytes of one token's keys and values at one layer of the runtime's KV cache."""
        k_dim, v_dim = self.kv_dims
        return self.cached_kv_heads * (k_dim + v_dim) * element_bytes

    def is_linear_attention(self, layer: int) -> bool:
        return bool(self.linear_attention_layers) and self.linear_attention_layers[layer]

    @property
    def num_kv_layers(self) -> int:
        """Layers whose cache grows per token (full attention); linear-attention layers hold a state."""
        return self.num_layers - sum(self.linear_attention_layers)

    @property
    def linear_conv_dim(self) -> int:
        """Channels of a linear-attention layer's causal conv: q and k (key heads) and v (value heads)."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )

    def linear_state_bytes_per_sequence(self, element_bytes: int) -> int:
        """Bytes of one sequence's state summed over the linear-attention layers: the conv's last
        kernel-1 inputs in the compute dtype and the fp32 recurrent state [value heads, dk, dv]."""
        conv = self.linear_conv_dim * (self.linear_conv_kernel - 1) * element_bytes
        recurrent = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4
        return sum(self.linear_attention_layers) * (conv + recurrent)

    def cache_bytes(self, sequences: int, context_tokens: int, element_bytes: int) -> int:
        """What the runtime's cache holds for `sequences` of `context_tokens` slots: keys and values
        at the full-attention layers plus the fixed-size state of the linear-attention layers."""
        kv = sequences * context_tokens * self.kv_bytes_per_token(element_bytes) * self.num_kv_layers
        return kv + sequences * self.linear_state_bytes_per_sequence(element_bytes)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` when it slides on its own (gpt-oss `layer_types`), else None
        (the model-wide `sliding_window`, if any, is already in the batch's mask)."""
        return (self.layer_windows[layer] or None) if self.layer_windows else None

    def mean_attended_tokens(self, context_tokens: float) -> float:
        """Cached tokens one decode step's attention reads, averaged over the layers: a sliding
        layer reads at most its window of the cache."""
        if not self.layer_windows:
            return float(context_tokens)
        return sum(min(context_tokens, w) if w else context_tokens for w in self.layer_windows) / len(
            self.layer_windows
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def expert_parameters(self) -> int:
        """Elements of one routed expert (gate, up, down, and their biases where the family has them)."""
        H, eI = self.hidden_size, self.expert_intermediate_size
        return 3 * H * eI + (2 * eI + H) * self.expert_bias

    def block_parameters(self, layer: int) -> int:
        """Elements of everything in `layer` except its routed experts: norms, attention, router,
        shared experts, or the dense MLP of a dense layer."""
        H, heads = self.hidden_size, self.num_heads
        if self.is_linear_attention(layer):
            attention = self._linear_attention_parameters()
        elif self.attention == "mla":
            q_out = heads * self.head_dim
            q = self.q_lora_rank * (H + q_out + 1) if self.q_lora_rank else H * q_out
            attention = q + H * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            attention += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        else:
            q_out, kv_out = heads * self.head_dim, self.num_kv_heads * self.head_dim
            q_proj_out = q_out * (2 if self.attention_output_gate else 1)
            attention = H * (q_proj_out + 2 * kv_out) + (q_proj_out + 2 * kv_out) * self.qkv_bias
            attention += (
                2 * self.head_dim
                if self.qk_norm == "per_head"
                else (q_out + kv_out) * (self.qk_norm == "full")
            )
        if not self.is_linear_attention(layer):
            attention += heads * self.v_head_dim * H + H * self.o_bias + heads * self.attention_sinks
        if self.moe_layers[layer]:
            router = H + self.router_correction_bias + self.router_bias
            ffn = self.num_experts * router + 3 * H * self.shared_intermediate_size
            ffn += H * self.shared_expert_gate
        else:
            ffn = 3 * H * self.dense_intermediate_size
        return 2 * H + attention + ffn

    def _linear_attention_parameters(self) -> int:
        """in_proj_qkvz, in_proj_ba, conv1d, dt_bias, A_log, the gated norm and out_proj."""
        H, value_dim = self.hidden_size, self.linear_num_value_heads * self.linear_value_head_dim
        qkvz = H * (2 * self.linear_num_key_heads * self.linear_key_head_dim + 2 * value_dim)
        ba_dt_a = H * 2 * self.linear_num_value_heads + 2 * self.linear_num_value_heads
        conv = self.linear_conv_dim * self.linear_conv_kernel
        return qkvz + ba_dt_a + conv + self.linear_value_head_dim + value_dim * H


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read `config.json` in `model_dir` into a ModelSpec; ShunterError on anything missing or unknown."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ShunterError(f"{model_dir}: not a directory (expected a model directory with config.json)")
    if not path.is_file():
        raise ShunterError(f"{path}: missing (a model directory needs config.json beside its safetensors)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShunterError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ShunterError(f"{path}: expected a JSON object at the top level")
    spec = spec_from_config(config, source=str(path))
    return spec


def spec_from_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    """Normalise one family's config dictionary; `source` names the file in error messages."""
    family = config.get("model_type")
    if family == "llama4":
        raise ShunterError(
            f"{source}: model_type 'llama4' is the multimodal Llama 4 (its text model sits under text_config "
            "and its tensors under language_model.*); only the text model is supported: a Llama4ForCausalLM "
            "checkpoint, model_type 'llama4_text'"
        )
    if family not in SUPPORTED_FAMILIES:
        raise ShunterError(
            f"{source}: model_type {family!r} is not supported; supported families: "
            + ", ".join(SUPPORTED_FAMILIES)
        )
    refuse_quantized(config, source)
    c = _Fields(config, source)
    if c.opt("hidden_act", "silu") != "silu":
        raise ShunterError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")

    hidden = c.int("hidden_size")
    layers = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", default=heads)
    num_experts = c.int_any(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))
    top_k_field = "moe_k" if family == "ernie4_5_moe" else "num_experts_per_tok"
    top_k = c.int(top_k_field)
    if not 0 < top_k <= num_experts:
        raise ShunterError(f"{source}: {top_k_field}={top_k} must be between 1 and {num_experts}")
    if heads % kv_heads:
        raise ShunterError(f"{source}: num_attention_heads={heads} is not a multiple of {kv_heads=}")

    rope_field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope_value = config.get(rope_field) or {}
    if not isinstance(rope_value, dict):
        raise ShunterError(f"{source}: field {rope_field!r} must be an object, got {rope_value!r}")
    rope = dict(rope_value)
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ShunterError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    rope_factor = 1.0
    if rope_type != "default":
        original = rope.get("original_max_position_embeddings")
        factor = rope.get("factor")
        if factor is None and rope_type == "yarn" and original:
            factor = c.int("max_position_embeddings") / original
        if factor is None or float(factor) <= 0:
            raise ShunterError(f"{source}: rope type {rope_type!r} needs a positive 'factor'")
        rope_factor = float(factor)
        if rope_type == "yarn" and not original:
            raise ShunterError(f"{source}: rope type 'yarn' needs 'original_max_position_embeddings'")
        if rope_type == "llama3":
            _check_llama3_rope(rope, source)

    eos = config.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    vocab = c.int("vocab_size")
    eos_ids = tuple(e for e in eos_ids if 0 <= e < vocab)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if dtype not in _DTYPES:
        raise ShunterError(f"{source}: dtype {dtype!r} is not supported (float32, bfloat16, float16)")

    common: dict[str, Any] = dict(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=c.positive_float("rms_norm_eps", 1e-6),
        dtype=dtype,
        tie_word_embeddings=bool(c.opt("tie_word_embeddings", False)),
        max_position_embeddings=c.int("max_position_embeddings", default=4096),
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope_factor=rope_factor,
        rope_scaling=rope,
        num_experts=num_experts,
        top_k=top_k,
        bos_token_id=config.get("bos_token_id") if isinstance(config.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids,
        name=str(config.get("_name_or_path") or config.get("name") or family),
        clip_qkv=None,
        q_lora_rank=0,
        kv_lora_rank=0,
        qk_nope_head_dim=0,
        qk_rope_head_dim=0,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        router_correction_bias=False,
        scoring="softmax",
        topk_method="greedy",
        shared_intermediate_size=0,
        shared_expert_gate=False,
        router_in_fp32=False,
        sliding_window=None,
        rope_interleaved=False,
    )

    if family in ("deepseek_v2", "deepseek_v3"):
        return _deepseek_spec(c, common, family)
    if family == "gpt_oss":
        return _gpt_oss_spec(c, common)
    if family == "minimax_m2":
        return _minimax_m2_spec(c, common)
    if family == "glm4_moe":
        return _glm4_moe_spec(c, common)
    if family == "ernie4_5_moe":
        return _ernie4_5_moe_spec(c, common)
    if family == "llama4_text":
        return _llama4_text_spec(c, common)

    head_dim = c.opt("head_dim") or hidden // heads
    sparse_step = c.int("decoder_sparse_step", default=1)
    mlp_only = set(c.opt("mlp_only_layers") or [])
    moe_layers = tuple(
        (i not in mlp_only) and num_experts > 0 and (i + 1) % sparse_step == 0 for i in range(layers)
    )
    window = c.opt("sliding_window")
    use_window = family == "mixtral" or bool(c.opt("use_sliding_window", False))
    if family == "qwen2_moe" and use_window:
        # Qwen2-MoE slides only on the layers listed as "sliding_attention"; rare enough to refuse.
        raise ShunterError(f"{source}: use_sliding_window=true is not supported for qwen2_moe")
    common.update(
        attention="gqa",
        head_dim=int(head_dim),
        v_head_dim=int(head_dim),
        attention_scale=float(head_dim) ** -0.5,
        sliding_window=int(window) if (use_window and window) else None,
        moe_layers=moe_layers,
        dense_intermediate_size=c.int("intermediate_size", default=0),
        norm_topk_prob=bool(c.opt("norm_topk_prob", family == "mixtral")),
        gate_weights_in_model_dtype=family != "mixtral",
    )
    if family == "mixtral":
        common.update(
            expert_intermediate_size=c.int("intermediate_size"),
            qkv_bias=False,
            o_bias=False,
            qk_norm="none",
            norm_topk_prob=True,
        )
    elif family == "qwen2_moe":
        common.update(
            expert_intermediate_size=c.int("moe_intermediate_size"),
            qkv_bias=bool(c.opt("qkv_bias", True)),
            o_bias=False,
            qk_norm="none",
            shared_intermediate_size=c.int("shared_expert_intermediate_size", default=0),
            shared_expert_gate=c.int("shared_expert_intermediate_size", default=0) > 0,
        )
    elif family == "qwen3_moe":
        bias = bool(c.opt("attention_bias", False))
        common.update(
            expert_intermediate_size=c.int("moe_intermediate_size"),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="per_head",
        )
    elif family == "qwen3_next":
        bias = bool(c.opt("attention_bias", False))
        shared = c.int("shared_expert_intermediate_size")
        common.update(
            expert_intermediate_size=c.int("moe_intermediate_size"),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="per_head",
            shared_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            **_hybrid_attention_fields(c, layers, int(head_dim), rope),
        )
    else:  # olmoe
        bias = bool(c.opt("attention_bias", False))
        clip = c.opt("clip_qkv")
        common.update(
            expert_intermediate_size=c.int("intermediate_size"),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=float(clip) if clip is not None else None,
        )
    return ModelSpec(**common)


LAYER_TYPES = ("linear_attention", "full_attention")


def _hybrid_attention_fields(c: _Fields, layers: int, head_dim: int, rope: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next: which layers are Gated DeltaNet (linear) attention, their sizes, and the full
    attention's output gate, partial RoPE and zero-centred norms."""
    types = c.config.get("layer_types")
    if types is None:
        # transformers' default: every `full_attention_interval`-th layer is full attention
        interval = c.int("full_attention_interval", default=4)
        if interval == 0:
            raise ShunterError(f"{c.source}: field 'full_attention_interval' must be positive, got 0")
        linear = tuple((i + 1) % interval != 0 for i in range(layers))
    elif not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ShunterError(
            f"{c.source}: field 'layer_types' must list {' or '.join(map(repr, LAYER_TYPES))} for each "
            f"of the {layers} layers, got {types!r}"
        )
    else:
        linear = tuple(t == "linear_attention" for t in types)

    def positive(key: str) -> int:
        value = c.int(key)
        if value == 0:
            raise ShunterError(f"{c.source}: field {key!r} must be a positive integer, got 0")
        return value

    key_heads, value_heads = positive("linear_num_key_heads"), positive("linear_num_value_heads")
    if value_heads % key_heads:
        raise ShunterError(
            f"{c.source}: linear_num_value_heads={value_heads} is not a multiple of "
            f"linear_num_key_heads={key_heads}"
        )
    factor = rope.get("partial_rotary_factor", c.config.get("partial_rotary_factor", 0.25))
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise ShunterError(f"{c.source}: field 'partial_rotary_factor' must be in (0, 1], got {factor!r}")
    if int(head_dim * factor) % 2:
        raise ShunterError(
            f"{c.source}: partial_rotary_factor={factor} rotates an odd number of dims of head_dim={head_dim}"
        )
    return dict(
        linear_attention_layers=linear,
        linear_num_key_heads=key_heads,
        linear_num_value_heads=value_heads,
        linear_key_head_dim=positive("linear_key_head_dim"),
        linear_value_head_dim=positive("linear_value_head_dim"),
        linear_conv_kernel=positive("linear_conv_kernel_dim"),
        attention_output_gate=True,
        rotary_dim=int(head_dim * factor),
        zero_centred_norms=True,
    )


def _deepseek_spec(c: _Fields, common: dict[str, Any], family: str) -> ModelSpec:
    layers = common["num_layers"]
    first_dense = c.int("first_k_dense_replace", default=0)
    freq = c.int("moe_layer_freq", default=1)
    nope, rope_dim, v_dim = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim"), c.int("v_head_dim")
    q_lora = c.opt("q_lora_rank")
    num_experts = common["num_experts"]
    n_group = c.int("n_group", default=1)
    topk_group = c.int("topk_group", default=1)
    if num_experts % max(n_group, 1):
        raise ShunterError(
            f"{c.source}: n_routed_experts={num_experts} is not a multiple of n_group={n_group}"
        )
    if family == "deepseek_v2":
        method = c.opt("topk_method", "greedy")
        topk_method = {"greedy": "greedy", "group_limited_greedy": "group_limited"}.get(method)
        if topk_method is None:
            raise ShunterError(
                f"{c.source}: topk_method {method!r} is not supported (greedy, group_limited_greedy)"
            )
        scoring = "softmax"
        # transformers' DeepSeek-V2 scales but never renormalises the top-k weights.
        norm_topk = False
        interleaved = True
    else:
        topk_method, scoring = "noaux_tc", "sigmoid"
        norm_topk = bool(c.opt("norm_topk_prob", True))
        interleaved = bool(c.opt("rope_interleave", True))
    common.update(
        attention="mla",
        head_dim=nope + rope_dim,
        v_head_dim=v_dim,
        qkv_bias=False,
        o_bias=bool(c.opt("attention_bias", False)),
        qk_norm="none",
        rope_interleaved=interleaved,
        attention_scale=float(nope + rope_dim) ** -0.5 * _yarn_softmax_scale(common),
        q_lora_rank=int(q_lora or 0),
        kv_lora_rank=c.int("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(layers)),
        dense_intermediate_size=c.int("intermediate_size"),
        expert_intermediate_size=c.int("moe_intermediate_size"),
        shared_intermediate_size=c.int("moe_intermediate_size") * c.int("n_shared_experts", default=0),
        scoring=scoring,
        topk_method=topk_method,
        norm_topk_prob=norm_topk,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(c.opt("routed_scaling_factor", 1.0)),
        router_correction_bias=family == "deepseek_v3",
        router_in_fp32=True,
        gate_weights_in_model_dtype=False,
    )
    return ModelSpec(**common)


def _check_llama3_rope(rope: dict[str, Any], source: str) -> None:
    """Llama 3.1's frequency-dependent scaling (Llama 4 Scout uses it) needs three more numbers."""
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = rope.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ShunterError(f"{source}: rope type 'llama3' needs a positive {key!r}, got {value!r}")
    if rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise ShunterError(f"{source}: rope type 'llama3' needs high_freq_factor > low_freq_factor")


def _gqa_attention(c: _Fields, common: dict[str, Any], default_head_dim: int | None = None) -> dict[str, Any]:
    """Grouped-query attention fields shared by GLM-4.5, ERNIE 4.5 and Llama 4."""
    head_dim = c.int("head_dim", default=default_head_dim or common["hidden_size"] // common["num_heads"])
    if head_dim == 0 or head_dim % 2:
        raise ShunterError(f"{c.source}: field 'head_dim' must be a positive even integer, got {head_dim}")
    return dict(attention="gqa", head_dim=head_dim, v_head_dim=head_dim, attention_scale=head_dim**-0.5)


def _glm4_moe_spec(c: _Fields, common: dict[str, Any]) -> ModelSpec:
    """GLM-4.5/4.6: GQA with partial RoPE, optional qk-norm and q/k/v bias; DeepSeek-V3 routing
    (sigmoid, correction bias, group-limited top-k) and shared experts after `first_k_dense_replace`."""
    layers, num_experts = common["num_layers"], common["num_experts"]
    attention = _gqa_attention(c, common)
    # transformers keeps the factor in rope_parameters; older configs have it at the top level
    factor = common["rope_scaling"].get("partial_rotary_factor", c.opt("partial_rotary_factor", 0.5))
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise ShunterError(f"{c.source}: field 'partial_rotary_factor' must be in (0, 1], got {factor!r}")
    rotary_dim = int(attention["head_dim"] * factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ShunterError(
            f"{c.source}: field 'partial_rotary_factor' ({factor}) leaves {rotary_dim} rotary dims of "
            f"head_dim {attention['head_dim']}; need a positive even number"
        )
    n_group, topk_group = c.int("n_group", default=1), c.int("topk_group", default=1)
    _check_groups(c, num_experts, n_group, topk_group, "n_routed_experts")
    first_dense = c.int("first_k_dense_replace", default=1)
    moe_intermediate = c.int("moe_intermediate_size")
    bias = c.bool("attention_bias", False)
    common.update(
        attention,
        rotary_dim=rotary_dim if rotary_dim < attention["head_dim"] else 0,
        qkv_bias=bias,
        o_bias=False,
        qk_norm="per_head" if c.bool("use_qk_norm", False) else "none",
        moe_layers=tuple(i >= first_dense for i in range(layers)),
        dense_intermediate_size=c.int("intermediate_size"),
        expert_intermediate_size=moe_intermediate,
        shared_intermediate_size=moe_intermediate * c.int("n_shared_experts", default=1),
        scoring="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=c.bool("norm_topk_prob", True),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=c.positive_float("routed_scaling_factor", 1.0),
        router_correction_bias=True,
        router_in_fp32=True,
        gate_weights_in_model_dtype=False,
    )
    return ModelSpec(**common)


def _check_groups(c: _Fields, num_experts: int, n_group: int, topk_group: int, experts_field: str) -> None:
    # noaux_tc scores a group by its two best experts, so a group needs two
    if n_group == 0 or num_experts % n_group or num_experts // n_group < 2:
        raise ShunterError(
            f"{c.source}: field 'n_group' ({n_group}) must divide {experts_field}={num_experts} into groups "
            "of at least 2 experts"
        )
    if not 0 < topk_group <= n_group:
        raise ShunterError(
            f"{c.source}: field 'topk_group' ({topk_group}) must be between 1 and n_group={n_group}"
        )


def _ernie4_5_moe_spec(c: _Fields, common: dict[str, Any]) -> ModelSpec:
    """ERNIE 4.5 MoE: GQA with interleaved RoPE; softmax routing whose top-k is chosen on the
    probabilities plus a correction bias (weights stay the plain probabilities, renormalised);
    shared experts; MoE layers from `moe_layer_start_index` to `moe_layer_end_index` every
    `moe_layer_interval`."""
    layers = common["num_layers"]
    if c.bool("use_bias", False):
        raise ShunterError(
            f"{c.source}: field 'use_bias' is true: ERNIE 4.5 with biases on every projection is "
            "not supported"
        )
    start, interval = c.int("moe_layer_start_index", default=1), c.int("moe_layer_interval", default=1)
    end = c.config.get("moe_layer_end_index", -1)
    if end is None:
        end = -1
    if isinstance(end, bool) or not isinstance(end, int) or end < -1:
        raise ShunterError(f"{c.source}: field 'moe_layer_end_index' must be an integer >= -1, got {end!r}")
    if interval == 0:
        raise ShunterError(f"{c.source}: field 'moe_layer_interval' must be a positive integer, got 0")
    end = layers - 1 if end == -1 else end
    moe_intermediate = c.int("moe_intermediate_size")
    common.update(
        _gqa_attention(c, common),
        tie_word_embeddings=c.bool("tie_word_embeddings", True),
        rope_interleaved=True,
        qkv_bias=False,
        o_bias=False,
        qk_norm="none",
        moe_layers=tuple((i + 1) % interval == 0 and start <= i <= end for i in range(layers)),
        dense_intermediate_size=c.int("intermediate_size"),
        expert_intermediate_size=moe_intermediate,
        shared_intermediate_size=moe_intermediate * c.int("moe_num_shared_experts", default=2),
        scoring="softmax",
        topk_method="greedy",
        norm_topk_prob=True,
        router_correction_bias=True,
        router_in_fp32=True,
        gate_weights_in_model_dtype=True,
    )
    return ModelSpec(**common)


def _llama4_text_spec(c: _Fields, common: dict[str, Any]) -> ModelSpec:
    """Llama 4 text: dense and MoE layers interleaved; a shared expert beside top-k experts whose
    input (not output) is scaled by a sigmoid gate; RoPE layers with L2 qk-norm and chunked
    attention, NoPE layers with attention temperature tuning. Defaults are transformers'."""
    layers = common["num_layers"]
    step = c.int("interleave_moe_layer_step", default=1)
    if step == 0:
        raise ShunterError(f"{c.source}: field 'interleave_moe_layer_step' must be a positive integer, got 0")
    moe_list = c.int_list("moe_layers", layers, upper=layers)
    moe_layers = set(moe_list) if moe_list is not None else set(range(step - 1, layers, step))
    rope_flags = c.int_list("no_rope_layers", layers, upper=2, per_layer=True)  # 1: RoPE, 0: NoPE
    if not rope_flags:
        interval = c.int("no_rope_layer_interval", default=4)
        if interval == 0:
            raise ShunterError(
                f"{c.source}: field 'no_rope_layer_interval' must be a positive integer, got 0"
            )
        rope_flags = [int((i + 1) % interval != 0) for i in range(layers)]
    chunk = c.opt("attention_chunk_size")
    if chunk is not None:
        chunk = c.int("attention_chunk_size")
    layer_types = c.opt("layer_types")
    if layer_types is None:
        layer_types = ["chunked_attention" if r and chunk else "full_attention" for r in rope_flags[:layers]]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) < layers
        or any(t not in ("chunked_attention", "full_attention") for t in layer_types)
    ):
        raise ShunterError(
            f"{c.source}: field 'layer_types' must list 'chunked_attention' or 'full_attention' for each "
            f"of the {layers} layers"
        )
    chunked = tuple(t == "chunked_attention" for t in layer_types[:layers])
    if any(chunked) and not chunk:
        raise ShunterError(
            f"{c.source}: field 'attention_chunk_size' is missing (layer_types has chunked layers)"
        )
    bias = c.bool("attention_bias", False)
    intermediate = c.int("intermediate_size")
    tuning = c.bool("attn_temperature_tuning", True)
    common.update(
        _gqa_attention(c, common, default_head_dim=128),
        rope_interleaved=True,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="l2" if c.bool("use_qk_norm", True) else "none",
        nope_layers=tuple(not r for r in rope_flags[:layers]),
        nope_temperature_floor=c.int("floor_scale", default=8192) if tuning else 0,
        nope_temperature_scale=c.positive_float("attn_scale", 0.1) if tuning else 0.0,
        chunked_attention_layers=chunked if any(chunked) else (),
        attention_chunk_size=(chunk or 0) if any(chunked) else 0,
        moe_layers=tuple(i in moe_layers for i in range(layers)),
        dense_intermediate_size=c.int("intermediate_size_mlp") if len(moe_layers) < layers else 0,
        expert_intermediate_size=intermediate,
        shared_intermediate_size=intermediate,
        scoring="sigmoid",
        topk_method="greedy",
        norm_topk_prob=False,
        router_in_fp32=False,
        gate_weights_in_model_dtype=True,
        gate_on_expert_input=True,
    )
    return ModelSpec(**common)


GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gpt_oss_spec(c: _Fields, common: dict[str, Any]) -> ModelSpec:
    """OpenAI gpt-oss: attention sinks, sliding and full layers alternating as `layer_types` says,
    biases everywhere, softmax over the top-k router logits (equal to renormalising the top-k
    of the full softmax), clamped SwiGLU experts stored fused."""
    layers, head_dim = common["num_layers"], c.int("head_dim")
    layer_types = c.opt("layer_types")
    if layer_types is None:  # transformers' default: even layers slide, odd layers attend fully
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != layers
        or any(t not in GPT_OSS_LAYER_TYPES for t in layer_types)
    ):
        raise ShunterError(
            f"{c.source}: field 'layer_types' must list {layers} entries (one per layer), each one of "
            f"{', '.join(GPT_OSS_LAYER_TYPES)}; got {layer_types!r}"
        )
    window = c.int("sliding_window") if "sliding_attention" in layer_types else 0
    if "sliding_attention" in layer_types and window < 1:
        raise ShunterError(f"{c.source}: field 'sliding_window' must be at least 1, got {window}")
    bias = bool(c.opt("attention_bias", True))
    common.update(
        attention="gqa",
        head_dim=head_dim,
        v_head_dim=head_dim,
        attention_scale=float(head_dim) ** -0.5,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="none",
        moe_layers=(True,) * layers,
        dense_intermediate_size=0,
        expert_intermediate_size=c.int("intermediate_size"),
        norm_topk_prob=True,
        gate_weights_in_model_dtype=True,
        layer_windows=tuple(window if t == "sliding_attention" else 0 for t in layer_types),
        attention_sinks=True,
        router_bias=True,
        expert_bias=True,
        swiglu_limit=c.positive_float("swiglu_limit", 7.0),
        swiglu_alpha=c.positive_float("swiglu_alpha", 1.702),
    )
    return ModelSpec(**common)


def _minimax_m2_spec(c: _Fields, common: dict[str, Any]) -> ModelSpec:
    """MiniMax-M2: sigmoid router scores with a selection-only correction bias, top-k renormalised;
    RMSNorm over the whole q and k projections; RoPE on the first `rotary_dim` dims of each head."""
    head_dim = c.int("head_dim")
    scoring = c.opt("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ShunterError(
            f"{c.source}: field 'scoring_func' must be 'sigmoid' for minimax_m2, got {scoring!r}"
        )
    if c.opt("rotary_dim") is not None:
        rotary_dim = c.int("rotary_dim")
    else:  # transformers writes it as a fraction of the head
        factor = common["rope_scaling"].get("partial_rotary_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
            raise ShunterError(
                f"{c.source}: field 'partial_rotary_factor' must be a number in (0, 1], got {factor!r}"
            )
        rotary_dim = int(head_dim * factor)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise ShunterError(
            f"{c.source}: field 'rotary_dim' must be an even number of dims in (0, head_dim={head_dim}], "
            f"got {rotary_dim}"
        )
    common.update(
        attention="gqa",
        head_dim=head_dim,
        v_head_dim=head_dim,
        attention_scale=float(head_dim) ** -0.5,
        qkv_bias=False,
        o_bias=False,
        qk_norm="full",
        rotary_dim=rotary_dim,
        moe_layers=(True,) * common["num_layers"],
        dense_intermediate_size=0,
        expert_intermediate_size=c.int("intermediate_size"),
        scoring="sigmoid",
        norm_topk_prob=True,
        router_correction_bias=True,
        gate_weights_in_model_dtype=False,
    )
    return ModelSpec(**common)


def refuse_quantized(config: dict[str, Any], source: str) -> None:
    """One line for a checkpoint whose weights are quantised in a layout Shunter does not read (it
    reads its own, `shunter quantize`'s: docs/quantization.md)."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == QUANT_METHOD:
        return
    if method == "mxfp4":
        raise ShunterError(
            f"{source}: quantization_config quant_method 'mxfp4' (MXFP4 experts) is not read yet; "
            "dequantise with transformers first: AutoModelForCausalLM.from_pretrained(path, "
            "quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16).save_pretrained(new_dir)"
        )
    raise ShunterError(
        f"{source}: quantization_config quant_method {method!r} is not read yet; save the model "
        "dequantised (bfloat16) with transformers and load that directory"
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_softmax_scale(common: dict[str, Any]) -> float:
    # DeepSeek folds YaRN's mscale_all_dim into the softmax scale (squared: it scales q and k).
    mscale_all_dim = common["rope_scaling"].get("mscale_all_dim")
    if common["rope_type"] == "default" or not mscale_all_dim:
        return 1.0
    return yarn_mscale(common["rope_factor"], mscale_all_dim) ** 2


class _Fields:
    """Typed access to config fields with errors that name the file and the field."""

    def __init__(self, config: dict[str, Any], source: str) -> None:
        self.config, self.source = config, source

    def opt(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key)
        if value is None:
            if default is None:
                raise ShunterError(f"{self.source}: field {key!r} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ShunterError(f"{self.source}: field {key!r} must be a non-negative integer, got {value!r}")
        return value

    def positive_float(self, key: str, default: float) -> float:
        """A finite number above zero (an epsilon, a base frequency)."""
        value = self.config.get(key)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ShunterError(f"{self.source}: field {key!r} must be a positive number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ShunterError(f"{self.source}: field {key!r} must be true or false, got {value!r}")
        return value

    def int_list(self, key: str, length: int, upper: int, per_layer: bool = False) -> list[int] | None:
        """A list of integers in [0, upper) (layer indices, flags); None when absent. A per_layer
        list that is not empty holds an entry for each of the `length` layers (or more)."""
        value = self.config.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < upper for v in value)
            or (per_layer and value and len(value) < length)
        ):
            what = (
                f"one integer in [0, {upper}) per layer ({length})"
                if per_layer
                else f"integers in [0, {upper})"
            )
            raise ShunterError(f"{self.source}: field {key!r} must be a list of {what}, got {value!r}")
        return value

    def int_any(self, keys: tuple[str, ...]) -> int:
        for key in keys:
            if self.config.get(key) is not None:
                return self.int(key)
        raise ShunterError(f"{self.source}: none of the fields {', '.join(keys)} is present")
