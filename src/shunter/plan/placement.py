"""Expert placement: Aurora's four cases, and the baselines it is measured against (one room:
the cases share their cost functions and are tested against each other and brute force).

1. exclusive, equal devices: balance expert load over devices (with one expert per device every
   assignment has the same all-to-all bound, so the schedule does the work);
2. exclusive, mixed devices: experts by load onto devices by speed, in order (Aurora Thm 5.1);
3. two models colocated, equal devices: pair expert i of model a with expert partner[i] of model
   b on one device, minimising the largest per-device all-to-all volume: sorted pairing when each
   expert sends what it receives (Thm 6.2), else a bottleneck perfect matching (Case II);
4. colocated, mixed devices (NP-hard): pair as in 3 ignoring devices, bottleneck-match pairs to
   devices, then improve locally by swapping partners and devices; `place_colocated_brute_force`
   is the exact reference for small n.
Baselines: random assignment (RGA), random cross-model pairing (REC), Lina's packing (hottest
with coldest of the same model, two per device).

Volumes are per expert: send_bytes [n] (what the device holding the expert sends in dispatch) and
recv_bytes [n] (what it receives). Per-device time of a colocated pair on device d is
max(send_a + send_b, recv_a + recv_b) / B_d + (flops_a + flops_b) / C_d.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from shunter.errors import ShunterError
from shunter.plan.matching import bottleneck_perfect_matching


@dataclass(frozen=True)
class Placement:
    """Where one model's experts run: shares [E, n] float64, the share of expert e's tokens that
    device d processes (rows sum to 1; exclusive placements are one-hot)."""

    shares: np.ndarray
    strategy: str

    @property
    def num_experts(self) -> int:
        return int(self.shares.shape[0])

    @property
    def num_devices(self) -> int:
        return int(self.shares.shape[1])

    def replicas(self, expert: int) -> np.ndarray:
        """Devices holding a replica of `expert`."""
        return np.flatnonzero(self.shares[expert] > 0)

    def experts_per_device(self) -> np.ndarray:
        """[n] number of expert replicas on each device."""
        return (self.shares > 0).sum(axis=0)

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "experts": [
                {
                    "devices": self.replicas(e).tolist(),
                    "token_shares": [round(float(s), 6) for s in self.shares[e, self.replicas(e)]],
                }
                for e in range(self.num_experts)
            ],
        }


def placement_from_devices(device_of_expert: np.ndarray, num_devices: int, strategy: str) -> Placement:
    """An exclusive placement from device_of_expert [E]."""
    device_of_expert = np.asarray(device_of_expert, dtype=np.int64)
    shares = np.zeros((device_of_expert.shape[0], num_devices))
    shares[np.arange(device_of_expert.shape[0]), device_of_expert] = 1.0
    return Placement(shares, strategy)


def slots_needed(num_experts: int, num_devices: int, max_experts_per_device: int | None) -> int:
    """Experts per device an exclusive placement needs; ShunterError when the devices are too few."""
    needed = -(-num_experts // num_devices)
    if max_experts_per_device is not None and needed > max_experts_per_device:
        raise ShunterError(
            f"fewer devices than the placement needs: {num_experts} experts at most "
            f"{max_experts_per_device} per device need {-(-num_experts // max_experts_per_device)} devices, "
            f"the cluster has {num_devices}"
        )
    return needed


# ---------------------------------------------------------------------------------------------
# exclusive placement (cases 1 and 2)


def place_exclusive(
    tokens_per_expert: np.ndarray,
    seconds_per_token: np.ndarray,
    max_experts_per_device: int | None = None,
) -> Placement:
    """Aurora cases 1 and 2 (and their generalisation to several experts per device).

    Args:
        tokens_per_expert [E]: tokens routed to each expert.
        seconds_per_token [n]: time a device spends per token it processes (moving it in and out
            plus computing it); smaller is faster. Equal for equal devices.
        max_experts_per_device: memory limit in experts, or None for no limit.

    Longest processing time first: experts by load, heaviest first, each onto the device where it
    would finish earliest among those with a free slot. With one expert per device this is exactly
    Aurora's sorted pairing (heaviest expert on the fastest device); on equal devices it balances
    the load, which is what the all-to-all bound max_i max(row_i, col_i) / B depends on.
    """
    load = np.asarray(tokens_per_expert, dtype=np.float64)
    speed_cost = np.asarray(seconds_per_token, dtype=np.float64)
    num_experts, num_devices = load.shape[0], speed_cost.shape[0]
    slots = slots_needed(num_experts, num_devices, max_experts_per_device)
    device_load = np.zeros(num_devices)
    free_slots = np.full(num_devices, slots)
    device_of_expert = np.empty(num_experts, dtype=np.int64)
    # Stable order: heaviest expert first; ties keep expert order, devices tie by index (fastest first).
    device_order = np.argsort(speed_cost, kind="stable")
    for expert in np.argsort(-load, kind="stable"):
        finish = (device_load[device_order] + load[expert]) * speed_cost[device_order]
        finish[free_slots[device_order] == 0] = np.inf
        device = device_order[int(np.argmin(finish))]
        device_of_expert[expert] = device
        device_load[device] += load[expert]
        free_slots[device] -= 1
    homogeneous = bool(np.all(speed_cost == speed_cost[0]))
    return placement_from_devices(
        device_of_expert, num_devices, "balanced (case 1)" if homogeneous else "load-by-speed (case 2)"
    )


def place_random(num_experts: int, num_devices: int, seed: int) -> Placement:
    """RGA baseline: experts dealt to devices in a random order (as evenly as counts allow)."""
    rng = np.random.default_rng(seed)
    slots = np.arange(num_experts) % num_devices
    return placement_from_devices(rng.permutation(slots), num_devices, "random (RGA)")


# ---------------------------------------------------------------------------------------------
# colocated placement (cases 3 and 4)


@dataclass(frozen=True)
class Colocation:
    """Two models on one set of devices: device_of_a [E_a], device_of_b [E_b]."""

    device_of_a: np.ndarray
    device_of_b: np.ndarray
    num_devices: int
    strategy: str

    def placements(self) -> tuple[Placement, Placement]:
        return (
            placement_from_devices(self.device_of_a, self.num_devices, self.strategy),
            placement_from_devices(self.device_of_b, self.num_devices, self.strategy),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "device_of_expert_a": self.device_of_a.tolist(),
            "device_of_expert_b": self.device_of_b.tolist(),
        }


def colocation_cost(
    send_a: np.ndarray, recv_a: np.ndarray, send_b: np.ndarray, recv_b: np.ndarray
) -> np.ndarray:
    """[n, n] h[i, j] = max(send_a[i] + send_b[j], recv_a[i] + recv_b[j]): the bytes the busier
    direction of a device's port carries when it holds expert i of a and expert j of b."""
    return np.maximum(np.add.outer(send_a, send_b), np.add.outer(recv_a, recv_b))


