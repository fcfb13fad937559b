"""Devices that compute on a few shared cores: processes of emulated hosts on one machine.

SharedCores holds the compute that is running now, one op per device, and advances it as an OS
scheduler's processor sharing does: while k devices have work, each progresses at min(1, cores / k)
of its own speed, so a device computing while the others wait (in a collective) runs at full speed,
and one of four computing at once on two cores at half. Work is counted in seconds of a core to
oneself ("alone" seconds); a finish is an event, as a flow's end is in network.fluid.FluidNetwork.
Used by the timeline engine (TimelineOptions.cores).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np


def shared_rate(cores: float, computing: int) -> float:
    """Share of its own speed each of `computing` devices gets on `cores` shared cores."""
    return min(1.0, cores / computing) if computing > 0 else 1.0


class SharedCores:
    """The compute running on each of num_devices devices, sharing `cores` cores (see module docstring).

    `start` gives a device work (alone seconds) now, `next_event_s` is when the first running work
    ends at the current rate, and `advance` moves the clock there and reports what ended.
    """

    def __init__(self, num_devices: int, cores: float) -> None:
        if not cores > 0:
            raise ValueError(f"cores must be positive, got {cores}")
        self.cores = float(cores)
        self.now_s = 0.0
        self._left = np.zeros(num_devices)  # alone seconds still to do (0: idle)
        self._work = np.zeros(num_devices)  # alone seconds of the running work
        self._tag: list[Hashable | None] = [None] * num_devices

    def running(self, device: int) -> bool:
        return self._tag[device] is not None

    def rate(self) -> float:
        """Speed of every device that computes now, as a share of its own."""
        return shared_rate(self.cores, sum(tag is not None for tag in self._tag))

    def start(self, device: int, work_s: float, tag: Hashable) -> None:
        """Device starts `work_s` alone seconds of work now; `tag` comes back from `advance` at its end."""
        if self.running(device):
            raise AssertionError(f"device {device} is already computing {self._tag[device]!r}")
        if not work_s > 0:
            raise ValueError(f"work must be positive, got {work_s}")
        self._left[device] = self._work[device] = float(work_s)
        self._tag[device] = tag

    def next_event_s(self) -> float:
        """When the first running work ends at the current rate (inf when every device is idle)."""
        busy = [d for d, tag in enumerate(self._tag) if tag is not None]
        if not busy:
            return math.inf
        return self.now_s + float(self._left[busy].min()) / self.rate()

    def advance(self, until_s: float) -> list[tuple[int, Hashable]]:
        """Run the work up to until_s (which must not pass next_event_s); returns (device, tag) of
        each work that ended there."""
        if until_s < self.now_s:
            raise AssertionError("the shared cores cannot go back in time")
        rate = self.rate()
        busy = np.array([tag is not None for tag in self._tag])
        self._left[busy] -= rate * (until_s - self.now_s)
        self.now_s = until_s
        # Event times come from this rate, so an ending work lands on ~0; allow rounding (and a
        # time tolerance: a step below the clock's resolution would never be taken).
        done = busy & ((self._left <= 1e-9 * self._work) | (self._left <= rate * 1e-12 * max(until_s, 1e-6)))
        ended = []
        for device in np.flatnonzero(done).tolist():
            ended.append((device, self._tag[device]))
            self._left[device] = 0.0
            self._tag[device] = None
        return ended
