"""The one cost model: what a transfer, a collective, a compute op and a set of weights cost.

Network (Aurora's big switch): device i has a full-duplex port of bandwidth_bytes_s[i]; the core
never blocks, so flows contend only at ports. Every message pays a fixed latency_s before its
first byte moves. Three ways to run traffic, all built on plan/schedule.py:
  - one flow alone: latency_s + bytes / min(B_src, B_dst)                       (flow_time_s)
  - a matching schedule: round by round, each round latency_s + its longest transfer
    (Schedule.makespan_with_latency_s)                                           (schedule_time_s)
  - concurrent flows: ports shared max-min fairly (plan.schedule.max_min_fair_rates), rates
    recomputed whenever a flow starts or finishes; flows may join at any time    (FluidNetwork)
Compute: FLOPs per token of attention, gate, expert and aggregation from the model's shapes,
divided by the device's speed (peak FLOP/s x efficiency), floored by the time to read the op's
weights from device memory (a roofline), or read off a measured profile.
Memory: bytes of an expert, of the KV cache, of what a placement puts on each device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from shunter.errors import ShunterError
from shunter.plan.schedule import Schedule, max_min_fair_rates, off_diagonal, simulate_baseline

if TYPE_CHECKING:  # shunter.model imports torch; MoEShapes.from_spec only reads a spec's fields
    from shunter.model.spec import ModelSpec

GBIT_S = 1e9 / 8  # bytes/s in one Gbit/s

# ---------------------------------------------------------------------------------------------
# network


@dataclass(frozen=True)
class NetworkModel:
    """latency_s: fixed cost of every message (one flow, or one round of a matching schedule)."""

    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or not math.isfinite(self.latency_s):
            raise ShunterError(f"network latency must be >= 0 seconds, got {self.latency_s!r}")


def flow_time_s(
    num_bytes: float, src_bandwidth_bytes_s: float, dst_bandwidth_bytes_s: float, latency_s: float
) -> float:
    """One flow alone on the switch: latency + bytes at the slower of its two ports."""
    if num_bytes <= 0:
        return 0.0
    return latency_s + num_bytes / min(src_bandwidth_bytes_s, dst_bandwidth_bytes_s)


def schedule_time_s(schedule: Schedule, latency_s: float) -> float:
    """A matching schedule run round by round: sum over rounds of (latency + longest transfer)."""
    return schedule.makespan_with_latency_s(latency_s)


def fair_share_time_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    latency_s: float,
    crowded_port_efficiency: float = 1.0,
) -> float:
    """An all-to-all with every flow started at once and ports shared max-min fairly: all flows
    wait the same latency, then plan.schedule's fluid fair-share simulation runs (a port side
    crossed by n - 1 flows delivering crowded_port_efficiency of its rate, fewer flows more:
    plan.schedule.port_efficiency_by_flows)."""
    matrix = off_diagonal(traffic_bytes)
    if not matrix.any():
        return 0.0
    fluid = simulate_baseline(
        matrix, bandwidth_bytes_s, "fair_share", record=False, crowded_port_efficiency=crowded_port_efficiency
    )
    return latency_s + fluid.makespan_s


def sender_queue_time_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray | float,
    policy: Literal["random_order", "shortest_first"],
    seed: int,
    latency_s: float,
    shared_port_efficiency: float = 1.0,
) -> float:
    """Each sender sends its flows one after another (plan.schedule.sender_queues); each flow
    waits latency_s before it moves, so the longest queue adds one latency per flow. A receiving
    port two or more flows meet at delivers shared_port_efficiency x its bandwidth."""
    matrix = off_diagonal(traffic_bytes)
    if not matrix.any():
        return 0.0
    longest_queue = int((matrix > 0).sum(axis=1).max())
    fluid = simulate_baseline(
        matrix,
        bandwidth_bytes_s,
        policy,
        seed=seed,
        record=False,
        shared_port_efficiency=shared_port_efficiency,
    ).makespan_s
    return fluid + longest_queue * latency_s


def ring_allreduce_flows(
    num_bytes: float, num_devices: int, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src [F], dst [F], bytes [F]) of a ring allreduce of num_bytes on every device: each device
    sends 2 (n-1)/n * num_bytes to its successor (reduce-scatter then all-gather), split over
    `channels` parallel flows (NCCL runs a collective on several channels; with as many channels
    as an all-to-all has flows per port, the two split a shared port evenly under max-min)."""
    if num_devices < 2 or num_bytes <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    src = np.repeat(np.arange(num_devices, dtype=np.int64), channels)
    dst = (src + 1) % num_devices
    per_flow = 2 * (num_devices - 1) / num_devices * num_bytes / channels
    return src, dst, np.full(src.shape[0], per_flow)


