"""Background loading of layer blocks and experts from disk, one I/O thread, first come first served.

The queue order is the schedule: the pipeline requests what it needs soonest first (the cold
experts a gate just chose), then what it needs next (the next layer's block and predicted hot
experts). Reads release the GIL, so they overlap with compute on the main thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from shunter.model.checkpoint import Checkpoint
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, LayerWeights, MLPWeights
from shunter.offload.disk import DirectReader

BlockKey = tuple[str, int]  # ("block", layer)
ExpertKey = tuple[str, int, int]  # ("expert", layer, expert)


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
    ) -> None:
        self.layout = CheckpointLayout(spec, checkpoint, fetch=reader.read)
        self.dtype = dtype
        self.reader = reader
        self.resident_blocks = resident_blocks
        self.resident_experts = resident_experts
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shunter-io")
        self._inflight: dict[tuple, Future] = {}
        self.expert_loads = 0

    def is_requested_expert(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.resident_experts or ("expert", layer, expert) in self._inflight

    def request_block(self, layer: int) -> None:
        key = ("block", layer)
        if layer not in self.resident_blocks and key not in self._inflight:
            self._inflight[key] = self._pool.submit(self.layout.layer, layer, self.dtype, False)

    def request_expert(self, layer: int, expert: int) -> None:
        key = ("expert", layer, expert)
        if (layer, expert) not in self.resident_experts and key not in self._inflight:
            self.expert_loads += 1
            self._inflight[key] = self._pool.submit(self.layout.expert, layer, expert, self.dtype)

    def block(self, layer: int) -> LayerWeights:
        if layer in self.resident_blocks:
            return self.resident_blocks[layer]
        self.request_block(layer)
        return self._inflight[("block", layer)].result()

    def expert(self, layer: int, expert: int) -> MLPWeights:
        if (layer, expert) in self.resident_experts:
            return self.resident_experts[(layer, expert)]
        self.request_expert(layer, expert)
        return self._inflight[("expert", layer, expert)].result()

    def drop_block(self, layer: int) -> None:
        self._inflight.pop(("block", layer), None)

    def drop_expert(self, layer: int, expert: int) -> None:
        self._inflight.pop(("expert", layer, expert), None)

    def drop_all(self) -> None:
        """Wait for queued reads (so no thread writes into freed state) and forget them."""
        for future in list(self._inflight.values()):
            future.exception()
        self._inflight.clear()

    def close(self) -> None:
        self.drop_all()
        self._pool.shutdown(wait=True)
