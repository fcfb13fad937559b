"""A placement as a runtime consumes it: physical expert slots (compare DeepSeek EPLB's `phy2log`,
`log2phy`, `logcnt`). Slot s holds expert `slot_expert[s]` on device `slot_device[s]` and takes
`slot_share[s]` of that expert's tokens; an exclusive placement has one slot per expert."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shunter.errors import ShunterError

# Shares are written with 6 digits; a reader renormalises each expert's shares to sum to 1.
SHARE_DIGITS = 6


@dataclass(frozen=True, eq=False)
class ExpertSlots:
    """One model's experts in one layer as physical slots.

    slot_device [S] int64, slot_expert [S] int64, slot_share [S] float64 (each expert's shares sum
    to 1); num_experts E, num_devices n. Slots are ordered by expert, then device.
    """

    slot_device: np.ndarray
    slot_expert: np.ndarray
    slot_share: np.ndarray
    num_experts: int
    num_devices: int

    @classmethod
    def from_shares(cls, shares: np.ndarray) -> ExpertSlots:
        """From a Placement's shares [E, n]: one slot per (expert, device) with a positive share."""
        shares = np.asarray(shares, dtype=np.float64)
        experts, devices = np.nonzero(shares > 0)  # row-major: ordered by expert, then device
        return cls(
            devices.astype(np.int64),
            experts.astype(np.int64),
            shares[experts, devices],
            int(shares.shape[0]),
            int(shares.shape[1]),
        )

    @classmethod
    def from_device_of_expert(cls, device_of_expert: np.ndarray, num_devices: int) -> ExpertSlots:
        """An exclusive placement: expert e alone on device_of_expert[e]."""
        devices = np.asarray(device_of_expert, dtype=np.int64)
        return cls(devices, np.arange(devices.size), np.ones(devices.size), int(devices.size), num_devices)

    @property
    def num_slots(self) -> int:
        return int(self.slot_device.size)

    @property
    def replica_count(self) -> np.ndarray:
        """[E] int64 slots per expert (EPLB's logcnt)."""
        return np.bincount(self.slot_expert, minlength=self.num_experts)

    @property
    def is_exclusive(self) -> bool:
        return bool(np.all(self.replica_count == 1))

    def expert_slots(self) -> np.ndarray:
        """[E, X] int64 the slots of each expert, padded with -1 (EPLB's log2phy)."""
        table = np.full((self.num_experts, int(self.replica_count.max(initial=1))), -1, dtype=np.int64)
        filled = np.zeros(self.num_experts, dtype=np.int64)
        for slot, expert in enumerate(self.slot_expert.tolist()):
            table[expert, filled[expert]] = slot
            filled[expert] += 1
        return table

    def shares(self) -> np.ndarray:
        """[E, n] float64 the share of each expert's tokens each device takes (Placement.shares)."""
        out = np.zeros((self.num_experts, self.num_devices))
        np.add.at(out, (self.slot_expert, self.slot_device), self.slot_share)
        return out

    def device_of_expert(self) -> np.ndarray:
        """[E] int64 for an exclusive placement; a ShunterError for a replicated one."""
        if not self.is_exclusive:
            raise ShunterError("placement: replicated experts have no single device")
        out = np.empty(self.num_experts, dtype=np.int64)
        out[self.slot_expert] = self.slot_device
        return out

    def to_dict(self) -> dict[str, list]:
        return {
            "device": self.slot_device.tolist(),
            "expert": self.slot_expert.tolist(),
            "share": [round(float(s), SHARE_DIGITS) for s in self.slot_share],
        }

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExpertSlots)
            and (self.num_experts, self.num_devices) == (other.num_experts, other.num_devices)
            and np.array_equal(self.slot_device, other.slot_device)
            and np.array_equal(self.slot_expert, other.slot_expert)
            and np.allclose(self.slot_share, other.slot_share, rtol=0, atol=10.0**-SHARE_DIGITS)
        )


