"""Gated DeltaNet linear attention (Qwen3-Next), as functions over explicit weights.

A linear-attention layer keeps, per sequence, a fixed-size state in place of a KV cache: the last
kernel-1 inputs of a causal depthwise conv over q, k, v, and a recurrent matrix S [dk, dv] per
value head that the gated delta rule updates token by token:

    S <- exp(g_t) S;    S <- S + k_t (beta_t (v_t - S^T k_t))^T;    o_t = S^T q_t

(q and k L2-normalised, q scaled by dk^-1/2). `gated_delta_rule_recurrent` is that loop, the
readable reference and the decode path; `gated_delta_rule_chunked` computes the same over chunks
of tokens with a few matmuls each (the prefill path), tested against it.

Shapes: B batch, T new tokens, H hidden, nk/nv key/value heads, dk/dv their head dims, C conv
channels (2 nk dk + nv dv), K conv kernel width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from shunter.model.layers import linear
from shunter.model.spec import ModelSpec
from shunter.model.weights import LinearAttentionWeights

# transformers' (and flash-linear-attention's) epsilon of the q/k L2 norm
L2_NORM_EPS = 1e-6


@dataclass
class LinearAttentionState:
    """What one linear-attention layer carries between forwards, per sequence."""

    conv: torch.Tensor  # [B, C, K-1] the last K-1 conv inputs (compute dtype)
    recurrent: torch.Tensor  # [B, nv, dk, dv] fp32

    @staticmethod
    def zeros(
        spec: ModelSpec, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> LinearAttentionState:
        """A fresh state: no previous tokens (zeros are exactly what the conv and the rule start from)."""
        return LinearAttentionState(
            torch.zeros(batch, spec.linear_conv_dim, spec.linear_conv_kernel - 1, dtype=dtype, device=device),
            torch.zeros(
                batch,
                spec.linear_num_value_heads,
                spec.linear_key_head_dim,
                spec.linear_value_head_dim,
                dtype=torch.float32,
                device=device,
            ),
        )


# -- the causal conv ----------------------------------------------------------------------------
def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of the depthwise causal conv of x [B, C, T] whose left context is conv_state
    [B, C, K-1] (zeros for a fresh sequence). Returns (out [B, C, T], new state [B, C, K-1])."""
    kernel = weight.shape[-1]
    full = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    out = F.conv1d(full, weight.unsqueeze(1), groups=x.shape[1])
    return F.silu(out), full[..., full.shape[-1] - (kernel - 1) :]


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable reference for `causal_conv1d`: one token at a time, the window slid by hand."""
    window = conv_state.to(x.dtype)
    outputs = []
    for t in range(x.shape[-1]):
        full = torch.cat([window, x[..., t : t + 1]], dim=-1)  # [B, C, K]
        outputs.append(F.silu((full * weight).sum(-1)))
        window = full[..., 1:]
    return torch.stack(outputs, dim=-1), window


# -- the gated delta rule -----------------------------------------------------------------------
def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_NORM_EPS)


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule token by token. q, k [B, T, nv, dk] (normalised and scaled), v [B, T, nv, dv],
    g (log decay, <= 0) and beta [B, T, nv], state [B, nv, dk, dv]. Returns (o [B, T, nv, dv] fp32,
    new state fp32)."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    S = state.float()
    outputs = []
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        predicted = (S * k[:, t, :, :, None]).sum(dim=-2)  # S^T k: [B, nv, dv]
        delta = (v[:, t] - predicted) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outputs.append((S * q[:, t, :, :, None]).sum(dim=-2))
    return torch.stack(outputs, dim=1), S


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_delta_rule_recurrent` over chunks of `chunk_size` tokens (same arguments and result).

    Within a chunk, with G_i the cumulative log decay up to token i and D_ij = exp(G_i - G_j) for
    j <= i, the delta rule's writes u (the values corrected by what earlier tokens of the chunk
    already wrote) solve the unit lower-triangular system (I + tril(beta K K^T * D, -1)) u = beta V
    - w S0, where w solves the same system for beta K exp(G): one triangular solve per chunk
    instead of one step per token (the WY/UT form of DeltaNet). Then
        o = (Q exp(G)) S0 + (Q K^T * D) u,     S = exp(G_last) S0 + (K exp(G_last - G))^T u.
    """
    B, T, heads, _ = q.shape
    dv = v.shape[-1]
    pad = (-T) % chunk_size
    # padded tokens have k = v = 0 and g = 0: they write nothing and decay nothing
    q, k, v = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t.float(), (0, 0, 0, pad)) for t in (g, beta))
    n = (T + pad) // chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [B, T', nv, ...] -> [B, nv, n, chunk, ...]
        return t.reshape(B, n, chunk_size, heads, *t.shape[3:]).movedim(3, 1)

    q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))
    G = g.cumsum(dim=-1)  # [B, nv, n, chunk]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # D_ij for j <= i; above the diagonal -inf before exp so no overflow can leak in
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # its strictly lower part; the diagonal is taken as 1
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * G.exp()[..., None], upper=False, unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * decay  # [B, nv, n, chunk, chunk]
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]

    S = state.float()
    outputs = []
    for c in range(n):
        writes = u[:, :, c] - w[:, :, c] @ S  # [B, nv, chunk, dv]
        outputs.append(q_decayed[:, :, c] @ S + within[:, :, c] @ writes)
        S = S * G[:, :, c, -1].exp()[..., None, None] + k_to_end[:, :, c].transpose(-1, -2) @ writes
    o = torch.stack(outputs, dim=2).reshape(B, heads, n * chunk_size, dv)[:, :, :T]
    return o.transpose(1, 2), S


