"""MoE layer timelines: one model with exclusive placement, and two models colocated (Aurora).

Per MoE layer and model (Aurora's system model): gate G -> dispatch all-to-all N -> expert FFN F
-> combine all-to-all C -> aggregation A. Both all-to-alls are barriers; within one model compute
and communication do not overlap.
- exclusive: G0 N0 F0 C0 A0 G1 ... (Aurora Eq. 1 per layer when the network is "planned":
  max G + N + max F + C + max A).
- colocated, interleaved (Aurora Table 2): each GPU computes in the order G_a, G_b, F_a, F_b,
  A_a, A_b, so one model's all-to-all runs while the other model computes; the two models'
  all-to-alls share the ports when they overlap (fair-share network).
- colocated, sequential: model a's layer, then model b's (time-sharing the GPUs with no overlap,
  as a single-model system such as Lina runs two models).
GPU utilisation = compute time / inference time, per device (mean reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shunter.network.bounds import off_diagonal
from shunter.network.cost import all_to_all_time_s
from shunter.network.transport import TimelineTransport, Transport
from shunter.plan.cluster import ClusterSpec
from shunter.plan.schedule import schedule_all_to_all
from shunter.plan.traffic import combine_traffic, dispatch_traffic, token_home_devices, tokens_per_device
from shunter.shapes import MoEShapes
from shunter.sim.cost import ComputeModel
from shunter.sim.timeline import Collective, Compute, Op, Timeline, TimelineOptions, run_timeline


@dataclass(frozen=True)
class TokenCosts:
    """Per-token costs of one MoE layer: bytes on the wire and FLOPs of each compute op.

    gate_flops_per_token may include the attention block before the router (the work between two
    all-to-alls that is not expert FFN); expert_weight_bytes feeds the roofline floor.
    """

    bytes_per_token: float
    expert_flops_per_token: float
    gate_flops_per_token: float
    aggregation_flops_per_token: float
    expert_weight_bytes: float = 0.0
    gate_weight_bytes: float = 0.0

    @classmethod
    def from_shapes(cls, shapes: MoEShapes, attention_context_tokens: float | None = None) -> TokenCosts:
        """From model shapes; with attention_context_tokens, the attention block joins the gate phase."""
        gate = shapes.gate_flops_per_token
        gate_bytes = shapes.gate_params * shapes.bytes_per_param
        if attention_context_tokens is not None:
            gate += shapes.attention_flops_per_token(attention_context_tokens)
            gate_bytes += shapes.attention_bytes
        return cls(
            bytes_per_token=shapes.token_bytes,
            expert_flops_per_token=shapes.expert_flops_per_token,
            gate_flops_per_token=gate,
            aggregation_flops_per_token=shapes.aggregation_flops_per_token,
            expert_weight_bytes=shapes.expert_bytes,
            gate_weight_bytes=gate_bytes,
        )


@dataclass(frozen=True)
class LayerCosts:
    """One MoE layer of one model on a cluster.

    gate_s [n], expert_s [n], aggregation_s [n]: compute per device. dispatch_bytes [n, n]: the
    dispatch all-to-all (combine is its transpose). all_to_all_s: the time of one all-to-all under
    the chosen transport (dispatch and combine take the same: full-duplex ports, transposed
    traffic), used when the timeline's network is "planned". tokens_processed [n]: routed
    (token, choice) pairs each device's experts process.
    """

    gate_s: np.ndarray
    dispatch_bytes: np.ndarray
    expert_s: np.ndarray
    aggregation_s: np.ndarray
    all_to_all_s: float
    tokens_processed: np.ndarray


def layer_all_to_all_s(
    traffic_bytes: np.ndarray,
    bandwidth_bytes_s: np.ndarray,
    transport: Transport,
    latency_s: float = 0.0,
    seed: int = 0,
) -> float:
    """One all-to-all alone on the network (network.cost.all_to_all_time_s), its planned schedule
    built here by plan.schedule.schedule_all_to_all: the all-to-all time layer_costs uses."""
    matrix = off_diagonal(traffic_bytes)
    if not matrix.any():
        return 0.0
    schedule = schedule_all_to_all(matrix, bandwidth_bytes_s) if transport == "planned" else None
    return all_to_all_time_s(matrix, bandwidth_bytes_s, transport, latency_s, seed, schedule=schedule)


def layer_costs(
    expert_ids: np.ndarray,
    shares: np.ndarray,
    cluster: ClusterSpec,
    costs: TokenCosts,
    compute: ComputeModel,
    transport: Transport | None = "planned",
    latency_s: float = 0.0,
    seed: int = 0,
) -> LayerCosts:
    """Costs of one layer: expert_ids [N, k] of this layer, shares [E, n] of the placement.

    Tokens start evenly spread (plan.traffic: token t on device floor(t n / N)); the gate and the
    aggregation run where a token lives, its experts where the placement sends it. transport
    None skips the all-to-all time (all_to_all_s = nan), for fair-share-only timelines.
    """
    n = cluster.num_devices
    speed = cluster.compute_flop_s
    home_tokens = np.bincount(token_home_devices(expert_ids.shape[0], n), minlength=n).astype(np.float64)
    processed = tokens_per_device(expert_ids, shares)
    experts_here = (np.asarray(shares) > 0).sum(axis=0)
    gate_s = compute.op_time_s(
        "gate", home_tokens, costs.gate_flops_per_token, costs.gate_weight_bytes, speed
    )
    # The roofline floor counts each resident expert's weights once.
    expert_s = compute.op_time_s(
        "expert", processed, costs.expert_flops_per_token, costs.expert_weight_bytes * experts_here, speed
    )
    aggregation_s = compute.op_time_s(
        "aggregation", home_tokens, costs.aggregation_flops_per_token, 0.0, speed
    )
    traffic = dispatch_traffic(expert_ids, shares, costs.bytes_per_token, n)
    a2a = (
        layer_all_to_all_s(traffic, cluster.bandwidth_bytes_s, transport, latency_s, seed)
        if transport is not None
        else float("nan")
    )
    return LayerCosts(gate_s, traffic, expert_s, aggregation_s, a2a, processed)


def exclusive_ops(layers: list[LayerCosts], model: str = "") -> list[Op]:
    """G N F C A per layer, layer after layer, for one model."""
    ops: list[Op] = []
    previous: tuple[str, ...] = ()
    for index, layer in enumerate(layers):
        ops += _layer_ops(layer, f"{model}{index}", previous)
        previous = (f"A{model}{index}",)
    return ops


def _layer_ops(layer: LayerCosts, suffix: str, after: tuple[str, ...]) -> list[Op]:
    planned = None if np.isnan(layer.all_to_all_s) else layer.all_to_all_s
    return [
        Compute(f"G{suffix}", layer.gate_s, after, "gate"),
        Collective.from_traffic(f"N{suffix}", layer.dispatch_bytes, (f"G{suffix}",), planned, "dispatch"),
        Compute(f"F{suffix}", layer.expert_s, (f"N{suffix}",), "expert"),
        Collective.from_traffic(
            f"C{suffix}", combine_traffic(layer.dispatch_bytes), (f"F{suffix}",), planned, "combine"
        ),
        Compute(f"A{suffix}", layer.aggregation_s, (f"C{suffix}",), "aggregation"),
    ]


def colocated_ops(
    layers_a: list[LayerCosts], layers_b: list[LayerCosts], interleaved: bool = True
) -> list[Op]:
    """Two models on the same GPUs, layer l of a beside layer l of b.

    interleaved (Aurora Table 2): per GPU the compute order G_a, G_b, F_a, F_b, A_a, A_b, each
    model's ops waiting only on its own chain, so N_a runs under G_b, N_b under F_a, C_a under F_b,
    C_b under A_a. sequential: a's whole layer, then b's.
    """
    if len(layers_a) != len(layers_b):
        raise ValueError("colocated models need the same number of layers")
    ops: list[Op] = []
    after_a: tuple[str, ...] = ()
    after_b: tuple[str, ...] = ()
    for index, (a, b) in enumerate(zip(layers_a, layers_b, strict=True)):
        if interleaved:
            ga, na, fa, ca, aa = _layer_ops(a, f"a{index}", after_a)
            gb, nb, fb, cb, ab = _layer_ops(b, f"b{index}", after_b)
            ops += [ga, gb, na, nb, fa, fb, ca, cb, aa, ab]
            after_a, after_b = (aa.name,), (ab.name,)
        else:
            ops += _layer_ops(a, f"a{index}", after_b)
            ops += _layer_ops(b, f"b{index}", (f"Aa{index}",))
            after_b = (f"Ab{index}",)
    return ops


def simulate_exclusive(
    layers: list[LayerCosts],
    cluster: ClusterSpec,
    network: TimelineTransport,
    latency_s: float,
) -> Timeline:
    """One model, exclusive placement, every layer in turn."""
    return run_timeline(exclusive_ops(layers), cluster.bandwidth_bytes_s, TimelineOptions(network, latency_s))


def simulate_colocated(
    layers_a: list[LayerCosts],
    layers_b: list[LayerCosts],
    cluster: ClusterSpec,
    interleaved: bool,
    network: TimelineTransport = "fair_share",
    latency_s: float = 0.0,
) -> Timeline:
    """Two colocated models (interleaved per Aurora Table 2, or one after the other)."""
    ops = colocated_ops(layers_a, layers_b, interleaved)
    return run_timeline(ops, cluster.bandwidth_bytes_s, TimelineOptions(network, latency_s))
