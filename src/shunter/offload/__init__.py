"""Run MoE checkpoints larger than memory: tiered weight store and Klotski's multi-batch pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from shunter.model.checkpoint import Checkpoint
from shunter.model.spec import load_spec
from shunter.offload.engine import OffloadedModel, PipelineOptions, experts_in_flight
from shunter.offload.placement import OffloadPlacement, kv_cache_bytes, plan_placement
from shunter.offload.prefetcher import CorrelationPrefetcher
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.stats import popularity

__all__ = ["OffloadPlacement", "OffloadedModel", "PipelineOptions", "load_offloaded", "model_bytes"]


def model_bytes(checkpoint: Checkpoint, element_bytes: int) -> int:
    """Bytes of every weight once converted to the compute dtype."""
    return sum(loc.num_bytes // loc.dtype.itemsize * element_bytes for loc in checkpoint.locations.values())


def load_offloaded(
    model_dir: str | Path,
    memory_bytes: int,
    dtype: torch.dtype | None = None,
    options: PipelineOptions | None = None,
    sequences: int = 1,
    max_slots: int = 2048,
    trace: RoutingTrace | None = None,
    use_direct_io: bool = True,
) -> OffloadedModel:
    """Open a checkpoint for streaming under `memory_bytes` (weights + KV cache + working buffers)."""
    spec = load_spec(model_dir)
    dtype = dtype or spec.torch_dtype
    element = torch.tensor([], dtype=dtype).element_size()
    checkpoint = Checkpoint(model_dir)
    kv = kv_cache_bytes(spec, sequences, max_slots, element)
    activations = sequences * max_slots * spec.hidden_size * 16 * element + sequences * spec.vocab_size * 4
    expert_popularity = popularity(trace) if trace is not None else None
    options = options or PipelineOptions()
    placement = plan_placement(
        spec, memory_bytes, element, kv, activations, expert_popularity, experts_in_flight(spec, options)
    )
    moe_layers = sum(spec.moe_layers)
    prefetcher = CorrelationPrefetcher(moe_layers, spec.num_experts, trace)
    return OffloadedModel(spec, checkpoint, dtype, placement, options, prefetcher, use_direct_io)
