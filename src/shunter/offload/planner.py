"""Profile this machine, then pick the smallest bubble-free number of micro-batches.

Klotski's planner (klotski.md §7) on the offload engine: a forward over many sequences runs as n
micro-batches that share one load of every layer's weights, and n should be the smallest for which
compute hides every load (more micro-batches only grow the KV cache and the latency).

    machine_profile(spec, model_dir, dtype)  -> MachineProfile   (measured once, cached as JSON)
    pipeline_times(spec, profile, batch_size, context_tokens, expert_share) -> PipelineTimes (pure)
    plan_batches(spec, profile, ...)         -> BatchPlan         (pure; sim.klotski's cost model)
    explain(plan)                            -> str

The cost model is sim.klotski's (`smallest_bubble_free_batches`, `klotski_step_time`), mapped onto
this engine: compute is the runtime's own layer functions on the CPU, and a "transfer" is a read
from disk with O_DIRECT. The KV cache stays in RAM, so it never crosses the link.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.layers import (
    Rotary,
    add_shared_experts,
    attention,
    attention_mask,
    expert_mlp,
    rms_norm,
    rope_inverse_frequencies,
    router_scores,
    select_experts,
)
from shunter.model.loader import DTYPE_NAMES
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, MLPWeights
from shunter.offload.disk import DirectReader, HostBufferPool
from shunter.offload.streamer import streaming_layout
from shunter.sim import klotski
from shunter.sim.klotski import (
    PipelineTimes,
    bubble_free_sides,
    klotski_step_time,
    smallest_bubble_free_batches,
)
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.stats import popularity
from shunter.units import format_bytes

PROFILE_VERSION = 5  # part of the cache key: a change in how profiles are measured re-measures
CACHE_DIR_VARIABLE = "SHUNTER_CACHE_DIR"
# what the profile times (decode: one new token per sequence); two contexts give the KV slope,
# three token counts the expert's line
PROFILE_CONTEXT_TOKENS = (32, 512)
PROFILE_EXPERT_TOKENS = (1, 4, 16)
TIMING_ROUNDS = 5
# Each round repeats the call until it lasts this long. 10 ms rounds, best of 3, once measured
# attention at 4x its speed: right after the benchmark drops the page cache, the first calls fault
# the kernels' code back in from disk.
TIMING_ROUND_S = 0.05
READ_BUDGET_S = 1.0  # timed disk reads stop after this much reading (and at least 3 experts)
READ_MAX_EXPERTS = 48
READ_WARMUP_EXPERTS = 2  # read before timing: the first reads fault in fresh memory


@dataclass(frozen=True)
class MachineProfile:
    """What this machine takes for one model's layer, measured with the runtime's own functions.

    Compute times are per new token of a decode micro-batch of `batch_size` sequences, on the CPU
    with `threads` threads, in `dtype`:
      attention_s_per_token: the attention norm and attention with nothing cached (the line's
        intercept); attention_s_per_token_per_context_token: what each cached token adds to it;
      gate_s_per_token: the post-attention norm, router scores, top-k and shared experts (if any);
      expert_s_per_token: one expert's run time per routed token (the line's slope);
      expert_min_s: one expert run's floor (the line's intercept: reading its weights once).
    read_bytes_s: compute-dtype bytes of experts per second through the streamer's own path
      (O_DIRECT read of the checkpoint, then the dtype conversion), so bytes / read_bytes_s is a
      load time.
    """

    dtype: str
    threads: int
    batch_size: int
    attention_s_per_token: float
    attention_s_per_token_per_context_token: float
    gate_s_per_token: float
    expert_s_per_token: float
    expert_min_s: float
    read_bytes_s: float

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if int(self.threads) < 1 or int(self.batch_size) < 1:
            raise ValueError("threads and batch_size must be at least 1")
        seconds = (
            self.attention_s_per_token,
            self.attention_s_per_token_per_context_token,
            self.gate_s_per_token,
            self.expert_s_per_token,
            self.expert_min_s,
        )
        if not all(math.isfinite(s) and s >= 0 for s in seconds):
            raise ValueError("profile times must be finite and non-negative")
        if not (math.isfinite(self.read_bytes_s) and self.read_bytes_s > 0):
            raise ValueError("read_bytes_s must be finite and positive")

    @property
    def element_bytes(self) -> int:
        return torch.tensor([], dtype=DTYPE_NAMES[self.dtype]).element_size()


# ---------------------------------------------------------------------------------------------
# measuring


class _RandomWeights(CheckpointLayout):
    """The checkpoint's names and shapes with random values: timing needs the model's shapes and
    dtype, not its weights, and random tensors cost no disk reads (which the profile times apart)."""

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # small values, like trained weights: no overflow, no denormals to slow the kernels
        return (torch.randn(shape) * 0.02).to(dtype)

    def read_row(self, name: str, shape: tuple[int, ...], row: int, dtype: torch.dtype) -> torch.Tensor:
        return self.read(name, shape[1:], dtype)


class _FixedContext:
    """A KV store holding `context` cached tokens; every update rewrites the slot after them, so
    repeated timing calls all attend over the same context (a KVStore for `attention`)."""

    def __init__(self, spec: ModelSpec, batch_size: int, context: int, dtype: torch.dtype) -> None:
        kv_heads = spec.num_heads if spec.attention == "mla" else spec.num_kv_heads
        k_dim, v_dim = spec.kv_dims
        self.keys = torch.randn(batch_size, kv_heads, context + 1, k_dim).to(dtype)
        self.values = torch.randn(batch_size, kv_heads, context + 1, v_dim).to(dtype)

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[:, :, -1:] = keys
        self.values[:, :, -1:] = values
        return self.keys, self.values


def best_seconds_per_call(run: Callable[[], object]) -> float:
    """Seconds one call of `run` takes: the best of a few rounds, each repeating the call until it
    lasts TIMING_ROUND_S. The best, not the mean: other work on the machine only ever adds time."""
    run()  # warm-up: allocations, oneDNN kernel selection
    calls, best = 1, math.inf
    for _ in range(TIMING_ROUNDS):
        while True:
            started = time.perf_counter()
            for _ in range(calls):
                run()
            elapsed = time.perf_counter() - started
            if elapsed >= TIMING_ROUND_S or calls >= 1 << 16:
                break
            calls *= 2
        best = min(best, elapsed / calls)
    return best


def _line(x: tuple[int, ...], seconds: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, both clamped at 0 (timing noise can tip them)."""
    slope, intercept = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(seconds), 1)
    return max(float(intercept), 0.0), max(float(slope), 0.0)


