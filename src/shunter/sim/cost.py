"""The cost model of compute and memory; what transfers and collectives cost is shunter.network.

Compute: FLOPs per token of attention, gate, expert and aggregation from the model's shapes,
divided by the device's speed (peak FLOP/s x efficiency), floored by the time to read the op's
weights from device memory (a roofline), or read off a measured profile.
Memory: bytes of an expert, of the KV cache, of what a placement puts on each device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shunter.errors import ShunterError

# ---------------------------------------------------------------------------------------------
# compute


@dataclass(frozen=True)
class ComputeProfile:
    """Measured op times: for each op name, seconds at a few token counts (linear in between and
    beyond the last two points). Ops: "attention", "gate", "expert", "aggregation"."""

    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, np.ndarray] = field(default_factory=dict)

    def time_s(self, op: str, tokens: np.ndarray) -> np.ndarray:
        x, y = self.tokens[op], self.seconds[op]
        tokens = np.asarray(tokens, dtype=np.float64)
        inside = np.interp(tokens, x, y)
        if x.size >= 2:  # extrapolate beyond the last point along the last segment
            slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
            inside = np.where(tokens > x[-1], y[-1] + slope * (tokens - x[-1]), inside)
        return np.where(tokens > 0, inside, 0.0)


def parse_compute_profile(document: object, source: str) -> ComputeProfile:
    """{"expert": {"tokens": [...], "seconds": [...]}, ...} -> ComputeProfile; errors name the field."""
    if not isinstance(document, dict) or not document:
        raise ShunterError(
            f"{source}: expected an object of ops, e.g. {{'expert': {{'tokens': [...], 'seconds': [...]}}}}"
        )
    tokens, seconds = {}, {}
    for op, entry in document.items():
        if op not in ("attention", "gate", "expert", "aggregation"):
            raise ShunterError(f"{source}: unknown op {op!r} (expected attention, gate, expert, aggregation)")
        if not isinstance(entry, dict) or "tokens" not in entry or "seconds" not in entry:
            raise ShunterError(f"{source}: {op}: expected 'tokens' and 'seconds' lists")
        x = np.asarray(entry["tokens"], dtype=np.float64)
        y = np.asarray(entry["seconds"], dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ShunterError(
                f"{source}: {op}: 'tokens' and 'seconds' must be lists of equal, non-zero length"
            )
        if np.any(np.diff(x) <= 0) or np.any(y < 0) or not np.all(np.isfinite(y)):
            raise ShunterError(f"{source}: {op}: tokens must increase and seconds be finite and >= 0")
        tokens[op], seconds[op] = x, y
    return ComputeProfile(tokens, seconds)


@dataclass(frozen=True)
class ComputeModel:
    """How long compute takes on a device.

    efficiency: fraction of the device's peak FLOP/s that its matmuls reach.
    memory_bandwidth_bytes_s: device memory speed for the roofline floor (an op cannot finish
        before its weights are read once); None: no floor.
    launch_s: fixed overhead per op run (kernel launches).
    profile: measured times that replace the FLOP estimate for the ops it names.
    """

    efficiency: float = 1.0
    memory_bandwidth_bytes_s: float | None = None
    launch_s: float = 0.0
    profile: ComputeProfile | None = None

    def op_time_s(
        self,
        op: str,
        tokens: np.ndarray | float,
        flops_per_token: float,
        weight_bytes: float,
        compute_flop_s: np.ndarray | float,
    ) -> np.ndarray:
        """Seconds for `tokens` tokens through one op on devices of compute_flop_s (broadcasting).
        Zero tokens cost nothing (the op does not run)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if self.profile is not None and op in self.profile.tokens:
            return self.profile.time_s(op, tokens)
        seconds = tokens * flops_per_token / (np.asarray(compute_flop_s) * self.efficiency)
        if self.memory_bandwidth_bytes_s:
            seconds = np.maximum(seconds, weight_bytes / self.memory_bandwidth_bytes_s)
        return np.where(tokens > 0, seconds + self.launch_s, 0.0)


# ---------------------------------------------------------------------------------------------
# memory


def expert_bytes_per_device(shares_per_layer: list[np.ndarray], expert_bytes: float) -> np.ndarray:
    """[n] bytes of expert weights each device holds when every layer's placement (shares [E, n])
    stays resident: one copy per replica."""
    total = None
    for shares in shares_per_layer:
        held = (np.asarray(shares) > 0).sum(axis=0).astype(np.float64) * expert_bytes
        total = held if total is None else total + held
    return np.zeros(0) if total is None else total


def kv_cache_bytes(kv_bytes_per_token: int, sequences: int, context_tokens: int, layers: int) -> int:
    """Keys and values of `sequences` sequences of `context_tokens` tokens at `layers` layers, from
    one token's at one layer: MoEShapes.kv_bytes_per_token in the simulator. The runtime's cache
    (the offload placement) is ModelSpec.cache_bytes: KV at its full-attention layers only, plus
    the fixed-size state of linear-attention layers."""
    return sequences * context_tokens * kv_bytes_per_token * layers