def read_slots(entry: object, n: int, where: str) -> ExpertSlots:
    """One slot table ({device, expert, share}) on n devices, checked; errors name `where`."""
    try:
        device = np.asarray(entry["device"], dtype=np.int64)  # type: ignore[index]
        expert = np.asarray(entry["expert"], dtype=np.int64)  # type: ignore[index]
        share = np.asarray(entry["share"], dtype=np.float64)  # type: ignore[index]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ShunterError(f"{where}: expected device, expert and share lists of numbers") from None
    if not (device.ndim == expert.ndim == share.ndim == 1) or not (device.size == expert.size == share.size):
        raise ShunterError(f"{where}: device, expert and share must be lists of one length")
    if device.size == 0:
        raise ShunterError(f"{where}: no slots")
    if device.min() < 0 or device.max() >= n:
        raise ShunterError(f"{where}.device: device index outside 0..{n - 1}")
    num_experts = int(expert.max()) + 1
    if expert.min() < 0 or np.any(np.bincount(expert, minlength=num_experts) == 0):
        raise ShunterError(f"{where}.expert: every expert 0..{num_experts - 1} needs at least one slot")
    if not np.all(np.isfinite(share)) or np.any(share <= 0):
        raise ShunterError(f"{where}.share: shares must be positive finite numbers")
    total = np.bincount(expert, weights=share, minlength=num_experts)
    if np.any(np.abs(total - 1) > 1e-3):
        bad = int(np.argmax(np.abs(total - 1)))
        raise ShunterError(f"{where}.share: expert {bad}'s shares sum to {total[bad]:g}, expected 1")
    order = np.lexsort((device, expert))
    share = share / total[expert]  # written with 6 digits: renormalise so every token counts once
    return ExpertSlots(device[order], expert[order], share[order], num_experts, n)


def slots_from_placement(placement: object, mode: str, n: int, where: str) -> tuple[ExpertSlots, ...]:
    """Slots from the placement as `shunter plan` prints it (all that plan version 1 stored): one-hot
    device lists per model when colocated, else per-expert device and token-share lists."""
    if not isinstance(placement, dict):
        raise ShunterError(f"{where}: missing")
    if mode == "colocated":
        return tuple(
            ExpertSlots.from_shares(_one_hot(placement.get(key), n, f"{where}.{key}"))
            for key in ("device_of_expert_a", "device_of_expert_b")
        )
    return (ExpertSlots.from_shares(_expert_shares(placement.get("experts"), n, f"{where}.experts")),)


def _one_hot(devices: object, n: int, where: str) -> np.ndarray:
    if not isinstance(devices, list) or not all(isinstance(d, int) for d in devices) or not devices:
        raise ShunterError(f"{where}: expected a list of device indices")
    if any(not 0 <= d < n for d in devices):
        raise ShunterError(f"{where}: device index outside 0..{n - 1}")
    shares = np.zeros((len(devices), n))
    shares[np.arange(len(devices)), devices] = 1.0
    return shares


def _expert_shares(experts: object, n: int, where: str) -> np.ndarray:
    if not isinstance(experts, list) or not experts:
        raise ShunterError(f"{where}: expected one entry per expert with devices and token_shares")
    shares = np.zeros((len(experts), n))
    for e, entry in enumerate(experts):
        try:
            devices = [int(d) for d in entry["devices"]]
            token_shares = [float(s) for s in entry["token_shares"]]
        except (KeyError, TypeError, ValueError):
            raise ShunterError(f"{where}[{e}]: expected devices and token_shares lists") from None
        if len(devices) != len(token_shares) or not devices:
            raise ShunterError(f"{where}[{e}]: devices and token_shares must have the same, non-zero length")
        if any(not 0 <= d < n for d in devices):
            raise ShunterError(f"{where}[{e}].devices: device index outside 0..{n - 1}")
        if not all(np.isfinite(s) and s > 0 for s in token_shares):
            raise ShunterError(f"{where}[{e}].token_shares: shares must be positive finite numbers")
        shares[e, devices] = token_shares
    # The plan rounds shares to 6 digits; renormalise so every routed token is counted once.
    return shares / shares.sum(axis=1, keepdims=True)