def _moe_layers(spec: ModelSpec) -> list[int]:
    layers = [layer for layer, moe in enumerate(spec.moe_layers) if moe]
    if not layers:
        raise ShunterError(f"{spec.name}: the model has no MoE layer, so there are no experts to plan for")
    return layers


@torch.inference_mode()
def measure_compute(spec: ModelSpec, checkpoint: Checkpoint, dtype: torch.dtype, batch_size: int) -> dict:
    """The compute fields of a MachineProfile, timed on random weights of the model's first MoE layer."""
    layer = _moe_layers(spec)[0]
    weights = _RandomWeights(spec, checkpoint).layer(layer, dtype, with_experts=False)
    assert weights.moe is not None
    H, b = spec.hidden_size, batch_size
    inv_freq, rope_factor = rope_inverse_frequencies(spec)
    x = torch.randn(b, 1, H).to(dtype)

    contexts = tuple(min(c, spec.max_position_embeddings - 1) for c in PROFILE_CONTEXT_TOKENS)
    attention_s = []
    for context in contexts:
        kv = _FixedContext(spec, b, context, dtype)
        rotary = Rotary.at(torch.full((b, 1), context), inv_freq, spec.rope_interleaved, dtype, rope_factor)
        mask = attention_mask(torch.ones(b, context + 1, dtype=torch.bool), context, 1, spec.sliding_window)

        def attend(kv=kv, rotary=rotary, mask=mask) -> torch.Tensor:
            normed = rms_norm(x, weights.attn_norm, spec.rms_norm_eps)
            return attention(normed, weights.attention, spec, rotary, mask, kv, layer)

        attention_s.append(best_seconds_per_call(attend) / b)
    if contexts[0] == contexts[1]:
        attention_base_s, attention_per_context_s = attention_s[0], 0.0
    else:
        attention_base_s, attention_per_context_s = _line(contexts, attention_s)

    flat = x.reshape(b, H)
    moe = weights.moe

    def gate() -> torch.Tensor:
        normed = rms_norm(flat, weights.mlp_norm, spec.rms_norm_eps)
        select_experts(router_scores(normed, moe, spec), moe, spec)
        return add_shared_experts(normed, normed, moe)

    gate_s = best_seconds_per_call(gate) / b

    expert = _RandomWeights(spec, checkpoint).expert(layer, 0, dtype)
    expert_s = []
    for tokens in PROFILE_EXPERT_TOKENS:
        rows = torch.randn(tokens, H).to(dtype)
        expert_s.append(best_seconds_per_call(lambda rows=rows: expert_mlp(rows, expert)))
    expert_min_s, expert_per_token_s = _line(PROFILE_EXPERT_TOKENS, expert_s)
    return dict(
        attention_s_per_token=attention_base_s,
        attention_s_per_token_per_context_token=attention_per_context_s,
        gate_s_per_token=gate_s,
        expert_s_per_token=expert_per_token_s,
        expert_min_s=expert_min_s,
    )