def ring_allreduce_time_s(
    num_bytes: float, bandwidth_bytes_s: float, num_devices: int, latency_s: float
) -> float:
    """Closed form on equal ports, alone on the network: 2 (n-1) latencies, 2 (n-1)/n * S / B of data."""
    if num_devices < 2 or num_bytes <= 0:
        return 0.0
    return (
        2 * (num_devices - 1) * latency_s
        + 2 * (num_devices - 1) / num_devices * num_bytes / bandwidth_bytes_s
    )


class FluidNetwork:
    """Flows on a big switch sharing ports max-min fairly; flows may join at any time.

    A flow added at time t is idle until t + latency_s, then moves bytes at its max-min fair rate
    (plan.schedule.max_min_fair_rates over all moving flows), recomputed at every start and finish.
    Each flow carries a tag (the collective it belongs to); `advance` reports tags whose last flow
    finished. Used by the timeline engine; a single all-to-all through it takes exactly
    fair_share_time_s (tested).
    """

    def __init__(self, bandwidth_bytes_s: np.ndarray, latency_s: float = 0.0) -> None:
        self.bandwidth = np.asarray(bandwidth_bytes_s, dtype=np.float64)
        self.latency_s = float(latency_s)
        self.now_s = 0.0
        self._src = np.zeros(0, dtype=np.int64)
        self._dst = np.zeros(0, dtype=np.int64)
        self._left = np.zeros(0)  # bytes still to move
        self._size = np.zeros(0)  # bytes at the start
        self._active_at = np.zeros(0)  # when the flow's first byte may move
        self._tag = np.zeros(0, dtype=np.int64)
        self._rate = np.zeros(0)
        self._rates_valid = False
        self._flows_of_tag: dict[int, int] = {}

    @property
    def busy(self) -> bool:
        return self._src.size > 0

    def add(self, tag: int, src: np.ndarray, dst: np.ndarray, num_bytes: np.ndarray) -> None:
        """Start flows now (they move after the latency). Local (src == dst) and empty flows are dropped."""
        keep = (np.asarray(num_bytes) > 0) & (np.asarray(src) != np.asarray(dst))
        count = int(keep.sum())
        self._flows_of_tag[tag] = self._flows_of_tag.get(tag, 0) + count
        if count == 0:
            return
        self._src = np.concatenate([self._src, np.asarray(src, dtype=np.int64)[keep]])
        self._dst = np.concatenate([self._dst, np.asarray(dst, dtype=np.int64)[keep]])
        self._left = np.concatenate([self._left, np.asarray(num_bytes, dtype=np.float64)[keep]])
        self._size = np.concatenate([self._size, np.asarray(num_bytes, dtype=np.float64)[keep]])
        self._active_at = np.concatenate([self._active_at, np.full(count, self.now_s + self.latency_s)])
        self._tag = np.concatenate([self._tag, np.full(count, tag, dtype=np.int64)])
        self._rates_valid = False

    def flows_of(self, tag: int) -> int:
        """Flows of `tag` not yet finished (0 for a tag whose flows are all done or never existed)."""
        return self._flows_of_tag.get(tag, 0)

    def _rates(self) -> np.ndarray:
        if not self._rates_valid:
            moving = self._active_at <= self.now_s
            self._rate = np.zeros(self._src.size)
            if moving.any():
                self._rate[moving] = max_min_fair_rates(self._src[moving], self._dst[moving], self.bandwidth)
            self._rates_valid = True
        return self._rate

    def next_event_s(self) -> float:
        """The next time a flow starts moving or finishes at the current rates (inf when idle)."""
        if not self.busy:
            return math.inf
        rate = self._rates()
        waiting = self._active_at > self.now_s
        next_start = float(self._active_at[waiting].min()) if waiting.any() else math.inf
        moving = rate > 0
        next_finish = (
            float((self._left[moving] / rate[moving]).min()) + self.now_s if moving.any() else math.inf
        )
        return min(next_start, next_finish)

    def advance(self, until_s: float) -> list[int]:
        """Move bytes up to until_s (which must not pass next_event_s); returns tags that completed."""
        if until_s < self.now_s:
            raise AssertionError("the fluid network cannot go back in time")
        before = self.now_s
        if not self.busy:
            self.now_s = until_s
            return []
        rate = self._rates()
        self._left = self._left - rate * (until_s - before)
        self.now_s = until_s
        # Event times come from these rates, so a finishing flow lands on ~0; allow rounding.
        # (A time tolerance too: a step below the clock's resolution would never be taken.)
        done = (rate > 0) & (
            (self._left <= 1e-9 * self._size) | (self._left <= rate * 1e-12 * max(until_s, 1e-6))
        )
        completed: list[int] = []
        if done.any():
            for tag, count in zip(*np.unique(self._tag[done], return_counts=True), strict=True):
                self._flows_of_tag[int(tag)] -= int(count)
                if self._flows_of_tag[int(tag)] == 0:
                    completed.append(int(tag))
            keep = ~done
            self._src, self._dst, self._left = self._src[keep], self._dst[keep], self._left[keep]
            self._size, self._active_at, self._tag = self._size[keep], self._active_at[keep], self._tag[keep]
            self._rates_valid = False
        if np.any((self._active_at > before) & (self._active_at <= until_s)):
            self._rates_valid = False  # flows past their latency join the sharing
        return completed


