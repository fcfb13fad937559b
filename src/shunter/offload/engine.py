"""The offload engine: Klotski's expert-aware multi-batch pipeline over weights streamed from disk.

A forward over B sequences runs as `num_batches` micro-batches that share one load of every
layer's weights. Per layer: attention micro-batch by micro-batch; the gate micro-batch by
micro-batch, queueing each newly chosen expert for loading at once; then the next layer's block
and predicted hot experts are queued; then the experts run over the tokens of all micro-batches,
those already in memory (hot) first, the rest in the order their loads were queued, each dropped
as soon as its tokens are done. The math is the runtime's own layer functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import Batch, KVCache, output_logits, token_mixer
from shunter.model.layers import (
    add_expert_output,
    add_shared_experts,
    applied_gate_weights,
    expert_mlp,
    group_tokens_by_expert,
    pack_linear_weight,
    rms_norm,
    rope_inverse_frequencies,
    router_scores,
    select_experts,
)
from shunter.model.linear_attention import LinearAttentionState
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, LayerWeights, MLPWeights, pack_layer, pack_mlp
from shunter.offload.device import ComputeDevice
from shunter.offload.disk import DirectReader
from shunter.offload.placement import OffloadPlacement
from shunter.offload.planner import expected_touched_experts
from shunter.offload.prefetcher import CorrelationPrefetcher
from shunter.offload.streamer import WeightStreamer
from shunter.sim.klotski import Prefetch, canonical_prefetch
from shunter.trace.routing_trace import RoutingRecorder

# From this many micro-batches on, a streamed layer block is packed into the CPU's fast layout as
# it loads: packing a Mixtral-like block takes 21 ms on the I/O thread's one thread and saves
# 0.54 ms on each micro-batch's attention (1.01 against 0.47 ms, measured), so it pays from ~40.
PACK_BLOCK_MIN_BATCHES = 40


@dataclass(frozen=True)
class PipelineOptions:
    """The ablation ladder: num_batches=1 + prefetch="layer" + hot_first=False is the simple
    pipeline; Shunter's default is the planner's n, hot-only prefetch, hot-first order. prefetch is
    the simulator's vocabulary (shunter.sim.klotski.Prefetch), so the planner predicts what runs."""

    num_batches: int = 1
    prefetch: Prefetch = "hot"
    hot_first: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefetch", canonical_prefetch(self.prefetch))


def experts_in_flight(spec: ModelSpec, options: PipelineOptions) -> int:
    """How many streamed experts the pipeline may hold at once (the placement reserves room).

    Whole-layer prefetch, or experts taken in id order, may hold a whole layer plus the next
    layer's prefetch. Hot-only prefetch taken in queue order needs only the next layer's K hot
    experts and read-ahead for K cold ones (+1 so one cold read proceeds while all K hot wait):
    the streamer's window then bounds memory however many experts a batch routes to."""
    whole_layer = spec.num_experts + spec.top_k
    if options.prefetch == "layer" or not options.hot_first:
        return whole_layer
    return min(whole_layer, 2 * spec.top_k + 1)


class _RowCache:
    """The KV cache rows [first, last) of one micro-batch; the shared write position is the cache's."""

    def __init__(self, cache: KVCache, first: int, last: int) -> None:
        self.cache, self.first, self.last = cache, first, last

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c, rows = self.cache, slice(self.first, self.last)
        end = c.length + keys.shape[2]
        c.keys[layer][rows, :, c.length : end] = keys
        c.values[layer][rows, :, c.length : end] = values
        return c.keys[layer][rows, :, :end], c.values[layer][rows, :, :end]

    def linear_state(self, layer: int) -> LinearAttentionState:
        return self.cache.linear_state(layer, slice(self.first, self.last))

    def store_linear_state(self, layer: int, state: LinearAttentionState) -> None:
        self.cache.store_linear_state(layer, state, slice(self.first, self.last))