def pair_sorted(volume_a: np.ndarray, volume_b: np.ndarray) -> np.ndarray:
    """Case I (each expert sends what it receives): partner_of_a [n] pairing the lightest expert of
    a with the heaviest of b, and so on (Thm 6.2: minimises max(volume_a[i] + volume_b[partner]))."""
    order_a = np.argsort(volume_a, kind="stable")
    order_b = np.argsort(-np.asarray(volume_b), kind="stable")
    partner = np.empty(len(order_a), dtype=np.int64)
    partner[order_a] = order_b
    return partner


def pair_bottleneck(
    send_a: np.ndarray, recv_a: np.ndarray, send_b: np.ndarray, recv_b: np.ndarray
) -> np.ndarray:
    """Case II: partner_of_a [n] minimising max over devices of colocation_cost (bottleneck
    perfect matching: binary search over the sorted costs + Hopcroft–Karp)."""
    return bottleneck_perfect_matching(colocation_cost(send_a, recv_a, send_b, recv_b)).right_of_left


def pair_brute_force(
    send_a: np.ndarray, recv_a: np.ndarray, send_b: np.ndarray, recv_b: np.ndarray
) -> tuple[np.ndarray, float]:
    """Reference for pair_sorted / pair_bottleneck: (partner_of_a, largest cost) over all n! pairings."""
    cost = colocation_cost(send_a, recv_a, send_b, recv_b)
    n = cost.shape[0]
    permutations = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
    largest = cost[np.arange(n), permutations].max(axis=1)
    best = int(np.argmin(largest))
    return permutations[best], float(largest[best])


