"""Klotski's correlation prefetcher: predict a layer's hot experts from the previous layer's choices."""

from __future__ import annotations

import numpy as np

from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.stats import expert_load, transition_counts


class CorrelationPrefetcher:
    """Counts per MoE layer: first layer expert -> count; later layers previous expert ->
    {current expert -> count} (path length 1). Built from a trace, updated online by `observe`.

    Layers are indexed by position among the MoE layers (0 = first MoE layer).
    """

    def __init__(self, num_moe_layers: int, num_experts: int, trace: RoutingTrace | None = None) -> None:
        self.first = np.zeros(num_experts, dtype=np.int64)
        self.transitions = np.zeros((max(num_moe_layers - 1, 0), num_experts, num_experts), dtype=np.int64)
        if trace is not None:
            self.first += expert_load(trace)[0]
            self.transitions += transition_counts(trace)
        self.hits = 0
        self.predicted = 0

    def predict(self, moe_layer: int, previous_ids: np.ndarray | None, count: int) -> list[int]:
        """The `count` experts expected to be hottest at `moe_layer`, given every token's experts
        at the previous MoE layer (previous_ids [N, k]); ties go to the lower expert id."""
        if moe_layer == 0 or previous_ids is None:
            scores = self.first.astype(np.float64)
        else:
            # every previous choice votes for its successors in proportion to observed frequency
            votes = np.bincount(previous_ids.ravel(), minlength=self.first.shape[0]).astype(np.float64)
            table = self.transitions[moe_layer - 1].astype(np.float64)
            rows = table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)
            scores = votes @ rows
        order = np.lexsort((np.arange(scores.shape[0]), -scores))
        return [int(e) for e in order[:count]]

    def observe(self, moe_layer: int, previous_ids: np.ndarray | None, ids: np.ndarray) -> None:
        """Online update with one forward's choices at `moe_layer` (ids [N, k])."""
        E = self.first.shape[0]
        if moe_layer == 0 or previous_ids is None:
            self.first += np.bincount(ids.ravel(), minlength=E)
            return
        k = ids.shape[1]
        src = np.repeat(previous_ids, k, axis=1).ravel()
        dst = np.tile(ids, (1, previous_ids.shape[1])).ravel()
        self.transitions[moe_layer - 1] += np.bincount(src * E + dst, minlength=E * E).reshape(E, E)

    def score(self, predicted: list[int], ids: np.ndarray) -> None:
        """Count a prediction as a hit for every predicted expert that some token used."""
        used = set(np.unique(ids).tolist())
        self.hits += sum(e in used for e in predicted)
        self.predicted += len(predicted)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.predicted if self.predicted else 0.0
