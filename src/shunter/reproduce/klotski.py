"""Klotski (expert-aware multi-batch pipeline) re-run on our cost model: the ablation ladder of Env 1.

Mixtral-8x7B on an RTX 3090 over PCIe 4.0 x16 with a 1 GB/s SSD, batch 64 in n = 10 batches (the
paper's profiled run); the simulator's timeline is sim.klotski's, the planner's n its inequalities.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from shunter.reproduce.claims import (
    Claim,
    Figure,
    GainWithinFactor,
    Reproduction,
    Row,
    WithinFactor,
)
from shunter.shapes import MIXTRAL_8X7B, MoEShapes
from shunter.sim.klotski import (
    OffloadMachine,
    PipelineOptions,
    PipelineTimes,
    ThroughputResult,
    klotski_step_time,
    klotski_throughput,
    mixtral_pipeline_times,
    smallest_bubble_free_batches,
)

RTX3090_PCIE4 = OffloadMachine(
    name="RTX 3090 24 GB, PCIe 4.0 x16, 256 GB RAM, 1 GB/s SSD",
    # bf16 tensor cores with fp32 accumulation: 71 TFLOP/s dense; kernels reach about half.
    compute_flop_s=0.5 * 71e12,
    memory_bandwidth_bytes_s=936e9,
    # The paper's own profile: one Mixtral expert (352 MB) takes ~21 ms over PCIe.
    link_bytes_s=MIXTRAL_8X7B.expert_bytes / 0.021,
    disk_bytes_s=1e9,
    device_memory_bytes=24 * 2**30,
    host_memory_bytes=256e9,
    launch_s=20e-6,
)
KLOTSKI_SKEW = 0.5
BATCH, NUM_BATCHES = 64, 10  # the paper's profiled run
PROMPT_TOKENS, OUTPUT_TOKENS = 512, 32

# The ablation ladder: each rung (micro-batches, pipeline) and the paper's throughput in tok/s.
LADDER = (
    ("simple pipeline (n=1, whole layers)", 1, PipelineOptions("whole_layer", "by_batch"), 5.721),
    ("+ multiple batches", NUM_BATCHES, PipelineOptions("whole_layer", "by_batch"), 18.24),
    ("+ prefetch only hot experts", NUM_BATCHES, PipelineOptions("hot_only", "by_batch"), 19.074),
    ("+ reorder experts (Klotski)", NUM_BATCHES, PipelineOptions("hot_only", "hot_first"), 22.414),
)
KLOTSKI_PAPER = tuple(paper for *_, paper in LADDER)

# What the paper reports and the rule ours is judged by.
THROUGHPUT = [
    Claim(label, Figure.value(paper, f"{paper:g} tok/s"), WithinFactor(2), "tok/s")
    for label, *_, paper in LADDER
]
STEP_GAINS = [
    KLOTSKI_PAPER[k] / KLOTSKI_PAPER[k - 1] for k in range(1, len(LADDER))
]  # rung over the one below
STEP_RATIO = [
    Claim(f"step ratio: {label}", Figure.value(gain, f"{gain:.3f}x"), GainWithinFactor(2))
    for (label, *_), gain in zip(LADDER[1:], STEP_GAINS, strict=True)
]
# the paper's profiler timeline: one decode layer of 10 batches of 64, Klotski's and a simple pipeline's
PROFILER_PAPER_S = (0.215, 2.367)
PROFILER = [
    Claim(label, Figure.value(paper_s * 1e3, f"~{paper_s * 1e3:.0f} ms"), WithinFactor(2), "ms")
    for label, paper_s in zip(
        ("profiler: one layer, 10 x 64 (Klotski)", "profiler: the same with a simple overlap pipeline"),
        PROFILER_PAPER_S,
        strict=True,
    )
]
PLANNED_BATCHES = Claim(
    "planner: smallest bubble-free n (inequalities 4-7), batch 64",
    Figure.value(10.0, "n = 10 (profiled run)"),
    WithinFactor(2),
    "batches",
)


def _prefill_flops(shapes: MoEShapes, sequences: int, prompt_tokens: int) -> float:
    """FLOPs of a causal prefill: attention over half the prompt on average, gate, k experts."""
    per_token = shapes.attention_flops_per_token(prompt_tokens / 2) + shapes.gate_flops_per_token
    per_token += shapes.top_k * shapes.expert_flops_per_token
    return float(sequences * prompt_tokens * shapes.num_layers * per_token)


def _throughput_rows(
    shapes: MoEShapes, machine: OffloadMachine, results: list[ThroughputResult]
) -> list[Row]:
    rows = []
    for claim, (_, nb, _, paper), result in zip(THROUGHPUT, LADDER, results, strict=True):
        ratio = result.throughput_tok_s / paper
        # What the paper's figure implies for the prefill if our decode is right.
        paper_total_s = nb * BATCH * OUTPUT_TOKENS / paper
        implied_prefill_s = paper_total_s - result.decode_steps * result.decode_step_s
        prefill_flops = _prefill_flops(shapes, nb * BATCH, PROMPT_TOKENS)
        implied = (
            f"; if our decode is right, the paper's figure implies a prefill at "
            f"{prefill_flops / implied_prefill_s / 1e12:.0f} TFLOP/s (we assume "
            f"{machine.compute_flop_s / 1e12:.0f})"
            if implied_prefill_s > 0
            else "; the paper's total is shorter than our decode alone"
        )
        rows.append(
            claim.beside(
                Figure.value(result.throughput_tok_s, f"{result.throughput_tok_s:.2f} tok/s"),
                f"rule: {claim.rule}; ours is {ratio:.2f}x the paper's. Prefill {result.prefill_s:.1f} s "
                f"(compute-bound), decode {result.decode_step_s:.2f} s per step x {result.decode_steps} "
                f"({'KV on the GPU' if result.kv_on_device else 'KV streamed over PCIe'}){implied}.",
                {
                    "batch_size": BATCH,
                    "num_batches": nb,
                    "prefill_s": result.prefill_s,
                    "decode_step_s": result.decode_step_s,
                },
            )
        )
    return rows


def _step_ratio_rows(results: list[ThroughputResult]) -> list[Row]:
    rows = []
    for k, (claim, paper) in enumerate(zip(STEP_RATIO, STEP_GAINS, strict=True), start=1):
        ours_gain = results[k].throughput_tok_s / results[k - 1].throughput_tok_s
        ours = Figure.value(ours_gain, f"{ours_gain:.3f}x")
        why = f"rule: {claim.rule} (ours {(ours_gain - 1) * 100:+.1f}%, paper {(paper - 1) * 100:+.1f}%). "
        if k == 1:
            why += (
                "n batches share each layer's 2.9 GB of weights, so decode tokens per weight byte grow "
                "n-fold; the KV cache of 640 sequences no longer fits and crosses PCIe too."
            )
        else:
            why += (
                "In our model the decode step is bound by PCIe (weights + KV: "
                f"{results[k].decode_step_s:.2f} s per step, compute a few percent of it) and the prefill "
                "by compute, so reordering transfers or experts cannot shorten either; the paper's gain "
                "implies its compute and transfers were closer to balanced (e.g. slower attention or a "
                "faster link than its 21 ms per expert)."
                if not claim.holds(ours)
                else "the reorder removes bubbles where compute and transfer are comparable."
            )
        rows.append(claim.beside(ours, why))
    return rows


def _profiler_rows(decode: PipelineTimes) -> list[Row]:
    """One layer, one decode step of 10 batches of 64: the paper's profiler timeline."""
    one_layer = replace(decode, num_layers=1)
    klotski_layer = klotski_step_time(one_layer, NUM_BATCHES, LADDER[3][2]).step_s
    simple_layer = NUM_BATCHES * klotski_step_time(one_layer, 1, LADDER[0][2]).step_s
    rows = []
    for claim, ours_s, paper_s in zip(PROFILER, (klotski_layer, simple_layer), PROFILER_PAPER_S, strict=True):
        rows.append(
            claim.beside(
                Figure.value(ours_s * 1e3, f"{ours_s * 1e3:.0f} ms"),
                f"rule: {claim.rule} ({ours_s / paper_s:.2f}x). One decode layer: attention weights, "
                "8 experts and the KV of 10 batches over PCIe; 'simple' loads the layer once per batch.",
            )
        )
    return rows