def measure_read_bytes_s(spec: ModelSpec, checkpoint: Checkpoint, dtype: torch.dtype) -> float:
    """Compute-dtype bytes per second of the checkpoint's real experts, read one after another with
    DirectReader (no page cache) and converted to `dtype`, as the streamer's one I/O thread does in
    steady state: into the same reused buffers, with a window of 2K+1 experts alive (as the
    pipeline holds them). Reading into fresh memory instead faults in every page, which measured
    0.6-0.7 GB/s here against 1.3-1.9 GB/s into reused memory, on the same disk."""
    reader = DirectReader()
    layout = streaming_layout(spec, checkpoint, reader, HostBufferPool())
    experts = [(layer, e) for layer in _moe_layers(spec) for e in range(spec.num_experts)]
    expert_bytes = spec.expert_parameters() * torch.tensor([], dtype=dtype).element_size()
    window: list[MLPWeights] = []
    window_size = 2 * spec.top_k + 1
    warmup = min(READ_WARMUP_EXPERTS, len(experts) - 1)
    try:
        for layer, e in experts[len(experts) - warmup :]:  # opens the file and warms the allocator
            window.append(layout.expert(layer, e, dtype))
        seconds, count = 0.0, 0
        for layer, e in experts[: len(experts) - warmup][:READ_MAX_EXPERTS]:
            started = time.perf_counter()
            window.append(layout.expert(layer, e, dtype))
            seconds += time.perf_counter() - started
            del window[:-window_size]
            count += 1
            if count >= 3 and seconds >= READ_BUDGET_S:
                break
    finally:
        reader.close()
    return count * expert_bytes / max(seconds, 1e-9)


def measure_profile(
    spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, batch_size: int = 1
) -> MachineProfile:
    """Measure a MachineProfile now (about a second on small models; a few on large ones)."""
    checkpoint = Checkpoint(model_dir)
    compute = measure_compute(spec, checkpoint, dtype, batch_size)
    return MachineProfile(
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        read_bytes_s=measure_read_bytes_s(spec, checkpoint, dtype),
        **compute,
    )


