"""Klotski's offload pipeline: n batches share one load of each layer's weights (klotski.md).
One room: the cost model, its planner search and the reproduction's figures share one timeline.

The cost model is a pure function over explicit per-layer times, so the offload engine's planner
and the simulator use the same one:

    klotski_step_time(times: PipelineTimes, num_batches, options) -> PipelineResult
    smallest_bubble_free_batches(times, num_hot_experts) -> n (klotski.md §7, inequalities (4)-(7))

One step is one forward of all n batches through all layers (a decode step, or the prefill).
The accelerator has one compute stream; weights and KV cross one host->device link (PCIe) as
transfers on separate streams that share the link max-min fairly (a two-port
network.fluid.FluidNetwork: port 0 the host, port 1 the device, full duplex so KV stores do not
slow loads). Per layer l:
- compute order: attention of batches 0..n-1, gates of batches 0..n-1, then the expert layer —
  by batch (each batch runs its experts; "simple"/FlexGen order) or hot experts first over all n
  batches, then cold experts in the order their transfers were issued (Klotski's reorder);
- weight stream: attention weights A_l, gate G_l, then either every expert of the layer
  (prefetch "layer": the expert layer starts when all of it is in), only the K predicted hot
  experts ("hot"), or none ("none"); the experts not prefetched go on their own stream once batch
  0's gate has run. Layer l+1's weights start after layer l's last expert transfer and once layer
  l's first attention ran (at most two layers in flight);
- KV stream: batch k's KV for layer l after attention(l, k-1) (one batch ahead); KV stores of
  attention outputs go device->host.
prefetch_accuracy p: a prefetched hot expert is used by some token with probability p; the
expected wasted transfer (1 - p) * K * tIO_E follows the hot experts on the weight stream.

One room on purpose (a little over 450 lines): the step timeline and the bubble-free inequalities
are two readings of the same per-layer times, and a change to one must be checked against the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shunter.shapes import MoEShapes
from shunter.sim.cost import kv_cache_bytes
from shunter.sim.timeline import Collective, Compute, Op, TimelineOptions, run_timeline

# What of a layer's experts is loaded before its gate has run, in the simulator and the offload
# engine alike: nothing, the K predicted hot experts, or every expert of the layer.
Prefetch = Literal["none", "hot", "layer"]
PREFETCH_CHOICES: tuple[Prefetch, ...] = ("none", "hot", "layer")
# The simulator's first spellings, still accepted (sim/reproduce.py, older scripts).
PREFETCH_ALIASES: dict[str, Prefetch] = {"hot_only": "hot", "whole_layer": "layer"}
ExpertOrder = Literal["by_batch", "hot_first"]


def canonical_prefetch(prefetch: str) -> Prefetch:
    """`prefetch` in the one vocabulary (PREFETCH_CHOICES), aliases mapped; ValueError otherwise."""
    prefetch = PREFETCH_ALIASES.get(prefetch, prefetch)
    if prefetch not in PREFETCH_CHOICES:
        choices = ", ".join(PREFETCH_CHOICES + tuple(PREFETCH_ALIASES))
        raise ValueError(f"prefetch {prefetch!r} is not one of {choices}")
    return prefetch


@dataclass(frozen=True)
class PipelineTimes:
    """Per-layer times of one offloaded MoE block on one accelerator (seconds; every layer alike).

    Compute times are for ONE batch, with its weights and KV already on the device:
      attention_compute_s: tc_A (attention and its norm); gate_compute_s: tc_G;
      expert_tokens_per_batch [E]: (token, choice) pairs one batch routes to each expert;
      expert_compute_s_per_token: marginal expert time per routed token;
      expert_min_compute_s: the floor of one expert run (its weights read from device memory once).
    Transfers, host -> device on the shared link, alone on it:
      attention_transfer_s: tIO_A; gate_transfer_s: tIO_G; expert_transfer_s: tIO_E;
      kv_load_s: one batch's KV cache of one layer (0: the KV cache lives on the device);
      kv_store_s: what one batch's attention writes back, device -> host (0: kept on the device).
    num_layers: L.
    """

    attention_compute_s: float
    gate_compute_s: float
    expert_tokens_per_batch: np.ndarray
    expert_compute_s_per_token: float
    expert_min_compute_s: float
    attention_transfer_s: float
    gate_transfer_s: float
    expert_transfer_s: float
    num_layers: int
    kv_load_s: float = 0.0
    kv_store_s: float = 0.0

    @property
    def num_experts(self) -> int:
        return int(np.asarray(self.expert_tokens_per_batch).shape[0])

    def expert_run_s(self, tokens: float) -> float:
        """One expert over `tokens` routed tokens: 0 when none, else max(marginal, floor)."""
        if tokens <= 0:
            return 0.0
        return max(tokens * self.expert_compute_s_per_token, self.expert_min_compute_s)

    def hot_experts(self, count: int) -> np.ndarray:
        """The `count` experts with the most tokens (ties: lower id), i.e. a perfect prediction."""
        tokens = np.asarray(self.expert_tokens_per_batch, dtype=np.float64)
        return np.argsort(-tokens, kind="stable")[:count]

    def hot_and_cold(self, count: int) -> tuple[list[int], list[int]]:
        """(hot, cold): the `count` hot experts that get tokens, then every other expert with tokens."""
        tokens = np.asarray(self.expert_tokens_per_batch, dtype=np.float64)
        hot = [int(e) for e in self.hot_experts(min(count, self.num_experts)) if tokens[e] > 0]
        cold = [int(e) for e in np.flatnonzero(tokens > 0) if int(e) not in hot]
        return hot, cold

    def pure_compute_s(self, num_batches: int, expert_order: ExpertOrder = "hot_first") -> float:
        """Every compute op of a step back to back: what the step takes with free transfers."""
        tokens = np.asarray(self.expert_tokens_per_batch, dtype=np.float64)
        if expert_order == "hot_first":
            experts = sum(self.expert_run_s(num_batches * t) for t in tokens)
        else:
            experts = num_batches * sum(self.expert_run_s(t) for t in tokens)
        per_layer = num_batches * (self.attention_compute_s + self.gate_compute_s) + experts
        return self.num_layers * per_layer


@dataclass(frozen=True)
class PipelineOptions:
    """prefetch, expert_order: see the module docstring (prefetch also takes PREFETCH_ALIASES).
    num_hot_experts: K (Mixtral: top-2). prefetch_accuracy: share of prefetched hot experts that
    some token uses."""

    prefetch: Prefetch = "hot"
    expert_order: ExpertOrder = "hot_first"
    num_hot_experts: int = 2
    prefetch_accuracy: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefetch", canonical_prefetch(self.prefetch))


@dataclass(frozen=True)
class PipelineResult:
    """step_s: one step (all n batches, all layers); compute_s: accelerator busy time in it;
    link_busy_s: time the host->device link carried anything; bubble_s = step_s - compute_s."""

    step_s: float
    compute_s: float
    link_busy_s: float
    num_batches: int

    @property
    def bubble_s(self) -> float:
        return self.step_s - self.compute_s


_HOST, _DEVICE = 0, 1


def _transfer(name: str, seconds: float, after: tuple[str, ...], to_device: bool = True) -> Collective:
    # On a link of 1 byte/s, bytes are seconds alone on the link.
    src, dst = (_HOST, _DEVICE) if to_device else (_DEVICE, _HOST)
    return Collective(
        name, np.array([src]), np.array([dst]), np.array([float(seconds)]), after, kind="transfer"
    )


def _compute(name: str, seconds: float, after: tuple[str, ...], kind: str) -> Compute:
    return Compute(name, np.array([0.0, float(seconds)]), after, kind)


def pipeline_ops(times: PipelineTimes, num_batches: int, options: PipelineOptions) -> list[Op]:
    """The op graph of one step (see the module docstring); exposed for plots and tests."""
    if num_batches < 1:
        raise ValueError("num_batches must be >= 1")
    n = num_batches
    K = 0 if options.prefetch == "none" else min(options.num_hot_experts, times.num_experts)
    tokens = np.asarray(times.expert_tokens_per_batch, dtype=np.float64)
    hot, cold = times.hot_and_cold(K)
    wasted_s = (1.0 - options.prefetch_accuracy) * K * times.expert_transfer_s
    ops: list[Op] = []
    last_weight: str | None = None  # the weight stream is FIFO: each transfer after the previous
    last_cold: str | None = None
    previous_layer_end: tuple[str, ...] = ()
    previous_first_attention: tuple[str, ...] = ()
    last_kv: str | None = None

    def weight(name: str, seconds: float, extra: tuple[str, ...] = ()) -> str:
        nonlocal last_weight
        after = ((last_weight,) if last_weight else ()) + extra
        ops.append(_transfer(name, seconds, after))
        last_weight = name
        return name

    for layer in range(times.num_layers):
        L = f"{layer}"
        # Weights: at most two layers in flight, and after the previous layer's cold experts.
        gate_in = previous_first_attention + ((last_cold,) if last_cold else ())
        attention_w = weight(f"wA{L}", times.attention_transfer_s, gate_in)
        gate_w = weight(f"wG{L}", times.gate_transfer_s)
        loaded: dict[int, str] = {}
        prefetched = hot + cold if options.prefetch == "layer" else hot
        for e in prefetched:
            loaded[e] = weight(f"wE{L}.{e}", times.expert_transfer_s)
        if options.prefetch != "layer" and wasted_s > 0:
            weight(f"wX{L}", wasted_s)
        # Attention and gates, batch by batch; KV one batch ahead.
        for k in range(n):
            kv_after = (f"att{L}.{k - 1}",) if k > 0 else previous_first_attention
            kv_after = kv_after + ((last_kv,) if last_kv else ())
            kv = f"kv{L}.{k}"
            ops.append(_transfer(kv, times.kv_load_s, kv_after))
            last_kv = kv
            ops.append(
                _compute(
                    f"att{L}.{k}",
                    times.attention_compute_s,
                    (attention_w, kv, *previous_layer_end),
                    "attention",
                )
            )
            if times.kv_store_s > 0:
                ops.append(_transfer(f"st{L}.{k}", times.kv_store_s, (f"att{L}.{k}",), to_device=False))
        for k in range(n):
            ops.append(_compute(f"gate{L}.{k}", times.gate_compute_s, (gate_w, f"att{L}.{k}"), "gate"))
        # Cold experts: requested once batch 0's gate has chosen them (every batch routes alike).
        if options.prefetch != "layer":
            for e in cold:
                after = (f"gate{L}.0",) + ((last_cold,) if last_cold else ())
                name = f"wC{L}.{e}"
                ops.append(_transfer(name, times.expert_transfer_s, after))
                loaded[e] = last_cold = name
        else:
            last_cold = last_weight
        whole_layer = tuple(loaded.values()) if options.prefetch == "layer" else ()
        runs: list[str] = []
        if options.expert_order == "hot_first":
            for e in hot + cold:
                name = f"exp{L}.{e}"
                after = (loaded[e], f"gate{L}.{n - 1}", *whole_layer)
                ops.append(_compute(name, times.expert_run_s(n * tokens[e]), after, "expert"))
                runs.append(name)
        else:
            for k in range(n):
                for e in hot + cold:
                    name = f"exp{L}.{k}.{e}"
                    after = (loaded[e], f"gate{L}.{k}", *whole_layer)
                    ops.append(_compute(name, times.expert_run_s(tokens[e]), after, "expert"))
                    runs.append(name)
        previous_layer_end = tuple(runs) if runs else (f"gate{L}.{n - 1}",)
        previous_first_attention = (f"att{L}.0",)
    return ops


def klotski_step_time(times: PipelineTimes, num_batches: int, options: PipelineOptions) -> PipelineResult:
    """One step of the pipeline (all layers, n batches) on the event engine; pure.

    With every transfer time zero this equals times.pure_compute_s(n, options.expert_order).
    """
    ops = pipeline_ops(times, num_batches, options)
    timeline = run_timeline(ops, np.array([1.0, 1.0]), TimelineOptions("fair_share", 0.0))
    loads = [
        (timeline.collective_start_s[op.name], timeline.collective_finish_s[op.name])
        for op in ops
        if isinstance(op, Collective) and op.src[0] == _HOST and op.bytes[0] > 0
    ]
    link_busy = _union_length(loads)
    return PipelineResult(timeline.makespan_s, float(timeline.busy_s[_DEVICE]), link_busy, num_batches)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, finish in sorted(intervals):
        if finish > end:
            total += finish - max(start, end)
            end = finish
    return total


# ---------------------------------------------------------------------------------------------
# the planner's choice of n (klotski.md §7)


@dataclass(frozen=True)
class BubbleFreeBatches:
    """num_batches: the smallest n meeting (4)-(7), or None when none up to the search limit does;
    binding: which inequality needed the largest n ("4".."7")."""

    num_batches: int | None
    binding: str


def bubble_free_sides(
    times: PipelineTimes, num_batches: int, num_hot_experts: int = 2
) -> dict[str, tuple[float, float]]:
    """(left, right) seconds of klotski.md §7's inequalities (4)-(7) at n = num_batches; the
    pipeline has no bubble at that point when left >= right (see smallest_bubble_free_batches)."""
    n = num_batches
    tokens = np.asarray(times.expert_tokens_per_batch, dtype=np.float64)
    K = min(num_hot_experts, times.num_experts)
    hot, cold = times.hot_and_cold(K)
    front = n * (times.attention_compute_s + times.gate_compute_s)
    hot_s = sum(times.expert_run_s(n * tokens[e]) for e in hot)
    cold_s = sum(times.expert_run_s(n * tokens[e]) for e in cold)
    kv = n * times.kv_load_s
    gate_io, expert_io = times.gate_transfer_s, times.expert_transfer_s
    return {
        "4": (n * times.attention_compute_s, gate_io),
        "5": (front, gate_io + K * expert_io + kv),
        "6": (front + hot_s, gate_io + (K + min(1, len(cold))) * expert_io + kv),
        "7": (
            front + hot_s + cold_s,
            gate_io + (K + len(cold)) * expert_io + times.attention_transfer_s + kv,
        ),
    }


def smallest_bubble_free_batches(
    times: PipelineTimes | Callable[[int], PipelineTimes], num_hot_experts: int = 2, max_batches: int = 4096
) -> BubbleFreeBatches:
    """Smallest n >= 1 with no bubble at the four points of klotski.md §7:

        (4) n tc_A                                  >= tIO_G
        (5) n (tc_A + tc_G)                         >= tIO_G + K tIO_E
        (6) n (tc_A + tc_G) + tc_hotE               >= tIO_G + (K + 1) tIO_E
        (7) n (tc_A + tc_G) + tc_hotE + sum_Q tc_Ei >= tIO_G + (K + |Q|) tIO_E + tIO_A

    tc_hotE and tc_Ei are the hot and cold experts' runs over the tokens of all n batches (so the
    left sides grow with n); Q are the experts with tokens that are not hot. The paper leaves the
    KV cache out (its tc_A includes loading it); when kv_load_s > 0 the n batches' KV crosses the
    same link, so n * kv_load_s joins the right sides of (5)-(7). `times` may depend on n (a
    function of it), when which experts a step touches does.
    """
    binding_first: dict[str, int] = {}
    for n in range(1, max_batches + 1):
        at_n = times(n) if callable(times) else times
        checks = {
            key: left >= right for key, (left, right) in bubble_free_sides(at_n, n, num_hot_experts).items()
        }
        for key, ok in checks.items():
            if ok and key not in binding_first:
                binding_first[key] = n
        if all(checks.values()):
            binding = max(binding_first, key=lambda key: (binding_first[key], key))
            return BubbleFreeBatches(n, binding)
    unmet = [key for key in ("4", "5", "6", "7") if key not in binding_first]
    return BubbleFreeBatches(None, unmet[0] if unmet else "7")


# ---------------------------------------------------------------------------------------------
# from model shapes and a machine to times


@dataclass(frozen=True)
class OffloadMachine:
    """One accelerator with weights offloaded to host memory (and disk when RAM is short).

    compute_flop_s: dense bf16 matmul FLOP/s the kernels reach; memory_bandwidth_bytes_s: device
    memory (roofline floor); link_bytes_s: host -> device copy rate (each direction);
    disk_bytes_s: disk -> host read rate; launch_s: fixed cost per op.
    """

    name: str
    compute_flop_s: float
    memory_bandwidth_bytes_s: float
    link_bytes_s: float
    disk_bytes_s: float
    device_memory_bytes: float
    host_memory_bytes: float
    launch_s: float = 0.0


def weight_seconds_per_byte(shapes: MoEShapes, machine: OffloadMachine) -> float:
    """Seconds per weight byte reaching the device: over the link from RAM, and for the share that
    does not fit in RAM (10% kept free) first from disk at its rate (a sliding window pipelines
    the two, so the slower sets the pace for that share)."""
    total = float(shapes.weight_bytes)
    on_disk = max(0.0, total - 0.9 * machine.host_memory_bytes) / total
    return (1 - on_disk) / machine.link_bytes_s + on_disk / min(machine.link_bytes_s, machine.disk_bytes_s)


def mixtral_pipeline_times(
    shapes: MoEShapes,
    machine: OffloadMachine,
    batch_size: int,
    num_batches: int,
    phase: Literal["prefill", "decode"],
    prompt_tokens: int,
    context_tokens: int,
    expert_share: np.ndarray | None = None,
) -> PipelineTimes:
    """PipelineTimes of one layer from shapes and a machine (roofline compute, link transfers).

    prefill: each batch has batch_size * prompt_tokens tokens attending to prompt_tokens / 2
    positions on average (causal); decode: batch_size tokens attending to context_tokens.
    expert_share [E]: share of routed tokens per expert (default uniform).
    The KV cache stays on the device when all n batches' cache fits beside two layers of weights;
    otherwise it is loaded and stored over the link each layer.
    """
    E = shapes.num_experts
    share = np.full(E, 1.0 / E) if expert_share is None else np.asarray(expert_share, dtype=np.float64)
    tokens = batch_size * (prompt_tokens if phase == "prefill" else 1)
    context = prompt_tokens / 2 if phase == "prefill" else context_tokens
    flop_s, hbm = machine.compute_flop_s, machine.memory_bandwidth_bytes_s
    kv_token_bytes = shapes.kv_bytes_per_token
    cached_tokens = prompt_tokens if phase == "prefill" else context_tokens
    kv_per_batch_layer = kv_cache_bytes(kv_token_bytes, batch_size, cached_tokens, 1)
    attention_read = shapes.attention_bytes + (kv_per_batch_layer if phase == "decode" else 0.0)
    attention_s = max(tokens * shapes.attention_flops_per_token(context) / flop_s, attention_read / hbm)
    gate_s = max(tokens * shapes.gate_flops_per_token / flop_s, shapes.gate_bytes / hbm)
    kv_total = kv_cache_bytes(
        kv_token_bytes, num_batches * batch_size, prompt_tokens + context_tokens, shapes.num_layers
    )
    working_set = 2 * (shapes.attention_bytes + E * shapes.expert_bytes)
    kv_on_device = kv_total + working_set <= 0.9 * machine.device_memory_bytes
    per_byte = weight_seconds_per_byte(shapes, machine)
    if kv_on_device:
        kv_load = kv_store = 0.0
    else:
        kv_load = kv_per_batch_layer / machine.link_bytes_s if phase == "decode" else 0.0
        written = kv_cache_bytes(kv_token_bytes, batch_size, prompt_tokens if phase == "prefill" else 1, 1)
        kv_store = written / machine.link_bytes_s
    return PipelineTimes(
        attention_compute_s=attention_s + machine.launch_s,
        gate_compute_s=gate_s + machine.launch_s,
        expert_tokens_per_batch=tokens * shapes.top_k * share,
        expert_compute_s_per_token=shapes.expert_flops_per_token / flop_s,
        expert_min_compute_s=shapes.expert_bytes / hbm + machine.launch_s,
        attention_transfer_s=shapes.attention_bytes * per_byte,
        gate_transfer_s=shapes.gate_bytes * per_byte,
        expert_transfer_s=shapes.expert_bytes * per_byte,
        num_layers=shapes.num_layers,
        kv_load_s=kv_load,
        kv_store_s=kv_store,
    )


@dataclass(frozen=True)
class ThroughputResult:
    """Generated tokens per second over prefill + decode, and its parts."""

    throughput_tok_s: float
    prefill_s: float
    decode_step_s: float
    decode_steps: int
    num_batches: int
    batch_size: int
    kv_on_device: bool


def klotski_throughput(
    shapes: MoEShapes,
    machine: OffloadMachine,
    batch_size: int,
    num_batches: int,
    prompt_tokens: int,
    output_tokens: int,
    options: PipelineOptions,
    expert_share: np.ndarray | None = None,
) -> ThroughputResult:
    """Klotski's metric: n * b * output_tokens / (prefill + decode time). The prefill produces the
    first token; the other output_tokens - 1 are decode steps, simulated at the mean context length
    (the step time is close to linear in the context)."""
    prefill = klotski_step_time(
        mixtral_pipeline_times(
            shapes, machine, batch_size, num_batches, "prefill", prompt_tokens, prompt_tokens, expert_share
        ),
        num_batches,
        options,
    )
    mean_context = prompt_tokens + output_tokens // 2
    decode_times = mixtral_pipeline_times(
        shapes, machine, batch_size, num_batches, "decode", prompt_tokens, mean_context, expert_share
    )
    decode = klotski_step_time(decode_times, num_batches, options)
    steps = max(output_tokens - 1, 0)
    total = prefill.step_s + steps * decode.step_s
    generated = num_batches * batch_size * output_tokens
    return ThroughputResult(
        throughput_tok_s=generated / total,
        prefill_s=prefill.step_s,
        decode_step_s=decode.step_s,
        decode_steps=steps,
        num_batches=num_batches,
        batch_size=batch_size,
        kv_on_device=decode_times.kv_load_s == 0.0,
    )
