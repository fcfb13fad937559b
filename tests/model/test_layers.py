"""Layer functions and generation, each fast path against its readable reference."""

from __future__ import annotations

import pytest
import torch

from shunter.model import Batch, SamplingParams, generate, layers, load_model
from shunter.model.layers import Rotary, group_tokens_by_expert, routed_experts, routed_experts_reference
from shunter.model.weights import MoEWeights


def test_grouped_experts_equal_the_token_by_token_reference():
    torch.manual_seed(0)
    E, H, I, N, k = 8, 16, 24, 40, 3
    weights = MoEWeights(torch.randn(E, H), torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 4)
    x = torch.randn(N, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    gates = torch.rand(N, k)
    torch.testing.assert_close(
        routed_experts(x, ids, gates, weights), routed_experts_reference(x, ids, gates, weights)
    )


def test_grouping_covers_every_token_choice_exactly_once():
    ids = torch.tensor([[0, 3], [3, 1], [0, 1], [2, 3]])
    groups = group_tokens_by_expert(ids)
    assert [g.expert for g in groups] == [0, 1, 2, 3]
    seen = sorted((int(t), int(s)) for g in groups for t, s in zip(g.token_index, g.slot_index, strict=True))
    assert seen == [(n, s) for n in range(4) for s in range(2)]
    for g in groups:
        assert bool((ids[g.token_index, g.slot_index] == g.expert).all())


@pytest.mark.parametrize("tokens, k, experts", [(1, 2, 8), (3, 2, 4), (40, 3, 8), (100, 2, 64)])
def test_grouping_in_python_equals_grouping_by_sort(monkeypatch, tokens, k, experts):
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    in_python = group_tokens_by_expert(ids)
    monkeypatch.setattr(layers, "PYTHON_GROUPING_MAX_PAIRS", 0)  # the sort path
    by_sort = group_tokens_by_expert(ids)
    assert [g.expert for g in in_python] == [g.expert for g in by_sort]
    for a, b in zip(in_python, by_sort, strict=True):
        assert torch.equal(a.token_index, b.token_index) and torch.equal(a.slot_index, b.slot_index)
        assert a.token_index.dtype == b.token_index.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotation_is_bit_identical_to_the_two_halves_formula(dtype):
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4000, (2, 5), generator=generator)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    rotary = Rotary.at(positions, inv_freq, False, dtype)
    x = torch.randn(2, 4, 5, 64, generator=generator).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    c, s = rotary.cos, rotary.sin
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    assert torch.equal(rotary.apply(x), expected)


def test_batched_generation_equals_each_prompt_alone(tiny_checkpoint):
    """Left padding must not change any sequence's tokens (oracle: the batch-of-one run)."""
    model = load_model(tiny_checkpoint("qwen3_moe")).model
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    together = generate(model, prompts, max_new_tokens=10).tokens
    alone = [generate(model, [p], max_new_tokens=10).tokens[0] for p in prompts]
    assert together == alone


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_checkpoint):
    model = load_model(tiny_checkpoint("mixtral")).model
    run = lambda seed: (
        generate(model, [[1, 2, 3]], 16, SamplingParams(temperature=1.0, top_p=0.9, seed=seed)).tokens
    )
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_tiny_top_p_is_greedy(tiny_checkpoint):
    model = load_model(tiny_checkpoint("mixtral")).model
    greedy = generate(model, [[1, 2, 3]], 12).tokens
    nucleus = generate(model, [[1, 2, 3]], 12, SamplingParams(temperature=0.7, top_p=1e-6, seed=1)).tokens
    assert nucleus == greedy


def test_generation_stops_at_a_stop_token(tiny_checkpoint):
    model = load_model(tiny_checkpoint("mixtral")).model
    free = generate(model, [[1, 2, 3]], 12).tokens[0]
    stop = free[4]
    stopped = generate(model, [[1, 2, 3]], 12, stop_ids=[stop]).tokens[0]
    assert stopped == free[: free.index(stop) + 1]


def test_cached_decode_equals_a_full_recompute(tiny_checkpoint):
    """Logits for the last token via the KV cache equal a forward over the whole sequence."""
    model = load_model(tiny_checkpoint("deepseek_v3")).model
    seq = torch.tensor([[4, 8, 15, 16, 23, 42]])
    full = model.forward(Batch(seq, torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool), 0))
    cache = model.new_cache(1, 6)
    valid = torch.ones(1, 6, dtype=torch.bool)
    model.forward(Batch(seq[:, :5], torch.arange(5)[None], valid[:, :5], 0), cache)
    last = model.forward(Batch(seq[:, 5:], torch.tensor([[5]]), valid, 5), cache)
    torch.testing.assert_close(last[:, 0], full[:, 5], atol=1e-5, rtol=1e-5)


def test_single_query_attention_equals_sdpa():
    """Oracle: torch's scaled_dot_product_attention with the same mask and GQA grouping."""
    import torch.nn.functional as F

    from shunter.model.layers import single_query_attention

    torch.manual_seed(0)
    B, heads, kv_heads, S, d, dv = 3, 8, 2, 11, 16, 12
    q, k, v = torch.randn(B, heads, 1, d), torch.randn(B, kv_heads, S, d), torch.randn(B, kv_heads, S, dv)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[..., -1] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(single_query_attention(q, k, v, mask, 0.3), expected, atol=1e-5, rtol=1e-5)


def test_prepacked_bf16_weights_give_the_same_logits_as_plain_linear(tiny_checkpoint):
    """Oracle: F.linear on the plain weights (the reference beside the oneDNN fast path)."""
    path = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    plain, packed = load_model(path, pack=False).model, load_model(path).model
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 4, 8, 15, 16, 23]])
    batch = Batch(tokens, torch.arange(6).expand(2, 6), torch.ones(2, 6, dtype=torch.bool), 0)
    torch.testing.assert_close(packed.forward(batch), plain.forward(batch), atol=1e-2, rtol=1e-2)
    assert generate(packed, [[1, 2, 3]], 12).tokens == generate(plain, [[1, 2, 3]], 12).tokens
