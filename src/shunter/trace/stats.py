"""Statistics of a RoutingTrace: expert load, skew, and layer-to-layer transitions."""

from __future__ import annotations

import numpy as np

from shunter.trace.routing_trace import RoutingTrace


def expert_load(trace: RoutingTrace) -> np.ndarray:
    """[L, E] int64: how many (token, choice) pairs went to each expert at each MoE layer."""
    L, E = trace.num_layers, trace.num_experts
    load = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        load[layer] = np.bincount(trace.expert_ids[layer].ravel(), minlength=E)
    return load


def popularity(trace: RoutingTrace) -> np.ndarray:
    """[L, E] float64: each expert's share of the layer's routed (token, choice) pairs; rows sum to 1."""
    load = expert_load(trace).astype(np.float64)
    return load / np.maximum(load.sum(axis=1, keepdims=True), 1.0)


def load_skew(trace: RoutingTrace) -> np.ndarray:
    """[L] max/min expert load per layer (inf when some expert received nothing)."""
    load = expert_load(trace).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(load.min(axis=1) > 0, load.max(axis=1) / np.maximum(load.min(axis=1), 1), np.inf)


def transition_counts(trace: RoutingTrace) -> np.ndarray:
    """[L-1, E, E] int64: counts[l, a, b] = number of (token, choice at l, choice at l+1) with
    expert a at layer l and expert b at layer l+1 (all k x k pairs of each token)."""
    L, _, k = trace.expert_ids.shape
    E = trace.num_experts
    counts = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
    for layer in range(L - 1):
        src = np.repeat(trace.expert_ids[layer], k, axis=1).ravel()
        dst = np.tile(trace.expert_ids[layer + 1], (1, k)).ravel()
        counts[layer] = np.bincount(src * E + dst, minlength=E * E).reshape(E, E)
    return counts


def successor_hit_rate(trace: RoutingTrace, shuffle_seed: int | None = None) -> np.ndarray:
    """[L-1] how often a token that chose expert e at layer l chooses, at layer l+1, one of e's
    top-k successors (the k experts that most often follow e), with successors learned on the
    first half of the tokens and measured on the second half.

    With `shuffle_seed`, each layer's tokens are permuted independently first: the control, where
    layer l+1 keeps its popularity but loses any link to layer l, so what remains is chance.
    """
    ids = trace.expert_ids.astype(np.int64)
    L, N, k = ids.shape
    E = trace.num_experts
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        ids = np.stack([ids[layer][rng.permutation(N)] for layer in range(L)])
    half = N // 2
    learn = RoutingTrace(ids[:, :half], np.zeros((L, half, k), np.float32), E, trace.layer_indices)
    counts = transition_counts(learn)  # [L-1, E, E]
    rates = np.zeros(max(L - 1, 0))
    for layer in range(L - 1):
        successors = np.argsort(-counts[layer], axis=1, kind="stable")[:, :k]  # [E, k]
        is_successor = np.zeros((E, E), dtype=bool)
        np.put_along_axis(is_successor, successors, True, axis=1)
        now, nxt = ids[layer, half:], ids[layer + 1, half:]  # [M, k] each
        # hit[m, i] = any_j is_successor[now[m, i], nxt[m, j]]
        hits = is_successor[now[:, :, None], nxt[:, None, :]].any(axis=2)
        rates[layer] = hits.mean()
    return rates


def transition_mutual_information(trace: RoutingTrace, shuffle_seed: int | None = None) -> np.ndarray:
    """[L-1] mutual information in bits between a token's expert at layer l and at layer l+1,
    from the joint distribution of all k x k (choice at l, choice at l+1) pairs. 0 means layer
    l+1's choice says nothing about layer l's; `shuffle_seed` gives the shuffled control."""
    ids = trace.expert_ids
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        ids = np.stack([layer_ids[rng.permutation(ids.shape[1])] for layer_ids in ids])
    shuffled = RoutingTrace(ids, np.zeros(ids.shape, np.float32), trace.num_experts, trace.layer_indices)
    out = []
    for counts in transition_counts(shuffled).astype(np.float64):
        joint = counts / max(counts.sum(), 1.0)
        outer = joint.sum(axis=1, keepdims=True) @ joint.sum(axis=0, keepdims=True)
        nonzero = joint > 0
        out.append(float((joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])).sum()))
    return np.array(out)