def _planner_row(decode: PipelineTimes) -> Row:
    """The planner's n: the paper's accounting folds the KV load into tc_A."""
    paper_accounting = replace(
        decode, attention_compute_s=decode.attention_compute_s + decode.kv_load_s, kv_load_s=0.0
    )
    planned = smallest_bubble_free_batches(paper_accounting, 2)
    ours_link = smallest_bubble_free_batches(decode, 2)
    planned_n = planned.num_batches
    return PLANNED_BATCHES.beside(
        Figure.value(
            float(planned_n) if planned_n else None,
            f"n = {planned_n} (binding: ({planned.binding}))" if planned_n else "none",
        ),
        f"rule: {PLANNED_BATCHES.rule} of the n the paper ran. With the KV load counted as attention "
        "time (the paper's tc_A); counting it on the link instead, "
        + (
            f"n = {ours_link.num_batches}"
            if ours_link.num_batches
            else "no n is bubble-free: each batch adds more KV transfer than compute"
        )
        + ".",
    )


def _settings(
    shapes: MoEShapes, machine: OffloadMachine, weights: np.ndarray, quick: bool
) -> tuple[str, ...]:
    return (
        f"{shapes.name}: {shapes.num_layers} layers, hidden {shapes.hidden_size}, 8 SwiGLU experts of "
        f"{shapes.expert_bytes / 1e6:.0f} MB, top-2, bf16 ({'quick: 8 layers' if quick else 'all layers'})",
        f"{machine.name}: {machine.compute_flop_s / 1e12:.1f} TFLOP/s reached (half of 71 dense bf16), "
        f"936 GB/s device memory, {machine.link_bytes_s / 1e9:.1f} GB/s host->device (the paper's 21 ms "
        "per expert); the 93 GB model fits in 256 GB RAM, so the 1 GB/s SSD is not on the path",
        f"workload: prompts of {PROMPT_TOKENS} tokens, {OUTPUT_TOKENS} generated, batch {BATCH}, n = "
        f"{NUM_BATCHES} batches (the paper's profiled run); expert popularity Zipf exponent {KLOTSKI_SKEW} "
        f"over 8 experts (max/min {weights[0] / weights[-1]:.1f}x); prefetch accuracy 100% (all prefetched "
        "experts used)",
        "metric: generated tokens / (prefill + decode); decode steps simulated at the mean context length",
    )