# -- the layer ----------------------------------------------------------------------------------
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., dv] (fp32, cast back before the scale) times silu(gate), as Qwen3-Next's
    RMSNormGated (the norm before the gate)."""
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * F.silu(gate.float())).to(x.dtype)


def gated_delta_net(
    x: torch.Tensor,
    w: LinearAttentionWeights,
    spec: ModelSpec,
    state: LinearAttentionState,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One Gated DeltaNet token mixer on x [B, T, H] (normed), continuing from `state`.

    valid [B, T] bool marks real tokens: padding is zeroed before the projections (as transformers
    does), so with left padding its q, k, v are 0 and the state stays what it was. One token per
    sequence (decode) runs the recurrent rule, more (prefill) the chunked one, as transformers does.
    Returns (y [B, T, H], the new state)."""
    B, T, _ = x.shape
    nk, nv = spec.linear_num_key_heads, spec.linear_num_value_heads
    dk, dv, group = spec.linear_key_head_dim, spec.linear_value_head_dim, nv // nk
    if valid is not None and not bool(valid.all()):
        x = x * valid[..., None].to(x.dtype)
    qkvz = linear(x, w.in_proj_qkvz).view(B, T, nk, 2 * dk + 2 * group * dv)
    q, k, v, z = qkvz.split([dk, dk, group * dv, group * dv], dim=-1)
    b, a = linear(x, w.in_proj_ba).view(B, T, nk, 2 * group).split([group, group], dim=-1)
    mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
    mixed, conv_state = causal_conv1d(mixed.transpose(1, 2), w.conv, state.conv)
    q, k, v = mixed.transpose(1, 2).split([nk * dk, nk * dk, nv * dv], dim=-1)
    # each key head serves `group` consecutive value heads
    q = l2_normalise(q.reshape(B, T, nk, dk).float()).repeat_interleave(group, dim=2) * dk**-0.5
    k = l2_normalise(k.reshape(B, T, nk, dk).float()).repeat_interleave(group, dim=2)
    beta = b.reshape(B, T, nv).sigmoid()
    g = -w.A_log.float().exp() * F.softplus(a.reshape(B, T, nv).float() + w.dt_bias)
    rule = gated_delta_rule_recurrent if T == 1 else gated_delta_rule_chunked
    o, recurrent = rule(q, k, v.reshape(B, T, nv, dv), g, beta, state.recurrent)
    o = gated_rms_norm(o.to(x.dtype), z.reshape(B, T, nv, dv), w.norm, spec.rms_norm_eps)
    return linear(o.reshape(B, T, nv * dv), w.out), LinearAttentionState(conv_state, recurrent)


class LinearStateStore(Protocol):
    def linear_state(self, layer: int) -> LinearAttentionState:
        """The state of `layer` for this forward's sequences."""
        ...

    def store_linear_state(self, layer: int, state: LinearAttentionState) -> None: ...


def linear_attention(
    x: torch.Tensor,
    w: LinearAttentionWeights,
    spec: ModelSpec,
    store: LinearStateStore | None,
    layer: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`gated_delta_net` on x [B, T, H] continuing from the store's state of `layer` and leaving
    the new one there (store None: a fresh sequence, state dropped) -> [B, T, H]."""
    state = (
        store.linear_state(layer)
        if store is not None
        else LinearAttentionState.zeros(spec, x.shape[0], x.dtype, x.device)
    )
    out, state = gated_delta_net(x, w, spec, state, valid)
    if store is not None:
        store.store_linear_state(layer, state)
    return out
