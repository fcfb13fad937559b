"""Gated DeltaNet: the chunked rule against the token-by-token one, the conv against a hand-slid
window, and a layer's state streaming across forwards as one forward over all tokens.

Oracles: the readable recurrent references (`gated_delta_rule_recurrent`,
`causal_conv1d_reference`) and the same layer run on the whole sequence at once; the layer itself
is checked against transformers in tests/model/test_families.py (qwen3_next).
"""

from __future__ import annotations

import pytest
import torch

from shunter.model.linear_attention import (
    LinearAttentionState,
    causal_conv1d,
    causal_conv1d_reference,
    gated_delta_net,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    l2_normalise,
)
from shunter.model.spec import spec_from_config
from shunter.model.weights import LinearAttentionWeights
from tests.tiny_models import _COMMON, FAMILY_CONFIGS


def _rule_inputs(B: int, T: int, heads: int, dk: int, dv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalise(torch.randn(B, T, heads, dk, generator=g)) * dk**-0.5
    k = l2_normalise(torch.randn(B, T, heads, dk, generator=g))
    v = torch.randn(B, T, heads, dv, generator=g)
    decay = -torch.rand(B, T, heads, generator=g) * 2  # log decay in (-2, 0]
    beta = torch.rand(B, T, heads, generator=g)
    state = torch.randn(B, heads, dk, dv, generator=g) * 0.5
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("T, chunk", [(37, 8), (37, 64), (16, 16), (1, 4)])
def test_chunked_rule_equals_the_token_by_token_rule(T, chunk):
    inputs = _rule_inputs(2, T, 3, 8, 12)
    expected_out, expected_state = gated_delta_rule_recurrent(*inputs)
    out, state = gated_delta_rule_chunked(*inputs, chunk_size=chunk)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-5)


def test_conv_over_a_sequence_equals_the_window_slid_by_hand_and_continues_from_its_state():
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 6, 9, generator=g), torch.randn(6, 4, generator=g)
    state = torch.randn(2, 6, 3, generator=g)
    expected, expected_state = causal_conv1d_reference(x, weight, state)
    out, new_state = causal_conv1d(x, weight, state)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_state, expected_state, rtol=0, atol=0)
    first, middle = causal_conv1d(x[..., :5], weight, state)
    second, last = causal_conv1d(x[..., 5:], weight, middle)
    torch.testing.assert_close(torch.cat([first, second], -1), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(last, new_state, rtol=0, atol=0)


def _tiny_layer():
    spec = spec_from_config({"model_type": "qwen3_next", **_COMMON, **FAMILY_CONFIGS["qwen3_next"]})
    g = torch.Generator().manual_seed(2)
    H, nk, nv = spec.hidden_size, spec.linear_num_key_heads, spec.linear_num_value_heads
    dk, dv = spec.linear_key_head_dim, spec.linear_value_head_dim
    normal = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    weights = LinearAttentionWeights(
        in_proj_qkvz=normal(2 * nk * dk + 2 * nv * dv, H),
        in_proj_ba=normal(2 * nv, H),
        conv=normal(spec.linear_conv_dim, spec.linear_conv_kernel),
        dt_bias=torch.ones(nv),
        A_log=torch.rand(nv, generator=g).log(),
        norm=1 + normal(dv),
        out=normal(H, nv * dv),
    )
    return spec, weights, torch.randn(2, 11, H, generator=g)


def test_prefill_then_decode_carries_the_state_like_one_forward_over_all_tokens():
    """The cache's job: 8 tokens (chunked rule), then 3 one at a time (recurrent rule) from the
    state they left, give the outputs and state of one forward over all 11."""
    spec, weights, x = _tiny_layer()
    fresh = LinearAttentionState.zeros(spec, 2, x.dtype)
    expected, expected_state = gated_delta_net(x, weights, spec, fresh)
    outputs, state = [], fresh
    out, state = gated_delta_net(x[:, :8], weights, spec, state)
    outputs.append(out)
    for t in range(8, 11):
        out, state = gated_delta_net(x[:, t : t + 1], weights, spec, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(state.recurrent, expected_state.recurrent, rtol=0, atol=1e-5)
    torch.testing.assert_close(state.conv, expected_state.conv, rtol=0, atol=1e-5)


def test_left_padding_leaves_the_state_as_if_the_prompt_stood_alone():
    spec, weights, x = _tiny_layer()
    pads = 4
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :pads] = False
    out, state = gated_delta_net(x, weights, spec, LinearAttentionState.zeros(spec, 2, x.dtype), valid)
    alone, alone_state = gated_delta_net(
        x[1:, pads:], weights, spec, LinearAttentionState.zeros(spec, 1, x.dtype)
    )
    torch.testing.assert_close(out[1:, pads:], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(state.recurrent[1:], alone_state.recurrent, rtol=0, atol=1e-5)
    torch.testing.assert_close(state.conv[1:], alone_state.conv, rtol=0, atol=1e-5)