def reproduce_klotski(quick: bool = False) -> Reproduction:
    """The ablation ladder on Env 1 (Mixtral-8x7B, RTX 3090), batch 64, n = 10 (the paper's
    profile); `quick`: 8 layers instead of 32."""
    started = time.perf_counter()
    shapes = replace(MIXTRAL_8X7B, num_layers=8) if quick else MIXTRAL_8X7B
    machine = RTX3090_PCIE4
    weights = np.arange(1, shapes.num_experts + 1, dtype=np.float64) ** -KLOTSKI_SKEW
    share = weights / weights.sum()
    results = [
        klotski_throughput(shapes, machine, BATCH, nb, PROMPT_TOKENS, OUTPUT_TOKENS, options, share)
        for _, nb, options, _ in LADDER
    ]
    decode = mixtral_pipeline_times(
        shapes,
        machine,
        BATCH,
        NUM_BATCHES,
        "decode",
        PROMPT_TOKENS,
        PROMPT_TOKENS + OUTPUT_TOKENS // 2,
        share,
    )
    rows = [
        *_throughput_rows(shapes, machine, results),
        *_step_ratio_rows(results),
        *_profiler_rows(decode),
        _planner_row(decode),
    ]
    return Reproduction(
        "klotski",
        "Klotski: expert-aware multi-batch pipeline (ablation, Env 1)",
        _settings(shapes, machine, weights, quick),
        tuple(rows),
        time.perf_counter() - started,
    )
