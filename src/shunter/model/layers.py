"""The math of an MoE decoder, once, as functions over explicit weights.

One module on purpose: every engine (in memory, offload, expert-parallel, training) calls these
same functions, and splitting attention from routing would only split what is read together.

Shapes: B batch, T new tokens, S cached slots, H hidden, N = B*T flattened tokens,
E experts, k experts per token, I expert intermediate size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from shunter.model import kernels
from shunter.model.quant import QuantizedWeight, quantized_linear
from shunter.model.spec import ModelSpec, yarn_mscale
from shunter.model.weights import AttentionWeights, MLPWeights, MoEWeights

# DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) use the RMSNorm default, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T (+ bias). A weight prepacked by `pack_linear_weight` (oneDNN's
    blocked layout) goes to the oneDNN kernel, a quantised one to `quantized_linear`; a bf16 weight
    times a few tokens to the decode kernel (kernels.linear_bf16: torch's bf16 product is
    compute-bound there on AVX2-only CPUs); any other weight to F.linear, the reference."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    if weight.is_mkldnn:
        if x.dim() == 2 and x.is_contiguous():  # an expert's rows: no reshape, no view (two ops saved)
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    if weight.dtype == torch.bfloat16 and use_bf16_kernel(x.numel() // x.shape[-1], weight):
        out = kernels.linear_bf16(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def use_bf16_kernel(tokens: int, weight: torch.Tensor) -> bool:
    return (
        kernels.BF16_MIN_TOKENS <= tokens <= kernels.MAX_KERNEL_TOKENS
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.shape[1] % 8 == 0
        and kernels.available()
    )


def pack_linear_weight(weight: torch.Tensor, batch_hint: int = 1) -> torch.Tensor:
    """Reorder a bf16 [out, in] weight once into oneDNN's blocked layout. On CPUs with AVX512-BF16
    this makes each product 1.5-3x faster (measured) because F.linear reorders the weight on every
    call; results are bit-identical (tested). Returns the weight unchanged where oneDNN cannot
    (and a quantised weight: its packed bytes are its fast layout)."""
    if not isinstance(weight, torch.Tensor):
        return weight
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
    except (RuntimeError, AttributeError):
        return weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back before the scale (as Llama does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


# -- rotary position embedding ------------------------------------------------------------------
def rope_inverse_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """([rot_dim/2] fp32 inverse frequencies, factor on cos/sin); rot_dim is the head dim (MLA:
    its rope part). Default, linear (positions divided by `factor`) and YaRN scaling."""
    rot_dim = spec.qk_rope_head_dim if spec.attention == "mla" else (spec.rotary_dim or spec.head_dim)
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    if spec.rope_type == "linear":
        return inv_freq / spec.rope_factor, 1.0
    if spec.rope_type == "yarn":
        return _yarn_frequencies(inv_freq, rot_dim, spec)
    if spec.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, spec), 1.0
    return inv_freq, 1.0


def _llama3_frequencies(inv_freq: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths shorter than original/high_freq_factor keep their frequency,
    those longer than original/low_freq_factor are divided by `factor`, a smooth blend between."""
    p, factor = spec.rope_scaling, spec.rope_factor
    original, low, high = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(inv_freq: torch.Tensor, rot_dim: int, spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): high-frequency dims keep their frequency, low-frequency dims are
    interpolated by `factor`, with a linear ramp between; cos/sin get a temperature correction."""
    p, factor, theta = spec.rope_scaling, spec.rope_factor, spec.rope_theta
    original = p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_completing(rotations: float) -> float:
        # the dim index whose wavelength fits `rotations` times into the original context
        return rot_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_completing(beta_fast), dim_completing(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    interpolate = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    scaled = inv_freq * (1 - interpolate) + (inv_freq / factor) * interpolate
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return scaled, float(attention_factor)


@dataclass
class Rotary:
    """cos/sin for the positions of one forward: each [B, 1, T, rot_dim/2]; with Llama 4, the
    other position-dependent inputs of its attention (see `with_llama4_positions`)."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    chunk_mask: torch.Tensor | None = None  # [B, 1, T, S] for chunked-attention layers
    nope_query_scale: torch.Tensor | None = None  # [T] temperature of NoPE layers' queries

    def rows(self, rows: slice) -> Rotary:
        """The inputs of sequences `rows` of the batch (a micro-batch)."""
        chunk_mask = None if self.chunk_mask is None else self.chunk_mask[rows]
        return Rotary(self.cos[rows], self.sin[rows], self.interleaved, chunk_mask, self.nope_query_scale)

    @staticmethod
    def at(
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        interleaved: bool,
        dtype: torch.dtype,
        factor: float = 1.0,
    ) -> Rotary:
        angles = positions[..., None].float() * inv_freq  # [B, T, rot/2]
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return Rotary(cos.to(dtype)[:, None], sin.to(dtype)[:, None], interleaved)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, heads, T, rot_dim]. Interleaved rotates pairs (2i, 2i+1) and returns them
        de-interleaved; queries and keys get the same permutation, so their dot products are unchanged.
        Dims past rot_dim (partial rotary: GLM, MiniMax-M2) pass through unrotated."""
        rot_dim = 2 * self.cos.shape[-1]
        if x.shape[-1] > rot_dim:
            return torch.cat([self.apply(x[..., :rot_dim]), x[..., rot_dim:]], dim=-1)
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)
        # [x1, x2] * [cos, cos] + [x2, x1] * [-sin, sin]: the same products and sums, rounded the
        # same (x1 cos - x2 sin == x1 cos + x2 (-sin) exactly), in 5 ops instead of 8 (tested)
        x1, x2 = x.chunk(2, dim=-1)
        cos_both, signed_sin = self._halves
        return x * cos_both + torch.cat([x2, x1], dim=-1) * signed_sin

    @functools.cached_property
    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([cos, cos], [-sin, sin]) along the last dim, made once per forward (or micro-batch)."""
        return torch.cat([self.cos, self.cos], dim=-1), torch.cat([-self.sin, self.sin], dim=-1)


