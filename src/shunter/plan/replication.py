"""Replicating skewed experts: Lina's path-based estimate and packing, and an EPLB-style baseline.

Lina (inference), per layer:
  phase 1, before the gate: estimate each expert's popularity from the paths the batch's tokens
    took through the previous layers (a profile maps a path to a distribution over this layer's
    experts); expert e gets n_e = N * share_e devices' worth of work (N devices); popular experts
    are replicated, unpopular ones share a device, at most 4 per device (first-fit decreasing);
    a replicated expert's tokens are split evenly over its replicas;
  phase 2, after the gate: if the estimated top-2k experts differ from the actual ones, plan again
    from the actual popularity.
EPLB-style baseline (written from DeepSeek's published description, not its code): one replica
per expert, then each further replica to the expert with the highest load per replica; replicas
packed heaviest first onto the least-loaded device that still has a free slot (identical devices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shunter.errors import ShunterError
from shunter.plan.placement import Placement
from shunter.trace.routing_trace import RoutingTrace

MAX_EXPERTS_PER_DEVICE = 4


# ---------------------------------------------------------------------------------------------
# the path-based popularity estimator


@dataclass(frozen=True)
class PathTable:
    """For one layer and one path length: profiled paths and where their tokens went next.

    path_keys [P] int64 sorted: a path (top-1 experts at the previous `length` layers) as one number.
    next_counts: (path_index [Q], expert [Q], count [Q]) sparse counts of this layer's choices.
    path_totals [P]: (token, choice) pairs per path.
    """

    length: int
    path_keys: np.ndarray
    path_index: np.ndarray
    expert: np.ndarray
    count: np.ndarray
    path_totals: np.ndarray


@dataclass(frozen=True)
class PathEstimator:
    """Lina's estimator: tables[layer][length - 1] for length 1..path_length (shorter paths are the
    back-off for paths the profile never saw); marginal [L, E] is the last resort."""

    path_length: int
    num_experts: int
    tables: tuple[tuple[PathTable, ...], ...]
    marginal: np.ndarray


def _path_keys(top1: np.ndarray, layer: int, length: int, num_experts: int) -> np.ndarray:
    """[N] int64 key of each token's path: top-1 experts at layers layer-length .. layer-1."""
    keys = np.zeros(top1.shape[1], dtype=np.int64)
    for previous in range(layer - length, layer):
        keys = keys * num_experts + top1[previous].astype(np.int64)
    return keys


def build_path_estimator(profile: RoutingTrace, path_length: int = 3) -> PathEstimator:
    """Profile a trace: for every layer and path length 1..path_length, count where tokens that
    took each path went next (all k choices)."""
    if path_length < 0:
        raise ShunterError(f"path length must be >= 0, got {path_length}")
    if path_length > 0 and profile.num_experts**path_length >= 2**62:
        raise ShunterError(f"path length {path_length} is too long for {profile.num_experts} experts")
    E = profile.num_experts
    top1 = profile.expert_ids[:, :, 0]
    k = profile.top_k
    marginal = np.zeros((profile.num_layers, E))
    tables = []
    for layer in range(profile.num_layers):
        choices = profile.expert_ids[layer].astype(np.int64)  # [N, k]
        marginal[layer] = np.bincount(choices.ravel(), minlength=E) / max(choices.size, 1)
        per_length = []
        for length in range(1, min(path_length, layer) + 1):
            keys = _path_keys(top1, layer, length, E)
            unique, inverse = np.unique(keys, return_inverse=True)
            pair = np.repeat(inverse, k) * E + choices.ravel()
            pair_unique, pair_count = np.unique(pair, return_counts=True)
            per_length.append(
                PathTable(
                    length=length,
                    path_keys=unique,
                    path_index=pair_unique // E,
                    expert=pair_unique % E,
                    count=pair_count.astype(np.float64),
                    path_totals=np.bincount(inverse, minlength=unique.size).astype(np.float64) * k,
                )
            )
        tables.append(tuple(per_length))
    return PathEstimator(path_length, E, tuple(tables), marginal)


