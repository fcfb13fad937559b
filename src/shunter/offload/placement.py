"""What stays on the compute device, what waits in host RAM, and what streams from disk (Klotski §6.1).

Device tier (--memory): always resident are embeddings, the final norm and LM head. The streaming
working set is reserved next: two layer blocks (the one computing and the next one loading) and
the experts one layer can have in flight (all its experts, plus the next layer's predicted hot
ones), the KV cache and the activations. Whatever budget is left pins whole layer blocks first
(they are needed by every token), then experts, most popular first.

Host tier (--host-memory): of what the device does not hold, experts first, most popular first
(most of a MoE's bytes, each needed by few tokens), then layer blocks. They stream to the device
from RAM instead of disk. On a CPU the device is host RAM, so the host tier only adds room.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shunter.errors import ShunterError
from shunter.model.spec import ModelSpec
from shunter.units import format_bytes


@dataclass(frozen=True)
class OffloadPlacement:
    resident_blocks: frozenset[int]
    resident_experts: frozenset[tuple[int, int]]  # (model layer, expert)
    base_bytes: int
    working_set_bytes: int
    kv_cache_bytes: int
    pinned_bytes: int
    budget_bytes: int
    host_blocks: frozenset[int] = frozenset()
    host_experts: frozenset[tuple[int, int]] = frozenset()
    host_bytes: int = 0  # weights the host tier holds
    host_budget_bytes: int = 0


def plan_placement(
    spec: ModelSpec,
    budget_bytes: int,
    element_bytes: int,
    kv_bytes: int,
    activation_bytes: int,
    expert_popularity: np.ndarray | None = None,
    in_flight_experts: int | None = None,
    host_budget_bytes: int = 0,
    expert_bytes: int | None = None,
) -> OffloadPlacement:
    """Pure function: sizes in, placement out. expert_popularity [num_moe_layers, E] ranks experts
    for pinning (uniform when None); in_flight_experts: streamed experts held at once (the
    pipeline's window; default a whole layer plus the next layer's K); host_budget_bytes: room
    in host RAM for weights the device does not hold; expert_bytes: one routed expert's bytes
    where they are not its parameters times element_bytes (a quantised checkpoint). Raises
    ShunterError naming the minimum when nothing fits."""
    H = spec.hidden_size
    base = (spec.vocab_size * H * (1 if spec.tie_word_embeddings else 2) + H) * element_bytes
    block = [spec.block_parameters(layer) * element_bytes for layer in range(spec.num_layers)]
    expert = spec.expert_parameters() * element_bytes if expert_bytes is None else expert_bytes
    if in_flight_experts is None:  # a whole layer's experts plus the next layer's prefetch
        in_flight_experts = spec.num_experts + spec.top_k
    in_flight_experts = in_flight_experts if spec.num_moe_layers else 0
    working = 2 * max(block) + in_flight_experts * expert + activation_bytes
    minimum = base + working + kv_bytes
    if base + working <= budget_bytes < minimum:
        left = format_bytes(budget_bytes - base - working)
        raise ShunterError(
            f"--memory {format_bytes(budget_bytes)}: the KV cache of this batch needs "
            f"{format_bytes(kv_bytes)} but only {left} is left after the weights in flight "
            f"({format_bytes(base + working)}); run fewer sequences or fewer new tokens, or raise --memory"
        )
    if budget_bytes < minimum:
        raise ShunterError(
            f"--memory {format_bytes(budget_bytes)} is below the minimum this model needs, "
            f"{format_bytes(minimum)} (embeddings and head {format_bytes(base)}, two layer blocks and one "
            f"layer's experts in flight {format_bytes(working)}, KV cache {format_bytes(kv_bytes)})"
        )
    spare = budget_bytes - minimum
    resident_blocks = []
    for layer in range(spec.num_layers):
        if block[layer] <= spare:
            resident_blocks.append(layer)
            spare -= block[layer]
    moe_layers = [layer for layer, moe in enumerate(spec.moe_layers) if moe]
    if expert_popularity is None:
        expert_popularity = np.ones((len(moe_layers), spec.num_experts))
    ranked = sorted(
        (
            (float(expert_popularity[m, e]), layer, e)
            for m, layer in enumerate(moe_layers)
            for e in range(spec.num_experts)
        ),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    resident_experts = []
    for _, layer, e in ranked:
        if expert > spare:
            break
        resident_experts.append((layer, e))
        spare -= expert
    pinned = sum(block[layer] for layer in resident_blocks) + expert * len(resident_experts)
    host_experts, host_blocks, host_spare = [], [], host_budget_bytes
    on_device = set(resident_experts)
    for _, layer, e in ranked:
        if expert > host_spare:
            break
        if (layer, e) not in on_device:
            host_experts.append((layer, e))
            host_spare -= expert
    for layer in range(spec.num_layers):
        if layer not in resident_blocks and block[layer] <= host_spare:
            host_blocks.append(layer)
            host_spare -= block[layer]
    return OffloadPlacement(
        frozenset(resident_blocks),
        frozenset(resident_experts),
        base,
        working,
        kv_bytes,
        pinned,
        budget_bytes,
        frozenset(host_blocks),
        frozenset(host_experts),
        host_budget_bytes - host_spare,
        host_budget_bytes,
    )