def check_colocatable(num_a: int, num_b: int, num_devices: int) -> None:
    """One expert of each model per device: ShunterError when the devices are too few."""
    if max(num_a, num_b) > num_devices:
        raise ShunterError(
            f"fewer devices than the placement needs: colocation puts one expert of each model on a "
            f"device, so {num_a} + {num_b} experts need {max(num_a, num_b)} devices, the cluster has "
            f"{num_devices}"
        )


def _padded(vector: np.ndarray, n: int) -> np.ndarray:
    """Missing experts (a model with fewer experts than devices) are idle experts of volume 0."""
    out = np.zeros(n)
    out[: len(vector)] = vector
    return out


def place_colocated_homogeneous(
    send_a: np.ndarray, recv_a: np.ndarray, send_b: np.ndarray, recv_b: np.ndarray, num_devices: int
) -> Colocation:
    """Case 3: one expert of each model per device; sorted pairing when every expert sends what it
    receives (Case I), bottleneck matching otherwise (Case II). Pair k goes to device k."""
    num_a, num_b = len(send_a), len(send_b)
    check_colocatable(num_a, num_b, num_devices)
    vectors = [
        _padded(np.asarray(v, dtype=np.float64), num_devices) for v in (send_a, recv_a, send_b, recv_b)
    ]
    if np.array_equal(vectors[0], vectors[1]) and np.array_equal(vectors[2], vectors[3]):
        partner, strategy = pair_sorted(vectors[0], vectors[2]), "sorted pairing (case 3, I)"
    else:
        partner, strategy = pair_bottleneck(*vectors), "bottleneck pairing (case 3, II)"
    device_of_b = np.empty(num_devices, dtype=np.int64)
    device_of_b[partner] = np.arange(num_devices)
    return Colocation(np.arange(num_a), device_of_b[:num_b], num_devices, strategy)


@dataclass(frozen=True)
class ColocatedInstance:
    """Everything case 4 needs, per expert and per device.

    send_a, recv_a [n] bytes per expert of model a; flops_a [n] its compute; same for b.
    bandwidth_bytes_s [n], compute_flop_s [n] per device.
    """

    send_a: np.ndarray
    recv_a: np.ndarray
    flops_a: np.ndarray
    send_b: np.ndarray
    recv_b: np.ndarray
    flops_b: np.ndarray
    bandwidth_bytes_s: np.ndarray
    compute_flop_s: np.ndarray

    def time_s(self) -> np.ndarray:
        """[n, n, n] seconds for expert i of a and expert j of b on device d."""
        volume = np.maximum(np.add.outer(self.send_a, self.send_b), np.add.outer(self.recv_a, self.recv_b))
        flops = np.add.outer(self.flops_a, self.flops_b)
        return volume[:, :, None] / self.bandwidth_bytes_s + flops[:, :, None] / self.compute_flop_s

    def largest_time_s(self, partner_of_a: np.ndarray, device_of_a: np.ndarray) -> float:
        """The bottleneck device's time under a full assignment."""
        n = len(partner_of_a)
        volume = (
            np.maximum(self.send_a + self.send_b[partner_of_a], self.recv_a + self.recv_b[partner_of_a])
            / self.bandwidth_bytes_s[device_of_a]
        )
        flops = (self.flops_a + self.flops_b[partner_of_a]) / self.compute_flop_s[device_of_a]
        assert volume.shape == (n,)
        return float((volume + flops).max())