def estimate_popularity(estimator: PathEstimator, batch: RoutingTrace, layer: int) -> np.ndarray:
    """[E] estimated share of the batch's (token, choice) pairs at `layer`, from the paths its tokens
    took through the previous layers only (what is known before this layer's gate runs).

    Each token contributes the profiled distribution of the longest path it shares with the profile.
    """
    E = estimator.num_experts
    if batch.num_experts != E:
        raise ShunterError(f"batch has {batch.num_experts} experts, the profile {E}")
    top1 = batch.expert_ids[:, :, 0]
    expected = np.zeros(E)
    unresolved = np.ones(batch.num_tokens, dtype=bool)
    for table in reversed(estimator.tables[layer] if layer < len(estimator.tables) else ()):
        if table.path_keys.size == 0:
            continue
        keys = _path_keys(top1, layer, table.length, E)
        position = np.searchsorted(table.path_keys, keys)
        position = np.minimum(position, table.path_keys.size - 1)
        known = unresolved & (table.path_keys[position] == keys)
        if not known.any():
            continue
        tokens_per_path = np.bincount(position[known], minlength=table.path_keys.size).astype(np.float64)
        weight = tokens_per_path[table.path_index] * table.count / table.path_totals[table.path_index]
        expected += np.bincount(table.expert, weights=weight, minlength=E)
        unresolved &= ~known
    expected += unresolved.sum() * estimator.marginal[min(layer, estimator.marginal.shape[0] - 1)]
    total = expected.sum()
    return expected / total if total > 0 else np.full(E, 1.0 / E)


# ---------------------------------------------------------------------------------------------
# Lina's packing


def replica_counts(
    share: np.ndarray, num_devices: int, max_experts_per_device: int = MAX_EXPERTS_PER_DEVICE
) -> np.ndarray:
    """[E] int replicas per expert: ceil(n_e) with n_e = N * share_e devices' worth of work, at least 1,
    at most N; trimmed (smallest per-replica load first) to fit max_experts_per_device * N slots."""
    share = np.asarray(share, dtype=np.float64)
    num_experts = share.shape[0]
    if num_experts > max_experts_per_device * num_devices:
        raise ShunterError(
            f"fewer devices than the placement needs: {num_experts} experts at most "
            f"{max_experts_per_device} per device need {-(-num_experts // max_experts_per_device)} devices, "
            f"the cluster has {num_devices}"
        )
    work = num_devices * share
    counts = np.clip(np.ceil(work - 1e-9), 1, num_devices).astype(np.int64)
    while counts.sum() > max_experts_per_device * num_devices:
        per_replica = np.where(counts > 1, work / counts, np.inf)
        counts[int(np.argmin(per_replica))] -= 1
    return counts


def pack_first_fit_decreasing(
    share: np.ndarray,
    counts: np.ndarray,
    num_devices: int,
    max_experts_per_device: int = MAX_EXPERTS_PER_DEVICE,
    device_capacity: np.ndarray | None = None,
) -> Placement:
    """First-fit decreasing: replicas (share_e / counts_e of the work each) largest first, each into
    the first device with room for its work, fewer than max_experts_per_device experts and no
    replica of the same expert; a replica that fits nowhere goes to the device whose load would be
    the smallest fraction of its capacity. Experts predicted to get nothing come last and land on
    the emptiest devices. Token shares: even over an expert's replicas.

    Args:
        share [E]: each expert's share of the layer's work (sums to 1).
        counts [E]: replicas per expert (replica_counts).
        device_capacity [n]: each device's share of the work it should take (sums to 1); default
            1/n each (Lina's identical devices). Devices are filled fastest first.
    """
    share = np.asarray(share, dtype=np.float64)
    num_experts = share.shape[0]
    capacity = (
        np.full(num_devices, 1.0 / num_devices)
        if device_capacity is None
        else np.asarray(device_capacity, dtype=np.float64) / np.sum(device_capacity)
    )
    order = np.argsort(-capacity, kind="stable")  # first fit walks the devices fastest first
    load = np.zeros(num_devices)
    slots = np.zeros(num_devices, dtype=np.int64)
    shares = np.zeros((num_experts, num_devices))
    sizes = np.repeat(share / counts, counts)
    experts = np.repeat(np.arange(num_experts), counts)
    for index in np.argsort(-sizes, kind="stable"):
        expert, size = int(experts[index]), float(sizes[index])
        allowed = (slots[order] < max_experts_per_device) & (shares[expert, order] == 0)
        fits = np.flatnonzero(allowed & (load[order] + size <= capacity[order] * (1 + 1e-9)))
        if size > 0 and fits.size:
            device = int(order[fits[0]])
        else:
            candidates = order[np.flatnonzero(allowed)]
            if candidates.size == 0:
                raise ShunterError(f"cannot place expert {expert}: every device is full")
            filled = (load[candidates] + size) / capacity[candidates]
            device = int(candidates[np.lexsort((slots[candidates], filled))[0]])
        load[device] += size
        slots[device] += 1
        shares[expert, device] = 1.0 / counts[expert]
    return Placement(shares, "Lina replication (FFD)")