# ---------------------------------------------------------------------------------------------
# the cache


def cache_dir() -> Path:
    """$SHUNTER_CACHE_DIR, else ~/.cache/shunter."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "shunter"


def profile_key(spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, batch_size: int = 1) -> dict:
    """What a profile depends on: the model's shapes (not its name), dtype, threads, micro-batch
    size and the device holding the checkpoint (another disk reads at another rate)."""
    shapes = {k: v for k, v in spec.to_dict().items() if k not in ("name", "bos_token_id", "eos_token_ids")}
    checkpoint = Checkpoint(model_dir)
    expert_file = checkpoint.location(_any_expert_tensor(spec, checkpoint)).file
    key = {
        "version": PROFILE_VERSION,
        "shapes": shapes,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "device": os.stat(expert_file).st_dev,  # follows symlinks: where the bytes really are
    }
    return json.loads(json.dumps(key, sort_keys=True))  # as it reads back from JSON


def _any_expert_tensor(spec: ModelSpec, checkpoint: Checkpoint) -> str:
    layout = CheckpointLayout(spec, checkpoint)
    layer = _moe_layers(spec)[0]
    if layout.fused_experts(layer):
        return layout.moe_prefix(layer) + "experts.gate_up_proj"
    return layout.expert_names(layer, 0)[0]


def profile_cache_path(
    spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, batch_size: int = 1
) -> Path:
    """Where `machine_profile` keeps this key's profile: one small JSON file per key."""
    return _cache_path(profile_key(spec, model_dir, dtype, batch_size))


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return cache_dir() / f"offload-profile-{digest[:16]}.json"


