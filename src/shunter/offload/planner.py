"""Pick the smallest bubble-free number of micro-batches from this machine's profile.

Klotski's planner (klotski.md §7) on the offload engine: a forward over many sequences runs as n
micro-batches that share one load of every layer's weights, and n should be the smallest for which
compute hides every load (more micro-batches only grow the KV cache and the latency).

    machine_profile(spec, model_dir, dtype)  -> MachineProfile   (offload/profile.py: measured once, cached)
    pipeline_times(spec, profile, batch_size, context_tokens, expert_share) -> PipelineTimes (pure)
    plan_batches(spec, profile, ...)         -> BatchPlan         (pure; sim.klotski's cost model)
    explain(plan)                            -> str

The cost model is sim.klotski's (`smallest_bubble_free_batches`, `klotski_step_time`), mapped onto
this engine: compute is the runtime's own layer functions on the CPU, and a "transfer" is a read
from disk with O_DIRECT. The KV cache stays in RAM, so it never crosses the link.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from shunter.model.spec import ModelSpec
from shunter.offload.profile import MachineProfile, moe_layers
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
    return max(spec.block_parameters(layer) for layer in moe_layers(spec)) * element_bytes


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
    # sliding-window layers (gpt-oss) read only their window of the cache
    attended = spec.mean_attended_tokens(context_tokens)
    attention_s_per_token = (
        profile.attention_s_per_token + profile.attention_s_per_token_per_context_token * attended
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
