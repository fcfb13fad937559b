"""Lina (all-to-all first in training, replication in inference) re-run on our cost model.

16 devices at 100 Gbit/s, 16 experts, top-2; inference per batch (static placement, Lina's
replication with path length 3, an ideal balanced gate) and the training step ablation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from shunter.network.cost import GBIT_S
from shunter.plan.cluster import ClusterSpec
from shunter.plan.replication import build_path_estimator
from shunter.reproduce.claims import (
    Claim,
    Figure,
    RangesOverlap,
    Reproduction,
    Row,
    WithinPoints,
    WithinRelative,
)
from shunter.shapes import LINA_MOE
from shunter.sim.cost import ComputeModel
from shunter.sim.lina import InferenceSetup, TrainingSetup, inference_batch, split_batches, training_step
from shunter.trace.routing_trace import RoutingTrace
from shunter.trace.stats import load_skew
from shunter.trace.synthetic import zipf_trace

# What the paper reports and the rule ours is judged by.
MEDIAN_SPEEDUP = Claim(
    "inference: median per-batch time, static / Lina", Figure.value(1.45, "1.45x"), WithinRelative(0.25)
)
P95_SPEEDUP = Claim(
    "inference: p95 per-batch time, static / Lina", Figure.value(1.63, "1.63x"), WithinRelative(0.25)
)
LINA_VS_IDEAL = Claim(
    "inference: p95 Lina / ideal balanced gate", Figure.value(1.04, "1.04x"), WithinRelative(0.10)
)
REPLANNED_SHARE = Claim(
    "inference: layers re-planned in phase 2", Figure.value(23.0, "~23%"), WithinPoints(15), unit="%"
)
ALLREDUCE_SLOWDOWN = Claim(
    "training: DeepSpeed backward all-to-all slowed by the allreduce",
    Figure.value(1.83, "1.83x (median)"),
    WithinRelative(0.25),
)
PRIORITY_SPEEDUP = Claim(
    "training: step speedup, priority (+ micro-ops) vs DeepSpeed",
    Figure.value(1.24, "1.24x"),
    WithinRelative(0.15),
)
LINA_SPEEDUP = Claim(  # the paper's average is 1.57x; the rule is its range over 2-16 experts
    "training: step speedup, Lina (priority + partitioning) vs DeepSpeed",
    Figure("1.57x avg (1.37-1.73x)", 1.37, 1.73),
    RangesOverlap(),
)
BACKWARD_SPEEDUP = Claim(
    "training: backward all-to-all, DeepSpeed / priority", Figure("2.21-2.39x", 2.21, 2.39), RangesOverlap()
)

A100_FLOP_S = 312e12
LINA_SKEW, LINA_CORRELATION = 0.5, 0.3


def lina_cluster() -> ClusterSpec:
    return ClusterSpec.uniform(16, 100 * GBIT_S, A100_FLOP_S)


def _ratio(value: float) -> Figure:
    return Figure.value(value, f"{value:.2f}x")


@dataclass(frozen=True)
class _Inference:
    """The inference workload: a profile to estimate paths from, then the batches served."""

    layers: int
    batches: int
    tokens_per_batch: int
    profile_tokens: int
    trace: RoutingTrace


def _inference_workload(quick: bool) -> _Inference:
    layers = 4 if quick else 8
    batches = 4 if quick else 12
    tokens_per_batch = 16 * (256 if quick else 1024)
    profile_tokens = 4 * tokens_per_batch
    trace = zipf_trace(
        layers, profile_tokens + batches * tokens_per_batch, 16, 2, LINA_SKEW, LINA_CORRELATION, 0
    )
    return _Inference(layers, batches, tokens_per_batch, profile_tokens, trace)


def _inference_rows(workload: _Inference, cluster: ClusterSpec, compute: ComputeModel) -> list[Row]:
    """Per-batch time of static placement, Lina and an ideal balanced gate."""
    profile = split_batches(workload.trace, workload.profile_tokens)[0]
    served = split_batches(workload.trace, workload.tokens_per_batch)[
        workload.profile_tokens // workload.tokens_per_batch :
    ]
    estimator = build_path_estimator(profile, 3)
    shapes = replace(LINA_MOE, num_layers=workload.layers)
    setup = InferenceSetup(shapes, cluster, compute, context_tokens=512, host_link_bytes_s=25e9)
    free_swaps = replace(setup, host_link_bytes_s=float("inf"))
    times: dict[str, list[float]] = {policy: [] for policy in ("static", "lina", "ideal", "lina_free_swaps")}
    replanned, imbalance, swapped = 0, [], []
    for batch in served:
        for policy in ("static", "lina", "ideal"):
            result = inference_batch(batch, setup, policy, estimator)  # type: ignore[arg-type]
            times[policy].append(result.time_s)
            if policy == "lina":
                replanned += result.replanned
                imbalance.append(float(result.max_over_mean.mean()))
                swapped.append(result.swap_bytes)
        times["lina_free_swaps"].append(inference_batch(batch, free_swaps, "lina", estimator).time_s)
    static, lina, ideal, free = (np.array(times[p]) for p in ("static", "lina", "ideal", "lina_free_swaps"))
    median_speedup = float(np.median(static) / np.median(lina))
    p95_speedup = float(np.percentile(static, 95) / np.percentile(lina, 95))
    lina_vs_ideal = float(np.percentile(lina, 95) / np.percentile(ideal, 95))
    static_vs_ideal = float(np.percentile(static, 95) / np.percentile(ideal, 95))
    replan_share = replanned / (workload.layers * len(served))
    return [
        MEDIAN_SPEEDUP.beside(
            _ratio(median_speedup),
            f"rule: {MEDIAN_SPEEDUP.rule} of the paper. Median batch: static "
            f"{np.median(static) * 1e3:.2f} ms, Lina {np.median(lina) * 1e3:.2f} ms, ideal gate "
            f"{np.median(ideal) * 1e3:.2f} ms; the gain is the hot device's expert compute and receive "
            "traffic spread over replicas, less the swap-ins.",
            {
                "static_ms": (static * 1e3).tolist(),
                "lina_ms": (lina * 1e3).tolist(),
                "ideal_ms": (ideal * 1e3).tolist(),
            },
        ),
        P95_SPEEDUP.beside(
            _ratio(p95_speedup),
            f"rule: {P95_SPEEDUP.rule} of the paper. Our batches differ only by sampling noise around one "
            "popularity per layer (synthetic traces), so the tail is close to the median; Lina's real "
            "batches vary more.",
        ),
        LINA_VS_IDEAL.beside(
            _ratio(lina_vs_ideal),
            f"rule: {LINA_VS_IDEAL.rule} of the paper (Table 5, path length 3). Static is "
            f"{static_vs_ideal:.2f}x the ideal. Lina swaps in {np.mean(swapped) / 1e9:.1f} GB of experts "
            "per batch; with free swap-ins it would be "
            f"{np.percentile(free, 95) / np.percentile(ideal, 95):.2f}x the ideal, "
            "the rest being the imbalance left after packing (max/mean device load "
            f"{np.mean(imbalance):.2f}: whole replicas, at most 4 experts per device). The paper's 1.04 "
            "implies swap-ins hidden almost entirely and a finer balance.",
        ),
        REPLANNED_SHARE.beside(
            Figure.value(replan_share * 100, f"{replan_share * 100:.0f}%"),
            f"rule: {REPLANNED_SHARE.rule}. The synthetic trace keeps each layer's popularity fixed, so the "
            "path estimate's top-2k matches the gate's more (or less) often than real routing does.",
        ),
    ]


def _training_setup(cluster: ClusterSpec, compute: ComputeModel, quick: bool) -> TrainingSetup:
    h = LINA_MOE.hidden_size
    return TrainingSetup(
        shapes=replace(LINA_MOE, num_layers=4 if quick else 12),
        cluster=cluster,
        compute=compute,
        tokens_per_device=4096,
        context_tokens=1024,
        # Per MoE block: its attention and the dense transformer layer beside it (attention + MLP).
        dense_gradient_bytes_per_block=(4 * h * h + 4 * h * h + 8 * h * h) * 2,
        dense_flops_per_token_per_block=2 * (4 * h * h + 8 * h * h) + 4 * h * 1024,
    )


def _training_rows(training: TrainingSetup) -> list[Row]:
    """Training: DeepSpeed (allreduce and all-to-all share ports) vs Lina's priority and partitioning."""
    steps = {v: training_step(training, v) for v in ("deepspeed", "priority", "lina")}
    alone = steps["lina"].forward_a2a_s  # a forward all-to-all shares nothing in any variant
    alone = min(steps["deepspeed"].forward_a2a_s, alone)
    priority_gain = steps["deepspeed"].step_s / steps["priority"].step_s
    lina_gain = steps["deepspeed"].step_s / steps["lina"].step_s
    bwd_gain = steps["deepspeed"].backward_a2a_s / steps["priority"].backward_a2a_s
    slowdown = steps["deepspeed"].backward_a2a_s / alone
    return [
        ALLREDUCE_SLOWDOWN.beside(
            _ratio(slowdown),
            f"rule: {ALLREDUCE_SLOWDOWN.rule}. The allreduce's ring runs on as many channels per port as "
            "the all-to-all has flows, so a shared port splits about evenly under max-min fairness (our "
            "assumption).",
        ),
        PRIORITY_SPEEDUP.beside(
            _ratio(priority_gain),
            f"rule: {PRIORITY_SPEEDUP.rule}. Step: DeepSpeed {steps['deepspeed'].step_s * 1e3:.1f} ms, "
            f"priority {steps['priority'].step_s * 1e3:.1f} ms; the all-to-all waits at most one 30 MB "
            "micro-op, and the allreduce fills the dense backward's compute.",
        ),
        LINA_SPEEDUP.beside(
            _ratio(lina_gain),
            "rule: inside the paper's range over 2-16 experts. Lina step "
            f"{steps['lina'].step_s * 1e3:.1f} ms; chunking the all-to-all overlaps it with the expert "
            "FFN only as far as the FFN is long, and our expert FFN per block is shorter than the "
            "all-to-all.",
            {
                v: {"step_s": s.step_s, "backward_a2a_s": s.backward_a2a_s, "utilisation": s.utilisation}
                for v, s in steps.items()
            },
        ),
        BACKWARD_SPEEDUP.beside(
            _ratio(bwd_gain),
            "rule: inside the paper's range. With priority the all-to-all shares a port only with a "
            "micro-op that was already running when it arrived.",
        ),
    ]