class OffloadedModel:
    """Same interface as InMemoryModel (`forward`, `new_cache`), weights streamed per the placement."""

    def __init__(
        self,
        spec: ModelSpec,
        checkpoint: Checkpoint,
        dtype: torch.dtype,
        placement: OffloadPlacement,
        options: PipelineOptions,
        prefetcher: CorrelationPrefetcher | None = None,
        use_direct_io: bool = True,
        device: ComputeDevice | None = None,
    ) -> None:
        self.spec, self.dtype, self.placement, self.options = spec, dtype, placement, options
        self.device = device = device or ComputeDevice()
        self.reader = DirectReader(use_direct_io)
        resident = CheckpointLayout(spec, checkpoint, fetch=self.reader.read)
        self.embed = device.place(resident.embed(dtype))
        self.final_norm = device.place(resident.final_norm(dtype))
        # resident weights are read once, so they take the prepacked fast layout (bf16 on CPU);
        # streamed ones would pay the reorder on every load and stay plain
        self.lm_head = pack_linear_weight(device.place(resident.lm_head(dtype, self.embed)))
        blocks: dict[int, LayerWeights] = {
            i: pack_layer(device.place(resident.layer(i, dtype, False)), pack_linear_weight)
            for i in sorted(placement.resident_blocks)
        }
        experts: dict[tuple[int, int], MLPWeights] = {
            key: pack_mlp(device.place(resident.expert(key[0], key[1], dtype)), pack_linear_weight)
            for key in sorted(placement.resident_experts)
        }
        window = experts_in_flight(spec, options)
        self.streamer = WeightStreamer(
            spec, checkpoint, dtype, self.reader, blocks, experts,
            None if window >= spec.num_experts + spec.top_k else window,
            device, placement.host_blocks, placement.host_experts,
        )  # fmt: skip
        self.moe_layers = [i for i, moe in enumerate(spec.moe_layers) if moe]
        self.prefetcher = prefetcher or CorrelationPrefetcher(len(self.moe_layers), spec.num_experts)
        inv_freq, self.rope_factor = rope_inverse_frequencies(spec)
        self.inv_freq = inv_freq.to(device.device)
        self._predicted: dict[int, list[int]] = {}
        self._pack_blocks = False  # this forward's: see PACK_BLOCK_MIN_BATCHES

    def new_cache(self, batch: int, max_slots: int) -> KVCache:
        return KVCache(self.spec, batch, max_slots, self.dtype, self.device.device)

    def close(self) -> None:
        self.streamer.close()
        self.reader.close()

    @torch.inference_mode()
    def forward(
        self,
        batch: Batch,
        cache: KVCache | None = None,
        recorder: RoutingRecorder | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V]) in fp32 on the compute device, equal to
        InMemoryModel.forward's."""
        spec, streamer = self.spec, self.streamer
        B, T = batch.tokens.shape
        n = max(1, min(self.options.num_batches, B))
        bounds = [(B * k // n, B * (k + 1) // n) for k in range(n)]
        keep = batch.start_recording(recorder)  # on the host, as the recorder keeps it
        batch = batch.to(self.device.device)
        rotary, mask = batch.attention_inputs(spec, self.inv_freq, self.rope_factor, self.dtype)
        valid = batch.new_valid_rows

        h = F.embedding(batch.tokens, self.embed)
        self._pack_blocks = n >= PACK_BLOCK_MIN_BATCHES
        streamer.request_block(0, self._pack_blocks)
        if spec.moe_layers[0] and self.options.prefetch != "none":
            self._prefetch_moe_layer(0, None, B * T)
        previous_ids: np.ndarray | None = None
        for layer in range(spec.num_layers):
            block = streamer.block(layer)
            for first, last in bounds:
                rows = slice(first, last)
                part_rotary = rotary.rows(rows)
                part_mask = None if mask is None else mask[rows]
                kv = _RowCache(cache, first, last) if cache is not None else None
                attn_in = rms_norm(h[rows], block.attn_norm, spec.rms_norm_eps)
                h[rows] += token_mixer(attn_in, block, spec, layer, part_rotary, part_mask, kv, valid[rows])
            x = rms_norm(h, block.mlp_norm, spec.rms_norm_eps).reshape(B * T, -1)
            if block.moe is None:
                streamer.drop_block(layer)
                self._queue_next(layer, None)
                y = expert_mlp(x, block.mlp)
            else:
                y, previous_ids = self._moe_layer(layer, block, x, bounds, T, previous_ids, recorder, keep)
            h += y.view(B, T, -1)
        if cache is not None:
            cache.advance(T)
        return output_logits(h, self.final_norm, self.lm_head, spec, last_only)

    def _moe_layer(self, layer, block, x, bounds, T, previous_ids, recorder, keep):
        spec, streamer, moe = self.spec, self.streamer, block.moe
        moe_index = self.moe_layers.index(layer)
        # requested before this layer's gate (prefetched or pinned), in the order they were queued
        hot = [e for e in self._requested_before_gate(layer) if streamer.is_requested_expert(layer, e)]
        queued: list[int] = []
        ids_parts, weight_parts = [], []
        for first, last in bounds:  # the gate, micro-batch by micro-batch; loads start at once
            part = x[first * T : last * T]
            ids, gate_weights = select_experts(router_scores(part, moe, spec), moe, spec)
            ids_parts.append(ids)
            weight_parts.append(gate_weights)
            for e in torch.unique(ids).tolist():
                if not streamer.is_requested_expert(layer, e):
                    streamer.request_expert(layer, e)
                    queued.append(e)
        ids, gate_weights = torch.cat(ids_parts), torch.cat(weight_parts)
        ids_np = ids.cpu().numpy()  # .cpu() is the tensor itself on a CPU
        if recorder is not None:
            recorder.record(layer, ids.cpu(), gate_weights.cpu(), keep)
        if layer in self._predicted:
            self.prefetcher.score(self._predicted.pop(layer), ids_np)
        self.prefetcher.observe(moe_index, previous_ids, ids_np)
        streamer.drop_block(layer)
        self._queue_next(layer, ids_np)

        applied = applied_gate_weights(gate_weights, x.dtype, spec)
        groups = {g.expert: g for g in group_tokens_by_expert(ids)}
        for e in hot:  # predicted but unused: the prefetch missed; free its slot before waiting on others
            if e not in groups:
                streamer.drop_expert(layer, e)
        if self.options.hot_first:
            order = [e for e in hot if e in groups] + [e for e in queued if e in groups]
        else:
            order = sorted(groups)
        out = torch.zeros_like(x)
        for e in order:
            add_expert_output(
                out, x, groups[e], streamer.expert(layer, e), applied, spec.gate_on_expert_input
            )
            streamer.drop_expert(layer, e)
        return add_shared_experts(x, out, moe), ids_np

    def _queue_next(self, layer: int, ids: np.ndarray | None) -> None:
        """Queue the next layer's block, then its predicted experts, behind this layer's loads."""
        nxt = layer + 1
        if nxt >= self.spec.num_layers:
            return
        self.streamer.request_block(nxt, self._pack_blocks)
        if self.spec.moe_layers[nxt] and self.options.prefetch != "none":
            self._prefetch_moe_layer(nxt, ids, None if ids is None else ids.shape[0])

    def _requested_before_gate(self, layer: int) -> list[int]:
        """This layer's pinned experts, then its prefetched ones in the order they were queued."""
        pinned = [e for e in range(self.spec.num_experts) if (layer, e) in self.streamer.resident_experts]
        if self.options.prefetch == "layer":
            prefetched = list(range(self.spec.num_experts))
        else:
            prefetched = self._predicted.get(layer, [])
        return list(dict.fromkeys(pinned + prefetched))

    def prefetch_count(self, tokens: int | None) -> int:
        """How many predicted experts hot-only prefetch loads before the gate: the top-k hot ones
        (Klotski), or the whole layer in predicted order when the forward's tokens are expected
        to touch every expert (uniform routing, rounded). Then no prefetch can miss, and reading
        the cold experts while attention runs keeps the I/O thread busy instead of idle until
        the gate names them; the window still bounds what is held."""
        E, K = self.spec.num_experts, self.spec.top_k
        if tokens is None:
            return K
        touched = expected_touched_experts(np.full(E, 1.0 / E), K, tokens)
        return E if round(touched) >= E else K

    def _prefetch_moe_layer(self, layer: int, previous_ids: np.ndarray | None, tokens: int | None) -> None:
        if self.options.prefetch == "layer":
            experts = list(range(self.spec.num_experts))
        else:
            moe_index = self.moe_layers.index(layer)
            experts = self.prefetcher.predict(moe_index, previous_ids, self.prefetch_count(tokens))
            self._predicted[layer] = experts
        for e in experts:
            self.streamer.request_expert(layer, e)