# -- attention ----------------------------------------------------------------------------------
class KVStore(Protocol):
    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys/values [B, kv_heads, T, d] at the current slot; return all [B, kv_heads, S, d]."""
        ...


def attention(
    x: torch.Tensor,
    w: AttentionWeights,
    spec: ModelSpec,
    rotary: Rotary,
    mask: torch.Tensor | None,
    kv: KVStore | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Self-attention of x [B, T, H] over the cache plus itself; mask [B, 1, T, S] (True = may
    attend), or None for plain causal attention over T fresh tokens."""
    output_gate = None
    if spec.attention == "mla":
        q, k, v = _mla_qkv(x, w, spec, rotary)
    elif spec.family == "llama4_text":
        q, k, v = _llama4_qkv(x, w, spec, rotary, layer)
    else:
        q, k, v, output_gate = _gqa_qkv(x, w, spec, rotary)
    if rotary.chunk_mask is not None and spec.chunked_attention_layers[layer]:
        mask = rotary.chunk_mask
    if kv is not None:
        k, v = kv.update(layer, k, v)
    window = spec.layer_window(layer)
    if window is not None:
        k, v, mask = keys_in_window(k, v, mask, q.shape[2], window)
    if w.sinks is not None:
        out = attention_with_sinks(q, k, v, mask, spec.attention_scale, w.sinks)
    elif q.shape[2] == 1:
        out = single_query_attention(q, k, v, mask, spec.attention_scale)
    else:
        # mask None: a fresh causal prefill without padding, where the kernel can skip masked blocks
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=spec.attention_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    B, _, T, _ = out.shape
    out = out.transpose(1, 2).reshape(B, T, -1)
    if output_gate is not None:  # Qwen3-Next's gated attention
        out = out * torch.sigmoid(output_gate)
    return linear(out, w.o, w.o_bias)


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention for one new token per sequence (decode): q [B, heads, 1, d], k [B, kv_heads, S, d],
    v [B, kv_heads, S, dv], mask [B, 1, 1, S] -> [B, heads, 1, dv].

    Two batched matmuls with the query heads of each KV group stacked as rows: on CPU this is
    about 6x faster than the fused SDPA kernel for a single query, and it never copies the cache
    to repeat KV heads. Equal to `F.scaled_dot_product_attention` (tested). On CPU, bf16 and fp16
    inputs are computed in fp32: torch's reduced-precision batched products of these shapes are
    slower than converting the keys and values first (measured, bf16, 16 query heads over 4 KV
    heads of 64: 51 against 28 us at 16 keys, 487 against 300 us at 4096)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return single_query_attention(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    B, heads, _, d = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = (q.reshape(B, kv_heads, group, d) @ k.transpose(-1, -2)) * scale  # [B, kv_heads, group, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs @ v).reshape(B, heads, 1, v.shape[-1])


def keys_in_window(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, num_new: int, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cached keys/values [B, kv_heads, S, d] a sliding layer's last `num_new` queries can reach
    (slots S - num_new - window + 1 on; a decode step reads `window` slots, not S) and the mask
    [B, 1, T, S'] over them, with the window applied: query slot q sees key slot s if q - s < window."""
    S = k.shape[2]
    first = max(0, S - num_new - window + 1)
    q_slot = torch.arange(S - num_new, S, device=k.device)[:, None]
    k_slot = torch.arange(first, S, device=k.device)[None, :]
    allowed = ((k_slot <= q_slot) & (q_slot - k_slot < window))[None, None]
    mask = allowed.expand(k.shape[0], 1, num_new, S - first) if mask is None else mask[..., first:] & allowed
    return k[:, :, first:], v[:, :, first:], mask


def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """Attention whose softmax denominator also holds exp(sink) of the query's head (gpt-oss): a
    head may attend to nothing. q [B, heads, T, d], k [B, kv_heads, S, d], v [B, kv_heads, S, dv],
    mask [B or 1, 1, T, S] (None: causal, the T queries being the last T slots), sinks [heads]
    -> [B, heads, T, dv]. The query heads of each KV group are stacked as rows, as in
    `single_query_attention`, so the cache is never repeated per head."""
    B, heads, T, d = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = (q.reshape(B, kv_heads, group * T, d) @ k.transpose(-1, -2)) * scale
    scores = scores.view(B, kv_heads, group, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    sink = sinks.view(1, kv_heads, group, 1, 1).expand(B, kv_heads, group, T, 1).to(scores.dtype)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
    out = probs.to(v.dtype).view(B, kv_heads, group * T, S) @ v
    return out.view(B, heads, T, v.shape[-1])


def _gqa_qkv(x: torch.Tensor, w: AttentionWeights, spec: ModelSpec, rotary: Rotary):
    B, T, _ = x.shape
    q, k, v = linear(x, w.q, w.q_bias), linear(x, w.k, w.k_bias), linear(x, w.v, w.v_bias)
    output_gate = None
    if spec.attention_output_gate:  # per head: head_dim query columns, then head_dim gate columns
        q, output_gate = q.view(B, T, spec.num_heads, 2 * spec.head_dim).chunk(2, dim=-1)
        q, output_gate = q.reshape(B, T, -1), output_gate.reshape(B, T, -1)
    if spec.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
        q, k = rms_norm(q, w.q_norm, spec.rms_norm_eps), rms_norm(k, w.k_norm, spec.rms_norm_eps)
    if spec.clip_qkv is not None:
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q = q.view(B, T, spec.num_heads, spec.head_dim)
    k = k.view(B, T, spec.num_kv_heads, spec.head_dim)
    v = v.view(B, T, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm == "per_head":  # Qwen3 normalises each head
        q, k = rms_norm(q, w.q_norm, spec.rms_norm_eps), rms_norm(k, w.k_norm, spec.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
    return rotary.apply(q), rotary.apply(k), v, output_gate


def _llama4_qkv(x: torch.Tensor, w: AttentionWeights, spec: ModelSpec, rotary: Rotary, layer: int):
    """Llama 4: RoPE layers rotate then L2-normalise q and k per head; NoPE layers leave them
    unrotated and scale q by a temperature that grows with the query's slot."""
    B, T, _ = x.shape
    q, k, v = linear(x, w.q, w.q_bias), linear(x, w.k, w.k_bias), linear(x, w.v, w.v_bias)
    q = q.view(B, T, spec.num_heads, spec.head_dim).transpose(1, 2)
    k = k.view(B, T, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
    v = v.view(B, T, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
    if spec.uses_rope(layer):
        q, k = rotary.apply(q), rotary.apply(k)
        if spec.qk_norm == "l2":
            q, k = l2_norm(q, spec.rms_norm_eps), l2_norm(k, spec.rms_norm_eps)
    elif rotary.nope_query_scale is not None:
        q = (q * rotary.nope_query_scale[:, None]).to(q.dtype)
    return q, k, v


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight over the last dim, in fp32 (Llama 4's qk-norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _mla_qkv(x: torch.Tensor, w: AttentionWeights, spec: ModelSpec, rotary: Rotary):
    """Multi-head latent attention (DeepSeek-V2/V3), expanded to per-head keys and values."""
    B, T, _ = x.shape
    heads, nope, rope_dim = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim
    if w.q_a is not None:
        q = linear(rms_norm(linear(x, w.q_a), w.q_a_norm, LATENT_NORM_EPS), w.q_b)
    else:
        q = linear(x, w.q)
    q = q.view(B, T, heads, nope + rope_dim).transpose(1, 2)
    q_nope, q_rot = q.split([nope, rope_dim], dim=-1)
    latent, k_rot = linear(x, w.kv_a).split([spec.kv_lora_rank, rope_dim], dim=-1)
    kv = linear(rms_norm(latent, w.kv_a_norm, LATENT_NORM_EPS), w.kv_b)
    k_nope, v = (
        kv.view(B, T, heads, nope + spec.v_head_dim).transpose(1, 2).split([nope, spec.v_head_dim], -1)
    )
    k_rot = rotary.apply(k_rot.view(B, 1, T, rope_dim)).expand(B, heads, T, rope_dim)
    q = torch.cat([q_nope, rotary.apply(q_rot)], dim=-1)
    k = torch.cat([k_nope, k_rot], dim=-1)
    return q, k, v.contiguous()


def attention_mask(
    key_valid: torch.Tensor, start: int, num_new: int, sliding_window: int | None = None
) -> torch.Tensor | None:
    """[B, 1, T, S] bool: query slot start+t may see key slot s if s <= start+t, the key is a real
    token (key_valid [B, S]) and, with a sliding window, start+t - s < window.

    Each query may always see itself, so a padding query never has an empty row (which would
    make softmax produce NaN); real queries never see padding. Returns None when the mask is
    plain causal (no cache before, no padding, no window in reach), so kernels can use is_causal.
    """
    S = key_valid.shape[1]
    if start == 0 and (sliding_window is None or sliding_window >= num_new) and bool(key_valid.all()):
        return None
    q_slot = torch.arange(start, start + num_new, device=key_valid.device)[:, None]
    k_slot = torch.arange(S, device=key_valid.device)[None, :]
    allowed = (k_slot <= q_slot)[None] & key_valid[:, None, :]
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)[None]
    allowed = allowed | (k_slot == q_slot)[None]
    return allowed[:, None]


def chunked_attention_mask(
    key_valid: torch.Tensor, start: int, num_new: int, chunk_size: int
) -> torch.Tensor:
    """[B, 1, T, S] bool: `attention_mask` restricted to keys in the query's chunk of `chunk_size`
    positions (Llama 4). Chunks count from each sequence's first real token, as transformers'
    chunked mask does for left padding."""
    S = key_valid.shape[1]
    q_slot = torch.arange(start, start + num_new, device=key_valid.device)[None, :, None]  # [1, T, 1]
    k_slot = torch.arange(S, device=key_valid.device)[None, None, :]  # [1, 1, S]
    pads = (key_valid.cumsum(dim=-1) == 0).sum(dim=-1)[:, None, None]  # [B, 1, 1] leading padding
    same_chunk = (q_slot - pads).div(chunk_size, rounding_mode="floor") == (k_slot - pads).div(
        chunk_size, rounding_mode="floor"
    )
    allowed = (k_slot <= q_slot) & key_valid[:, None, :] & same_chunk  # [B, T, S]
    return (allowed | (k_slot == q_slot))[:, None]


def with_llama4_positions(
    rotary: Rotary, key_valid: torch.Tensor, start: int, num_new: int, spec: ModelSpec
) -> Rotary:
    """`rotary` with Llama 4's chunk mask and NoPE query temperature for one forward writing
    slots [start, start + num_new). The temperature follows the cache slot, as transformers'
    does (it counts a left-padded sequence's padding)."""
    if spec.attention_chunk_size:
        rotary.chunk_mask = chunked_attention_mask(key_valid, start, num_new, spec.attention_chunk_size)
    if spec.nope_temperature_floor:
        slots = torch.arange(start, start + num_new, dtype=torch.float32)
        scale = torch.log1p(torch.floor((slots + 1.0) / spec.nope_temperature_floor))
        rotary.nope_query_scale = (scale * spec.nope_temperature_scale + 1.0).to(key_valid.device)
    return rotary


# -- routing and experts ------------------------------------------------------------------------
def router_scores(x: torch.Tensor, w: MoEWeights, spec: ModelSpec) -> torch.Tensor:
    """Per-expert router scores for x [N, H] -> [N, E] fp32 (softmax probabilities or sigmoids)."""
    if spec.router_in_fp32:
        logits = F.linear(x.float(), w.router.float())
    else:
        logits = F.linear(x, w.router, w.router_bias).float()
    return logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()


def route(x: torch.Tensor, w: MoEWeights, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts for x [N, H]. Returns (expert_ids [N, k] int64, gate_weights [N, k] fp32),
    each row sorted by the selection score, highest first."""
    return select_experts(router_scores(x, w, spec), w, spec)


def select_experts(scores: torch.Tensor, w: MoEWeights, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection from router scores [N, E] (group-limited and bias-corrected where the family is)."""
    choice = scores if w.correction_bias is None else scores + w.correction_bias
    if spec.topk_method != "greedy":
        N, G = choice.shape[0], spec.n_group
        grouped = choice.view(N, G, -1)
        if spec.topk_method == "group_limited":
            group_scores = grouped.max(dim=-1).values
        else:  # noaux_tc: a group is worth the sum of its two best experts
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        top_groups = group_scores.topk(spec.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
    expert_ids = choice.topk(spec.top_k, dim=-1).indices
    gate_weights = scores.gather(1, expert_ids)
    if spec.norm_topk_prob:
        gate_weights = gate_weights / (gate_weights.sum(dim=-1, keepdim=True) + 1e-20)
    if spec.routed_scaling_factor != 1.0:
        gate_weights = gate_weights * spec.routed_scaling_factor
    return expert_ids, gate_weights


def expert_mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """SwiGLU MLP: down(silu(gate x) * up x) for x [n, H]; with `swiglu_limit` (gpt-oss) the
    clamped form `clamped_swiglu`, and biases where the weights carry them."""
    if w.up is None:
        gate, up = linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    else:
        assert w.gate_up_bias is None, "a biased gate/up is stored joined"
        gate, up = linear(x, w.gate_up), linear(x, w.up)
    if w.swiglu_limit is not None:
        hidden = clamped_swiglu(gate, up, w.swiglu_limit, w.swiglu_alpha)
    else:
        hidden = F.silu(gate) * up
    return linear(hidden, w.down, w.down_bias)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's gated activation: gate clamped above at `limit`, up to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@dataclass
class ExpertGroup:
    """The tokens routed to one expert: rows of x and which of their k slots chose it."""

    expert: int
    token_index: torch.Tensor  # [n] int64 rows of x
    slot_index: torch.Tensor  # [n] int64 in [0, k)


# Up to this many (token, choice) pairs are grouped in Python from one host copy of the ids: at
# decode the sort below is a dozen torch ops for a handful of pairs.
PYTHON_GROUPING_MAX_PAIRS = 256


def group_tokens_by_expert(expert_ids: torch.Tensor) -> list[ExpertGroup]:
    """Group token rows by chosen expert with one sort (instead of one scan per expert): groups in
    expert order, each group's rows in (token, choice) order."""
    k = expert_ids.shape[1]
    if expert_ids.numel() <= PYTHON_GROUPING_MAX_PAIRS:
        return _group_in_python(expert_ids.tolist(), k, expert_ids.device)
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    groups = []
    for expert, rows in zip(experts.tolist(), order.split(counts.tolist()), strict=True):
        groups.append(ExpertGroup(expert, rows // k, rows % k))
    return groups


def _group_in_python(ids: list[list[int]], k: int, device: torch.device) -> list[ExpertGroup]:
    """group_tokens_by_expert for few pairs: the same groups, in the same order (tested)."""
    rows: dict[int, tuple[list[int], list[int]]] = {}
    for token, chosen in enumerate(ids):
        for slot, expert in enumerate(chosen):
            tokens, slots = rows.setdefault(expert, ([], []))
            tokens.append(token)
            slots.append(slot)
    return [
        ExpertGroup(
            expert,
            torch.tensor(rows[expert][0], dtype=torch.int64, device=device),
            torch.tensor(rows[expert][1], dtype=torch.int64, device=device),
        )
        for expert in sorted(rows)
    ]


def routed_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_weights: torch.Tensor,
    weights: MoEWeights,
    gate_on_input: bool = False,
) -> torch.Tensor:
    """Sum over each token's experts of gate weight * expert(x) (with gate_on_input, Llama 4's
    expert(gate weight * x)); x [N, H] -> [N, H]."""
    out = torch.zeros_like(x)
    for g in group_tokens_by_expert(expert_ids):
        add_expert_output(out, x, g, weights.expert(g.expert), gate_weights, gate_on_input)
    return out


def add_expert_output(
    out: torch.Tensor,
    x: torch.Tensor,
    group: ExpertGroup,
    expert: MLPWeights,
    gate_weights: torch.Tensor,
    gate_on_input: bool = False,
) -> None:
    """out[tokens] += gate weight * expert(x[tokens]) for the tokens of one expert group (in place);
    with gate_on_input, out[tokens] += expert(gate weight * x[tokens])."""
    rows, gate_weights = gated_expert_inputs(
        x, group.token_index, group.slot_index, gate_weights, gate_on_input
    )
    add_weighted_rows(out, expert_mlp(rows, expert), group.token_index, group.slot_index, gate_weights)


def gated_expert_inputs(
    x: torch.Tensor,
    token_index: torch.Tensor,
    slot_index: torch.Tensor,
    gate_weights: torch.Tensor,
    gate_on_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows x[token_index] [R, H] an expert computes on, the gate weights [N, k] its outputs are
    summed with). Llama 4 scales the input by the gate weight and sums outputs as they are."""
    rows = x[token_index]
    if not gate_on_input:
        return rows, gate_weights
    rows = (rows * gate_weights[token_index, slot_index, None]).to(x.dtype)
    return rows, torch.ones_like(gate_weights)


def add_weighted_rows(
    out: torch.Tensor,
    y: torch.Tensor,
    token_index: torch.Tensor,
    slot_index: torch.Tensor,
    gate_weights: torch.Tensor,
) -> None:
    """out[token_index[r]] += gate_weights[token_index[r], slot_index[r]] * y[r] (in place).

    y [R, H]: expert outputs, one row per (token, choice) pair, wherever they were computed."""
    out.index_add_(0, token_index, (y * gate_weights[token_index, slot_index, None]).to(out.dtype))


def applied_gate_weights(gate_weights: torch.Tensor, dtype: torch.dtype, spec: ModelSpec) -> torch.Tensor:
    """The gate weights as the family multiplies them: Qwen/OLMoE round them to the model dtype."""
    return gate_weights.to(dtype) if spec.gate_weights_in_model_dtype else gate_weights


def routed_experts_reference(
    x: torch.Tensor, expert_ids: torch.Tensor, gate_weights: torch.Tensor, weights: MoEWeights
) -> torch.Tensor:
    """Readable reference for `routed_experts`: one token at a time, one expert at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for slot in range(expert_ids.shape[1]):
            e = int(expert_ids[n, slot])
            y = expert_mlp(x[n : n + 1], weights.expert(e)) * gate_weights[n, slot]
            out[n] += y[0].to(x.dtype)
    return out


@dataclass
class MoEResult:
    output: torch.Tensor  # [N, H]
    expert_ids: torch.Tensor  # [N, k]
    gate_weights: torch.Tensor  # [N, k] fp32
    scores: torch.Tensor  # [N, E] fp32 router scores, for load-balancing losses


def moe_block(x: torch.Tensor, w: MoEWeights, spec: ModelSpec) -> MoEResult:
    """The sparse feed-forward for x [N, H]: routed experts plus shared experts."""
    scores = router_scores(x, w, spec)
    expert_ids, gate_weights = select_experts(scores, w, spec)
    applied = applied_gate_weights(gate_weights, x.dtype, spec)
    routed = routed_experts(x, expert_ids, applied, w, spec.gate_on_expert_input)
    out = add_shared_experts(x, routed, w)
    return MoEResult(out, expert_ids, gate_weights, scores)


def add_shared_experts(x: torch.Tensor, routed: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    """routed [N, H] plus the shared experts' output on x [N, H] (gated by sigmoid in Qwen2-MoE)."""
    if w.shared is None:
        return routed
    shared = expert_mlp(x, w.shared)
    if w.shared_gate is not None:
        shared = torch.sigmoid(F.linear(x, w.shared_gate)) * shared
    return routed + shared
