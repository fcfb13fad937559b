"""Run MoE checkpoints larger than memory: tiered weight store and Klotski's multi-batch pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.spec import ModelSpec, load_spec
from shunter.offload.device import ComputeDevice
from shunter.offload.engine import OffloadedModel, PipelineOptions, experts_in_flight
from shunter.offload.placement import OffloadPlacement, plan_placement
from shunter.offload.prefetcher import CorrelationPrefetcher
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.stats import popularity

__all__ = [
    "ComputeDevice",
    "OffloadPlacement",
    "OffloadedModel",
    "PipelineOptions",
    "load_offloaded",
    "model_bytes",
    "most_sequences_that_fit",
    "offload_placement",
]


def model_bytes(checkpoint: Checkpoint, element_bytes: int) -> int:
    """Bytes of every tensor the checkpoint stores once converted to the compute dtype: what holding
    the whole model takes. Counted from the files, not from shapes (MoEShapes.weight_bytes, the
    simulator's, has no embeddings, norms, dense layers or extra tensors a checkpoint may carry)."""
    return sum(loc.num_bytes // loc.dtype.itemsize * element_bytes for loc in checkpoint.locations.values())


def offload_placement(
    spec: ModelSpec,
    memory_bytes: int,
    element_bytes: int,
    options: PipelineOptions,
    sequences: int,
    max_slots: int,
    expert_popularity: np.ndarray | None = None,
    host_memory_bytes: int = 0,
) -> OffloadPlacement:
    """What load_offloaded places under `memory_bytes` of the compute device (weights + KV cache +
    working buffers) and `host_memory_bytes` of host RAM; ShunterError naming the minimum when it
    cannot fit."""
    kv = spec.cache_bytes(sequences, max_slots, element_bytes)
    activations = (
        sequences * max_slots * spec.hidden_size * 16 * element_bytes + sequences * spec.vocab_size * 4
    )
    return plan_placement(
        spec,
        memory_bytes,
        element_bytes,
        kv,
        activations,
        expert_popularity,
        experts_in_flight(spec, options),
        host_memory_bytes,
    )


def most_sequences_that_fit(
    spec: ModelSpec,
    memory_bytes: int,
    element_bytes: int,
    options: PipelineOptions,
    max_slots: int,
    limit: int,
) -> int:
    """The largest number of sequences in flight (<= limit) whose KV cache and buffers fit beside
    the weights in flight (Klotski's memory constraint on n); 0 when not even one does."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        try:
            offload_placement(spec, memory_bytes, element_bytes, options, middle, max_slots)
            low = middle
        except ShunterError:
            high = middle - 1
    return low


def load_offloaded(
    model_dir: str | Path,
    memory_bytes: int,
    dtype: torch.dtype | None = None,
    options: PipelineOptions | None = None,
    sequences: int = 1,
    max_slots: int = 2048,
    trace: RoutingTrace | None = None,
    use_direct_io: bool = True,
    device: ComputeDevice | torch.device | str = "cpu",
    host_memory_bytes: int = 0,
) -> OffloadedModel:
    """Open a checkpoint for streaming under `memory_bytes` of the compute device (weights + KV
    cache + working buffers), with `host_memory_bytes` of host RAM holding weights the device
    does not (the host tier)."""
    spec = load_spec(model_dir)
    dtype = dtype or spec.torch_dtype
    element = torch.tensor([], dtype=dtype).element_size()
    checkpoint = Checkpoint(model_dir)
    options = options or PipelineOptions()
    expert_popularity = popularity(trace) if trace is not None else None
    placement = offload_placement(
        spec, memory_bytes, element, options, sequences, max_slots, expert_popularity, host_memory_bytes
    )
    moe_layers = sum(spec.moe_layers)
    prefetcher = CorrelationPrefetcher(moe_layers, spec.num_experts, trace)
    if not isinstance(device, ComputeDevice):
        device = ComputeDevice(device)
    return OffloadedModel(spec, checkpoint, dtype, placement, options, prefetcher, use_direct_io, device)