# Random starts of the local search beside the two-stage start (case 4). The search stops in local
# optima; on 300 random instances (n <= 6) the two-stage start alone ends 1.13x above the optimum at
# worst, 4 more starts 1.024x, 16 more 1.022x (docs/planner.md).
COLOCATION_RESTARTS = 8
# Up to this many devices case 4 is solved exactly as a mixed-integer program (n^3 binaries; HiGHS
# takes 10-60 ms at n = 7, 0.5-1.3 s at n = 10-12 and over 5 s at 16 on this machine).
EXACT_COLOCATION_MAX_DEVICES = 8


def place_colocated_heterogeneous(
    instance: ColocatedInstance,
    improve: bool = True,
    restarts: int = COLOCATION_RESTARTS,
    seed: int = 0,
    exact_max_devices: int = EXACT_COLOCATION_MAX_DEVICES,
) -> Colocation:
    """Case 4 heuristic: (1) pair experts with Case II ignoring devices; (2) bottleneck-match pairs
    to devices by the pair's time there (Aurora's two stages); (3, when improve) local search until
    nothing helps: re-place one model's experts exactly given the other's (a bottleneck matching of
    experts to devices, alternating between the models), then swap the bottleneck device's a-expert,
    b-expert or both with another device's while that lowers the larger of the two devices' times
    below the current largest time. The local search also runs from `restarts` random placements
    (seeded by `seed`), and the placement with the smallest largest time is kept. Up to
    `exact_max_devices` devices (with improve) the exact program `place_colocated_exact` is solved
    instead."""
    n = len(instance.send_a)
    if improve and 1 < n <= exact_max_devices:
        return place_colocated_exact(instance)
    partner = pair_bottleneck(instance.send_a, instance.recv_a, instance.send_b, instance.recv_b)
    device_of_pair = _match_pairs_to_devices(instance, partner)
    a_on = np.empty(n, dtype=np.int64)  # a_on[d]: the expert of model a on device d
    a_on[device_of_pair] = np.arange(n)
    b_on = partner[a_on]
    strategy = "two-stage heuristic (case 4)"
    if improve and n > 1:
        devices = np.arange(n)
        a_on, b_on = _improve_locally(instance, a_on, b_on)
        best = float(_time_of(instance, a_on, b_on, devices).max())
        rng = np.random.default_rng(seed)
        for _ in range(restarts):
            a_try, b_try = _improve_locally(instance, rng.permutation(n), rng.permutation(n))
            time = float(_time_of(instance, a_try, b_try, devices).max())
            if time < best * (1 - 1e-12):
                a_on, b_on, best = a_try, b_try, time
        strategy = "two-stage heuristic + local search (case 4)"
    device_of_a, device_of_b = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    device_of_a[a_on] = np.arange(n)
    device_of_b[b_on] = np.arange(n)
    return Colocation(device_of_a, device_of_b, n, strategy)


def _match_pairs_to_devices(instance: ColocatedInstance, partner: np.ndarray) -> np.ndarray:
    """device_of_pair [n]: bottleneck matching of the pairs (a_i, b_partner[i]) to devices."""
    n = len(partner)
    devices = np.arange(n)
    cost = _time_of(instance, np.arange(n)[:, None], partner[:, None], devices[None, :])  # [pair, device]
    return bottleneck_perfect_matching(cost).right_of_left


def _time_of(
    instance: ColocatedInstance, a: np.ndarray | int, b: np.ndarray | int, device: np.ndarray | int
) -> np.ndarray:
    """Seconds for expert a of model a and expert b of model b on `device` (broadcasting)."""
    volume = np.maximum(instance.send_a[a] + instance.send_b[b], instance.recv_a[a] + instance.recv_b[b])
    flops = instance.flops_a[a] + instance.flops_b[b]
    return volume / instance.bandwidth_bytes_s[device] + flops / instance.compute_flop_s[device]


