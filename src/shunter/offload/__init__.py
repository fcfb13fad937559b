"""Run MoE checkpoints larger than memory: tiered weight store and Klotski's multi-batch pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.quant import quantized_tensor_names
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.weights import CheckpointLayout
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
    expert_bytes: int | None = None,
) -> OffloadPlacement:
    """What load_offloaded places under `memory_bytes` of the compute device (weights + KV cache +
    working buffers) and `host_memory_bytes` of host RAM; ShunterError naming the minimum when it
    cannot fit. expert_bytes: one routed expert's bytes, where quantised (`quantized_expert_bytes`)."""
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
        expert_bytes,
    )


def quantized_expert_bytes(spec: ModelSpec, checkpoint: Checkpoint) -> int | None:
    """One routed expert's bytes in a quantised checkpoint (its packed gate, up and down: what
    streaming it reads and holding it takes), or None where the experts are not quantised."""
    layer = next((i for i, moe in enumerate(spec.moe_layers) if moe), None)
    if layer is None:
        return None
    layout = CheckpointLayout(spec, checkpoint)
    moe = layout.moe_prefix(layer)
    if spec.family in ("gpt_oss", "llama4_text") or layout.fused_experts(layer):
        names = [moe + "experts.gate_up_proj", moe + "experts.down_proj"]
        stacked = spec.num_experts
    else:
        names = list(layout.expert_names(layer, 0))
        stacked = 1
    parts = [part for name in names for part in quantized_tensor_names(name) if part in checkpoint]
    if not parts:
        return None
    return sum(checkpoint.location(part).num_bytes for part in parts) // stacked


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
        spec,
        memory_bytes,
        element,
        options,
        sequences,
        max_slots,
        expert_popularity,
        host_memory_bytes,
        quantized_expert_bytes(spec, checkpoint),
    )
    moe_layers = sum(spec.moe_layers)
    prefetcher = CorrelationPrefetcher(moe_layers, spec.num_experts, trace)
    if not isinstance(device, ComputeDevice):
        device = ComputeDevice(device)
    return OffloadedModel(spec, checkpoint, dtype, placement, options, prefetcher, use_direct_io, device)
