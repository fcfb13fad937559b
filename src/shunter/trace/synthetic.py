"""Synthetic routing traces: Zipf-skewed expert popularity with layer-to-layer correlation.

Stand-ins for real traces in planner tests and experiments: each layer ranks the experts in its
own random order (popular experts change from layer to layer, as Lina observed) with Zipf weights
rank^-skew; a fraction `correlation` of the tokens follow their previous layer's top expert to a
fixed set of successor experts, so the path a token took predicts where it goes next.
"""

from __future__ import annotations

import numpy as np

from shunter.errors import ShunterError
from shunter.trace.routing_trace import RoutingTrace


def zipf_trace(
    num_layers: int,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    skew: float,
    correlation: float,
    seed: int,
) -> RoutingTrace:
    """A RoutingTrace [num_layers, num_tokens, top_k] drawn from Zipf-skewed popularities.

    Args:
        skew: Zipf exponent (0 = uniform; 1.2 = the most popular expert of 16 gets ~6x the least).
        correlation: probability in [0, 1] that a token's choices at layer l+1 are the successors
            of its top choice at layer l instead of a fresh draw.
        seed: everything is drawn from np.random.default_rng(seed).

    Choices are distinct per token, ordered highest gate first; gate weights are a softmax.
    """
    if num_layers < 1 or num_tokens < 1 or num_experts < 1:
        raise ShunterError("zipf_trace: num_layers, num_tokens and num_experts must be positive")
    if not 1 <= top_k <= num_experts:
        raise ShunterError(f"zipf_trace: top_k must lie in [1, {num_experts}], got {top_k}")
    if skew < 0 or not 0 <= correlation <= 1:
        raise ShunterError("zipf_trace: skew must be >= 0 and correlation in [0, 1]")
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(skew)
    log_popularity = np.empty((num_layers, num_experts))
    for layer in range(num_layers):
        log_popularity[layer, rng.permutation(num_experts)] = np.log(weights / weights.sum())

    expert_ids = np.empty((num_layers, num_tokens, top_k), dtype=np.int32)
    expert_ids[0] = _sample_without_replacement(log_popularity[0], num_tokens, top_k, rng)
    for layer in range(1, num_layers):
        fresh = _sample_without_replacement(log_popularity[layer], num_tokens, top_k, rng)
        # successors[e]: the experts tokens that chose e at the previous layer move on to.
        successors = _sample_without_replacement(log_popularity[layer], num_experts, top_k, rng)
        follows = rng.random(num_tokens) < correlation
        previous_top = expert_ids[layer - 1, :, 0]
        expert_ids[layer] = np.where(follows[:, None], successors[previous_top], fresh)

    logits = np.sort(rng.normal(size=(num_layers, num_tokens, top_k)), axis=-1)[..., ::-1]
    gates = np.exp(logits - logits.max(axis=-1, keepdims=True))
    gates /= gates.sum(axis=-1, keepdims=True)
    return RoutingTrace(
        expert_ids=expert_ids,
        gate_weights=gates.astype(np.float32),
        num_experts=num_experts,
        layer_indices=np.arange(num_layers),
        model=f"zipf(skew={skew:g}, correlation={correlation:g})",
        source=f"synthetic seed={seed}",
    )


def _sample_without_replacement(
    log_probability: np.ndarray, count: int, k: int, rng: np.random.Generator, chunk: int = 4096
) -> np.ndarray:
    """[count, k] int32 draws of k distinct experts each, proportional to exp(log_probability)
    (Gumbel top-k: the k largest of log p + Gumbel noise), `chunk` rows at a time to bound memory."""
    out = np.empty((count, k), dtype=np.int32)
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        keys = log_probability[None, :] + rng.gumbel(size=(rows, log_probability.shape[0]))
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        out[start : start + rows] = np.take_along_axis(top, order, axis=1)
    return out