# ---------------------------------------------------------------------------------------------
# compute


@dataclass(frozen=True, kw_only=True)
class MoEShapes:
    """The sizes that set an MoE model's costs (element counts; bytes per element separately).

    Attention is grouped-query: num_heads query heads and num_kv_heads key/value heads of head_dim.
    Experts are SwiGLU (gated: 3 matrices hidden x intermediate) or a plain two-matrix MLP.
    Keyword-only, like the presets below; `from_spec` reads them from a model's config.json.
    """

    name: str
    hidden_size: int
    expert_intermediate_size: int
    num_experts: int
    top_k: int
    num_layers: int  # MoE layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_experts: bool = True
    bytes_per_param: int = 2
    bytes_per_activation: int = 2

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        bytes_per_param: int | None = None,
        bytes_per_activation: int | None = None,
        name: str | None = None,
    ) -> MoEShapes:
        """The simulator's shapes of a model read from its config.json (`shunter.model.spec`).

        Bytes per parameter and per activation default to the checkpoint dtype's. num_layers counts
        the MoE layers only: the simulator has no dense layers, norms, embeddings or LM head, and
        no attention biases or sliding window. ShunterError for what the shapes cannot hold:
        multi-head latent attention (DeepSeek) and shared experts (Qwen2-MoE).
        """
        if spec.attention != "gqa":
            raise ShunterError(
                f"{spec.name}: {spec.attention} attention has no MoEShapes (the simulator models "
                "grouped-query attention only)"
            )
        if spec.shared_intermediate_size:
            raise ShunterError(
                f"{spec.name}: shared experts (intermediate size {spec.shared_intermediate_size}) have "
                "no MoEShapes (the simulator models routed experts only)"
            )
        element = spec.dtype_bytes
        return cls(
            name=spec.name if name is None else name,
            hidden_size=spec.hidden_size,
            expert_intermediate_size=spec.expert_intermediate_size,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            num_layers=spec.num_moe_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            gated_experts=True,  # every family shunter.model reads has SwiGLU experts
            bytes_per_param=element if bytes_per_param is None else bytes_per_param,
            bytes_per_activation=element if bytes_per_activation is None else bytes_per_activation,
        )

    @property
    def expert_params(self) -> int:
        return (3 if self.gated_experts else 2) * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.bytes_per_param

    @property
    def expert_flops_per_token(self) -> float:
        return 2.0 * self.expert_params

    @property
    def attention_params(self) -> int:
        """q and o: hidden x (heads * head_dim); k and v: hidden x (kv_heads * head_dim)."""
        return 2 * self.hidden_size * self.head_dim * (self.num_heads + self.num_kv_heads)

    @property
    def attention_bytes(self) -> int:
        return self.attention_params * self.bytes_per_param

    def attention_flops_per_token(self, context_tokens: float) -> float:
        """Projections, plus q.k and attention-weighted v over `context_tokens` earlier positions."""
        return 2.0 * self.attention_params + 4.0 * self.num_heads * self.head_dim * context_tokens

    @property
    def gate_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def gate_bytes(self) -> int:
        return self.gate_params * self.bytes_per_param

    @property
    def gate_flops_per_token(self) -> float:
        return 2.0 * self.gate_params

    @property
    def aggregation_flops_per_token(self) -> float:
        """Weighted sum of the k expert outputs."""
        return 2.0 * self.top_k * self.hidden_size

    @property
    def token_bytes(self) -> int:
        """One token's hidden state on the wire."""
        return self.hidden_size * self.bytes_per_activation

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token at one layer (ModelSpec.kv_bytes_per_token for the same model)."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_activation

    @property
    def weight_bytes(self) -> int:
        """Every MoE layer's attention, gate and experts: all the weights the simulator knows of
        (what an offloaded step streams). Not the whole checkpoint: shunter.offload.model_bytes
        sums a checkpoint's tensors, embeddings, norms and dense layers included."""
        per_layer = self.attention_bytes + self.gate_bytes + self.num_experts * self.expert_bytes
        return self.num_layers * per_layer


