"""The in-memory executor: every weight in RAM (or on one device), layers run in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shunter.model.layers import (
    MoEResult,
    Rotary,
    attention,
    attention_mask,
    expert_mlp,
    linear,
    moe_block,
    rms_norm,
    with_llama4_positions,
)
from shunter.model.layers import rope_inverse_frequencies as _inv_freq
from shunter.model.linear_attention import LinearAttentionState, linear_attention
from shunter.model.spec import ModelSpec
from shunter.model.weights import LayerWeights, LinearAttentionWeights, ModelWeights
from shunter.trace.routing_trace import RoutingRecorder


class KVCache:
    """Preallocated keys/values for every attention layer: [B, kv_heads, max_slots, d] each; a
    linear-attention layer holds its fixed-size state instead (`linear_states`, per sequence).

    All sequences of a batch share one write position (prompts are left-padded to a common
    length), so `update` writes one slice and `advance` moves the position once per forward.
    """

    def __init__(self, spec: ModelSpec, batch: int, max_slots: int, dtype: torch.dtype, device="cpu") -> None:
        # MLA caches expanded per-head keys and values: more memory, no re-expansion per step.
        kv_heads = spec.num_heads if spec.attention == "mla" else spec.num_kv_heads
        k_dim, v_dim = spec.kv_dims
        linear = [spec.is_linear_attention(i) for i in range(spec.num_layers)]
        self.keys = [
            None if linear[i] else torch.zeros(batch, kv_heads, max_slots, k_dim, dtype=dtype, device=device)
            for i in range(spec.num_layers)
        ]
        self.values = [
            None if linear[i] else torch.zeros(batch, kv_heads, max_slots, v_dim, dtype=dtype, device=device)
            for i in range(spec.num_layers)
        ]
        self.linear_states = [
            LinearAttentionState.zeros(spec, batch, dtype, device) if linear[i] else None
            for i in range(spec.num_layers)
        ]
        self.length = 0
        self.max_slots = max_slots

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + keys.shape[2]
        if end > self.max_slots:
            raise ValueError(f"KV cache holds {self.max_slots} slots, a forward needs {end}")
        self.keys[layer][:, :, self.length : end] = keys
        self.values[layer][:, :, self.length : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def linear_state(self, layer: int, rows: slice = slice(None)) -> LinearAttentionState:
        state = self.linear_states[layer]
        assert state is not None, f"layer {layer} is not a linear-attention layer"
        return LinearAttentionState(state.conv[rows], state.recurrent[rows])

    def store_linear_state(self, layer: int, new: LinearAttentionState, rows: slice = slice(None)) -> None:
        state = self.linear_states[layer]
        assert state is not None, f"layer {layer} is not a linear-attention layer"
        state.conv[rows] = new.conv
        state.recurrent[rows] = new.recurrent


@dataclass
class Batch:
    """One forward's inputs. tokens/positions [B, T]; key_valid [B, S] marks real (non-pad) slots
    up to the end of this forward; start is the first cache slot this forward writes."""

    tokens: torch.Tensor
    positions: torch.Tensor
    key_valid: torch.Tensor
    start: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.tokens.to(device), self.positions.to(device), self.key_valid.to(device), self.start)

    @property
    def new_valid(self) -> torch.Tensor:
        """[B*T] bool: which of this forward's tokens are real."""
        return self.key_valid[:, self.start : self.start + self.tokens.shape[1]].reshape(-1)

    @property
    def new_valid_rows(self) -> torch.Tensor:
        """[B, T] bool: `new_valid` per sequence."""
        return self.key_valid[:, self.start : self.start + self.tokens.shape[1]]

    def attention_inputs(
        self, spec: ModelSpec, inv_freq: torch.Tensor, rope_factor: float, dtype: torch.dtype
    ) -> tuple[Rotary, torch.Tensor | None]:
        """The rotary embedding and attention mask every layer of this forward shares."""
        rotary = Rotary.at(self.positions, inv_freq, spec.rope_interleaved, dtype, rope_factor)
        if spec.family == "llama4_text":
            rotary = with_llama4_positions(rotary, self.key_valid, self.start, self.tokens.shape[1], spec)
        return rotary, attention_mask(self.key_valid, self.start, self.tokens.shape[1], spec.sliding_window)

    def start_recording(self, recorder: RoutingRecorder | None) -> torch.Tensor | None:
        """Record this forward's real tokens; returns the [B*T] mask that drops padding from routing."""
        if recorder is None:
            return None
        keep = self.new_valid
        recorder.record_tokens(self.tokens.reshape(-1), keep)
        return keep