def _improve_locally(
    instance: ColocatedInstance, a_on: np.ndarray, b_on: np.ndarray, max_passes: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    a_on, b_on = a_on.copy(), b_on.copy()
    n = len(a_on)
    devices = np.arange(n)
    for _ in range(max_passes):
        changed = False
        # Exact step: with one model fixed, the other's best placement is a bottleneck matching.
        for side in ("b", "a"):
            worst = float(_time_of(instance, a_on, b_on, devices).max())
            experts = np.arange(n)[:, None]
            if side == "b":
                cost = _time_of(instance, a_on[None, :], experts, devices[None, :])  # [b expert, device]
            else:
                cost = _time_of(instance, experts, b_on[None, :], devices[None, :])  # [a expert, device]
            matching = bottleneck_perfect_matching(cost)
            if matching.bottleneck < worst * (1 - 1e-12):
                (b_on if side == "b" else a_on)[matching.right_of_left] = devices
                changed = True
        # Swap step: lowers the number of devices at the largest time where the exact step ties.
        for _step in range(4 * n):
            times = _time_of(instance, a_on, b_on, devices)
            worst = float(times.max())
            p = int(np.argmax(times))
            best_after, best_move = worst, None
            for move in ("a", "b", "both"):
                # Vectors over q: what devices p and q hold after swapping with q.
                a_at_p = np.full(n, a_on[p]) if move == "b" else a_on
                b_at_p = np.full(n, b_on[p]) if move == "a" else b_on
                a_at_q = a_on if move == "b" else np.full(n, a_on[p])
                b_at_q = b_on if move == "a" else np.full(n, b_on[p])
                after = np.maximum(
                    _time_of(instance, a_at_p, b_at_p, p), _time_of(instance, a_at_q, b_at_q, devices)
                )
                after[p] = np.inf
                q = int(np.argmin(after))
                if after[q] < best_after * (1 - 1e-12):
                    best_after, best_move = float(after[q]), (move, q)
            if best_move is None:
                break
            move, q = best_move
            if move in ("a", "both"):
                a_on[p], a_on[q] = a_on[q], a_on[p]
            if move in ("b", "both"):
                b_on[p], b_on[q] = b_on[q], b_on[p]
            changed = True
        if not changed:
            break
    return a_on, b_on


def place_colocated_exact(instance: ColocatedInstance) -> Colocation:
    """Exact case 4 as a mixed-integer program, solved by HiGHS (scipy.optimize.milp).

    Binary x[a, b, d] = expert a of model a and expert b of model b share device d; each a, each
    b and each device in exactly one triple; minimise z with z >= sum_ab time[a, b, d] x[a, b, d]
    for every device d. n^3 binaries, so only for small n (`EXACT_COLOCATION_MAX_DEVICES`);
    `place_colocated_brute_force` is its reference.
    """
    # imported here, not at the top: scipy's compiled modules turn a Ctrl-C during their import
    # into an ImportError, and every command imports this module at start-up
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    time = instance.time_s()  # [a, b, device]
    n = time.shape[0]
    triples = n**3
    a, b, d = np.unravel_index(np.arange(triples), (n, n, n))
    once_rows = np.concatenate([a, n + b, 2 * n + d])
    once = coo_array(
        (np.ones(3 * triples), (once_rows, np.tile(np.arange(triples), 3))), shape=(3 * n, triples + 1)
    )
    device_time = coo_array(
        (
            np.concatenate([time.ravel(), -np.ones(n)]),
            (np.concatenate([d, np.arange(n)]), np.concatenate([np.arange(triples), np.full(n, triples)])),
        ),
        shape=(n, triples + 1),
    )
    objective = np.zeros(triples + 1)
    objective[-1] = 1.0
    integrality = np.ones(triples + 1)
    integrality[-1] = 0
    result = milp(
        objective,
        constraints=[LinearConstraint(once, 1, 1), LinearConstraint(device_time, -np.inf, 0)],
        integrality=integrality,
        bounds=Bounds(np.zeros(triples + 1), np.r_[np.ones(triples), np.inf]),
    )
    if result.status != 0:  # an assignment always exists, so only a solver failure lands here
        raise RuntimeError(f"case 4 program not solved: {result.message}")
    chosen = np.flatnonzero(result.x[:triples] > 0.5)
    device_of_a, device_of_b = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    device_of_a[a[chosen]] = d[chosen]
    device_of_b[b[chosen]] = d[chosen]
    return Colocation(device_of_a, device_of_b, n, "exact program (case 4)")


def place_colocated_brute_force(instance: ColocatedInstance) -> tuple[Colocation, float]:
    """Exact case 4 by trying every pairing and every device assignment ((n!)^2; n <= 7).
    Returns the best colocation and its largest per-device time (seconds)."""
    n = len(instance.send_a)
    if n > 7:
        raise ValueError("brute force is for n <= 7")
    time = instance.time_s()  # [a, b, device]
    permutations = np.array(list(itertools.permutations(range(n))), dtype=np.int64)  # [P, n]
    rows = np.arange(n)
    best_value, best_partner, best_device = np.inf, permutations[0], permutations[0]
    for partner in permutations:
        per_device = time[rows, partner]  # [pair, device]
        largest = per_device[rows, permutations].max(axis=1)  # [P] over device assignments
        k = int(np.argmin(largest))
        if largest[k] < best_value:
            best_value, best_partner, best_device = float(largest[k]), partner, permutations[k]
    device_of_b = np.empty(n, dtype=np.int64)
    device_of_b[best_partner] = best_device
    return Colocation(best_device.copy(), device_of_b, n, "brute force (case 4)"), best_value


def place_colocated_random(num_a: int, num_b: int, num_devices: int, seed: int) -> Colocation:
    """REC baseline: a random partner in b for each expert of a; pair k on device k."""
    check_colocatable(num_a, num_b, num_devices)
    rng = np.random.default_rng(seed)
    device_of_b = rng.permutation(num_devices)[:num_b]
    return Colocation(np.arange(num_a), device_of_b, num_devices, "random pairing (REC)")


def place_colocated_lina(tokens_a: np.ndarray, tokens_b: np.ndarray, num_devices: int) -> Colocation:
    """Lina's packing as a colocation baseline: each model's hottest expert shares a device with its
    own coldest, the next hottest with the next coldest, two per device; model a takes the first
    devices, model b the rest (an odd expert out shares a device with the other model's)."""
    num_a, num_b = len(tokens_a), len(tokens_b)
    check_colocatable(num_a, num_b, num_devices)
    if num_a + num_b > 2 * num_devices:
        raise ShunterError(
            f"fewer devices than the placement needs: Lina packs two experts per device, "
            f"{num_a + num_b} experts need {-(-(num_a + num_b) // 2)} devices"
        )
    device_of_a, next_device = _pack_hot_with_cold(np.asarray(tokens_a), 0)
    device_of_b, _ = _pack_hot_with_cold(
        np.asarray(tokens_b), next_device, odd_device=(next_device - 1 if num_a % 2 else None)
    )
    return Colocation(device_of_a, device_of_b, num_devices, "Lina packing (hot with cold)")


def _pack_hot_with_cold(
    tokens: np.ndarray, first_device: int, odd_device: int | None = None
) -> tuple[np.ndarray, int]:
    order = np.argsort(-tokens, kind="stable")
    device_of = np.empty(len(tokens), dtype=np.int64)
    device = first_device
    low, high = 0, len(order) - 1
    while low < high:
        device_of[order[low]] = device_of[order[high]] = device
        device += 1
        low, high = low + 1, high - 1
    if low == high:  # the middle expert is left over
        if odd_device is not None:
            device_of[order[low]] = odd_device
        else:
            device_of[order[low]] = device
            device += 1
    return device_of, device