def _settings(workload: _Inference, training: TrainingSetup) -> tuple[str, ...]:
    skews = load_skew(workload.trace)
    return (
        f"16 devices x (100 Gbit/s, 312 TFLOP/s at 50%); {LINA_MOE.name}: hidden {LINA_MOE.hidden_size}, MLP "
        f"experts {LINA_MOE.expert_intermediate_size}, 16 experts, top-2",
        f"inference: {workload.layers} MoE layers, {workload.batches} batches of {workload.tokens_per_batch} "
        f"tokens after a {workload.profile_tokens}-token profile; synthetic Zipf traces skew {LINA_SKEW}, "
        f"correlation {LINA_CORRELATION}: expert skew max/min per layer {skews.min():.1f}-{skews.max():.1f}x "
        f"(median {np.median(skews):.1f}x; the paper: 4.02x with 4 experts, 5.56x with 16); path length 3; "
        "experts swapped in over a 25 GB/s host link (pipelined unless phase 2 re-plans); all-to-alls "
        "shared max-min fairly",
        f"training: {training.shapes.num_layers} MoE blocks, 4096 tokens per device, dense gradients "
        f"{training.dense_gradient_bytes_per_block / 1e6:.1f} MB per block (ring allreduce), micro-ops 30 "
        "MB, all-to-all in 4 chunks for partitioning; balanced routing (training's balancing loss)",
    )


def reproduce_lina(quick: bool = False) -> Reproduction:
    """Lina inference (static vs replication vs ideal gate) and the training step ablation;
    `quick`: fewer layers, batches and tokens."""
    started = time.perf_counter()
    cluster = lina_cluster()
    compute = ComputeModel(efficiency=0.5)
    workload = _inference_workload(quick)
    training = _training_setup(cluster, compute, quick)
    rows = _inference_rows(workload, cluster, compute) + _training_rows(training)
    return Reproduction(
        "lina",
        "Lina: all-to-all first in training, replication in inference",
        _settings(workload, training),
        tuple(rows),
        time.perf_counter() - started,
    )