def output_logits(
    h: torch.Tensor, final_norm: torch.Tensor, lm_head: torch.Tensor, spec: ModelSpec, last_only: bool
) -> torch.Tensor:
    """Final norm and LM head on h [B, T, H] -> fp32 logits [B, T, V] (or [B, 1, V] with last_only)."""
    if last_only:
        h = h[:, -1:]
    return linear(rms_norm(h, final_norm, spec.rms_norm_eps), lm_head).float()


MoEObserver = Callable[[int, MoEResult], None]


def token_mixer(
    x: torch.Tensor,
    weights: LayerWeights,
    spec: ModelSpec,
    layer: int,
    rotary: Rotary,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's attention on x [B, T, H] (normed): softmax attention over the KV cache, or
    Gated DeltaNet over the layer's state in the cache; valid [B, T] marks the real tokens."""
    if isinstance(weights.attention, LinearAttentionWeights):
        return linear_attention(x, weights.attention, spec, cache, layer, valid)
    return attention(x, weights.attention, spec, rotary, mask, cache, layer)


def decoder_layer(
    h: torch.Tensor,
    weights: LayerWeights,
    spec: ModelSpec,
    layer: int,
    rotary: Rotary,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    observe_moe: MoEObserver | None = None,
    valid: torch.Tensor | None = None,
    moe_override: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One pre-norm decoder layer on h [B, T, H]: attention then the (sparse or dense) feed-forward.
    `observe_moe(layer, result)` sees each sparse layer's routing (tracing, load-balancing losses).
    valid [B, T] marks real tokens (linear attention keeps padding out of its state); None: all.
    moe_override [B*T, H] -> [B*T, H] computes the sparse feed-forward instead of `moe_block` (the
    expert-parallel block; it records no routing)."""
    attn_in = rms_norm(h, weights.attn_norm, spec.rms_norm_eps)
    h = h + token_mixer(attn_in, weights, spec, layer, rotary, mask, cache, valid)
    x = rms_norm(h, weights.mlp_norm, spec.rms_norm_eps)
    B, T, H = x.shape
    if weights.moe is not None and moe_override is not None:
        y = moe_override(x.reshape(B * T, H)).view(B, T, H)
    elif weights.moe is not None:
        moe = moe_block(x.reshape(B * T, H), weights.moe, spec)
        if observe_moe is not None:
            observe_moe(layer, moe)
        y = moe.output.view(B, T, H)
    else:
        y = expert_mlp(x, weights.mlp)
    return h + y


class InMemoryModel:
    """A model whose weights all live in memory (host RAM, or one GPU's: `device`, where the
    weights already are). `forward` is the whole network on one batch."""

    def __init__(
        self, spec: ModelSpec, weights: ModelWeights, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self.spec, self.weights, self.dtype = spec, weights, dtype
        self.device = torch.device(device)
        inv_freq, self.rope_factor = _inv_freq(spec)
        self.inv_freq = inv_freq.to(self.device)
        # layer -> a function computing that layer's sparse feed-forward instead of its weights
        # (the expert-parallel block of parallel/check.py); empty: every layer runs `moe_block`
        self.moe_overrides: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def new_cache(self, batch: int, max_slots: int) -> KVCache:
        return KVCache(self.spec, batch, max_slots, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        batch: Batch,
        cache: KVCache | None = None,
        recorder: RoutingRecorder | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) in fp32, on the model's device."""
        spec, w = self.spec, self.weights
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        T = batch.tokens.shape[1]
        h = F.embedding(batch.tokens, w.embed)
        rotary, mask = batch.attention_inputs(spec, self.inv_freq, self.rope_factor, self.dtype)
        keep = batch.start_recording(recorder)
        observe = None
        if recorder is not None:
            observe = lambda layer, moe: recorder.record(layer, moe.expert_ids, moe.gate_weights, keep)
        for i, layer_weights in enumerate(w.layers):
            h = decoder_layer(
                h, layer_weights, spec, i, rotary, mask, cache, observe, batch.new_valid_rows,
                self.moe_overrides.get(i),
            )  # fmt: skip
        if cache is not None:
            cache.advance(T)
        return output_logits(h, w.final_norm, w.lm_head, spec, last_only)
