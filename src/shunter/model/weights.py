"""Explicit weight containers and the map from a family's checkpoint names to them.

One room: the containers and the one reader that fills them from any layout (per-expert, fused,
input-major, quantised) change together.

The layer functions take these dataclasses; where the tensors come from (RAM, disk, another
device) is the caller's business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint, TensorLocation
from shunter.model.quant import QuantizedWeight, quantized_tensor_names
from shunter.model.spec import ModelSpec


@dataclass
class AttentionWeights:
    """Projection weights as stored by nn.Linear: [out_features, in_features]."""

    q: torch.Tensor | None = None  # [heads*head_dim, H] (MLA without q LoRA too)
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    o: torch.Tensor | None = None  # [H, heads*v_head_dim]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    # multi-head latent attention
    q_a: torch.Tensor | None = None  # [q_lora_rank, H]
    q_a_norm: torch.Tensor | None = None
    q_b: torch.Tensor | None = None  # [heads*head_dim, q_lora_rank]
    kv_a: torch.Tensor | None = None  # [kv_lora_rank + rope_dim, H]
    kv_a_norm: torch.Tensor | None = None
    kv_b: torch.Tensor | None = None  # [heads*(nope + v_head_dim), kv_lora_rank]
    sinks: torch.Tensor | None = None  # [heads] gpt-oss attention sinks (logits)


@dataclass
class LinearAttentionWeights:
    """One Gated DeltaNet (linear attention) layer as transformers stores it (`linear_attn.*`);
    the math is in shunter.model.linear_attention."""

    in_proj_qkvz: torch.Tensor  # [2 nk dk + 2 nv dv, H]; rows grouped per key head: q, k, v, z
    in_proj_ba: torch.Tensor  # [2 nv, H]; rows grouped per key head: b, a
    conv: torch.Tensor  # [C, K] depthwise causal conv over q, k, v channels
    dt_bias: torch.Tensor  # [nv]
    A_log: torch.Tensor  # [nv] log of the decay rate
    norm: torch.Tensor  # [dv] gated RMSNorm scale (plain, not zero-centred)
    out: torch.Tensor  # [H, nv dv]


@dataclass
class MLPWeights:
    """A SwiGLU MLP: gate and up fused into one matrix so one matmul computes both, or, when `up`
    is given, kept apart (weights streamed from a checkpoint that stores them apart: joining them
    would copy both on every load, on the thread that should be reading the next one)."""

    gate_up: torch.Tensor  # [2I, H]: rows [0, I) gate, [I, 2I) up; [I, H], the gate alone, with `up`
    down: torch.Tensor  # [H, I]
    up: torch.Tensor | None = None  # [I, H]
    gate_up_bias: torch.Tensor | None = None  # [2I], gpt-oss
    down_bias: torch.Tensor | None = None  # [H], gpt-oss
    swiglu_limit: float | None = None  # clamped SwiGLU (gpt-oss); see layers.clamped_swiglu
    swiglu_alpha: float = 1.0


@dataclass
class MoEWeights:
    """Router, routed experts stacked (None when a schedule streams them one by one), shared experts."""

    router: torch.Tensor  # [E, H]
    experts_gate_up: torch.Tensor | None  # [E, 2I, H]
    experts_down: torch.Tensor | None  # [E, H, I]
    correction_bias: torch.Tensor | None = None  # [E] fp32, DeepSeek-V3
    shared: MLPWeights | None = None
    shared_gate: torch.Tensor | None = None  # [1, H], Qwen2-MoE
    router_bias: torch.Tensor | None = None  # [E], gpt-oss
    experts_gate_up_bias: torch.Tensor | None = None  # [E, 2I], gpt-oss
    experts_down_bias: torch.Tensor | None = None  # [E, H], gpt-oss
    swiglu_limit: float | None = None  # the experts' clamped SwiGLU (gpt-oss)
    swiglu_alpha: float = 1.0

    packed_experts: list[MLPWeights] | None = None  # per-expert prepacked weights (fast CPU path)

    def expert(self, e: int) -> MLPWeights:
        if self.packed_experts is not None:
            return self.packed_experts[e]
        assert self.experts_gate_up is not None and self.experts_down is not None, "experts are streamed"
        return MLPWeights(
            self.experts_gate_up[e],
            self.experts_down[e],
            gate_up_bias=None if self.experts_gate_up_bias is None else self.experts_gate_up_bias[e],
            down_bias=None if self.experts_down_bias is None else self.experts_down_bias[e],
            swiglu_limit=self.swiglu_limit,
            swiglu_alpha=self.swiglu_alpha,
        )


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    attention: AttentionWeights | LinearAttentionWeights
    mlp_norm: torch.Tensor
    moe: MoEWeights | None = None
    mlp: MLPWeights | None = None  # dense layers


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H]; the embedding itself when tied


class CheckpointLayout:
    """Tensor names of one model in its checkpoint, with the shapes config.json implies."""

    def __init__(
        self,
        spec: ModelSpec,
        checkpoint: Checkpoint,
        fetch: Callable[[TensorLocation], torch.Tensor] | None = None,
        join_gate_up: bool = True,
    ) -> None:
        """`fetch` reads a byte range of the checkpoint (the offload engine reads with O_DIRECT);
        by default tensors are read through safetensors. join_gate_up=False keeps an MLP's gate
        and up apart where the checkpoint stores them apart (see MLPWeights)."""
        self.spec, self.ckpt, self.fetch, self.join_gate_up = spec, checkpoint, fetch, join_gate_up

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def moe_prefix(self, layer: int) -> str:
        # Mixtral's original layout names the block `block_sparse_moe`; the fused one names it `mlp`.
        legacy = f"model.layers.{layer}.block_sparse_moe."
        if self.spec.family in ("mixtral", "minimax_m2") and legacy + "gate.weight" in self.ckpt:
            return legacy
        if self.spec.family == "llama4_text":
            return f"model.layers.{layer}.feed_forward."
        return f"model.layers.{layer}.mlp."

    def fused_experts(self, layer: int) -> bool:
        fused = self.moe_prefix(layer) + "experts.gate_up_proj"
        return fused in self.ckpt or quantized_tensor_names(fused)[0] in self.ckpt

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: names of (gate, up, down) weights."""
        p = f"{self.moe_prefix(layer)}experts.{expert}."
        if self.spec.family in ("mixtral", "minimax_m2"):
            return p + "w1.weight", p + "w3.weight", p + "w2.weight"
        return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> MLPWeights:
        if self.join_gate_up:
            return MLPWeights(cat_rows([gate, up]), down)
        return MLPWeights(gate, down, up)

    def read(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, input_major: bool = False
    ) -> torch.Tensor:
        """Tensor `name` of `shape` as `dtype`; where the checkpoint holds it quantised, the
        QuantizedWeight standing for it, in nn.Linear's [..., out, in] orientation whatever
        `input_major` (the dense tensor's [..., in, out]) says (see `linear_orientation`)."""
        if name not in self.ckpt and quantized_tensor_names(name)[0] in self.ckpt:
            return self.read_quantized(name, shape, input_major)  # type: ignore[return-value]
        if self.fetch is None:
            return self.ckpt.read(name, shape).to(dtype)
        return self.fetch(self.ckpt.checked_location(name, shape)).to(dtype)

    def read_row(
        self, name: str, shape: tuple[int, ...], row: int, dtype: torch.dtype, input_major: bool = False
    ) -> torch.Tensor:
        """tensor[row] of a stacked tensor (a fused expert), reading only that row when fetching."""
        if name not in self.ckpt and quantized_tensor_names(name)[0] in self.ckpt:
            return self.read_quantized(name, shape, input_major, row)  # type: ignore[return-value]
        location = self.ckpt.checked_location(name, shape).row(row)
        if self.fetch is None:
            return self.ckpt.read_location(location, name).to(dtype)
        return self.fetch(location).to(dtype)

    def read_quantized(
        self, name: str, shape: tuple[int, ...], input_major: bool = False, row: int | None = None
    ) -> QuantizedWeight:
        """The packed tensors standing for weight `name` (dense shape `shape`; with `row`, only
        that expert's rows of a stacked one), their shapes checked against config.json's."""
        *lead, rows, cols = shape
        out_features, in_features = (cols, rows) if input_major else (rows, cols)
        qname, scales_name, mins_name = quantized_tensor_names(name)
        qloc, sloc = self.ckpt.location(qname), self.ckpt.location(scales_name)
        groups = sloc.shape[-1] if sloc.shape else 0
        bits = 8 if qloc.dtype == torch.int8 else 4
        if qloc.dtype not in (torch.int8, torch.uint8) or groups <= 0 or in_features % groups:
            raise ShunterError(
                f"{qloc.file}: {qname!r} ({str(qloc.dtype).removeprefix('torch.')}) with {scales_name!r} "
                f"{list(sloc.shape)} is not a quantised weight of shape {list(shape)} "
                "(see docs/quantization.md)"
            )
        packed_cols = in_features if bits == 8 else in_features // 2
        expected = {
            qname: (*lead, out_features, packed_cols),
            scales_name: (*lead, out_features, groups),
        }
        if bits == 4:
            expected[mins_name] = (*lead, out_features, groups)
        parts = {}
        for part_name, part_shape in expected.items():
            loc = self.ckpt.checked_location(part_name, part_shape)
            if self.fetch is not None:
                parts[part_name] = self.fetch(loc if row is None else loc.row(row))
            else:
                whole = self.ckpt.read(part_name)
                parts[part_name] = whole if row is None else whole[row].clone()
        return QuantizedWeight(
            parts[qname], parts[scales_name], parts.get(mins_name), bits, in_features // groups
        )

    # -- whole pieces -------------------------------------------------------------------------
    def embed(self, dtype: torch.dtype) -> torch.Tensor:
        s = self.spec
        return self.read("model.embed_tokens.weight", (s.vocab_size, s.hidden_size), dtype)

    def final_norm(self, dtype: torch.dtype) -> torch.Tensor:
        return self.norm("model.norm.weight", self.spec.hidden_size, dtype)

    def norm(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        """An RMSNorm scale [size]; a zero-centred one (Qwen3-Next scales by 1 + w) gets its 1 added
        here, in fp32 as the family computes it, so every norm is rms_norm(x, weight)."""
        if not self.spec.zero_centred_norms:
            return self.read(name, (size,), dtype)
        return (1.0 + self.read(name, (size,), torch.float32)).to(dtype)

    def lm_head(self, dtype: torch.dtype, embed: torch.Tensor | None = None) -> torch.Tensor:
        s = self.spec
        if s.tie_word_embeddings:
            return embed if embed is not None else self.embed(dtype)
        return self.read("lm_head.weight", (s.vocab_size, s.hidden_size), dtype)

    def attention(self, layer: int, dtype: torch.dtype) -> AttentionWeights:
        s, p = self.spec, self.layer_prefix(layer) + "self_attn."
        H = s.hidden_size
        w = AttentionWeights()
        if s.attention == "gqa":
            q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            if s.attention_output_gate:  # each head's query rows, then its gate rows
                q_out *= 2
            w.q = self.read(p + "q_proj.weight", (q_out, H), dtype)
            w.k = self.read(p + "k_proj.weight", (kv_out, H), dtype)
            w.v = self.read(p + "v_proj.weight", (kv_out, H), dtype)
            if s.qkv_bias:
                w.q_bias = self.read(p + "q_proj.bias", (q_out,), dtype)
                w.k_bias = self.read(p + "k_proj.bias", (kv_out,), dtype)
                w.v_bias = self.read(p + "v_proj.bias", (kv_out,), dtype)
            if s.qk_norm == "per_head":
                w.q_norm = self.norm(p + "q_norm.weight", s.head_dim, dtype)
                w.k_norm = self.norm(p + "k_norm.weight", s.head_dim, dtype)
            elif s.qk_norm == "full":
                w.q_norm = self.read(p + "q_norm.weight", (q_out,), dtype)
                w.k_norm = self.read(p + "k_norm.weight", (kv_out,), dtype)
        else:
            q_out = s.num_heads * s.head_dim
            if s.q_lora_rank:
                w.q_a = self.read(p + "q_a_proj.weight", (s.q_lora_rank, H), dtype)
                w.q_a_norm = self.read(p + "q_a_layernorm.weight", (s.q_lora_rank,), dtype)
                w.q_b = self.read(p + "q_b_proj.weight", (q_out, s.q_lora_rank), dtype)
            else:
                w.q = self.read(p + "q_proj.weight", (q_out, H), dtype)
            w.kv_a = self.read(
                p + "kv_a_proj_with_mqa.weight", (s.kv_lora_rank + s.qk_rope_head_dim, H), dtype
            )
            w.kv_a_norm = self.read(p + "kv_a_layernorm.weight", (s.kv_lora_rank,), dtype)
            kv_b_out = s.num_heads * (s.qk_nope_head_dim + s.v_head_dim)
            w.kv_b = self.read(p + "kv_b_proj.weight", (kv_b_out, s.kv_lora_rank), dtype)
        o_in = s.num_heads * s.v_head_dim
        w.o = self.read(p + "o_proj.weight", (H, o_in), dtype)
        if s.o_bias:
            w.o_bias = self.read(p + "o_proj.bias", (H,), dtype)
        if s.attention_sinks:
            w.sinks = self.read(p + "sinks", (s.num_heads,), dtype)
        return w

    def linear_attention(self, layer: int, dtype: torch.dtype) -> LinearAttentionWeights:
        s, p = self.spec, self.layer_prefix(layer) + "linear_attn."
        H, nk, nv = s.hidden_size, s.linear_num_key_heads, s.linear_num_value_heads
        key_dim, value_dim = nk * s.linear_key_head_dim, nv * s.linear_value_head_dim
        conv = self.read(p + "conv1d.weight", (s.linear_conv_dim, 1, s.linear_conv_kernel), dtype)
        return LinearAttentionWeights(
            in_proj_qkvz=self.read(p + "in_proj_qkvz.weight", (2 * key_dim + 2 * value_dim, H), dtype),
            in_proj_ba=self.read(p + "in_proj_ba.weight", (2 * nv, H), dtype),
            conv=conv.squeeze(1),
            dt_bias=self.read(p + "dt_bias", (nv,), dtype),
            A_log=self.read(p + "A_log", (nv,), dtype),
            norm=self.read(p + "norm.weight", (s.linear_value_head_dim,), dtype),
            out=self.read(p + "out_proj.weight", (H, value_dim), dtype),
        )

    def mlp(self, prefix: str, intermediate: int, dtype: torch.dtype) -> MLPWeights:
        H = self.spec.hidden_size
        gate = self.read(prefix + "gate_proj.weight", (intermediate, H), dtype)
        up = self.read(prefix + "up_proj.weight", (intermediate, H), dtype)
        down = self.read(prefix + "down_proj.weight", (H, intermediate), dtype)
        return self.swiglu(gate, up, down)

    def expert(self, layer: int, expert: int, dtype: torch.dtype) -> MLPWeights:
        """One routed expert's weights, from either layout."""
        s = self.spec
        H, eI = s.hidden_size, s.expert_intermediate_size
        if s.family == "gpt_oss":
            return self._gpt_oss_expert(layer, expert, dtype)
        if s.family == "llama4_text":
            return self._llama4_expert(layer, expert, dtype)
        if self.fused_experts(layer):
            p = self.moe_prefix(layer) + "experts."
            gate_up = self.read_row(p + "gate_up_proj", (s.num_experts, 2 * eI, H), expert, dtype)
            down = self.read_row(p + "down_proj", (s.num_experts, H, eI), expert, dtype)
            return MLPWeights(gate_up, down)
        gate_name, up_name, down_name = self.expert_names(layer, expert)
        gate = self.read(gate_name, (eI, H), dtype)
        up = self.read(up_name, (eI, H), dtype)
        down = self.read(down_name, (H, eI), dtype)
        return self.swiglu(gate, up, down)

    def moe(self, layer: int, dtype: torch.dtype, with_experts: bool = True) -> MoEWeights:
        """The MoE block of `layer`; with_experts=False leaves the routed experts out (streamed)."""
        s, p = self.spec, self.moe_prefix(layer)
        if s.family == "gpt_oss":
            return self._gpt_oss_moe(layer, dtype, with_experts)
        H, E, eI = s.hidden_size, s.num_experts, s.expert_intermediate_size
        router_dtype = torch.float32 if s.router_in_fp32 else dtype
        router = self.read(
            p + ("router.weight" if s.family == "llama4_text" else "gate.weight"), (E, H), router_dtype
        )
        if not with_experts:
            gate_up = down = None
        elif s.family == "llama4_text":
            gate_up, down = self._llama4_experts(layer, dtype)
        elif self.fused_experts(layer):
            gate_up = self.read(p + "experts.gate_up_proj", (E, 2 * eI, H), dtype)
            down = self.read(p + "experts.down_proj", (E, H, eI), dtype)
        else:
            per_expert = [self.expert(layer, e, dtype) for e in range(E)]
            if isinstance(per_expert[0].gate_up, QuantizedWeight):  # packed per expert as read
                moe = MoEWeights(router, None, None, packed_experts=per_expert)
                return self._moe_extras(moe, layer, dtype)
            gate_up = torch.stack([w.gate_up for w in per_expert])
            down = torch.stack([w.down for w in per_expert])
        moe = MoEWeights(router=router, experts_gate_up=gate_up, experts_down=down)
        return self._moe_extras(moe, layer, dtype)

    def _moe_extras(self, moe: MoEWeights, layer: int, dtype: torch.dtype) -> MoEWeights:
        """A MoE block's correction bias, shared experts and shared-expert gate, where it has them."""
        s, p = self.spec, self.moe_prefix(layer)
        H, E = s.hidden_size, s.num_experts
        if s.family == "ernie4_5_moe":
            moe.correction_bias = self._ernie_correction_bias(layer)
        elif s.router_correction_bias:
            # MiniMax-M2 keeps the bias beside the gate rather than in it
            bias_name = (
                "e_score_correction_bias" if s.family == "minimax_m2" else "gate.e_score_correction_bias"
            )
            moe.correction_bias = self.read(p + bias_name, (E,), torch.float32)
        if s.shared_intermediate_size:
            one_shared = s.family in ("qwen2_moe", "qwen3_next", "llama4_text")
            shared_prefix = p + ("shared_expert." if one_shared else "shared_experts.")
            moe.shared = self.mlp(shared_prefix, s.shared_intermediate_size, dtype)
        if s.shared_expert_gate:
            moe.shared_gate = self.read(p + "shared_expert_gate.weight", (1, H), dtype)
        return moe

    # -- gpt-oss: experts stored fused and transposed, gate and up interleaved, with biases ----------
    def _gpt_oss_expert(self, layer: int, expert: int, dtype: torch.dtype) -> MLPWeights:
        s, p = self.spec, self.moe_prefix(layer) + "experts."
        H, E, eI = s.hidden_size, s.num_experts, s.expert_intermediate_size
        gate_up = self.read_row(p + "gate_up_proj", (E, H, 2 * eI), expert, dtype, input_major=True)
        gate_up_bias = self.read_row(p + "gate_up_proj_bias", (E, 2 * eI), expert, dtype)
        down = self.read_row(p + "down_proj", (E, eI, H), expert, dtype, input_major=True)
        return MLPWeights(
            gate_up=deinterleave_gate_up(linear_orientation(gate_up)),
            down=contiguous(linear_orientation(down)),
            gate_up_bias=deinterleave_gate_up(gate_up_bias[:, None])[:, 0],
            down_bias=self.read_row(p + "down_proj_bias", (E, H), expert, dtype),
            swiglu_limit=s.swiglu_limit,
            swiglu_alpha=s.swiglu_alpha,
        )

    def _gpt_oss_moe(self, layer: int, dtype: torch.dtype, with_experts: bool) -> MoEWeights:
        s, p = self.spec, self.moe_prefix(layer)
        H, E, eI = s.hidden_size, s.num_experts, s.expert_intermediate_size
        moe = MoEWeights(
            router=self.read(p + "router.weight", (E, H), dtype),
            router_bias=self.read(p + "router.bias", (E,), dtype),
            experts_gate_up=None,
            experts_down=None,
            swiglu_limit=s.swiglu_limit,
            swiglu_alpha=s.swiglu_alpha,
        )
        if with_experts:
            gate_up = self.read(p + "experts.gate_up_proj", (E, H, 2 * eI), dtype, input_major=True)
            down = self.read(p + "experts.down_proj", (E, eI, H), dtype, input_major=True)
            moe.experts_gate_up = deinterleave_gate_up(linear_orientation(gate_up))
            moe.experts_down = contiguous(linear_orientation(down))
            bias = self.read(p + "experts.gate_up_proj_bias", (E, 2 * eI), dtype)
            moe.experts_gate_up_bias = deinterleave_gate_up(bias[..., None])[..., 0]
            moe.experts_down_bias = self.read(p + "experts.down_proj_bias", (E, H), dtype)
        return moe

    def layer(self, layer: int, dtype: torch.dtype, with_experts: bool = True) -> LayerWeights:
        s, p = self.spec, self.layer_prefix(layer)
        weights = LayerWeights(
            attn_norm=self.norm(p + "input_layernorm.weight", s.hidden_size, dtype),
            attention=(
                self.linear_attention(layer, dtype)
                if s.is_linear_attention(layer)
                else self.attention(layer, dtype)
            ),
            mlp_norm=self.norm(p + "post_attention_layernorm.weight", s.hidden_size, dtype),
        )
        if s.moe_layers[layer]:
            weights.moe = self.moe(layer, dtype, with_experts)
        else:
            if not s.dense_intermediate_size:
                raise ShunterError(f"config.json: layer {layer} is dense but intermediate_size is missing")
            dense_prefix = p + ("feed_forward." if s.family == "llama4_text" else "mlp.")
            weights.mlp = self.mlp(dense_prefix, s.dense_intermediate_size, dtype)
        return weights

    # -- family layouts -----------------------------------------------------------------------
    def _llama4_expert(self, layer: int, expert: int, dtype: torch.dtype) -> MLPWeights:
        """Llama 4 stores experts fused and input-major: gate_up_proj [E, H, 2I], down_proj [E, I, H];
        one expert's weights are the transposes of its rows (views, no copy)."""
        s, p = self.spec, self.moe_prefix(layer) + "experts."
        H, eI = s.hidden_size, s.expert_intermediate_size
        gate_up = self.read_row(
            p + "gate_up_proj", (s.num_experts, H, 2 * eI), expert, dtype, input_major=True
        )
        down = self.read_row(p + "down_proj", (s.num_experts, eI, H), expert, dtype, input_major=True)
        return MLPWeights(linear_orientation(gate_up), linear_orientation(down))

    def _llama4_experts(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All of a Llama 4 layer's experts as [E, 2I, H] and [E, H, I] (transposed views)."""
        s, p = self.spec, self.moe_prefix(layer) + "experts."
        H, E, eI = s.hidden_size, s.num_experts, s.expert_intermediate_size
        gate_up = self.read(p + "gate_up_proj", (E, H, 2 * eI), dtype, input_major=True)
        down = self.read(p + "down_proj", (E, eI, H), dtype, input_major=True)
        return linear_orientation(gate_up), linear_orientation(down)

    def _ernie_correction_bias(self, layer: int) -> torch.Tensor:
        """ERNIE 4.5's [1, E] bias: under `gate.moe_statics` as transformers names it, or under
        `moe_statics` in the original (per-expert) checkpoints."""
        p, E = self.moe_prefix(layer), self.spec.num_experts
        name = p + "gate.moe_statics.e_score_correction_bias"
        if name not in self.ckpt and p + "moe_statics.e_score_correction_bias" in self.ckpt:
            name = p + "moe_statics.e_score_correction_bias"
        return self.read(name, (1, E), torch.float32).reshape(E)


def linear_orientation(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """A weight stored input-major ([..., in, out]: gpt-oss, Llama 4 experts) as nn.Linear's
    [..., out, in]: the transposed view of a dense tensor; a quantised one is stored that way."""
    return weight if isinstance(weight, QuantizedWeight) else weight.transpose(-1, -2)


def contiguous(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    return weight if isinstance(weight, QuantizedWeight) else weight.contiguous()


def cat_rows(weights: list) -> torch.Tensor | QuantizedWeight:
    """Weights [out_i, in] (dense or quantised alike) stacked along out."""
    if isinstance(weights[0], QuantizedWeight):
        first = weights[0]
        return QuantizedWeight(
            torch.cat([w.packed for w in weights]),
            torch.cat([w.scales for w in weights]),
            None if first.mins is None else torch.cat([w.mins for w in weights]),
            first.bits,
            first.group_size,
        )
    return torch.cat(weights)


def deinterleave_gate_up(gate_up: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """[..., 2I, H] with gate and up rows interleaved (gate at even rows, up at odd: gpt-oss) ->
    [..., 2I, H] with the gate rows first, the layout `expert_mlp` splits in halves (a copy)."""
    if isinstance(gate_up, QuantizedWeight):
        return gate_up.map_rows(deinterleave_gate_up)
    return torch.cat([gate_up[..., 0::2, :], gate_up[..., 1::2, :]], dim=-2).contiguous()


def load_weights(
    spec: ModelSpec,
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    pack: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ModelWeights:
    """Read every weight of the model into memory as `dtype` (router/bias stay fp32 where needed).

    With `pack` (layers.pack_linear_weight, the fast CPU layout) each projection is packed as soon as it is
    read and routed experts are read one at a time, so loading holds the packed model plus one
    expert's transient copies: peak memory stays near the weights' own bytes."""
    layout = CheckpointLayout(spec, checkpoint)
    embed = layout.embed(dtype)
    layers = []
    for i in range(spec.num_layers):
        if pack is None:
            layers.append(layout.layer(i, dtype))
            continue
        layer = pack_layer(layout.layer(i, dtype, with_experts=False), pack)
        if layer.moe is not None:
            layer.moe.packed_experts = [
                pack_mlp(layout.expert(i, e, dtype), pack) for e in range(spec.num_experts)
            ]
        layers.append(layer)
    lm_head, final_norm = layout.lm_head(dtype, embed), layout.final_norm(dtype)
    checkpoint.close()
    # routers stay as read (small, and DeepSeek computes them in fp32); a tied head is packed apart
    return ModelWeights(embed, layers, final_norm, lm_head if pack is None else pack(lm_head))


def map_tensors(weights, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A copy of a weights container (dataclass, list or tensor) with fn applied to every tensor;
    None fields stay None. Where weights live is the caller's business: this moves them."""
    if isinstance(weights, torch.Tensor):
        return fn(weights)
    if isinstance(weights, (int, float)):  # a constant (gpt-oss's SwiGLU limit, a quantised weight's bits)
        return weights
    if isinstance(weights, list):
        return [map_tensors(w, fn) for w in weights]
    if dataclasses.is_dataclass(weights):
        changes = {
            f.name: map_tensors(getattr(weights, f.name), fn)
            for f in dataclasses.fields(weights)
            if getattr(weights, f.name) is not None
        }
        return dataclasses.replace(weights, **changes)
    raise TypeError(f"not a weights container: {type(weights).__name__}")


def pack_layer(layer: LayerWeights, pack: Callable[[torch.Tensor], torch.Tensor]) -> LayerWeights:
    """`pack` every projection of one layer in place: attention, dense or shared MLPs, experts."""
    a = layer.attention
    for name in ("q", "k", "v", "o", "q_a", "q_b", "kv_a", "kv_b", "in_proj_qkvz", "in_proj_ba", "out"):
        if getattr(a, name, None) is not None:
            setattr(a, name, pack(getattr(a, name)))
    for mlp in (layer.mlp, layer.moe.shared if layer.moe else None):
        if mlp is not None:
            pack_mlp(mlp, pack)
    moe = layer.moe
    if moe is not None and moe.experts_gate_up is not None and moe.experts_down is not None:
        moe.packed_experts = [pack_mlp(moe.expert(e), pack) for e in range(moe.experts_gate_up.shape[0])]
        moe.experts_gate_up = moe.experts_down = None  # the packed copies replace them
    return layer


def pack_mlp(mlp: MLPWeights, pack: Callable[[torch.Tensor], torch.Tensor]) -> MLPWeights:
    mlp.gate_up, mlp.down = pack(mlp.gate_up), pack(mlp.down)
    if mlp.up is not None:
        mlp.up = pack(mlp.up)
    return mlp
