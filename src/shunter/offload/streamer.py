"""Background loading of layer blocks and experts from disk, one I/O thread, first come first served.

The queue order is the schedule: the pipeline requests what it needs soonest first (the cold
experts a gate just chose), then what it needs next (the next layer's block and predicted hot
experts). Reads release the GIL, so they overlap with compute on the main thread. With a window, at most
`max_experts_in_flight` streamed experts are held at once: the I/O thread waits for a slot
before reading the next one, and dropping an expert frees its slot (so memory stays bounded
however many experts a batch routes to; the pipeline consumes experts in the order it queued
them, so a waiting read never blocks the expert the compute thread needs).

Tiers: resident weights are on the compute device already; host-tier weights wait in host RAM
(pinned for a GPU) and only cross to the device; the rest is read from disk into reused host
buffers and then crosses. On a CPU "crossing" is nothing: the host buffer is the weight.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch

from shunter.model.checkpoint import Checkpoint
from shunter.model.layers import pack_linear_weight
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, LayerWeights, MLPWeights, map_tensors, pack_layer
from shunter.offload.device import ComputeDevice, Uploaded
from shunter.offload.disk import DirectReader, HostBufferPool

BlockKey = tuple[str, int]  # ("block", layer)
ExpertKey = tuple[str, int, int]  # ("expert", layer, expert)


def streaming_layout(
    spec: ModelSpec, checkpoint: Checkpoint, reader: DirectReader, buffers: HostBufferPool
) -> CheckpointLayout:
    """The checkpoint read as the streamer reads it: O_DIRECT into reused buffers, gate and up
    left apart: joining them copied both, per expert, on the thread that should be reading (the I/O
    thread read 88-94% of the decode with the join and 92-98% without; Mixtral-like, 8 and 128
    sequences, 4 runs each)."""
    fetch = partial(reader.read, allocate=buffers.take)
    return CheckpointLayout(spec, checkpoint, fetch=fetch, join_gate_up=False)


class WeightStreamer:
    """Requests return futures; `get` waits; `drop` forgets a streamed tensor so its memory frees.

    Resident weights (pinned by the placement) are handed in at construction and never dropped.
    """

    def __init__(
        self,
        spec: ModelSpec,
        checkpoint: Checkpoint,
        dtype: torch.dtype,
        reader: DirectReader,
        resident_blocks: dict[int, LayerWeights],
        resident_experts: dict[tuple[int, int], MLPWeights],
        max_experts_in_flight: int | None = None,
        device: ComputeDevice | None = None,
        host_blocks: frozenset[int] = frozenset(),
        host_experts: frozenset[tuple[int, int]] = frozenset(),
    ) -> None:
        """resident_*: weights already on the compute device; host_*: what the host tier holds
        (read here, once)."""
        self.device = device or ComputeDevice()
        self.buffers = HostBufferPool(pin_memory=self.device.pin_memory)
        self.layout = streaming_layout(spec, checkpoint, reader, self.buffers)
        self.dtype = dtype
        self.reader = reader
        self.resident_blocks = resident_blocks
        self.resident_experts = resident_experts
        self.host_blocks = {layer: self.layout.layer(layer, dtype, False) for layer in sorted(host_blocks)}
        self.host_experts = {key: self.layout.expert(*key, dtype) for key in sorted(host_experts)}
        # one intra-op thread for the I/O thread's own copies: torch's thread count is per thread,
        # and the default team would take the compute threads' cores
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="shunter-io", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._inflight: dict[tuple, Future] = {}
        self.expert_loads = 0
        self._slots = threading.Semaphore(max_experts_in_flight) if max_experts_in_flight else None

    def is_requested_expert(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.resident_experts or ("expert", layer, expert) in self._inflight

    def request_block(self, layer: int, pack: bool = False) -> None:
        """pack: reorder its projections into the CPU's fast layout once, on the I/O thread (worth
        it when many micro-batches use the block; on a CPU device only)."""
        key = ("block", layer)
        if layer not in self.resident_blocks and key not in self._inflight:
            self._inflight[key] = self._pool.submit(self._load_block, layer, pack and not self.device.copies)

    def request_expert(self, layer: int, expert: int) -> None:
        key = ("expert", layer, expert)
        if (layer, expert) not in self.resident_experts and key not in self._inflight:
            self.expert_loads += 1
            self._inflight[key] = self._pool.submit(self._load_expert, layer, expert)

    def _load_block(self, layer: int, pack: bool) -> Uploaded[LayerWeights]:
        host = self.host_blocks.get(layer)
        block = host if host is not None else self.layout.layer(layer, self.dtype, False)
        if pack:  # a copy: a host-tier block stays plain for the next forward
            block = pack_layer(map_tensors(block, lambda t: t), pack_linear_weight)
        return self.device.upload(block)

    def _load_expert(self, layer: int, expert: int) -> Uploaded[MLPWeights]:
        if self._slots is not None:
            self._slots.acquire()
        try:
            host = self.host_experts.get((layer, expert))
            return self.device.upload(
                host if host is not None else self.layout.expert(layer, expert, self.dtype)
            )
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    def _release_slot(self, future: Future) -> None:
        if self._slots is not None and future.exception() is None:
            self._slots.release()

    def block(self, layer: int) -> LayerWeights:
        if layer in self.resident_blocks:
            return self.resident_blocks[layer]
        self.request_block(layer)
        return self.device.ready(self._inflight[("block", layer)].result())

    def expert(self, layer: int, expert: int) -> MLPWeights:
        if (layer, expert) in self.resident_experts:
            return self.resident_experts[(layer, expert)]
        self.request_expert(layer, expert)
        return self.device.ready(self._inflight[("expert", layer, expert)].result())

    def drop_block(self, layer: int) -> None:
        self._inflight.pop(("block", layer), None)

    def drop_expert(self, layer: int, expert: int) -> None:
        future = self._inflight.pop(("expert", layer, expert), None)
        # its slot frees when the read ends (a queued read still runs: what a prefetch wastes)
        if future is not None:
            future.add_done_callback(self._release_slot)

    def drop_all(self) -> None:
        """Wait for queued reads (so no thread writes into freed state) and forget them."""
        futures = list(self._inflight.values())
        for key in list(self._inflight):
            if key[0] == "expert":  # frees the slots, so a read waiting for one can finish
                self.drop_expert(key[1], key[2])
        for future in futures:
            future.exception()
        self._inflight.clear()

    def close(self) -> None:
        self.drop_all()
        self._pool.shutdown(wait=True)