# The papers' models. Mixtral-8x7B-v0.1's config.json gives the same (tests/sim/test_cost.py).
MIXTRAL_8X7B = MoEShapes(
    name="Mixtral-8x7B",
    hidden_size=4096,
    expert_intermediate_size=14336,
    num_experts=8,
    top_k=2,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
)
# LIMoE-B (Aurora's models): ViT-B width, plain MLP experts, top-1 routing, 4 MoE layers as Aurora uses.
LIMOE_B = MoEShapes(
    name="LIMoE-B",
    hidden_size=768,
    expert_intermediate_size=3072,
    num_experts=8,
    top_k=1,
    num_layers=4,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    gated_experts=False,
)
# Lina's models are GPT-2 / BERT-Large sized MoE transformers: width 1024, 4x MLP experts, top-2.
LINA_MOE = MoEShapes(
    name="GPT-2-medium MoE (Lina)",
    hidden_size=1024,
    expert_intermediate_size=4096,
    num_experts=16,
    top_k=2,
    num_layers=12,
    num_heads=16,
    num_kv_heads=16,
    head_dim=64,
    gated_experts=False,
)


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
    one token's at one layer: MoEShapes.kv_bytes_per_token in the simulator,
    ModelSpec.kv_bytes_per_token(element_bytes) for the runtime's cache (the offload placement)."""
    return sequences * context_tokens * kv_bytes_per_token * layers