def replicate_hot_experts(
    share: np.ndarray,
    num_devices: int,
    max_experts_per_device: int = MAX_EXPERTS_PER_DEVICE,
    device_capacity: np.ndarray | None = None,
) -> Placement:
    """Lina phase 1 from an (estimated or actual) popularity share [E]: replica counts, then FFD."""
    counts = replica_counts(share, num_devices, max_experts_per_device)
    return pack_first_fit_decreasing(share, counts, num_devices, max_experts_per_device, device_capacity)


def top_experts_differ(estimated: np.ndarray, actual: np.ndarray, top_k: int) -> bool:
    """Lina phase 2: do the 2k most popular experts by estimate and in fact differ (as sets)?"""
    count = min(2 * top_k, len(actual))
    top_estimated = set(np.argsort(-estimated, kind="stable")[:count].tolist())
    top_actual = set(np.argsort(-actual, kind="stable")[:count].tolist())
    return top_estimated != top_actual


@dataclass(frozen=True)
class LinaLayerPlan:
    """Lina's plan for one layer: the placement used, and whether phase 2 re-planned."""

    placement: Placement
    estimated_share: np.ndarray
    actual_share: np.ndarray
    replanned: bool


def plan_lina_layer(
    estimator: PathEstimator,
    batch: RoutingTrace,
    layer: int,
    num_devices: int,
    max_experts_per_device: int = MAX_EXPERTS_PER_DEVICE,
    device_capacity: np.ndarray | None = None,
) -> LinaLayerPlan:
    """Phase 1 from the path estimate; phase 2 re-plans from the actual gate output if the top-2k differ."""
    estimated = estimate_popularity(estimator, batch, layer)
    actual = np.bincount(batch.expert_ids[layer].ravel(), minlength=batch.num_experts).astype(np.float64)
    actual /= max(actual.sum(), 1.0)
    replanned = top_experts_differ(estimated, actual, batch.top_k)
    placement = replicate_hot_experts(
        actual if replanned else estimated, num_devices, max_experts_per_device, device_capacity
    )
    return LinaLayerPlan(placement, estimated, actual, replanned)


# ---------------------------------------------------------------------------------------------
# EPLB-style baseline


def eplb_replica_counts(tokens_per_expert: np.ndarray, total_replicas: int) -> np.ndarray:
    """[E] replicas per expert: one each, then every further replica to the expert with the highest
    load per replica (ties: the lower expert id)."""
    load = np.asarray(tokens_per_expert, dtype=np.float64)
    counts = np.ones(load.shape[0], dtype=np.int64)
    for _ in range(total_replicas - load.shape[0]):
        counts[int(np.argmax(load / counts))] += 1
    return counts


def eplb_replicate(tokens_per_expert: np.ndarray, num_devices: int, slots_per_device: int) -> Placement:
    """EPLB-style: num_devices * slots_per_device replicas; every expert one, each further replica to
    the expert with the highest load per replica; then balanced packing (replicas heaviest first,
    each onto the least-loaded device with a free slot). Token shares: even over replicas. As in the
    description, nothing stops two replicas of one expert from landing on the same device."""
    load = np.asarray(tokens_per_expert, dtype=np.float64)
    E = load.shape[0]
    total_slots = num_devices * slots_per_device
    if total_slots < E:
        raise ShunterError(
            f"fewer devices than the placement needs: {E} experts in {slots_per_device} slots per device "
            f"need {-(-E // slots_per_device)} devices, the cluster has {num_devices}"
        )
    counts = eplb_replica_counts(load, total_slots)
    sizes = np.repeat(load / counts, counts)
    experts = np.repeat(np.arange(E), counts)
    device_load = np.zeros(num_devices)
    free = np.full(num_devices, slots_per_device)
    shares = np.zeros((E, num_devices))
    for index in np.argsort(-sizes, kind="stable"):
        open_devices = np.flatnonzero(free > 0)
        device = int(open_devices[np.argmin(device_load[open_devices])])
        device_load[device] += sizes[index]
        free[device] -= 1
        shares[experts[index], device] += 1.0 / counts[experts[index]]
    return Placement(shares, "EPLB-style (greedy replicas + balanced packing)")


def max_over_mean_load(tokens_per_expert: np.ndarray, placement: Placement) -> float:
    """Device load imbalance: max over devices of processed tokens / mean over devices."""
    device_load = np.asarray(tokens_per_expert, dtype=np.float64) @ placement.shares
    mean = device_load.mean()
    return float(device_load.max() / mean) if mean > 0 else 1.0