def read_cached_profile(path: Path, key: dict) -> MachineProfile | None:
    """The profile saved at `path` for `key`; None when absent, for another key, or unreadable."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        return MachineProfile(**saved["profile"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def machine_profile(
    spec: ModelSpec,
    model_dir: str | Path,
    dtype: torch.dtype,
    batch_size: int = 1,
    refresh: bool = False,
) -> MachineProfile:
    """This machine's profile for the model: from the cache when present (unless `refresh`), else
    measured and saved. A corrupt cache file is measured over, not trusted."""
    key = profile_key(spec, model_dir, dtype, batch_size)
    path = _cache_path(key)
    if not refresh:
        cached = read_cached_profile(path, key)
        if cached is not None:
            return cached
    profile = measure_profile(spec, model_dir, dtype, batch_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "profile": dataclasses.asdict(profile)}, indent=1))
        partial.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # an unwritable cache only costs a re-measure next time
    return profile


# ---------------------------------------------------------------------------------------------
# planning (pure)


def expert_share_from_trace(trace: RoutingTrace) -> np.ndarray:
    """[E] share of routed tokens of a layer's most popular expert, second most, ... averaged over
    the trace's layers. Sorted per layer before averaging: each layer has its own hot experts, and
    averaging by expert id would wash out the skew that makes prefetching the top-K pay."""
    share = -np.sort(-popularity(trace), axis=1)
    return share.mean(axis=0)


def block_bytes(spec: ModelSpec, element_bytes: int) -> int:
    """The largest MoE layer block (norms, attention, router, shared experts) in the compute dtype."""
    return max(spec.block_parameters(layer) for layer in _moe_layers(spec)) * element_bytes


def pipeline_times(
    spec: ModelSpec,
    profile: MachineProfile,
    batch_size: int,
    context_tokens: int,
    expert_share: np.ndarray | None = None,
    num_batches: int | None = None,
) -> PipelineTimes:
    """Per-layer times of one decode step with micro-batches of `batch_size` sequences, each with
    `context_tokens` cached tokens; pure. expert_share [E]: share of routed (token, choice) pairs
    per expert (uniform when None; any scale, it is normalised). With num_batches, only the
    experts the step's n * batch_size tokens are expected to touch get tokens (see
    `expected_routing`): one token of a 64-expert top-8 model loads 8 experts, not 64.

    Mapped onto the engine: every layer is timed like its MoE layers; every block and expert is
    read from disk (weights the placement pins only make loads shorter, so the n is an upper
    bound); the router is read with the block, so the gate's own load is 0 and the block is tIO_A;
    the KV cache stays in RAM (no KV loads or stores).
    """
    E = spec.num_experts
    share = np.full(E, 1.0 / E) if expert_share is None else np.asarray(expert_share, dtype=np.float64)
    if share.shape != (E,) or not np.all(share >= 0) or share.sum() <= 0:
        raise ValueError(f"expert_share must be [{E}] non-negative shares, got shape {share.shape}")
    share = share / share.sum()
    tokens = batch_size  # decode: one new token per sequence
    attention_s_per_token = (
        profile.attention_s_per_token + profile.attention_s_per_token_per_context_token * context_tokens
    )
    element = profile.element_bytes
    return PipelineTimes(
        attention_compute_s=tokens * attention_s_per_token,
        gate_compute_s=tokens * profile.gate_s_per_token,
        expert_tokens_per_batch=expected_routing(share, tokens, spec.top_k, num_batches),
        expert_compute_s_per_token=profile.expert_s_per_token,
        expert_min_compute_s=profile.expert_min_s,
        attention_transfer_s=block_bytes(spec, element) / profile.read_bytes_s,
        gate_transfer_s=0.0,
        expert_transfer_s=spec.expert_parameters() * element / profile.read_bytes_s,
        num_layers=spec.num_layers,
        kv_load_s=0.0,
        kv_store_s=0.0,
    )


def expected_touched_experts(share: np.ndarray, top_k: int, tokens: float) -> float:
    """Experts of one layer that `tokens` tokens are expected to touch, each picking top_k with
    probability min(1, top_k * share_e) for expert e (share [E] sums to 1)."""
    per_token = np.minimum(1.0, top_k * share)
    return float((1.0 - (1.0 - per_token) ** tokens).sum())


def expected_routing(share: np.ndarray, tokens: int, top_k: int, num_batches: int | None) -> np.ndarray:
    """[E] routed (token, choice) pairs per expert for one micro-batch of `tokens` tokens.

    Without num_batches: the expectation, tokens * top_k * share (every expert with a share
    gets a fraction of a token). With it: the step's n * tokens tokens each pick top_k experts,
    expert e with probability min(1, top_k * share_e) per token, so it is touched with
    probability 1 - (1 - p_e)^(n tokens); the expected count m of touched experts (rounded, at
    least top_k) most popular ones share the micro-batch's tokens * top_k pairs in proportion.
    """
    pairs = tokens * top_k * share
    if num_batches is None:
        return pairs
    touched = expected_touched_experts(share, top_k, num_batches * tokens)
    count = min(share.shape[0], max(top_k, round(touched)))
    keep = np.argsort(-share, kind="stable")[:count]
    routed = np.zeros_like(share)
    routed[keep] = share[keep] / share[keep].sum() * tokens * top_k
    return routed


@dataclass(frozen=True)
class BatchPlan:
    """The planner's choice and what it rests on.

    num_batches: n, micro-batches of `batch_size` sequences per step; bubble_free: False when no
    n <= max_batches meets (4)-(7) (then n = max_batches); binding: the inequality ("4".."7")
    that needed the largest n, or the first still unmet. predicted_step_s: one decode step of all
    n micro-batches through every layer (sim.klotski's timeline); predicted_tok_s: n * batch_size
    new tokens per predicted_step_s. block_bytes, expert_bytes: one layer block and one expert.
    """

    num_batches: int
    bubble_free: bool
    binding: str
    times: PipelineTimes
    times_before: PipelineTimes | None  # at n - 1 (which experts a step touches depends on n)
    profile: MachineProfile
    num_hot_experts: int
    batch_size: int
    context_tokens: int
    max_batches: int
    predicted_step_s: float
    predicted_tok_s: float
    block_bytes: int
    expert_bytes: int


def predicted_step(times: PipelineTimes, num_batches: int, num_hot_experts: int) -> klotski.PipelineResult:
    """One step of the engine's default pipeline in the simulator: hot-only prefetch of the
    num_hot_experts predicted experts, hot experts first."""
    options = klotski.PipelineOptions(
        prefetch="hot", expert_order="hot_first", num_hot_experts=num_hot_experts
    )
    return klotski_step_time(times, num_batches, options)


# the search limit of plan_batches for `shunter generate --batches auto` and `shunter bench offload`
# (its timeline prediction grows with n)
MAX_PLANNED_BATCHES = 128


def plan_batches(
    spec: ModelSpec,
    profile: MachineProfile,
    batch_size: int,
    context_tokens: int,
    expert_share: np.ndarray | None = None,
    max_batches: int = 64,
) -> BatchPlan:
    """The smallest bubble-free n (klotski.md §7) with K = top-k hot experts, the ones the engine
    prefetches; pure. max_batches bounds the search (and the prediction's cost)."""
    if batch_size < 1 or max_batches < 1:
        raise ValueError("batch_size and max_batches must be at least 1")

    def times_at(n: int) -> PipelineTimes:
        return pipeline_times(spec, profile, batch_size, context_tokens, expert_share, num_batches=n)

    K = spec.top_k
    found = smallest_bubble_free_batches(times_at, K, max_batches)
    n = found.num_batches if found.num_batches is not None else max_batches
    times = times_at(n)
    times_before = times_at(n - 1) if n > 1 else None
    step = predicted_step(times, n, K)
    return BatchPlan(
        num_batches=n,
        bubble_free=found.num_batches is not None,
        binding=found.binding,
        times=times,
        times_before=times_before,
        profile=profile,
        num_hot_experts=K,
        batch_size=batch_size,
        context_tokens=context_tokens,
        max_batches=max_batches,
        predicted_step_s=step.step_s,
        predicted_tok_s=n * batch_size / step.step_s,
        block_bytes=block_bytes(spec, profile.element_bytes),
        expert_bytes=spec.expert_parameters() * profile.element_bytes,
    )


INEQUALITIES = {
    "4": ("n tc_A", "tIO_G"),
    "5": ("n (tc_A + tc_G)", "tIO_G + K tIO_E"),
    "6": ("n (tc_A + tc_G) + tc_hotE", "tIO_G + (K + 1) tIO_E"),
    "7": ("n (tc_A + tc_G) + tc_hotE + sum_Q tc_E", "tIO_G + (K + |Q|) tIO_E + tIO_A"),
}


def format_seconds(seconds: float) -> str:
    """0.00042 -> '420.0 us'."""
    if seconds == 0:
        return "0 s"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.1f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def explain(plan: BatchPlan, sequences_given: int | None = None) -> str:
    """A short account of the choice: the measured numbers, (4)-(7) at n and n - 1, which binds,
    the predicted throughput; with `sequences_given`, how that compares with n * batch_size."""
    p, t, n, K = plan.profile, plan.times, plan.num_batches, plan.num_hot_experts
    per_batch = f"micro-batch of {plan.batch_size} sequence{'s' * (plan.batch_size > 1)}"
    lines = [
        "Offload planner: the smallest number of micro-batches with no pipeline bubble (klotski.md §7)",
        f"Measured on this machine ({p.dtype}, {p.threads} threads):",
        f"  attention + norm  {format_seconds(p.attention_s_per_token)} per token, "
        f"+{format_seconds(p.attention_s_per_token_per_context_token)} per token per cached token",
        f"  gate              {format_seconds(p.gate_s_per_token)} per token "
        "(norm, router, top-k, shared experts)",
        f"  one expert        {format_seconds(p.expert_s_per_token)} per routed token, "
        f"at least {format_seconds(p.expert_min_s)} per run",
        f"  disk read         {format_bytes(p.read_bytes_s)}/s (O_DIRECT, converted to {p.dtype})",
        f"Per layer, one {per_batch} at {plan.context_tokens} cached tokens:",
        f"  tc_A {format_seconds(t.attention_compute_s)}, tc_G {format_seconds(t.gate_compute_s)}; "
        f"K = {K} hot experts prefetched, |Q| = {len(t.hot_and_cold(K)[1])} cold experts expected",
        f"  tIO_A {format_seconds(t.attention_transfer_s)} (block {format_bytes(plan.block_bytes)}), "
        f"tIO_G 0 (the router comes with the block), "
        f"tIO_E {format_seconds(t.expert_transfer_s)} (expert {format_bytes(plan.expert_bytes)})",
        f"Inequalities, per layer, at n = {n}" + (f" and n = {n - 1}:" if n > 1 else ":"),
    ]
    at_n = bubble_free_sides(t, n, K)
    before = bubble_free_sides(plan.times_before, n - 1, K) if plan.times_before is not None else None
    for key, (left, right) in INEQUALITIES.items():
        lines.append(f"  ({key}) {left} >= {right}")
        row = "        " + _sides(f"n={n}", *at_n[key])
        if before is not None:
            row += "    " + _sides(f"n={n - 1}", *before[key])
        lines.append(row.rstrip())
    if plan.bubble_free:
        lines.append(f"({plan.binding}) binds: it is the last to hold as n grows.")
        verdict = "bubble free"
    else:
        lines.append(f"({plan.binding}) still fails at n = {plan.max_batches}, the search limit.")
        verdict = f"not bubble free; the search stops at {plan.max_batches}"
    lines.append(
        f"Chosen: n = {n} ({verdict}); predicted decode step {format_seconds(plan.predicted_step_s)}, "
        f"{plan.predicted_tok_s:.1f} tok/s"
    )
    if sequences_given is not None:
        needed = n * plan.batch_size
        short = " (the pipeline waits on the disk; more sequences fill it)"
        lines.append(
            f"Sequences in flight: {needed} would be bubble free, {sequences_given} given"
            + ("" if sequences_given >= needed else short)
        )
    return "\n".join(lines)


def _sides(label: str, left: float, right: float) -> str:
    mark = "ok" if left >= right else "FAILS"
    return f"{label}: {format_seconds(left):>9} >= {format_seconds(right):<9} {mark:<5}"


def plan_as_dict(plan: BatchPlan) -> dict:
    """The plan as plain JSON values (for `generate --json`)."""
    times = dataclasses.asdict(plan.times)
    times["expert_tokens_per_batch"] = [float(x) for x in plan.times.expert_tokens_per_batch]

    def sides(times: PipelineTimes, n: int) -> dict[str, dict[str, float]]:
        return {
            key: {"left_s": left, "right_s": right}
            for key, (left, right) in bubble_free_sides(times, n, plan.num_hot_experts).items()
        }

    return {
        "num_batches": plan.num_batches,
        "bubble_free": plan.bubble_free,
        "binding": plan.binding,
        "num_hot_experts": plan.num_hot_experts,
        "batch_size": plan.batch_size,
        "context_tokens": plan.context_tokens,
        "max_batches": plan.max_batches,
        "predicted_step_s": plan.predicted_step_s,
        "predicted_tok_s": plan.predicted_tok_s,
        "block_bytes": plan.block_bytes,
        "expert_bytes": plan.expert_bytes,
        "profile": dataclasses.asdict(plan.profile),
        "times": times,
        "inequalities_at_n": sides(plan.times, plan.num_batches),
        "inequalities_at_n_minus_1": (
            sides(plan.times_before, plan.num_batches - 1) if plan.times_before is not None else None
        ),
    }
