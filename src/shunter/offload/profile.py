"""Profile this machine once per model and dtype: the runtime's own layer functions timed on random
weights of the model's shapes, and O_DIRECT reads of its experts; cached as JSON
(`machine_profile(spec, model_dir, dtype) -> MachineProfile`). The offload planner
(offload/planner.py) plans from it.
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
from shunter.model.executor import token_mixer
from shunter.model.layers import (
    Rotary,
    add_shared_experts,
    attention_mask,
    expert_mlp,
    rms_norm,
    rope_inverse_frequencies,
    router_scores,
    select_experts,
)
from shunter.model.linear_attention import LinearAttentionState
from shunter.model.loader import DTYPE_NAMES
from shunter.model.spec import ModelSpec
from shunter.model.weights import CheckpointLayout, MLPWeights
from shunter.offload.disk import DirectReader, HostBufferPool
from shunter.offload.streamer import streaming_layout

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
BUSY_FACTOR = 4.0  # a cached attention time this many times today's spot check is re-measured
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

    def read(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, input_major: bool = False
    ) -> torch.Tensor:
        # small values, like trained weights: no overflow, no denormals to slow the kernels
        return (torch.randn(shape) * 0.02).to(dtype)

    def read_row(
        self, name: str, shape: tuple[int, ...], row: int, dtype: torch.dtype, input_major: bool = False
    ) -> torch.Tensor:
        return self.read(name, shape[1:], dtype)


class _FixedContext:
    """A KV store holding `context` cached tokens; every update rewrites the slot after them, so
    repeated timing calls all attend over the same context (a KVStore for `attention`)."""

    def __init__(self, spec: ModelSpec, batch_size: int, context: int, dtype: torch.dtype) -> None:
        kv_heads = spec.num_heads if spec.attention == "mla" else spec.num_kv_heads
        k_dim, v_dim = spec.kv_dims
        self.keys = torch.randn(batch_size, kv_heads, context + 1, k_dim).to(dtype)
        self.values = torch.randn(batch_size, kv_heads, context + 1, v_dim).to(dtype)

        # a linear-attention layer's state has one size whatever the context
        self.state = (
            LinearAttentionState.zeros(spec, batch_size, dtype) if spec.linear_attention_layers else None
        )

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[:, :, -1:] = keys
        self.values[:, :, -1:] = values
        return self.keys, self.values

    def linear_state(self, layer: int) -> LinearAttentionState | None:
        return self.state

    def store_linear_state(self, layer: int, state: LinearAttentionState) -> None:
        pass  # every timing call starts from the same state


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


def moe_layers(spec: ModelSpec) -> list[int]:
    layers = [layer for layer, moe in enumerate(spec.moe_layers) if moe]
    if not layers:
        raise ShunterError(f"{spec.name}: the model has no MoE layer, so there are no experts to plan for")
    return layers


def timed_layer(spec: ModelSpec) -> int:
    """The MoE layer the profile times: the first that attends over its whole cache, so the per
    cached token slope is a full layer's (the planner scales it by `ModelSpec.mean_attended_tokens`
    for models whose sliding layers read only their window, gpt-oss)."""
    layers = moe_layers(spec)
    return next((layer for layer in layers if spec.layer_window(layer) is None), layers[0])


@torch.inference_mode()
def _profile_contexts(spec: ModelSpec) -> tuple[int, ...]:
    return tuple(min(c, spec.max_position_embeddings - 1) for c in PROFILE_CONTEXT_TOKENS)


def _attention_s_per_token(
    spec: ModelSpec, weights: object, layer: int, dtype: torch.dtype, batch_size: int, context: int
) -> float:
    """One decode step's attention norm and attention over `context` cached tokens, per sequence."""
    b = batch_size
    inv_freq, rope_factor = rope_inverse_frequencies(spec)
    x = torch.randn(b, 1, spec.hidden_size).to(dtype)
    kv = _FixedContext(spec, b, context, dtype)
    rotary = Rotary.at(torch.full((b, 1), context), inv_freq, spec.rope_interleaved, dtype, rope_factor)
    mask = attention_mask(torch.ones(b, context + 1, dtype=torch.bool), context, 1, spec.sliding_window)

    def attend() -> torch.Tensor:
        normed = rms_norm(x, weights.attn_norm, spec.rms_norm_eps)  # type: ignore[attr-defined]
        return token_mixer(normed, weights, spec, layer, rotary, mask, kv)  # type: ignore[arg-type]

    return best_seconds_per_call(attend) / b


def attention_now_s(spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, batch_size: int) -> float:
    """A spot check of the profile: attention at the shortest profiled context, timed now."""
    checkpoint = Checkpoint(model_dir)
    layer = timed_layer(spec)
    weights = _RandomWeights(spec, checkpoint).layer(layer, dtype, with_experts=False)
    return _attention_s_per_token(spec, weights, layer, dtype, batch_size, _profile_contexts(spec)[0])


def measured_while_busy(profile: MachineProfile, attention_now: float, context: int) -> bool:
    """True when a cached profile's attention is over BUSY_FACTOR x what it takes now: it was
    measured while other work held the cores (a profile once cached 44 ms/token where 0.3-1 ms is
    this machine's), and every plan made from it would be wrong. The best-of-rounds timing only
    ever errs slow, so a faster cached figure is never an outlier."""
    cached = profile.attention_s_per_token + profile.attention_s_per_token_per_context_token * context
    return cached > BUSY_FACTOR * attention_now


def measure_compute(spec: ModelSpec, checkpoint: Checkpoint, dtype: torch.dtype, batch_size: int) -> dict:
    """The compute fields of a MachineProfile, timed on random weights of the model's first MoE layer
    (that attends over its whole cache, see `timed_layer`)."""
    layer = timed_layer(spec)
    weights = _RandomWeights(spec, checkpoint).layer(layer, dtype, with_experts=False)
    assert weights.moe is not None
    H, b = spec.hidden_size, batch_size
    x = torch.randn(b, 1, H).to(dtype)

    contexts = _profile_contexts(spec)
    attention_s = [_attention_s_per_token(spec, weights, layer, dtype, b, context) for context in contexts]
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
    experts = [(layer, e) for layer in moe_layers(spec) for e in range(spec.num_experts)]
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
    layer = moe_layers(spec)[0]
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
    measured and saved. A corrupt cache file is measured over, not trusted, and so is one whose
    attention is far slower than a spot check now (measured while the machine was busy)."""
    key = profile_key(spec, model_dir, dtype, batch_size)
    path = _cache_path(key)
    if not refresh:
        cached = read_cached_profile(path, key)
        if cached is not None:
            now = attention_now_s(spec, model_dir, dtype, batch_size)
            if not measured_while_busy(cached, now, _profile_contexts(spec)[0]):
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
